# Two entry points (README.md): `make demo` and `make test`. Both build .venv from the pinned lock file.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install clean

$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -c requirements.lock -e ".[all]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/minsnr train configs/quickstart.yaml
	$(BIN)/python -m minsnr.quickcheck runs/quickstart

test: $(BIN)/.installed
	$(BIN)/pytest -n 2 tests

clean:
	rm -rf $(VENV) runs
