"""The README's quick start runs as written and prints what it says."""
import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs_as_written():
    text = README.read_text()
    block = re.search(r"## Quick start\s+```python\n(.*?)```", text, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README quick start", "exec"), {})
    lines = out.getvalue().splitlines()
    assert lines[0] == "ik,jk->ij | ik,ij->jk"
    assert lines[1] == "d,nd->n | diag n->nn"
    assert lines[2] == "(4, 2, 3) (3, 3)"
    assert len(block.strip().splitlines()) <= 17


def test_cli_explain():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "einsumgrad", "explain", "bij,bjk->bik",
                        "--shapes", "2x3x4", "2x4x5"], capture_output=True, text=True, check=True)
    assert "d/dx0: bik,bjk->bij" in r.stdout and "FLOPs" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "einsumgrad", "explain", "ij,jk->ik",
                          "--shapes", "2x3", "4x5"], capture_output=True, text=True)
    assert bad.returncode == 2 and "'j'" in bad.stderr


def test_coming_from_table_code_runs_as_written():
    text = README.read_text()
    block = re.search(r"### Coming from PyTorch, JAX or NumPy.*?```python\n(.*?)```", text,
                      re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README coming from", "exec"), {})
    assert out.getvalue().strip() == "['b', 'w'] (3, 2) (4, 3)"


def test_programs_printout_is_what_print_gives():
    # the README's program listing is the current output of str(Program), letter for letter
    text = README.read_text()
    section = re.search(r"## Programs: trace once.*?\n## ", text, re.S).group(0)
    code, shown = re.search(r"```python\n(.*?)```\s*```text\n(.*?)```", section, re.S).groups()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README programs", "exec"), {})
    assert out.getvalue() == shown
    assert "einsum 'ij,jk->ik' (x, w)" in shown and "einsum 'ik,ij->jk'" in shown
