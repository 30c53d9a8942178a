/*
 * check.h: what the C tests share: CHECK macros that stop at the first failure with
 * fdcast_last_error(), socketpairs, non-blocking reads and a monotonic clock.
 */
#ifndef FDCAST_TEST_CHECK_H
#define FDCAST_TEST_CHECK_H

#include "fdcast.h"

#include <stdio.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static unsigned long checks_run;

#define CHECK(cond)                                                            \
    do {                                                                       \
        checks_run++;                                                          \
        if (!(cond)) {                                                         \
            fprintf(stderr, "%s:%d: FAILED: %s (last error: %s)\n", __FILE__,  \
                    __LINE__, #cond, fdcast_last_error());                     \
            _exit(1);                                                          \
        }                                                                      \
    } while (0)

#define CHECK_EQ(a, b) CHECK((long long)(a) == (long long)(b))
/* A string literal as (pointer, length), without its NUL. */
#define T(s) (s), (sizeof(s) - 1)

static inline void make_pair(int sv[2]) {
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
}

/* Reads what is there now (the peer is non-blocking). */
static inline size_t read_now(int fd, char *buf, size_t cap) {
    ssize_t n = read(fd, buf, cap);
    return n < 0 ? 0 : (size_t)n;
}

static inline double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

#endif
