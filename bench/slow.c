/*
 * slow.c: slow consumers (benchmark part 5).
 *
 * N Unix connections subscribed to one topic (RAW, default outbox limit 1 MiB, policy
 * FDCAST_DROP_MESSAGE); M messages of S bytes. Two scenarios, alternating, `reps` times each,
 * for fdcast immediate and corked (flush every K):
 *
 *   all   every fd is read (by the receiver process): deliveries/s to all N
 *   slow  10% of the fds are never read while publishing (their ends stay in this process):
 *         deliveries/s to the other 90%, and the memory held once the fast ones are done:
 *         queued_bytes and the RSS growth of this process during the run
 *
 * The host's back-pressure counts only the bytes queued for the fast fds (all queued bytes
 * minus fdcast_pending_bytes of the slow ones), so the publisher never waits for the slow. Verified: every fast fd gets every
 * frame; afterwards the slow fds are drained and each must hold whole, intact frames in
 * increasing order, with frames received + dropped_messages = M x slow fds.
 *
 * usage: slow n=1000 s=1024 m=1400 k=16 reps=3 receivers=1
 * prints RESULT part=slow lines.
 */
#define _GNU_SOURCE
#include "common.h"
#include "fdcast.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

enum { MAX_REPS = 32, N_RUNS = 4 };

typedef struct result {
    double rate;
    uint64_t queued, dropped;
    long rss;
} result;

static int n, n_slow, *fast_tx, (*slow_pair)[2];
static size_t s;
static uint32_t m, k;
static rx_proc *rx;

/* drains the slow fds and checks what they got; returns the number of problems */
static int drain_slow(fdcast *fc, const codec *c, uint64_t dropped) {
    rx_fd *r = calloc((size_t)n_slow, sizeof *r);
    struct pollfd *pfd = calloc((size_t)n_slow + 1, sizeof *pfd);
    unsigned char *buf = malloc(1 << 16);
    if (!r || !pfd || !buf) die("malloc");
    for (int i = 0; i < n_slow; i++) {
        rx_reset(&r[i], c, 0);
        r[i].fd = slow_pair[i][1];
        r[i].check_frames = 1;
        pfd[i] = (struct pollfd){.fd = r[i].fd, .events = POLLIN};
    }
    pfd[n_slow] = (struct pollfd){.fd = fdcast_fd(fc), .events = POLLIN};
    for (;;) {
        fdcast_stats st;
        fdcast_get_stats(fc, &st);
        int rc = poll(pfd, (nfds_t)n_slow + 1, st.queued_bytes ? 10000 : 100);
        if (rc < 0 && errno == EINTR) continue;
        if (rc == 0) {
            if (st.queued_bytes) die("slow fds: %llu bytes stuck", (unsigned long long)st.queued_bytes);
            break; /* nothing queued, nothing more to read */
        }
        for (int i = 0; i < n_slow; i++) {
            if (!pfd[i].revents) continue;
            ssize_t got = read(r[i].fd, buf, 1 << 16);
            if (got > 0) rx_consume(&r[i], buf, (size_t)got);
        }
        if (pfd[n_slow].revents && fdcast_dispatch(fc, 0) < 0) die("fdcast_dispatch");
    }
    uint64_t frames = 0;
    int bad = 0;
    for (int i = 0; i < n_slow; i++) {
        frames += r[i].frames;
        if (r[i].bad || r[i].fill) {
            fprintf(stderr, "FAIL slow: slow fd %d: %s\n", i, r[i].bad ? "damaged or reordered frame" : "torn frame");
            bad++;
        }
        free(r[i].tail);
        free(r[i].frame);
    }
    if (frames + dropped != (uint64_t)m * (uint64_t)n_slow) {
        fprintf(stderr, "FAIL slow: slow fds got %llu frames, %llu dropped, expected %llu in all\n",
                (unsigned long long)frames, (unsigned long long)dropped,
                (unsigned long long)m * (unsigned long long)n_slow);
        bad++;
    }
    free(r);
    free(pfd);
    free(buf);
    return bad;
}

/* bytes queued for the fast fds: all queued bytes but the slow fds' */
static uint64_t fast_queued(fdcast *fc, int with_slow) {
    fdcast_stats st;
    fdcast_get_stats(fc, &st);
    uint64_t q = st.queued_bytes;
    for (int i = 0; with_slow && i < n_slow; i++) q -= (uint64_t)fdcast_pending_bytes(fc, slow_pair[i][0]);
    return q;
}

/* The host's back-pressure, blind to the slow fds: above `high` bytes queued for the fast
 * fds, dispatch until at most `low` are. */
static void settle_fast(fdcast *fc, int with_slow, uint64_t high, uint64_t low) {
    uint64_t q = fast_queued(fc, with_slow);
    if (q <= high) return;
    while (q > low) {
        struct pollfd pfd = {.fd = fdcast_fd(fc), .events = POLLIN};
        if (poll(&pfd, 1, 10000) == 0) die("slow: %llu bytes stuck", (unsigned long long)q);
        if (fdcast_dispatch(fc, 0) < 0) die("fdcast_dispatch");
        q = fast_queued(fc, with_slow);
    }
}

/* one run; returns the number of problems */
static int run(int with_slow, int corked, result *out) {
    int n_fast = with_slow ? n - n_slow : n;
    codec c = make_codec(F_RAW, s, NULL);
    fdcast *fc = fdcast_new();
    if (!fc) die("fdcast_new");
    for (int i = 0; i < n_fast; i++)
        if (fdcast_subscribe(fc, "t", 1, fast_tx[i], FDCAST_RAW) <= 0) die("fdcast_subscribe");
    for (int i = 0; with_slow && i < n_slow; i++)
        if (fdcast_subscribe(fc, "t", 1, slow_pair[i][0], FDCAST_RAW) <= 0) die("fdcast_subscribe");
    unsigned char *payload = malloc(s);
    if (!payload) die("malloc");
    fill_payload(payload, s, 0);
    uint64_t high = (uint64_t)n_fast * 32768, low = (uint64_t)n_fast * 8192;
    rx_arm(rx, 0, n_fast, F_RAW, s, NULL, m);
    long rss0 = rss_bytes();
    double t0 = now_s(), t1;
    if (corked && fdcast_cork(fc) != 0) die("fdcast_cork");
    for (uint32_t i = 0; i < m; i++) {
        put_seq(payload, i);
        if (fdcast_publish(fc, "t", 1, payload, s) != n_fast + (with_slow ? n_slow : 0)) die("publish");
        if (corked && (i + 1) % k == 0 && fdcast_flush(fc) < 0) die("fdcast_flush");
        if (!corked || (i + 1) % k == 0) settle_fast(fc, with_slow, high, low);
    }
    if (corked && fdcast_uncork(fc) < 0) die("fdcast_uncork");
    settle_fast(fc, with_slow, 0, 0);
    char what[64];
    snprintf(what, sizeof what, "slow %s %s", corked ? "corked" : "immediate", with_slow ? "slow" : "all");
    int bad = rx_finish(rx, m - 1, 60, what, &t1);
    fdcast_stats st;
    fdcast_get_stats(fc, &st);
    *out = (result){.rate = bad ? 0 : (double)m * n_fast / (t1 - t0), .queued = st.queued_bytes,
                    .dropped = st.dropped_messages, .rss = rss_bytes() - rss0};
    if (with_slow) {
        bad += drain_slow(fc, &c, st.dropped_messages);
    } else if (st.dropped_messages) {
        fprintf(stderr, "FAIL %s: %llu frames dropped\n", what, (unsigned long long)st.dropped_messages);
        bad++;
    }
    fdcast_free(fc);
    free(payload);
    return bad;
}

int main(int argc, char **argv) {
    n = (int)opt_long(argc, argv, "n", 1000);
    s = (size_t)opt_long(argc, argv, "s", 1024);
    m = (uint32_t)opt_long(argc, argv, "m", 1400);
    k = (uint32_t)opt_long(argc, argv, "k", 16);
    int reps = (int)opt_long(argc, argv, "reps", 3);
    n_slow = n / 10;
    if (n < 10 || m < 1 || k < 1 || reps < 1 || reps > MAX_REPS) die("bad arguments");

    rx = rx_spawn((int)opt_long(argc, argv, "receivers", 1));
    fast_tx = malloc(sizeof(int) * (size_t)n);
    slow_pair = malloc(sizeof *slow_pair * (size_t)n_slow);
    if (!fast_tx || !slow_pair) die("malloc");
    rx_pairs(rx, T_UNIX, n, fast_tx);
    for (int i = 0; i < n_slow; i++)
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, slow_pair[i]) != 0)
            die("socketpair");

    static const char *names[N_RUNS] = {"immediate-all", "immediate-slow", "corked-all", "corked-slow"};
    result res[N_RUNS][MAX_REPS];
    int failures = 0;
    for (int rep = 0; rep < reps; rep++)
        for (int j = 0; j < N_RUNS; j++) {
            int ri = (j + rep) % N_RUNS;
            failures += run(ri % 2, ri / 2, &res[ri][rep]);
        }
    for (int ri = 0; ri < N_RUNS; ri++) {
        double rates[MAX_REPS];
        for (int rep = 0; rep < reps; rep++) rates[rep] = res[ri][rep].rate;
        const result *last = &res[ri][reps - 1];
        printf("RESULT part=slow n=%d slow=%d s=%zu m=%u k=%u contender=%s rate=%.0f queued_bytes=%llu "
               "dropped=%llu rss_delta=%ld\n",
               n, ri % 2 ? n_slow : 0, s, m, k, names[ri], median(rates, reps),
               (unsigned long long)last->queued, (unsigned long long)last->dropped, last->rss);
    }
    return failures ? 1 : 0;
}
