"""The bench run as a picture: each case's ratio against each peer, as horizontal bars.

``bench/run.py`` calls :func:`write_png` after the cases with what
``common.report`` collected (``RESULTS``, ``TARGETS``, ``OURS``). A bar's
end is ours / peer on a log scale, drawn from 1 (left of 1: einsumgrad is faster);
where the issue sets a target the bar is green when met, red when missed,
and a black tick marks the target; bars without a target are grey.
"""
from __future__ import annotations

import textwrap


def ratios(results: list, targets: list, ours: dict) -> list:
    """The rows to draw, per case in run order: ``(case, [(peer, ratio, target | None)])``.

    Args:
        results: ``(case, contender, seconds)`` as ``common.RESULTS`` holds them.
        targets: ``(case, peer, limit)``: ours / peer must not exceed ``limit``.
        ours: case -> the einsumgrad contender's name.

    Returns:
        each case with a time for ours, with its peers that have a time.
    """
    times: dict = {}
    for case, name, t in results:
        times.setdefault(case, {})[name] = t
    limits = {(case, peer): limit for case, peer, limit in targets}
    rows = []
    for case, by_name in times.items():
        mine = by_name.get(ours.get(case))
        if not mine:
            continue
        bars = [(peer, mine / t, limits.get((case, peer)))
                for peer, t in by_name.items() if peer != ours[case] and t]
        if bars:
            rows.append((case, bars))
    return rows


def write_png(results: list, targets: list, ours: dict, path: str, title: str = "") -> int:
    """Draw the run's ratios into a PNG at ``path``.

    Args:
        results: ``(case, contender, seconds)``, as ``common.RESULTS``.
        targets: ``(case, peer, limit)``, as ``common.TARGETS``.
        ours: case -> ours, as ``common.OURS``.
        path: where the PNG goes.
        title: the figure's title (command, date, machine).

    Returns:
        how many targets were missed.

    Raises:
        ImportError: matplotlib is not installed (``pip install einsumgrad[bench]``).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = ratios(results, targets, ours)
    n_bars = sum(len(bars) for _, bars in rows)
    height = 1.0 + 0.28 * n_bars + 0.42 * len(rows)
    fig, ax = plt.subplots(figsize=(11, max(height, 2.5)))
    y, labels, ticks, missed = 0.0, [], [], 0
    lo, hi = 1.0, 1.0
    for case, bars in rows:
        y -= 0.5  # room for the case's title above its bars
        ax.text(0.0, y + 0.15, textwrap.shorten(case, 110), transform=ax.get_yaxis_transform(),
                fontsize=8.5, fontweight="bold", va="center", ha="left")
        y -= 0.55
        for peer, r, limit in bars:
            color = "0.65" if limit is None else ("tab:green" if r <= limit else "tab:red")
            missed += limit is not None and r > limit
            ax.barh(y, r - 1.0, height=0.7, color=color, left=1.0)  # from 1: which side wins
            if r >= 1.0:  # the figure past the bar's end and past the target's tick
                ax.text(max(r, limit or r) * 1.02, y, f"{r:.2f}x", va="center", fontsize=7.5)
            else:
                ax.text(min(r, limit or r) / 1.02, y, f"{r:.2f}x", va="center", ha="right",
                        fontsize=7.5)
            if limit is not None:
                ax.plot([limit, limit], [y - 0.45, y + 0.45], color="black", lw=2)
                lo, hi = min(lo, limit), max(hi, limit)
            lo, hi = min(lo, r), max(hi, r)
            ticks.append(y)
            labels.append(textwrap.shorten(peer, 40))
            y -= 1.0
    ax.set_xscale("log")
    left, right = max(lo / 2.2, 1e-4), hi * 2.2
    ax.set_xlim(left, right)
    steps = [m * 10.0 ** e for e in range(-4, 5) for m in (1, 2, 5)]
    ax.set_xticks([s for s in steps if left <= s <= right])
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.axvline(1.0, color="0.3", lw=0.8, ls="--")
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels, fontsize=7.5)
    ax.set_ylim(y + 0.3, 0.3)
    ax.set_xlabel("einsumgrad time / peer time (log scale; left of 1 = einsumgrad faster). "
                  "Black tick: target; green: met, red: missed, grey: no target")
    n_targets = sum(limit is not None for _, bars in rows for _, _, limit in bars)
    ax.set_title((textwrap.fill(title, 125) + "\n" if title else "")
                 + f"{n_targets - missed} of {n_targets} targets met", fontsize=9)
    ax.grid(axis="x", color="0.9", lw=0.5)
    ax.set_axisbelow(True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return missed
