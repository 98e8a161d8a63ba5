# make setup | demo | test | bench   (a fresh machine needs only python3.11 and pip)
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench bench-graph clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps torchrec==1.8.0
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# The main job: 1M generated Criteo-format rows, every method at two byte budgets, DLRM.
DEMO := runs/demo
demo: setup
	$(VENV)/bin/rectables memory --preset criteo-kaggle --dim 16
	test -f $(DEMO)/criteo_synth.tsv || $(VENV)/bin/rectables synth --rows 1000000 --out $(DEMO)/criteo_synth.tsv --seed 0
	test -f $(DEMO)/prep/meta.json || $(VENV)/bin/rectables preprocess $(DEMO)/criteo_synth.tsv --out $(DEMO)/prep --min-count 2
	$(VENV)/bin/rectables compare --data $(DEMO)/prep --budgets 1/4,1/16 --epochs 2 --out $(DEMO)/compare

test: setup
	$(PY) -m pytest

# Benchmark-only packages (deepctr-torch for the DeepFM comparison), pinned apart from the library's.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) requirements-bench.lock
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-bench.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps deepctr-torch==0.3.0
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) benchmarks/run.py --out BENCHMARKS.md

# NGCF / LightGCN on Gowalla: about 115 minutes on 2 cores (LightGCN full 40 epochs, NGCF full 160 at
# Adam 0.003 divided by 10 after epoch 40, three compressed tables of each model 5 each); replaces
# that section of BENCHMARKS.md
bench-graph: $(BENCH_STAMP)
	$(PY) benchmarks/run.py --only graph --out BENCHMARKS.md

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
