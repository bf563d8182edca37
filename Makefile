# `make train`:     create .venv if missing, install the runtime dependencies, train the embedded default
#                   (CPU, a few minutes). With ARGS="--resume ..." the run's stored config is used, so
#                   no --config is passed.
# `make test`:      create .venv if missing, install the test extra too, run the test suite.
# `make install`:   the development install (the test extra), as `make test` makes it.
# `make status RUN=runs/ID`       the run's status report (status.py; ARGS="--watch 30" etc.)
# `make tensorboard RUN=runs/ID`  TensorBoard on the run's event files
# `make test-gguf`: install the gguf extra too (llama-cpp-python: the first install compiles
#                   llama.cpp, about 17 minutes on 2 cores; pip caches the wheel), run the GGUF tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
CONFIG ?= configs/tiny.yaml
# Stamps: one per extra, named by the pyproject checksum, so a changed pyproject reinstalls and an
# install made for `make test` also satisfies `make train`.
HASH       := $(shell cksum pyproject.toml | cut -d' ' -f1)
STAMP_RUN  := $(VENV)/.installed-run-$(HASH)
STAMP_TEST := $(VENV)/.installed-test-$(HASH)
STAMP_GGUF := $(VENV)/.installed-gguf-$(HASH)
# llama-cpp-python's build: the multimodal (llava/mtmd) library is not needed here.
GGUF_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
RUN_CONFIG := $(if $(findstring --resume,$(ARGS)),,--config $(CONFIG))

.PHONY: install train status tensorboard test test-gguf dry-run clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP_RUN): pyproject.toml | $(PY)
	$(PIP) install --quiet -e .
	rm -f $(VENV)/.installed-run-*
	touch $@

$(STAMP_TEST): pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-run-* $(VENV)/.installed-test-*
	touch $(STAMP_RUN) $@

$(STAMP_GGUF): pyproject.toml | $(PY)
	CMAKE_ARGS="$(GGUF_CMAKE_ARGS)" $(PIP) install --quiet -e '.[test,gguf]'
	rm -f $(VENV)/.installed-run-* $(VENV)/.installed-test-* $(VENV)/.installed-gguf-*
	touch $(STAMP_RUN) $(STAMP_TEST) $@

install: $(STAMP_TEST)

train: $(STAMP_RUN)
	$(PY) train.py $(RUN_CONFIG) $(ARGS)

status: $(STAMP_RUN)
	$(PY) status.py $(or $(RUN),$(error give the run: make status RUN=runs/<run_id>)) $(ARGS)

tensorboard: $(STAMP_RUN)
	$(VENV)/bin/tensorboard --logdir $(or $(RUN),$(error give the run: make tensorboard RUN=runs/<run_id>))/tb $(ARGS)

dry-run: $(STAMP_RUN)
	$(PY) train.py --config configs/bitnet_95m.yaml --dry-run

test: $(STAMP_TEST)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

test-gguf: $(STAMP_GGUF)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 BITNET_REQUIRE_LLAMA_CPP=1 $(PY) -m pytest -q -m gguf $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
