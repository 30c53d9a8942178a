/*
 * fanout.c: the physical limit of fan-out (benchmark part 1).
 *
 * One process per (transport, N, S): it connects N stream pairs once, starts the receiver
 * threads, then runs every contender `reps` times, alternating (the order rotates each rep),
 * each run sending the same M messages of S bytes to all N fds:
 *
 *   loop      one send(MSG_NOSIGNAL|MSG_DONTWAIT) per message per fd; on EAGAIN poll, retry
 *   coalesce  the same loop sending K messages per send (one buffer of K*S bytes per fd)
 *   coalesce-iov  the same with one sendmsg of K iovecs, one per message (what writev costs)
 *   raw, ws, sse
 *             fdcast_publish per message, immediate, RAW / WS_TEXT / SSE subscribers
 *   corked    fdcast corked, fdcast_flush after every K publishes (RAW)
 *   raw-checked, corked-checked
 *             raw and corked with fdcast_set_fd_check on (an fstat before each write)
 *   raw-history, corked-history
 *             raw and corked with a history of 1000 messages (fdcast_set_history)
 *
 * fdcast runs get a fresh registry, an outbox limit so large that nothing can drop, and the
 * host's side of back-pressure: when queued_bytes passes a high-water mark (checked once per
 * >= 64 deliveries), poll fdcast_fd() and fdcast_dispatch() until it is under half of it.
 * A run's clock starts before the first send and stops when the last receiver has its last
 * byte. Every run is verified: every fd got exactly M frames' bytes, its last frame is message
 * M-1's, and fdcast reports M*N deliveries and no drop. Any failure exits 1. Besides the
 * rate, each run measures the sending thread's CPU time (user + system, RUSAGE_THREAD) per
 * delivery: the cost of the sending side alone, much less sensitive than the rate to what
 * else the machine runs.
 *
 * usage: fanout transport=unix|tcp n=100 s=64 k=16 deliveries=2000000 reps=3 receivers=1
 *               contenders=loop,coalesce,coalesce-iov,raw,ws,sse,corked part=fanout
 * prints one line per contender:
 *   RESULT part=fanout transport=unix n=100 s=64 k=16 m=20000 contender=raw rate=<median
 *   deliveries/s> cpu_ns=<median sender CPU ns per delivery> runs=<each run's rate>
 */
#define _GNU_SOURCE
#include "common.h"
#include "fdcast.h"

#include <poll.h>
#include <sys/uio.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { MAX_CONTENDERS = 12, MAX_REPS = 32 };

typedef struct ctx {
    int n, *tx;
    size_t s;
    uint32_t k, m;
    unsigned char *buf; /* K payloads back to back */
} ctx;

typedef void (*contender_fn)(const ctx *);

static void run_loop(const ctx *c) {
    for (uint32_t m = 0; m < c->m; m++) {
        put_seq(c->buf, m);
        for (int i = 0; i < c->n; i++) send_all(c->tx[i], c->buf, c->s);
    }
}

static void run_coalesce(const ctx *c) {
    for (uint32_t m = 0; m < c->m; m += c->k) {
        for (uint32_t j = 0; j < c->k; j++) put_seq(c->buf + j * c->s, m + j);
        for (int i = 0; i < c->n; i++) send_all(c->tx[i], c->buf, c->k * c->s);
    }
}

/* the same, but one sendmsg of K iovecs (one per message) instead of one contiguous buffer:
 * what a writev-based flush costs the kernel */
static void run_coalesce_iov(const ctx *c) {
    struct iovec iov[1024];
    if (c->k > 1024) die("k > 1024");
    for (uint32_t m = 0; m < c->m; m += c->k) {
        for (uint32_t j = 0; j < c->k; j++) {
            put_seq(c->buf + j * c->s, m + j);
            iov[j] = (struct iovec){.iov_base = c->buf + j * c->s, .iov_len = c->s};
        }
        for (int i = 0; i < c->n; i++) {
            struct iovec left[1024]; /* sendmsg_all consumes its iovecs */
            memcpy(left, iov, c->k * sizeof *iov);
            sendmsg_all(c->tx[i], left, (int)c->k);
        }
    }
}

/* --- fdcast ---------------------------------------------------------------------------------- */

/* What a contender turns on besides its mode. */
enum option { PLAIN, FD_CHECK, HISTORY };

static fdcast *subscribed_registry(const ctx *c, fdcast_mode mode, enum option option) {
    fdcast *fc = fdcast_new();
    if (!fc || fdcast_set_outbox_limit(fc, (size_t)1 << 40) != 0) die("fdcast_new");
    if (option == FD_CHECK && fdcast_set_fd_check(fc, 1) != 0) die("fdcast_set_fd_check");
    if (option == HISTORY && fdcast_set_history(fc, 1000, 0, 0) != 0) die("fdcast_set_history");
    for (int i = 0; i < c->n; i++)
        if (fdcast_subscribe(fc, "t", 1, c->tx[i], mode) <= 0) die("fdcast_subscribe");
    return fc;
}

static uint64_t high_water(const ctx *c) {
    uint64_t per_fd = 2 * (uint64_t)c->k * (c->s + 8);
    if (per_fd < 16384) per_fd = 16384;
    return per_fd * (uint64_t)c->n;
}

static void finish(const ctx *c, fdcast *fc) {
    fc_settle(fc, 0, 0); /* everything out of the outboxes */
    fdcast_stats st;
    fdcast_get_stats(fc, &st);
    if (st.dropped_messages != 0 || st.deliveries != (uint64_t)c->m * (uint64_t)c->n)
        die("fdcast: %llu dropped, %llu deliveries, expected %llu",
            (unsigned long long)st.dropped_messages, (unsigned long long)st.deliveries,
            (unsigned long long)c->m * (unsigned long long)c->n);
    fdcast_free(fc);
}

static void run_fdcast(const ctx *c, fdcast_mode mode, enum option option) {
    fdcast *fc = subscribed_registry(c, mode, option);
    uint64_t high = high_water(c);
    int every = (64 + c->n - 1) / c->n, since = 0;
    for (uint32_t m = 0; m < c->m; m++) {
        put_seq(c->buf, m);
        if (fdcast_publish(fc, "t", 1, c->buf, c->s) != c->n) die("fdcast_publish");
        if (++since == every) {
            since = 0;
            fc_settle(fc, high, high / 2);
        }
    }
    finish(c, fc);
}

static void run_raw(const ctx *c) { run_fdcast(c, FDCAST_RAW, PLAIN); }
static void run_raw_checked(const ctx *c) { run_fdcast(c, FDCAST_RAW, FD_CHECK); }
static void run_raw_history(const ctx *c) { run_fdcast(c, FDCAST_RAW, HISTORY); }
static void run_ws(const ctx *c) { run_fdcast(c, FDCAST_WS_TEXT, PLAIN); }
static void run_sse(const ctx *c) { run_fdcast(c, FDCAST_SSE, PLAIN); }

static void run_corked_with(const ctx *c, enum option option) {
    fdcast *fc = subscribed_registry(c, FDCAST_RAW, option);
    uint64_t high = high_water(c);
    if (fdcast_cork(fc) != 0) die("fdcast_cork");
    for (uint32_t m = 0; m < c->m; m++) {
        put_seq(c->buf, m);
        if (fdcast_publish(fc, "t", 1, c->buf, c->s) != c->n) die("fdcast_publish");
        if ((m + 1) % c->k == 0) {
            if (fdcast_flush(fc) < 0) die("fdcast_flush");
            fc_settle(fc, high, high / 2);
        }
    }
    if (fdcast_uncork(fc) < 0) die("fdcast_uncork");
    finish(c, fc);
}

static void run_corked(const ctx *c) { run_corked_with(c, PLAIN); }
static void run_corked_checked(const ctx *c) { run_corked_with(c, FD_CHECK); }
static void run_corked_history(const ctx *c) { run_corked_with(c, HISTORY); }

/* --- driver ---------------------------------------------------------------------------------- */

static const struct {
    const char *name;
    contender_fn fn;
    enum framing framing;
} CONTENDERS[] = {
    {"loop", run_loop, F_RAW},
    {"coalesce", run_coalesce, F_RAW},
    {"coalesce-iov", run_coalesce_iov, F_RAW},
    {"raw", run_raw, F_RAW},
    {"ws", run_ws, F_WS_TEXT},
    {"sse", run_sse, F_SSE},
    {"corked", run_corked, F_RAW},
    {"raw-checked", run_raw_checked, F_RAW},
    {"corked-checked", run_corked_checked, F_RAW},
    {"raw-history", run_raw_history, F_RAW},
    {"corked-history", run_corked_history, F_RAW},
};
enum { N_KNOWN = sizeof CONTENDERS / sizeof CONTENDERS[0] };

int main(int argc, char **argv) {
    enum transport t = parse_transport(opt(argc, argv, "transport", "unix"));
    int n = (int)opt_long(argc, argv, "n", 100);
    size_t s = (size_t)opt_long(argc, argv, "s", 64);
    uint32_t k = (uint32_t)opt_long(argc, argv, "k", 16);
    long deliveries = opt_long(argc, argv, "deliveries", 2000000);
    int reps = (int)opt_long(argc, argv, "reps", 3);
    int receivers = (int)opt_long(argc, argv, "receivers", 1);
    const char *part = opt(argc, argv, "part", "fanout");
    char list[256];
    snprintf(list, sizeof list, "%s", opt(argc, argv, "contenders", "loop,coalesce,coalesce-iov,raw,ws,sse,corked"));
    if (n < 1 || k < 1 || reps < 1 || reps > MAX_REPS || receivers < 1) die("bad arguments");

    int chosen[MAX_CONTENDERS], nc = 0;
    for (char *save = NULL, *tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        int found = -1;
        for (int i = 0; i < N_KNOWN; i++)
            if (strcmp(CONTENDERS[i].name, tok) == 0) found = i;
        if (found < 0) {
            fprintf(stderr, "fanout: skipping unknown contender %s\n", tok);
            continue;
        }
        if (nc < MAX_CONTENDERS) chosen[nc++] = found;
    }

    /* M: about `deliveries` per run, at least K messages, a multiple of K */
    uint64_t m = (uint64_t)deliveries / (uint64_t)n;
    if (m < k) m = k;
    m = (m + k - 1) / k * k;

    rx_proc *rx = rx_spawn(receivers);
    int *tx = malloc(sizeof(int) * (size_t)n);
    ctx c = {.n = n, .tx = tx, .s = s, .k = k, .m = (uint32_t)m, .buf = malloc(k * s)};
    if (!tx || !c.buf) die("malloc");
    for (uint32_t j = 0; j < k; j++) fill_payload(c.buf + j * s, s, j);
    rx_pairs(rx, t, n, tx);

    double rates[MAX_CONTENDERS][MAX_REPS], cpu[MAX_CONTENDERS][MAX_REPS];
    int failures = 0;
    for (int rep = 0; rep < reps; rep++) {
        for (int j = 0; j < nc; j++) {
            int ci = chosen[(j + rep) % nc];
            rx_arm(rx, 0, n, CONTENDERS[ci].framing, s, NULL, c.m);
            double t0 = now_s(), t1, c0 = thread_cpu_s();
            CONTENDERS[ci].fn(&c);
            cpu[(j + rep) % nc][rep] = (thread_cpu_s() - c0) * 1e9 / ((double)c.m * n);
            char what[128];
            snprintf(what, sizeof what, "fanout %s n=%d s=%zu %s", transport_name(t), n, s,
                     CONTENDERS[ci].name);
            if (rx_finish(rx, c.m - 1, 30, what, &t1) != 0) {
                failures++;
                rates[(j + rep) % nc][rep] = 0;
                continue;
            }
            rates[(j + rep) % nc][rep] = (double)c.m * n / (t1 - t0);
        }
    }
    for (int j = 0; j < nc; j++) {
        char runs[MAX_REPS * 24] = "";
        size_t len = 0;
        for (int rep = 0; rep < reps; rep++)
            len += (size_t)snprintf(runs + len, sizeof runs - len, "%s%.0f", rep ? ";" : "", rates[j][rep]);
        printf("RESULT part=%s transport=%s n=%d s=%zu k=%u m=%u contender=%s rate=%.0f "
               "cpu_ns=%.1f runs=%s\n",
               part, transport_name(t), n, s, k, c.m, CONTENDERS[chosen[j]].name, median(rates[j], reps),
               median(cpu[j], reps), runs);
    }
    return failures ? 1 : 0;
}
