# `make test` builds the virtual environment from nothing and runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch that lies on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: venv test lint demo demo-loop protos clean gpu-check

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]" "$(TORCH)"
	# OpenRLHF's own code for the parity tests of its conventions (its RewardDataset, its HTTP
	# reward client). Without its dependencies (ray, deepspeed, vllm: GBs); its wheel also
	# ships a top-level `tests` package that would shadow ours, so that one is removed.
	$(PIP) install -q --no-deps "openrlhf==0.11.2" "pylatexenc>=2.10"
	rm -rf "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/tests"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q -ra

# Static checks: ruff, configured in pyproject.toml ([tool.ruff]).
lint: venv
	$(PY) -m ruff check .

# The whole RLHF pipeline on the synthetic world (README "The demo"); artifacts in out/demo.
DEMO_OUT ?= out/demo
DEMO_ARGS ?=
demo: venv
	$(PY) -m demo.run --out $(DEMO_OUT) $(DEMO_ARGS)

# The live loop against a frozen RM at beta 0, 3 seeds (README "The live loop": the figures and
# how long it took); artifacts in out/loop. Reuses the seed folders a demo run left there.
LOOP_OUT ?= out/loop
LOOP_ARGS ?=
demo-loop: venv
	$(PY) -m demo.loop --out $(LOOP_OUT) $(LOOP_ARGS)

# On a machine with one CUDA GPU: the `gpu` kernel tests, the kernel timings and a 1B RM served,
# under 10 minutes, into one JSON (bench/RESULTS.md "GPU run"). Build the venv with a CUDA torch:
# `make gpu-check TORCH=torch` (PyPI's Linux x86_64 wheel is a CUDA build). Where pip also sees a
# +cpu wheel (find-links), name a CUDA one: TORCH=torch==2.13.0+cuXYZ, with
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cuXYZ. An existing .venv is reused: a CPU
# one makes the run say "no CUDA device" (make clean first).
GPU_CHECK_OUT ?= out/gpu-check.json
gpu-check: venv
	$(PY) -m bench.gpu_check --out $(GPU_CHECK_OUT)

# Regenerate the gRPC stubs from protos/reward.proto (tests fail when they are stale).
protos: venv
	$(PY) -m protos.generate

clean:
	rm -rf $(VENV) .pytest_cache
