/*
 * test_threads.c: one fdcast handle used from many threads at once.
 *
 *  - 4 publisher threads publish numbered WS_BINARY frames (5..304 bytes, so
 *    both the 7-bit and the 16-bit length forms) to one socketpair fd whose
 *    small send buffer forces most frames through the outbox;
 *  - 2 churn threads subscribe/unsubscribe other fds on other topics, publish
 *    to them and read the frames back;
 *  - 1 dispatch thread runs fdcast_dispatch(fc, 50) in a loop, flushing;
 *  - 1 reader thread parses the stream: every frame must be whole and
 *    well-formed, and each publisher's sequence numbers must arrive strictly
 *    increasing and without gaps;
 *  - history is on, keeping every message, and the outbox limit is small: a
 *    reader that falls behind catches up from the history instead of dropping,
 *    so nothing drops; a second subscriber of "bus" stops reading until the
 *    publishers are done (it falls behind at once), then reads everything, in
 *    order, while the dispatch thread refills it from the history.
 *
 * Run by `make c-test` under ASan+UBSan and valgrind.
 */
#define _GNU_SOURCE
#include "fdcast.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static void fail_at(const char *file, int line, const char *msg) {
    fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, msg);
    _exit(1);
}

#define CHECK(cond)                                                            \
    do {                                                                       \
        if (!(cond)) fail_at(__FILE__, __LINE__, #cond);                       \
    } while (0)

#define CHECK_EQ(a, b)                                                         \
    do {                                                                       \
        long long a_ = (long long)(a), b_ = (long long)(b);                    \
        if (a_ != b_) {                                                        \
            char m_[512];                                                      \
            snprintf(m_, sizeof m_, "%s == %s (got %lld, expected %lld)", #a,  \
                     #b, a_, b_);                                              \
            fail_at(__FILE__, __LINE__, m_);                                   \
        }                                                                      \
    } while (0)

enum {
    PUBLISHERS = 4,
    PER_PUBLISHER = 2000,
    CHURNERS = 2,
    CHURN_ROUNDS = 300,
    MAX_PAYLOAD = 5 + 300,
};

static fdcast *fc;
static int bus[2]; /* bus[0] subscribed to "bus"; bus[1] read by the reader */
static int stalled[2]; /* stalled[0] subscribed to "bus"; stalled[1] read once publishing ends */
static atomic_llong gaps_told;
static atomic_int stop_dispatch;
static atomic_llong churn_publishes;

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static size_t payload_len(int id, uint32_t seq) {
    return 5 + (seq * 37u + (unsigned)id * 11u) % 300u;
}

static unsigned char filler(int id, uint32_t seq, size_t j) {
    return (unsigned char)((unsigned)id * 31u + seq + (unsigned)j);
}

static void *publisher(void *arg) {
    int id = (int)(intptr_t)arg;
    unsigned char p[MAX_PAYLOAD];
    for (uint32_t seq = 0; seq < PER_PUBLISHER; seq++) {
        size_t n = payload_len(id, seq);
        p[0] = (unsigned char)id;
        p[1] = (unsigned char)(seq >> 24);
        p[2] = (unsigned char)(seq >> 16);
        p[3] = (unsigned char)(seq >> 8);
        p[4] = (unsigned char)seq;
        for (size_t j = 5; j < n; j++) p[j] = filler(id, seq, j);
        CHECK_EQ(fdcast_publish(fc, "bus", 3, p, n), 2);
    }
    return NULL;
}

static void read_back(int fd, const char *want, size_t n) {
    char got[64];
    size_t have = 0;
    long long deadline = now_ms() + 60000;
    while (have < n) {
        CHECK(now_ms() < deadline);
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int pr = poll(&p, 1, 100);
        CHECK(pr >= 0);
        if (pr == 0) continue;
        ssize_t r = read(fd, got + have, n - have);
        CHECK(r > 0);
        have += (size_t)r;
    }
    CHECK(memcmp(got, want, n) == 0);
}

static void *churner(void *arg) {
    int t = (int)(intptr_t)arg;
    int a[2], b[2];
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, a), 0);
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, b), 0);
    for (int i = 0; i < CHURN_ROUNDS; i++) {
        char topic[32], msg[32];
        int tl = snprintf(topic, sizeof topic, "churn-%d-%d", t, i % 5);
        int ml = snprintf(msg, sizeof msg, "m%d-%d;", t, i);
        int64_t id = fdcast_subscribe(fc, topic, (size_t)tl, a[0], FDCAST_RAW);
        CHECK(id > 0);
        CHECK_EQ(fdcast_publish(fc, topic, (size_t)tl, msg, (size_t)ml), 1);
        atomic_fetch_add(&churn_publishes, 1);
        read_back(a[1], msg, (size_t)ml);
        CHECK_EQ(fdcast_unsubscribe(fc, id), 0);

        if (i % 10 == 0) {
            /* Two subscriptions of b, dropped by fd. */
            CHECK(fdcast_subscribe(fc, topic, (size_t)tl, b[0], FDCAST_WS_TEXT) > 0);
            CHECK(fdcast_subscribe(fc, "churn-x", 7, b[0], FDCAST_WS_TEXT) > 0);
            CHECK_EQ(fdcast_unsubscribe_fd(fc, b[0]), 2);
            CHECK_EQ(fdcast_subscribers_for(fc, "bus", 3, NULL, 0), 2);
            CHECK(fdcast_subscriber_count(fc) >= 1);
        }
    }
    CHECK_EQ(close(a[0]), 0);
    CHECK_EQ(close(a[1]), 0);
    CHECK_EQ(close(b[0]), 0);
    CHECK_EQ(close(b[1]), 0);
    return NULL;
}

static void *dispatcher(void *arg) {
    (void)arg;
    while (!atomic_load(&stop_dispatch)) {
        int64_t r = fdcast_dispatch(fc, 50);
        CHECK(r >= 0);
    }
    return NULL;
}

static void count_gap(void *user, int fd, const char *topic, size_t topic_len, uint64_t lost) {
    (void)user, (void)fd, (void)topic, (void)topic_len;
    atomic_fetch_add(&gaps_told, (long long)lost);
}

/* Parses WS_BINARY frames from the fd `arg` until every publisher's frames arrived. */
static void *reader(void *arg) {
    int fd = (int)(intptr_t)arg;
    static unsigned char bufs[2][1 << 16];
    unsigned char *buf = bufs[fd == stalled[1]];
    size_t len = 0;
    long long next_seq[PUBLISHERS] = {0};
    long total = 0;
    long long deadline = now_ms() + 300000;
    while (total < (long)PUBLISHERS * PER_PUBLISHER) {
        CHECK(now_ms() < deadline);
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int pr = poll(&p, 1, 100);
        CHECK(pr >= 0);
        if (pr == 0) continue;
        ssize_t r = read(fd, buf + len, sizeof bufs[0] - len);
        CHECK(r > 0);
        len += (size_t)r;

        size_t off = 0;
        for (;;) {
            if (len - off < 2) break;
            const unsigned char *f = buf + off;
            CHECK_EQ(f[0], 0x82); /* FIN + binary: a torn or interleaved frame fails here */
            size_t hdr = 2, n = f[1];
            CHECK((n & 0x80) == 0); /* server frames are not masked */
            if (n == 126) {
                if (len - off < 4) break;
                hdr = 4;
                n = ((size_t)f[2] << 8) | f[3];
                CHECK(n >= 126);
            } else {
                CHECK(n < 126);
            }
            if (len - off < hdr + n) break;
            const unsigned char *p5 = f + hdr;
            CHECK(n >= 5 && n <= MAX_PAYLOAD);
            int id = p5[0];
            CHECK(id < PUBLISHERS);
            uint32_t seq = ((uint32_t)p5[1] << 24) | ((uint32_t)p5[2] << 16) |
                           ((uint32_t)p5[3] << 8) | p5[4];
            CHECK_EQ(seq, next_seq[id]); /* strictly increasing, no gap */
            CHECK_EQ(n, payload_len(id, seq));
            for (size_t j = 5; j < n; j++) CHECK_EQ(p5[j], filler(id, seq, j));
            next_seq[id]++;
            total++;
            off += hdr + n;
        }
        memmove(buf, buf + off, len - off);
        len -= off;
    }
    CHECK_EQ(len, 0);
    for (int i = 0; i < PUBLISHERS; i++) CHECK_EQ(next_seq[i], PER_PUBLISHER);
    return NULL;
}

int main(void) {
    alarm(900); /* a deadlock fails the test instead of hanging it */
    fc = fdcast_new();
    CHECK(fc != NULL);
    /* Every message kept: a reader behind on "bus" loses nothing. */
    CHECK_EQ(fdcast_set_history(fc, (size_t)PUBLISHERS * PER_PUBLISHER, 0, 0), 0);
    CHECK_EQ(fdcast_set_gap_callback(fc, count_gap, NULL), 0);
    CHECK_EQ(fdcast_set_outbox_limit(fc, 4096), 0);
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, bus), 0);
    int sz = 16384; /* small: most frames queue and the dispatch thread flushes */
    CHECK_EQ(setsockopt(bus[0], SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz), 0);
    CHECK(fdcast_subscribe(fc, "bus", 3, bus[0], FDCAST_WS_BINARY) > 0);
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, stalled), 0);
    sz = 4096;
    CHECK_EQ(setsockopt(stalled[0], SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz), 0);
    CHECK_EQ(setsockopt(stalled[1], SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz), 0);
    CHECK(fdcast_subscribe(fc, "bus", 3, stalled[0], FDCAST_WS_BINARY) > 0);

    pthread_t disp, rd, pubs[PUBLISHERS], churn[CHURNERS];
    CHECK_EQ(pthread_create(&disp, NULL, dispatcher, NULL), 0);
    CHECK_EQ(pthread_create(&rd, NULL, reader, (void *)(intptr_t)bus[1]), 0);
    for (intptr_t i = 0; i < CHURNERS; i++)
        CHECK_EQ(pthread_create(&churn[i], NULL, churner, (void *)i), 0);
    for (intptr_t i = 0; i < PUBLISHERS; i++)
        CHECK_EQ(pthread_create(&pubs[i], NULL, publisher, (void *)i), 0);

    for (int i = 0; i < PUBLISHERS; i++) CHECK_EQ(pthread_join(pubs[i], NULL), 0);
    /* Behind on "bus" since its first few frames, its outbox within the limit. */
    fdcast_fd_counters behind;
    CHECK_EQ(fdcast_fd_stats(fc, stalled[0], &behind), 0);
    CHECK_EQ(behind.catching_up, 1);
    CHECK_EQ(behind.dropped + behind.lost_to_gaps, 0);
    CHECK(behind.queued_bytes <= 4096 + MAX_PAYLOAD + 4);
    reader((void *)(intptr_t)stalled[1]);
    for (int i = 0; i < CHURNERS; i++) CHECK_EQ(pthread_join(churn[i], NULL), 0);
    CHECK_EQ(pthread_join(rd, NULL), 0);
    atomic_store(&stop_dispatch, 1);
    CHECK_EQ(pthread_join(disp, NULL), 0);

    long long bus_total = (long long)PUBLISHERS * PER_PUBLISHER;
    for (int i = 0; i < 2; i++) {
        fdcast_fd_counters c;
        CHECK_EQ(fdcast_fd_stats(fc, i == 0 ? bus[0] : stalled[0], &c), 0);
        CHECK_EQ(c.delivered, bus_total);
        CHECK_EQ(c.dropped + c.lost_to_gaps + c.queued_bytes + c.catching_up, 0);
    }
    fdcast_stats s;
    fdcast_get_stats(fc, &s);
    long long churned = atomic_load(&churn_publishes);
    CHECK_EQ(s.publishes, bus_total + churned);
    CHECK_EQ(s.deliveries, 2 * bus_total + churned);
    CHECK_EQ(s.dropped_messages, 0);
    CHECK_EQ(s.lost_to_gaps, 0);
    CHECK_EQ(atomic_load(&gaps_told), 0);
    CHECK_EQ(s.evicted_fds, 0);
    CHECK_EQ(s.queued_bytes, 0);
    CHECK_EQ(s.subscriptions, 2);
    CHECK_EQ(s.topics, 1);
    CHECK_EQ(fdcast_pending_bytes(fc, bus[0]), 0);
    CHECK_EQ(fdcast_subscriber_count(fc), 2);

    fdcast_free(fc);
    CHECK_EQ(close(bus[0]), 0);
    CHECK_EQ(close(bus[1]), 0);
    CHECK_EQ(close(stalled[0]), 0);
    CHECK_EQ(close(stalled[1]), 0);
    printf("test_threads: %d publishers x %d frames to a reader and a stalled reader that caught "
           "up from the history, %d churners x %d rounds: ok\n",
           PUBLISHERS, PER_PUBLISHER, CHURNERS, CHURN_ROUNDS);
    return 0;
}
