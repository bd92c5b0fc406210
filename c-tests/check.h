/* A minimal check framework for the C harnesses: every CHECK counts, the summary line is
 * "N passed, M failed", and the exit status is non-zero on any failure. */
#ifndef POSTCOPY_TEST_CHECK_H
#define POSTCOPY_TEST_CHECK_H
#include <stdio.h>
#include <stdlib.h>

static int check_passed, check_failed;

#define CHECK(cond, ...)                                                        \
    do {                                                                        \
        if (cond) {                                                             \
            check_passed++;                                                     \
        } else {                                                                \
            check_failed++;                                                     \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);     \
            fprintf(stderr, __VA_ARGS__);                                       \
            fputc('\n', stderr);                                                \
        }                                                                       \
    } while (0)

#define CHECK_EQ(a, b)                                                          \
    CHECK((long long)(a) == (long long)(b), "%s = %lld, expected %lld", #a,     \
          (long long)(a), (long long)(b))

static inline int check_summary(const char *name)
{
    printf("%s: %d passed, %d failed\n", name, check_passed, check_failed);
    return check_failed ? 1 : 0;
}
#endif
