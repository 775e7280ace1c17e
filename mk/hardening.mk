# mk/hardening.mk: fuzzing and sanitizer targets (issue 6). Included at the
# end of the main Makefile (`include mk/hardening.mk`), whose CSRCS, CTESTS,
# CFLAGS_C, LIBS_C and sysdeps target it uses.
#
#   make fuzz [FUZZ_SECONDS=60]  libFuzzer on the frame reader and the TLS engine,
#                                each for FUZZ_SECONDS on a fresh copy of its seeds
#   make fuzz-long [FUZZ_RUNS=10000000 FUZZ_JOBS=2]   the long run (not for CI)
#   make ctest-asan              every C unit test under ASan + UBSan (and LSan)
#   make ctest-valgrind          every C unit test under valgrind memcheck
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

VALGRIND := valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite \
	--trace-children=no --suppressions=mk/valgrind.supp

.PHONY: fuzz fuzz-long fuzz-deps fuzz-build fuzz-seeds ctest-asan ctest-valgrind valgrind-deps
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

build/ctest-asan/%: tests/c/%.c $(CSRCS) $(wildcard csrc/*.h) tests/c/unit.h
	@mkdir -p build/ctest-asan
	$(ASAN_CC) $(CFLAGS_C) $(ASAN_SAN) -Icsrc -o $@ $< $(CSRCS) $(LIBS_C)

ctest-asan: sysdeps $(ASAN_TESTS)
	@set -e; for t in $(ASAN_TESTS); do echo "== $$t"; \
		ASAN_OPTIONS=detect_leaks=1 \
		UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 $$t; done

# --------------------------------------------------------------- valgrind ---

valgrind-deps:
	@command -v valgrind >/dev/null 2>&1 || { echo "installing: valgrind"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind; }

# The plain builds of `make ctest`. test_tls_conn unshares a network
# namespace and runs `ip` and `openssl` through system(); those children run
# natively (--trace-children=no).
ctest-valgrind: sysdeps valgrind-deps $(CTESTS)
	@set -e; for t in $(CTESTS); do echo "== valgrind $$t"; $(VALGRIND) $$t; done
