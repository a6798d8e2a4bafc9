# Two commands for a newcomer: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU-only machines take the CPU build of torch 2.13.0; machines with an NVIDIA driver take the CUDA build.
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")
STAMP  := $(VENV)/.installed
# Test processes (pytest-xdist): one per core, at most 4 (each holds about 1 GB), each with its share
# of torch's threads (tests/conftest.py). On the 2-core CI machine (2026-11-27) the suite took 417 s
# in two processes, 580 s in two without the thread split, about 700 s in one; it has grown since
# (the README gives the latest time).
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: demo test test-gpu bench bench-smoke report audit clean

$(STAMP): setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" triton numpy tqdm pyyaml pyarrow matplotlib scikit-learn pytest pytest-benchmark pytest-xdist onnxscript onnxruntime
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m interformer demo

# On a machine without a GPU the Triton kernels run under the interpreter (tests/conftest.py sets
# TRITON_INTERPRET=1); GPU-only checks are marked `gpu`.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist worksteal tests

# On a GPU machine: only the checks marked `gpu` (bf16 cases, CUDA graphs, torch.compile with Inductor, ...)
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu tests

bench: $(STAMP)
	$(BIN)/python -m pytest bench -q --benchmark-json=bench/results/latest.json

bench-smoke: $(STAMP)
	$(BIN)/python -m pytest bench -q --benchmark-disable

report: $(STAMP)
	$(BIN)/python bench/report.py bench/results/latest.json

# What every kernel of a fused training step compiles to for an H100 (registers, spills, shared
# memory, occupancy), without a GPU: SHAPE=taobao|amazon|long|smoke
audit: $(STAMP)
	$(BIN)/python profiling/sm90_audit.py --shape $(or $(SHAPE),taobao)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
