# `make train`: create .venv if missing, install, train the embedded default (CPU, a few minutes).
# `make test`:  create .venv if missing, install (with the test extra), run the test suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
CONFIG ?= configs/tiny.yaml

.PHONY: install train test dry-run clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

train: $(STAMP)
	$(PY) train.py --config $(CONFIG) $(ARGS)

dry-run: $(STAMP)
	$(PY) train.py --config configs/bitnet_95m.yaml --dry-run

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
