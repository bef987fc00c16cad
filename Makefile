# `make run` and `make test` each set up .venv (once, and again when the dependencies change).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	$(BIN)/python -c 'from geobatch import run_report, vectorize; vectorize.compile_kernels(); run_report.compile_kernels()'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/geobatch run jobs/example.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/water_mosaic.py --size 20000 --core 1024
	$(BIN)/python bench/plain_floor.py --size 20000 --processes 2

clean:
	rm -rf $(VENV) out
