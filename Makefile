# Each target bootstraps .venv on first use; re-running is a no-op while it is current.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: test demo bench compile-report gpu lint clean finetune-table

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --constraint constraints.txt --editable '.[test,lint]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup tests

demo: $(STAMP)
	$(PY) -m clasp demo

bench: $(STAMP)
	$(PY) -m pytest benchmarks -p no:xdist -q -o python_files="bench_*.py"
	$(PY) benchmarks/report.py

# The README's fine-tuning table from a demo folder: make finetune-table DEMO=runs/demo
DEMO ?= runs/demo
finetune-table: $(STAMP)
	$(PY) benchmarks/finetune_table.py --demo $(DEMO) --out $(DEMO)/finetune-table

# Every kernel variant at the benchmark shapes, every kept autotune config, compiled for
# sm_90 and sm_80 without a GPU: registers, spills, shared memory, tensor cores, async copies.
compile-report: $(STAMP)
	$(PY) benchmarks/compile_report.py --jobs $(PYTEST_WORKERS) \
		--json benchmarks/results/compile-report.json > benchmarks/results/compile-report.txt; \
		status=$$?; cat benchmarks/results/compile-report.txt; exit $$status

# On a CUDA machine: kernel tests compiled, then benchmarks, within 8 minutes.
gpu:
	bash benchmarks/gpu.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
