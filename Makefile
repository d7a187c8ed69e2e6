# Two entry points (README.md), each with its own environment built from its lock file:
#   make demo: .venv-demo, the core dependencies only, CPU torch (requirements-demo.lock)
#   make test: .venv, every extra and the same torch as the GPU benchmarks (requirements.lock): ruff, then pytest
# PIP_ARGS: extra pip options, e.g. an index that serves torch's +cpu wheels where none is found locally.
# --no-compile: byte-compiling all of torch took ~37 s of CPU; Python compiles what the demo imports (~6 s).
PYTHON ?= python3
PIP_ARGS ?=

.PHONY: demo test install clean

.venv-demo/.installed: pyproject.toml requirements-demo.lock
	$(PYTHON) -m venv .venv-demo
	.venv-demo/bin/pip install --quiet --no-compile $(PIP_ARGS) -r requirements-demo.lock -e .
	touch $@

.venv/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv .venv
	.venv/bin/pip install --quiet $(PIP_ARGS) -r requirements.lock -e ".[all]"
	touch $@

install: .venv/.installed

demo: .venv-demo/.installed
	.venv-demo/bin/minsnr train configs/quickstart.yaml
	.venv-demo/bin/python -m minsnr.quickcheck runs/quickstart

test: .venv/.installed
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/pytest -n 2 tests

clean:
	rm -rf .venv .venv-demo runs
