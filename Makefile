# make setup | demo | test | bench   (a fresh machine needs only python3.11 and pip)
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps torchrec==1.8.0
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/rectables memory --preset criteo-kaggle --dim 16

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/run.py --out BENCHMARKS.md

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
