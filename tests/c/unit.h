/*
 * unit.h: a tiny header-only test harness for the C unit tests.
 *
 * Each test program includes this header once, calls its test functions from
 * main() and ends with `return unit_summary();`. CHECK(cond) counts a passed
 * or failed check and prints file:line and the condition on failure, so one
 * run reports every failing check instead of stopping at the first. The
 * summary line reads "N passed, N failed"; the exit status is 1 when any
 * check failed. UNIT_RUN(fn) announces a test function before running it.
 *
 * unit_seconds(s) is a time limit of s seconds times CHIRP_TEST_TIMEOUT_SCALE
 * (default 1), which slow runs set (valgrind, sanitizers: mk/hardening.mk),
 * so a test that waits for something is not failed by the slowdown alone.
 */
#ifndef CH_UNIT_H
#define CH_UNIT_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int unit_passed;
static int unit_failed;

static inline int unit_check(int ok, const char *file, int line, const char *expr)
{
    if (ok) {
        unit_passed++;
    } else {
        unit_failed++;
        fprintf(stderr, "%s:%d: check failed: %s\n", file, line, expr);
    }
    return ok;
}

static inline double unit_seconds(double s)
{
    const char *env = getenv("CHIRP_TEST_TIMEOUT_SCALE");
    double scale = env ? strtod(env, NULL) : 1.0;
    return s * (scale > 0 ? scale : 1.0);
}

/* CHECK evaluates to the truth of cond, so a test can bail out after a
 * failed precondition: if (!CHECK(p != NULL)) return; */
#define CHECK(cond) unit_check(!!(cond), __FILE__, __LINE__, #cond)

/* Integer equality that prints both values on failure. */
#define CHECK_EQ(a, b)                                                                     \
    do {                                                                                   \
        long long unit_a_ = (long long)(a), unit_b_ = (long long)(b);                      \
        if (!unit_check(unit_a_ == unit_b_, __FILE__, __LINE__, #a " == " #b))             \
            fprintf(stderr, "    left %lld, right %lld\n", unit_a_, unit_b_);              \
    } while (0)

/* Byte-wise equality of n bytes. */
#define CHECK_MEM(a, b, n) CHECK(memcmp((a), (b), (n)) == 0)

#define UNIT_RUN(fn)                                                                       \
    do {                                                                                   \
        printf("-- %s\n", #fn);                                                            \
        fn();                                                                              \
    } while (0)

static inline int unit_summary(void)
{
    printf("%d passed, %d failed\n", unit_passed, unit_failed);
    return unit_failed ? 1 : 0;
}

#endif
