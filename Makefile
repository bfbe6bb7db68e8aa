# jerald-nbk: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.jerald-installed
MPIEXEC := $(VENV)/bin/mpiexec
NPROC_MPI ?= 2
# pytest-xdist workers of the single-process part (0: none). Two on 2 cores: much of a test's time is
# one-threaded (XLA compiles, command lines starting Python), so two halve it where one cannot
TEST_WORKERS ?= 2
PYTEST_ARGS ?=

.PHONY: install demo test test-serial test-mpi bench bench-large lint format clean

# The stamp is rebuilt when the requirements, the pins (constraints.txt), the build recipe or the
# C++ kernels change.
$(STAMP): setup.cfg constraints.txt setup.py pyproject.toml scripts/install_stack.sh src_cpp/cic.cpp
	./scripts/install_stack.sh
	@touch $(STAMP)

## install: build the whole stack into .venv at the versions of constraints.txt (idempotent; wheels cached in ~/.cache/jerald-nbk)
install:
	./scripts/install_stack.sh
	@touch $(STAMP)

## demo: the main job on its embedded default (small end-to-end run: maps, power spectra, plots)
demo: $(STAMP)
	$(VENV)/bin/jerald demo

## test: the whole suite, single process and under mpiexec -n 2
test: $(STAMP) test-serial test-mpi

test-serial: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

test-mpi: $(STAMP)
	$(MPIEXEC) -n $(NPROC_MPI) $(PY) -m pytest -q --with-mpi -m mpi -p no:cacheprovider $(PYTEST_ARGS)

## bench: run the benchmarks, results in benchmarks/results/latest.json
bench: $(STAMP)
	$(PY) -m benchmarks.run

## bench-large: every paper model's training step at SIZE^3 (default 512; e.g. make bench-large SIZE=256), each in its own process, and a few-step `jerald train` (each under an address-space limit of the memory available, so that a step too large fails alone); step time and peak RSS under the "large" key of benchmarks/results/latest.json. Not part of `make test` (at 512^3: ~20 GB and tens of minutes)
SIZE ?= 512
bench-large: $(STAMP)
	$(PY) -m benchmarks.run --large --size $(SIZE)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf build *.egg-info jerald_nbk/*.so .pytest_cache
