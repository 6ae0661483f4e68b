# Each target sets up what it needs in a local .venv, then runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test bench test-gpu bench-gpu clean

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	@touch $@

$(VENV)/.demo: $(VENV)/.core
	$(PIP) -e '.[demo]'
	@touch $@

$(VENV)/.test: $(VENV)/.core
	$(PIP) -e '.[test]'
	@touch $@

demo: $(VENV)/.demo
	$(PY) examples/demo.py

# The core, transforms and nn suites again on the strict stand-in for a GPU
# (einsumgrad/backends/strict.py): any rule or layer that makes data with numpy. fails.
STRICT_SUITES = $(wildcard tests/test_spec.py tests/test_derive.py tests/test_einsum_grads.py \
	tests/test_tensor.py tests/test_ops.py tests/test_transforms*.py tests/test_seeds.py \
	tests/test_nn.py tests/test_optim.py tests/test_strict_backend.py tests/test_kernels.py \
	tests/test_extend.py tests/test_axes.py tests/test_traps.py tests/test_nn_errors.py \
	tests/test_state_dict.py tests/test_surface.py tests/test_grammar.py \
	tests/test_special_values.py tests/test_pytrees.py tests/test_chunks.py tests/test_conv.py \
	tests/test_losses.py tests/test_optim_more.py tests/test_batch_norm.py tests/test_nn_layers.py \
	tests/test_vmap.py tests/test_per_sample.py tests/test_layouts.py tests/test_program.py \
	tests/test_program_passes.py tests/test_program_fuse.py tests/test_program_chunks.py \
	tests/test_attention.py \
	tests/test_jit.py)

test: $(VENV)/.test
	$(PY) -m pytest -q
	EINSUMGRAD_BACKEND=strict $(PY) -m pytest -q -m "not slow" -p no:cacheprovider $(STRICT_SUITES)

$(VENV)/.bench: $(VENV)/.test
	$(PIP) -e '.[test,bench]'
	@touch $@

# As on a user's machine: OpenBLAS at its native kernel (this machine's environment pins it
# for the tests); bench/run.py prints each side's BLAS and kernel and writes bench/latest.png.
bench: $(VENV)/.bench
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) bench/run.py

# On a machine with an NVIDIA GPU: the suites again with CuPy arrays.
$(VENV)/.gpu: $(VENV)/.test
	$(PIP) -e '.[gpu]'
	@touch $@

test-gpu: $(VENV)/.gpu
	EINSUMGRAD_BACKEND=cupy $(PY) -m pytest -q

bench-gpu: $(VENV)/.gpu
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE EINSUMGRAD_BENCH_GPU=1 $(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info
