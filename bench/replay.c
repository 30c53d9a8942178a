/*
 * replay: the CPU a resume costs the thread that calls it. A topic keeps M messages of S
 * bytes (history on); each repetition subscribes one Unix socket with
 * fdcast_subscribe_tail(..., M), which frames and writes all M kept messages to it, and
 * measures that call with CLOCK_THREAD_CPUTIME_ID (user + system: the writevs count). The
 * socket's send buffer holds a whole replay, so nothing waits for the reader; between
 * repetitions (not measured) the fd is forgotten and the reader drained, and every
 * repetition must deliver the same bytes (RAW: exactly M * S), or the run fails.
 *
 * Modes alternate repetition by repetition (RAW, WS_TEXT, SSE, WS_TEXT_ID), so noise falls on
 * all of them alike. Prints a Markdown table: median and minimum µs per replay, against the
 * target of 100 µs for 1,000 messages of 64 bytes.
 *
 *   replay [m=1000] [s=64] [reps=200] [mode=SSE]   (mode: measure that mode alone, for perf)
 */
#define _GNU_SOURCE
#include "common.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fdcast.h"

#define TARGET_US 100.0

struct contender {
    const char *name;
    fdcast_mode mode;
    double *us;
    size_t bytes; /* what one replay delivers, from the first repetition */
};

/* This thread's CPU time (user + system), to the nanosecond: getrusage counts in ticks. */
static double thread_cpu_ns(void) {
    struct timespec ts;
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) != 0) die("clock_gettime: %s", strerror(errno));
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* Reads everything the reader holds (its writer writes nothing more). */
static size_t drain(int fd) {
    static char buf[1 << 16];
    size_t total = 0;
    for (;;) {
        ssize_t r = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        if (r > 0) {
            total += (size_t)r;
            continue;
        }
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return total;
        die("replay: recv: %s", r == 0 ? "EOF" : strerror(errno));
    }
}

int main(int argc, char **argv) {
    long m = opt_long(argc, argv, "m", 1000);
    long s = opt_long(argc, argv, "s", 64);
    long reps = opt_long(argc, argv, "reps", 200);
    if (m < 1 || s < 1 || reps < 1) die("replay: m, s and reps must be positive");

    fdcast *fc = fdcast_new();
    if (fc == NULL) die("replay: fdcast_new failed");
    if (fdcast_set_history(fc, (size_t)m, 0, 0) != 0) die("replay: set_history failed");
    /* A whole replay fits in the outbox too, should the kernel take less than all. */
    if (fdcast_set_outbox_limit(fc, 64u << 20) != 0) die("replay: set_outbox_limit failed");
    static const char topic[] = "replay";
    char *payload = malloc((size_t)s);
    if (payload == NULL) die("replay: out of memory");
    for (long i = 0; i < m; i++) {
        /* Printable, no line break: valid UTF-8 for WS_TEXT and SSE. */
        for (long j = 0; j < s; j++) payload[j] = (char)('a' + (i + j) % 26);
        int64_t rc = fdcast_publish(fc, topic, sizeof topic - 1, payload, (size_t)s);
        if (rc < 0) die("replay: publish: %s", strerror((int)-rc));
    }
    free(payload);

    int pair[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, pair) != 0) die("replay: socketpair: %s", strerror(errno));
    int sndbuf = 8 << 20;
    if (setsockopt(pair[0], SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof sndbuf) != 0)
        setsockopt(pair[0], SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);

    struct contender contenders[] = {
        {"RAW", FDCAST_RAW, NULL, 0},
        {"WS_TEXT", FDCAST_WS_TEXT, NULL, 0},
        {"SSE", FDCAST_SSE, NULL, 0},
        {"WS_TEXT_ID", FDCAST_WS_TEXT_ID, NULL, 0},
    };
    size_t n_contenders = sizeof contenders / sizeof contenders[0];
    const char *only = opt(argc, argv, "mode", "");
    if (*only != '\0') {
        size_t c = 0;
        while (c < n_contenders && strcmp(contenders[c].name, only) != 0) c++;
        if (c == n_contenders) die("replay: no mode %s", only);
        contenders[0] = contenders[c];
        n_contenders = 1;
    }
    for (size_t c = 0; c < n_contenders; c++) {
        contenders[c].us = calloc((size_t)reps, sizeof(double));
        if (contenders[c].us == NULL) die("replay: out of memory");
    }

    for (long r = 0; r < reps; r++) {
        for (size_t c = 0; c < n_contenders; c++) {
            struct contender *k = &contenders[c];
            double t0 = thread_cpu_ns();
            int64_t sub = fdcast_subscribe_tail(fc, topic, sizeof topic - 1, pair[0], k->mode,
                                                (size_t)m);
            double t1 = thread_cpu_ns();
            if (sub < 0) die("replay: subscribe_tail: %s", strerror((int)-sub));
            if (fdcast_pending_bytes(fc, pair[0]) != 0)
                die("replay: the send buffer did not take a whole replay");
            if (fdcast_unsubscribe_fd(fc, pair[0]) != 1) die("replay: unsubscribe_fd");
            size_t got = drain(pair[1]);
            if (r == 0) k->bytes = got;
            if (got == 0 || got != k->bytes ||
                (k->mode == FDCAST_RAW && got != (size_t)(m * s)))
                die("replay: %s delivered %zu bytes, expected %zu", k->name, got,
                    r == 0 ? (size_t)(m * s) : k->bytes);
            k->us[r] = (t1 - t0) / 1e3;
        }
    }

    printf("## 8. Replaying missed messages to one fd\n\n");
    printf("A topic keeps %ld messages of %ld B; `fdcast_subscribe_tail(..., %ld)` replays them\n"
           "all to one Unix socket whose buffer takes them at once (bench/replay.c): CPU of\n"
           "the calling thread (user + system), median of %ld, modes alternating. Target:\n"
           "%.0f µs for 1,000 messages of 64 B; `target / median` > 1 meets it.\n\n",
           m, s, m, reps, TARGET_US);
    printf("| mode | bytes per replay | median µs | min µs | ns per message | target / median |\n");
    printf("|---|---|---|---|---|---|\n");
    for (size_t c = 0; c < n_contenders; c++) {
        struct contender *k = &contenders[c];
        double med = median(k->us, (int)reps); /* sorts: us[0] is the minimum */
        printf("| %s | %zu | %.1f | %.1f | %.0f | %.2f× |\n", k->name, k->bytes, med, k->us[0],
               med * 1000.0 / (double)m, TARGET_US / med);
        free(k->us);
    }
    printf("\n");
    close(pair[0]);
    close(pair[1]);
    fdcast_free(fc);
    return 0;
}
