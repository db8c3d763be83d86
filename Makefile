# The two commands of README.md. Each creates .venv on first use and installs into it once;
# later runs reinstall only when pyproject.toml or constraints.txt changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# constraints.txt pins the torch/torchvision pair known to work here without letting pip pull a newer torch.
PIP_INSTALL := $(PY) -m pip install --quiet --constraint constraints.txt

.PHONY: quickstart test lint clean

quickstart: $(VENV)/.installed
	$(PY) -m launch train --config quickstart

test: $(VENV)/.installed-dev
	$(PY) -m pytest

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check .
	$(PY) -m mypy

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[dali,ray,mlflow]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP_INSTALL) -e '.[dev,dali,deepspeed,ray,mlflow,onnx]'
	touch $@

clean:
	rm -rf $(VENV) runs data .pytest_cache
