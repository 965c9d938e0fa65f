# Two-command setup: `make run` (install + main job on the built-in data), `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= runs/default
ARGS   ?=

.PHONY: install install-test run quick ood distill test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build here.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/interp bigram --out $(OUT) $(ARGS)

quick: install
	$(VENV)/bin/interp bigram --quick --out runs/quick $(ARGS)

ood: install
	$(VENV)/bin/interp ood --out runs/ood $(ARGS)

distill: install
	$(VENV)/bin/interp distill --out runs/distill $(ARGS)

# One pytest worker per core, each test module on one worker (module fixtures built once),
# one torch thread per worker: two processes beat two OpenMP threads on these small models.
test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q --timeout=1200 -n auto --dist loadscope

bench: install
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/bench_masks.py --quick
	$(PY) benchmarks/bench_bigram.py
	$(PY) benchmarks/bench_denormals.py

clean:
	rm -rf $(VENV) runs .pytest_cache
