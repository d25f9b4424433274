# Two commands set up and run everything on a fresh machine:
#   make demo   - install what is missing, start a sandbox cluster and pgsplit in front of it
#   make test   - install what is missing, run the whole test suite (what CI runs)
PYTHON ?= python3

.PHONY: demo test bench install

install:
	./scripts/install.sh

demo: install
	$(PYTHON) -m proxy.cli demo

test: install
	$(PYTHON) -m pytest -q -p no:cacheprovider

bench:
	./scripts/install.sh bench
	$(PYTHON) -m loadtest.bench
