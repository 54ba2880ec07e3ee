# Two commands a newcomer needs: `make demo` and `make test`. Each creates what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every package pinned (runtime, dev, bench, pip, setuptools); regenerate with `make lock`.
LOCK := requirements/lock.txt
# Extras installed into the venv: `make install EXTRAS=dev,bench` adds cryptofeed and profilers.
EXTRAS ?= dev
# How long `make demo` runs, in seconds; DEMO_SECONDS=0 runs until Ctrl-C.
DEMO_SECONDS ?= 30
# `make test-latest`'s throwaway venv (one per checkout; recreated on every run).
LATEST_VENV ?= /tmp/upbit-broker-latest$(subst /,-,$(CURDIR))

# `make test` fails in one line, before installing anything, without a redis-server.
REDIS_HINT := redis-server is not on PATH and the tests start their own: install it \
(Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)

.PHONY: demo test test-fast test-latest lint bench bench-quick install lock require-redis clean

# The install, from the lock: every dependency at its locked version (-c), and the build backend
# too (--build-constraint). pip and setuptools first, so the same pip reads the lock everywhere
# and nothing in the venv is unlocked. Editable: the venv runs the code in this checkout.
# Redone when pyproject.toml or the lock changes; ends with `pip check`.
$(VENV)/.installed-$(EXTRAS): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) --upgrade pip setuptools
	$(BIN)/python -m pip install -q -c $(LOCK) --build-constraint $(LOCK) -e '.[$(EXTRAS)]'
	$(BIN)/python -m pip check
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

# Regenerate requirements/lock.txt and requirements/runtime.txt from the newest releases that
# pyproject.toml admits (throwaway venvs; about a minute). Then `make install` applies it.
lock:
	$(PYTHON) scripts/lock.py

require-redis:
	$(if $(shell command -v redis-server),,$(error $(REDIS_HINT)))

demo: install
	$(BIN)/upbit-broker demo --duration $(DEMO_SECONDS)

# Pytest workers for the fast suite (pytest-xdist): its tests mostly wait on real processes
# and sockets, so two halve its time even on 2 cores. The slow scenarios run one at a time:
# several measure CPU or count frames against the clock of one machine.
TEST_WORKERS ?= 2

# Everything: the fast suite, then the long fault-injection scenarios (marked slow).
test: require-redis install
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS)
	$(BIN)/python -m pytest -q -m slow

# Before every commit: the fast suite only.
test-fast: require-redis install
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS)

# The fast suite on the newest release of every dependency (no lock): finds drift on purpose.
# A throwaway venv, so .venv keeps the locked versions; prints what differs from the lock.
test-latest: require-redis
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip setuptools
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	$(LATEST_VENV)/bin/python -m pip check
	$(PYTHON) scripts/lock.py drift $(LATEST_VENV)/bin/python
	$(LATEST_VENV)/bin/python -m pytest -q -m "not slow" -n $(TEST_WORKERS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: install
	$(BIN)/python -m benchmarks

bench-quick: install
	$(BIN)/python -m benchmarks --quick

clean:
	rm -rf $(VENV) $(LATEST_VENV) .pytest_cache .mypy_cache .ruff_cache
