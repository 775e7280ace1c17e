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

.PHONY: all sysdeps venv build demo test ctest pytest bench bench-kiwi bench-mp clean lint

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
# editable into .venv, which also puts the `chirp` command in .venv/bin.
build: venv
	$(PY) setup.py -q build_ext --inplace
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .

demo: build
	$(PY) examples/demo.py

test: build lint ctest
	$(PY) -m pytest -q tests
	$(MAKE) --no-print-directory hardening

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

clean:
	rm -rf build libchirp/_ffi*.so libchirp/_ffi.c *.egg-info
# docs (Sphinx), hardening (fuzz, ctest-asan, ctest-valgrind, asan, tsan, hardening)
# and load (soak, bench-memory) targets
include mk/docs.mk
include mk/hardening.mk
include mk/load.mk
