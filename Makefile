# libchirp: the two commands a fresh Debian machine needs are `make demo` and `make test`.
# Both install what is missing (apt packages, a .venv with the Python deps) first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PKGS := build-essential python3-dev libuv1-dev libssl-dev pkg-config iproute2 openssl
CC ?= cc
CFLAGS_C := -std=c11 -D_GNU_SOURCE -Wall -Wextra -O2 -g $(shell pkg-config --cflags libuv openssl 2>/dev/null)
LIBS_C := $(shell pkg-config --libs libuv openssl 2>/dev/null)
CSRCS := $(filter-out csrc/chirp_ffi.h,$(wildcard csrc/*.c))
CTESTS := $(patsubst tests/c/%.c,build/ctest/%,$(wildcard tests/c/test_*.c))

.PHONY: all sysdeps testdeps venv build demo test check ctest pytest bench bench-kiwi bench-mp clean lint typecheck

all: build

# System packages: only apt-get what is missing (needs root, as on CI).
sysdeps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	$(PYTHON) -c "import venv, ensurepip" >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(VENV)/.deps: setup.py requirements-dev.txt | sysdeps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: sysdeps $(VENV)/.deps

# Build the CFFI extension in place (libchirp/_ffi*.so) and install the package
# editable into .venv, which also puts the `chirp` command in .venv/bin. The
# compat mode installs a plain .pth path, which mypy follows (the default
# import-hook finder is invisible to it).
build: venv
	$(PY) setup.py -q build_ext --inplace
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=compat

demo: build
	$(PY) examples/demo.py

test: build lint typecheck ctest testdeps
	$(PY) -m pytest -q tests
	$(MAKE) --no-print-directory hardening

# What only the tests need: InfluxDB 1.x for tests/test_timeseries.py (Debian's
# influxdb; tests/influx.py installs it with apt-get when influxd is missing).
testdeps: venv
	$(PY) tests/influx.py install

# The day-to-day check, in a few minutes: lint, the type check (once a
# typecheck target exists), the C tests and the Python suite without the tests
# marked slow; no sanitizers, no fuzzing. `make test` is the full run of CI.
CHECK_PYTEST_ARGS ?= -m "not slow"
check: build lint typecheck ctest
	$(PY) -m pytest -q $(CHECK_PYTEST_ARGS) tests

ctest: sysdeps $(CTESTS)
	@set -e; for t in $(CTESTS); do echo "== $$t"; $$t; done

build/ctest/%: tests/c/%.c $(CSRCS) $(wildcard csrc/*.h) $(wildcard tests/c/*.h)
	@mkdir -p build/ctest
	$(CC) $(CFLAGS_C) -Icsrc -o $@ $< $(CSRCS) $(LIBS_C)

bench-mp: build
	$(PY) benchmarks/mp_bench.py

bench: build
	$(PY) benchmarks/run.py

bench-kiwi: build  # libchirp.kiwi against kiwiPy on a private loopback RabbitMQ (docs/kiwi.md)
	$(PY) benchmarks/kiwi_bench.py

lint: venv
	$(VENV)/bin/ruff check libchirp tests benchmarks examples
	$(VENV)/bin/ruff format --check libchirp tests benchmarks examples

# mypy --strict (settings in pyproject.toml) over the package and the public API
# as users write it (tests/typing_check.py).
typecheck: venv
	$(VENV)/bin/mypy --strict libchirp tests/typing_check.py

clean:
	rm -rf build libchirp/_ffi*.so libchirp/_ffi.c *.egg-info
# docs (Sphinx), hardening (fuzz, ctest-asan, ctest-valgrind, asan, tsan, hardening)
# and load (soak, bench-memory) targets
include mk/docs.mk
include mk/hardening.mk
include mk/load.mk
