# Two commands set up and run everything on a fresh machine:
#   make demo   - install what is missing, start a sandbox cluster and pgsplit in front of it
#   make test   - install what is missing, run the whole test suite (what CI runs)
PYTHON ?= python3
PYTEST = $(PYTHON) -m pytest -q -p no:cacheprovider

# The suite runs on uvloop (what pgsplit runs on); these files run a second time on the
# standard library's loop (PGSPLIT_LOOP=asyncio), so nothing depends on one loop's timing or
# API: the unit tests that run on an event loop, and the integration files that exercise the
# proxy's sockets (framing, flow control, resets, pooling, the admin server).
ASYNCIO_TESTS = \
	tests/unit/test_cutover_logic.py tests/unit/test_lsn.py tests/unit/test_migrate_logic.py \
	tests/unit/test_migrate_wiring.py tests/unit/test_relay_logic.py \
	tests/integration/test_framing.py tests/integration/test_client_stream.py \
	tests/integration/test_faults.py tests/integration/test_backend_faults.py \
	tests/integration/test_session_state.py tests/integration/test_pooling.py \
	tests/integration/test_statement_errors.py tests/integration/test_prepared_bound.py \
	tests/integration/test_admin.py

.PHONY: demo test bench install

install:
	./scripts/install.sh

demo: install
	$(PYTHON) -m proxy.cli demo

# The whole suite runs with the hot path compiled (it fails if the install could not compile
# it); the unit tests run a second time with it as plain Python (PGSPLIT_UNCOMPILED=1), the
# way pgsplit runs where no compiler was at hand.
test: install
	PGSPLIT_LOOP=uvloop PGSPLIT_EXPECT_COMPILED=1 $(PYTEST)
	PGSPLIT_LOOP=asyncio $(PYTEST) $(ASYNCIO_TESTS)
	PGSPLIT_LOOP=uvloop PGSPLIT_UNCOMPILED=1 $(PYTEST) tests/unit

bench:
	./scripts/install.sh bench
	$(PYTHON) -m loadtest.bench
