# make demo : the whole pipeline on the offline demo corpus, outputs in out/demo/
# make test : the test suite
# Both create or reuse .venv. Pin torch with e.g. `make test TORCH=torch==2.13.0`.
PYTHON ?= python3
VENV ?= .venv
PY ?= $(VENV)/bin/python
TORCH ?= torch>=2.5
TEST_PACKAGES ?= pytest>=7 transformers>=4.40 accelerate
PYTEST_ARGS ?= -q

.PHONY: demo test venv clean-demo

$(VENV)/.deps: requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check "$(TORCH)" -r requirements.txt
	touch $@

$(VENV)/.test-deps: $(VENV)/.deps
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check $(TEST_PACKAGES)
	touch $@

venv: $(VENV)/.deps

test: $(VENV)/.test-deps
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS) tests
