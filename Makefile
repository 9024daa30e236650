# drcl_d2: every target sets up its own environment (scripts/setup_env.sh, idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= datasets/embedded_small
OUT ?= output/demo
PYTEST_ARGS ?= -q
# Test processes (pytest-xdist, one file per process). Much of the suite is single-threaded Python
# (LVIS evaluation, json parsing, figures) or waits on the start of the processes it spawns, so
# 2 one-thread processes keep 2 cores busier than 1 two-thread one.
TEST_WORKERS ?= 2
TEST_THREADS ?= $(if $(filter 1,$(TEST_WORKERS)),2,1)

.PHONY: setup demo test bench longtail clean

setup:
	@bash scripts/setup_env.sh

# The main job on the embedded long-tailed dataset (no downloads).
demo: setup
	$(PY) -m drcl_d2.tools.demo --data $(DATA) --output $(OUT)

# The test suite (CPU, real detectron2).
test: setup
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS) tests

# Regenerates the CPU tables of BENCHMARKS.md (GPU rows: benchmarks/bench_pretrain_step.py --device cuda --amp,
# benchmarks/bench_step_ops.py --device cuda).
bench: setup
	$(PY) benchmarks/bench_rebalance.py
	$(PY) benchmarks/bench_mappers.py
	$(PY) benchmarks/bench_pretrain_step.py
	$(PY) benchmarks/bench_losses.py
	$(PY) benchmarks/bench_step_ops.py

# The long-tail results table of BENCHMARKS.md (30 fine-tuning runs; about 90 min on 2 cores).
longtail: setup
	$(PY) benchmarks/longtail_table.py

clean:
	rm -rf output datasets/embedded_* .pytest_cache
