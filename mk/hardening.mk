# mk/hardening.mk: fuzzing and sanitizer targets. Included at the
# end of the main Makefile (`include mk/hardening.mk`), whose CSRCS, CTESTS,
# CFLAGS_C, LIBS_C and sysdeps target it uses.
#
#   make fuzz [FUZZ_SECONDS=60]  libFuzzer on the frame reader and the TLS engine,
#                                each for FUZZ_SECONDS on a fresh copy of its seeds
#   make fuzz-long [FUZZ_RUNS=10000000 FUZZ_JOBS=2]   the long run (not for CI)
#   make ctest-asan              every C unit test under ASan + UBSan (and LSan)
#   make ctest-valgrind          every C unit test under valgrind memcheck
#   make asan [PYTEST_ARGS=...]  the extension built with ASan + UBSan (in build/asan,
#                                the in-place build is untouched) and the whole pytest
#                                suite run against it, child processes included
#   make tsan [TSAN_TESTS=...]   the same with ThreadSanitizer (not in CI)
#   make hardening               what CI adds after the plain suite (`make test`):
#                                ctest-valgrind, fuzz (FUZZ_SECONDS each), asan
#
# Tools missing on the machine are apt-get installed first, like sysdeps does.

FUZZ_SECONDS ?= 60
FUZZ_CC ?= clang
# Debian bookworm: clang is clang 14; libFuzzer and the sanitizer runtimes
# (libclang_rt.fuzzer-x86_64.a) come with libclang-rt-14-dev, which clang
# only recommends.
FUZZ_APT ?= clang libclang-rt-14-dev
FUZZ_DIR := build/fuzz
FUZZ_TARGETS := reader tls
FUZZ_SAN := -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
FUZZ_MAX_LEN_reader := 4096
FUZZ_MAX_LEN_tls := 20000

ASAN_CC ?= $(CC)
ASAN_SAN := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
ASAN_TESTS := $(patsubst build/ctest/%,build/ctest-asan/%,$(CTESTS))

# Time limits of the C tests (tests/c/unit.h unit_seconds) are multiplied by
# these under the slow tools; a test that waits for an event is then not failed
# by the slowdown alone (test_tls_conn's 2 s TIMEOUT once expired under valgrind
# on a loaded machine).
ASAN_SCALE ?= 3
VALGRIND_SCALE ?= 10
VALGRIND := valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite \
	--trace-children=no --suppressions=mk/valgrind.supp

.PHONY: hardening fuzz fuzz-long fuzz-deps fuzz-build fuzz-seeds ctest-asan ctest-valgrind valgrind-deps

# CI (`make test` runs this last). In order, cheapest first; on this 2-core
# machine about 25 s + 2 min + 3.5-5 min (measured; make test in all 10-12 min).
hardening: ctest-valgrind fuzz asan
# fuzz-run-<name> and fuzz-long-<name> are not .PHONY: make skips pattern rules for phony targets.

# ---------------------------------------------------------------- fuzzing ---

# Install clang and libFuzzer unless a trivial fuzz target already links.
fuzz-deps: sysdeps
	@mkdir -p $(FUZZ_DIR)
	@printf 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n) { (void)d; (void)n; return 0; }\n' \
		> $(FUZZ_DIR)/probe.c
	@if ! $(FUZZ_CC) -fsanitize=fuzzer,address,undefined -o $(FUZZ_DIR)/probe $(FUZZ_DIR)/probe.c \
			>/dev/null 2>&1; then \
		echo "installing: $(FUZZ_APT)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(FUZZ_APT); \
	fi

$(FUZZ_DIR)/fuzz_%: tests/fuzz/fuzz_%.c $(CSRCS) $(wildcard csrc/*.h) | fuzz-deps
	$(FUZZ_CC) $(CFLAGS_C) $(FUZZ_SAN) -Icsrc -o $@ $< $(CSRCS) $(LIBS_C)

# The TLS recorder: the same file with a main() that records sessions.
$(FUZZ_DIR)/record_tls: tests/fuzz/fuzz_tls.c $(CSRCS) $(wildcard csrc/*.h) | fuzz-deps
	$(FUZZ_CC) $(CFLAGS_C) -fsanitize=address,undefined -fno-sanitize-recover=all \
		-DFUZZ_TLS_RECORD -Icsrc -o $@ $< $(CSRCS) $(LIBS_C)

fuzz-build: $(addprefix $(FUZZ_DIR)/fuzz_,$(FUZZ_TARGETS)) $(FUZZ_DIR)/record_tls

# Each target runs on a fresh copy of its seeds; the TLS seeds are also
# recorded anew, so they replay with this machine's OpenSSL. A crash, leak,
# sanitizer report or failed invariant makes libFuzzer exit non-zero, which
# fails the target; the input is kept as build/fuzz/crash-<name>-*.
fuzz: $(addprefix fuzz-run-,$(FUZZ_TARGETS))
	@echo "fuzz: no crash in $(FUZZ_TARGETS)"

fuzz-run-%: $(FUZZ_DIR)/fuzz_% $(FUZZ_DIR)/record_tls
	@c=$(FUZZ_DIR)/corpus-$*; rm -rf $$c; mkdir -p $$c; cp tests/fuzz/seeds/$*/* $$c/; \
	if [ $* = tls ]; then $(FUZZ_DIR)/record_tls $$c >/dev/null; fi; \
	echo "== fuzz_$*: $(FUZZ_SECONDS) s on $$(ls $$c | wc -l) seeds, log $(FUZZ_DIR)/fuzz_$*.log"; \
	if ! $< -max_total_time=$(FUZZ_SECONDS) -max_len=$(FUZZ_MAX_LEN_$*) -timeout=25 \
			-print_final_stats=1 -artifact_prefix=$(FUZZ_DIR)/crash-$*- $$c \
			> $(FUZZ_DIR)/fuzz_$*.log 2>&1; then \
		tail -n 60 $(FUZZ_DIR)/fuzz_$*.log; echo "fuzz_$* FAILED"; exit 1; fi; \
	grep -E '^#[0-9]+[[:space:]]+DONE|^stat::(number_of_executed_units|average_exec_per_sec)' \
		$(FUZZ_DIR)/fuzz_$*.log

# A long run outside CI: FUZZ_RUNS executions per harness, split over
# FUZZ_JOBS processes that share build/fuzz/long-<name>/corpus (kept between
# runs). Prints the total; fails when any job left a crash-* input.
FUZZ_RUNS ?= 10000000
FUZZ_JOBS ?= 2
fuzz-long: $(addprefix fuzz-long-,$(FUZZ_TARGETS))

fuzz-long-%: $(FUZZ_DIR)/fuzz_% $(FUZZ_DIR)/record_tls
	@d=$(FUZZ_DIR)/long-$*; mkdir -p $$d/corpus; cp -n tests/fuzz/seeds/$*/* $$d/corpus/; \
	rm -f $$d/fuzz-*.log; echo "== fuzz_$*: $(FUZZ_RUNS) runs in $(FUZZ_JOBS) jobs, logs $$d/fuzz-*.log"; \
	cd $$d && ../fuzz_$* -jobs=$(FUZZ_JOBS) -workers=$(FUZZ_JOBS) \
		-runs=$$(( $(FUZZ_RUNS) / $(FUZZ_JOBS) )) -max_len=$(FUZZ_MAX_LEN_$*) -timeout=25 \
		-print_final_stats=1 -artifact_prefix=crash- corpus > main.log 2>&1; \
	grep -h '^stat::number_of_executed_units' fuzz-*.log | \
		awk '{ n += $$2 } END { print "fuzz_$*: " n " executions" }'; \
	if ls crash-* >/dev/null 2>&1; then echo "fuzz_$*: CRASH in $$d"; exit 1; fi

# Rewrite the checked-in seeds (deterministic; TLS seeds depend on OpenSSL).
fuzz-seeds: $(FUZZ_DIR)/record_tls
	python3 tests/fuzz/gen_seeds.py tests/fuzz/seeds/reader
	rm -f tests/fuzz/seeds/tls/*
	$(FUZZ_DIR)/record_tls tests/fuzz/seeds/tls

# ------------------------------------------------------------- sanitizers ---

build/ctest-asan/%: tests/c/%.c $(CSRCS) $(wildcard csrc/*.h) $(wildcard tests/c/*.h)
	@mkdir -p build/ctest-asan
	$(ASAN_CC) $(CFLAGS_C) $(ASAN_SAN) -Icsrc -o $@ $< $(CSRCS) $(LIBS_C)

ctest-asan: sysdeps $(ASAN_TESTS)
	@set -e; for t in $(ASAN_TESTS); do echo "== $$t"; \
		ASAN_OPTIONS=detect_leaks=1 CHIRP_TEST_TIMEOUT_SCALE=$(ASAN_SCALE) \
		UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 $$t; done

# --------------------------------------------------------------- valgrind ---

valgrind-deps:
	@command -v valgrind >/dev/null 2>&1 || { echo "installing: valgrind"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind; }

# The plain builds of `make ctest`. test_tls_conn unshares a network
# namespace and runs `ip` and `openssl` through system(); those children run
# natively (--trace-children=no).
ctest-valgrind: sysdeps valgrind-deps $(CTESTS)
	@set -e; for t in $(CTESTS); do echo "== valgrind $$t"; \
		CHIRP_TEST_TIMEOUT_SCALE=$(VALGRIND_SCALE) $(VALGRIND) $$t; done

# ------------------------------------------------- sanitized Python extension ---
#
# `make asan` builds libchirp._ffi with ASan + UBSan into build/asan/lib
# (build_ffi.py --out; libchirp/_ffi*.so in the source tree is not touched) and
# runs the whole pytest suite on it. The interpreter is build/asan/venv/bin/python,
# a venv (no pip, created in a second) whose start-up hook mk/sanhook.py adds
# .venv's packages and maps `libchirp._ffi` to the ASan build; the rest of
# libchirp is the source tree's. The tests, the examples and the CLI start their
# children as sys.executable, so every child runs that hook too, whatever
# PYTHONPATH it sets (the tests put the source tree first).
#
# Proof that the ASan build is the one loaded: every process that loads
# libchirp._ffi checks /proc/self/maps (the only mapped _ffi*.so is the ASan one,
# libasan is mapped) and appends OK or BAD to build/asan/loads.log; a BAD load
# raises ImportError. The target then fails on any BAD line and unless the log
# shows loads by pytest itself, tests/nodeproc.py, tests/hostproc.py, the CLI
# (python -m libchirp) and examples/, and it checks that the .so really calls
# the ASan runtime (__asan_report_* imports) and that the in-place .so is not it.
#
# CPython is not instrumented, so the ASan runtime is LD_PRELOADed; every
# child inherits that. PYTHONMALLOC=malloc lets ASan see the buffers cffi
# allocates (ffi.new) instead of pymalloc arenas. detect_leaks=0: LeakSanitizer
# would report the interpreter's own never-freed start-up allocations at every
# exit; the C core's leaks are checked by `make ctest-asan` (LSan) and
# `make ctest-valgrind`. UBSan findings abort (-fno-sanitize-recover=all,
# halt_on_error=1). Python's -fwrapv (from sysconfig CFLAGS) would hide signed
# overflow from UBSan and its -DNDEBUG would drop assert(): both are undone.
# Reports go to build/asan/reports/<asan|ubsan>.<pid> (log_path), so a report from
# a child whose test tolerates its death still fails the target; the files are
# printed. Bounds in the tests scale with CHIRP_TEST_TIMEOUT_SCALE
# (tests/conftest.py, tests/c/unit.h). CHIRP_SANITIZER (asan, tsan) tells tests
# which figures a sanitizer distorts beyond scaling (conftest.SANITIZER): the
# ASan allocator keeps freed memory in quarantine (256 MiB) and does not hand
# it back, so RSS does not fall after frees.

SAN_PY_CFLAGS := -O1 -g -UNDEBUG -fno-wrapv -fno-omit-frame-pointer
PYTEST_ARGS ?= tests
# The kinds of process the suite starts; with the whole suite the log must show
# a load by each.
SAN_KINDS := "-m pytest" tests/nodeproc.py tests/hostproc.py "-m libchirp " examples/

# asan. clang, not gcc: gcc 12's libubsan ignores log_path next to libasan and
# writes to stderr, which pytest captures and loses when the process aborts;
# clang's one shared runtime (ASan with UBSan inside) writes both to log_path.
ASAN_PY_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=all
SAN_CC_asan := $(FUZZ_CC)
SAN_CFLAGS_asan := $(SAN_PY_CFLAGS) $(ASAN_PY_FLAGS)
SAN_LDFLAGS_asan := $(ASAN_PY_FLAGS)
SAN_RUNTIME_asan := libclang_rt.asan-x86_64.so
SAN_SYMBOL_asan := __asan_report_load
SAN_TESTS_asan = $(PYTEST_ARGS)
SAN_ENV_asan = PYTHONMALLOC=malloc CHIRP_TEST_TIMEOUT_SCALE=$(ASAN_SCALE) CHIRP_SANITIZER=asan \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:log_path=$(CURDIR)/build/asan/reports/asan \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$(CURDIR)/build/asan/reports/ubsan

# `make tsan` (not in CI): the same with ThreadSanitizer, on TSAN_TESTS (default:
# the whole suite, about 5 min). Feasible with the stock CPython: gcc's libtsan
# LD_PRELOADed into it works (clang 14's libclang_rt.tsan-x86_64.so crashes at
# start-up, even preloaded into /bin/true, on this machine (kernel 6.18), so
# the TSan build uses gcc).
# Interpreter code is not instrumented, so it produces no reports of its own;
# its pthread mutexes are intercepted, and the GIL then orders everything run
# while holding it: races between two Python threads' calls into the core are
# hidden unless both calls overlap (cffi drops the GIL during calls). The
# hand-off that matters is such an overlap: a thread running libuv inside
# ch_loop_drive (without the GIL) against threads submitting commands or
# waiting for the ownership token. Checked to find a race:
# with the lock removed from ch__loop_submit, tests/test_node.py reports it.
# mk/tsan.supp is for reports inside libraries we do not build (libzmq of the
# benchmark test so far).
# Reports go to build/tsan/reports/tsan.<pid>.
TSAN_TESTS ?= tests
TSAN_SCALE ?= 5
SAN_CC_tsan := gcc
SAN_CFLAGS_tsan := $(SAN_PY_CFLAGS) -fsanitize=thread
SAN_LDFLAGS_tsan := -fsanitize=thread
SAN_RUNTIME_tsan := libtsan.so
SAN_SYMBOL_tsan := __tsan_read
SAN_TESTS_tsan = $(TSAN_TESTS)
SAN_ENV_tsan = CHIRP_TEST_TIMEOUT_SCALE=$(TSAN_SCALE) CHIRP_SANITIZER=tsan \
	TSAN_OPTIONS="halt_on_error=0 second_deadlock_stack=1 suppressions=$(CURDIR)/mk/tsan.supp log_path=$(CURDIR)/build/tsan/reports/tsan"

.PHONY: asan tsan

# build/<san>/ready: the sanitizer build of the extension and its venv, whose bin/chirp
# is the command line on that build (the doc snippets run it).
build/%/ready: build_ffi.py mk/sanhook.py $(CSRCS) $(wildcard csrc/*.h) | build fuzz-deps
	@rm -rf build/$*/venv build/$*/ffi-path; mkdir -p build/$*
	CC=$(SAN_CC_$*) CHIRP_CFLAGS="$(SAN_CFLAGS_$*)" CHIRP_LDFLAGS="$(SAN_LDFLAGS_$*)" \
		$(PY) build_ffi.py --out build/$*/lib > build/$*/build.log 2>&1 \
		|| { tail -n 40 build/$*/build.log; exit 1; }
	@so=$$(tail -n 1 build/$*/build.log); test -f "$$so"; \
	$(PY) -m venv --without-pip build/$*/venv; \
	sp=$$(build/$*/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))'); \
	deps=$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))'); \
	cp mk/sanhook.py $$sp/chirp_sanhook.py; \
	echo "import chirp_sanhook; chirp_sanhook.install('$$so', '$$deps', '$(CURDIR)/build/$*/loads.log')" \
		> $$sp/chirp_san.pth; \
	printf '#!%s\nimport sys\nfrom libchirp.cli import main\nsys.exit(main())\n' \
		"$(CURDIR)/build/$*/venv/bin/python" > build/$*/venv/bin/chirp; \
	chmod +x build/$*/venv/bin/chirp; \
	echo "$$so" > build/$*/ffi-path; echo "$*: extension $$so, python build/$*/venv/bin/python"
	@touch $@

# The in-place build first (`build`): .venv and the editable install the venv
# reuses. The same recipe for both sanitizers ($* is asan or tsan).
asan tsan: %: build build/%/ready
	@so=$$(cat build/$*/ffi-path); \
	nm -D --undefined-only $$so | grep -q $(SAN_SYMBOL_$*) || { echo "$*: $$so is not instrumented"; exit 1; }; \
	for f in libchirp/_ffi*.so; do if nm -D --undefined-only $$f | grep -q $(SAN_SYMBOL_$*); then \
		echo "$*: the in-place $$f is a sanitizer build; make clean build"; exit 1; fi; done
	@rm -rf build/$*/reports build/$*/loads.log; mkdir -p build/$*/reports
	@pre=$$($(SAN_CC_$*) -print-file-name=$(SAN_RUNTIME_$*)); test -f "$$pre"; \
	echo "== $*: pytest $(SAN_TESTS_$*) (LD_PRELOAD=$$pre)"; \
	rc=0; LD_PRELOAD="$$pre" $(SAN_ENV_$*) build/$*/venv/bin/python -m pytest -q $(SAN_TESTS_$*) || rc=$$?; \
	fail=0; for r in build/$*/reports/*; do [ -e "$$r" ] || continue; fail=1; \
		echo "== sanitizer report $$r"; cat "$$r"; done; \
	log=build/$*/loads.log; touch $$log; \
	echo "$*: $$(grep -c '^OK' $$log) processes loaded the $* build, $$(grep -c '^BAD' $$log) did not"; \
	if grep '^BAD' $$log; then fail=1; fi; \
	if [ "$(SAN_TESTS_$*)" = tests ]; then for k in $(SAN_KINDS); do \
		grep -q "^OK .*$$k" $$log || { echo "$*: no load by $$k in $$log"; fail=1; }; done; fi; \
	[ $$fail = 0 ] || { echo "$*: sanitizer reports or wrong extension (see above)"; exit 1; }; \
	[ $$rc = 0 ] || { echo "$*: pytest failed ($$rc)"; exit $$rc; }; \
	echo "$*: tests passed, no sanitizer report"
