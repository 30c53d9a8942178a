/*
 * test_api.c: the C API contract of fdcast (each function's comment in
 * include/fdcast.h, and README.md's Conventions and Guarantees), exercised
 * from C over real socketpairs and pipes.
 *
 * Covers every function for the conventions, the types, the registry,
 * publishing, event-loop embedding and the hooks, and every documented error
 * path. Each test_* function builds its own registry so that counters and
 * callbacks start from a known state. A failing check prints file:line and
 * exits 1. Run by `make c-test` under ASan+UBSan (static library) and valgrind
 * (shared library); it frees everything and closes every fd it opens.
 */
#define _GNU_SOURCE
#include "fdcast.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------------ */
/* Checks                                                                   */

static unsigned long checks_run;

static void fail_at(const char *file, int line, const char *msg) {
    fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, msg);
    fflush(stdout);
    /* _exit: a failed run should report the failure, not a cascade of leaks. */
    _exit(1);
}

#define CHECK(cond)                                                            \
    do {                                                                       \
        checks_run++;                                                          \
        if (!(cond)) fail_at(__FILE__, __LINE__, #cond);                       \
    } while (0)

#define CHECK_EQ(a, b)                                                         \
    do {                                                                       \
        long long a_ = (long long)(a), b_ = (long long)(b);                    \
        checks_run++;                                                          \
        if (a_ != b_) {                                                        \
            char m_[512];                                                      \
            snprintf(m_, sizeof m_, "%s == %s (got %lld, expected %lld)", #a,  \
                     #b, a_, b_);                                              \
            fail_at(__FILE__, __LINE__, m_);                                   \
        }                                                                      \
    } while (0)

/* A call that must fail with -err and leave a message in fdcast_last_error. */
#define CHECK_ERR(expr, err)                                                   \
    do {                                                                       \
        CHECK_EQ((expr), -(err));                                              \
        const char *le_ = fdcast_last_error();                                 \
        CHECK(le_ != NULL);                                                    \
        CHECK(le_[0] != '\0');                                                 \
    } while (0)

#define T(s) (s), (sizeof(s) - 1) /* topic literal as pointer + length */

/* ------------------------------------------------------------------------ */
/* fd helpers                                                               */

static void make_pair(int sv[2]) {
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
}

/* A small send buffer makes the kernel refuse most of a large frame, so the
 * rest has to go through fdcast's outbox. */
static void make_slow_pair(int sv[2]) {
    make_pair(sv);
    int sz = 4096;
    CHECK_EQ(setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz), 0);
}

static void close_pair(int sv[2]) {
    CHECK_EQ(close(sv[0]), 0);
    CHECK_EQ(close(sv[1]), 0);
}

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Read exactly n bytes from fd, calling fdcast_dispatch (when fc is given) so
 * that queued bytes get flushed while we read. Fails after 20 s. */
static void read_exact(fdcast *fc, int fd, void *buf, size_t n) {
    size_t got = 0;
    long long deadline = now_ms() + 20000;
    while (got < n) {
        CHECK(now_ms() < deadline);
        if (fc != NULL) {
            int64_t d = fdcast_dispatch(fc, 0);
            CHECK(d >= 0);
        }
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int pr = poll(&p, 1, 10);
        CHECK(pr >= 0);
        if (pr == 0) continue;
        ssize_t r = read(fd, (char *)buf + got, n - got);
        CHECK(r > 0);
        got += (size_t)r;
    }
}

/* Nothing is waiting to be read on fd (the peer's end), and fdcast holds no
 * bytes that could still arrive. */
static void expect_nothing(int fd) {
    char c;
    ssize_t r = recv(fd, &c, 1, MSG_DONTWAIT);
    CHECK_EQ(r, -1);
    CHECK(errno == EAGAIN || errno == EWOULDBLOCK);
}

static void print_escaped(const char *label, const unsigned char *p, size_t n) {
    fprintf(stderr, "  %s (%zu bytes): \"", label, n);
    for (size_t i = 0; i < n && i < 120; i++) {
        if (p[i] >= 0x20 && p[i] < 0x7f && p[i] != '\\' && p[i] != '"')
            fputc(p[i], stderr);
        else
            fprintf(stderr, "\\x%02x", p[i]);
    }
    fprintf(stderr, "%s\"\n", n > 120 ? "..." : "");
}

/* The peer reads exactly `want`, and then nothing more. On a mismatch, both
 * byte strings are printed with the caller's file:line. */
#define expect_bytes(fc, fd, want, n) expect_bytes_at(__FILE__, __LINE__, fc, fd, want, n)
static void expect_bytes_at(const char *file, int line, fdcast *fc, int fd, const void *want,
                            size_t n) {
    unsigned char *got = malloc(n ? n : 1);
    CHECK(got != NULL);
    read_exact(fc, fd, got, n);
    if (memcmp(got, want, n) != 0) {
        size_t i = 0;
        while (got[i] == ((const unsigned char *)want)[i]) i++;
        fprintf(stderr, "%s:%d: bytes differ at offset %zu\n", file, line, i);
        print_escaped("expected", want, n);
        print_escaped("got     ", got, n);
        fail_at(file, line, "expect_bytes");
    }
    free(got);
    char c;
    ssize_t r = recv(fd, &c, 1, MSG_DONTWAIT);
    if (r != -1 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
        if (r == 1) print_escaped("unexpected extra byte", (unsigned char *)&c, 1);
        fail_at(file, line, "expect_bytes: more bytes than expected");
    }
}

/* The peer sees end of stream within 5 s (after whatever bytes are left). */
static size_t read_until_eof(int fd) {
    size_t total = 0;
    char buf[65536];
    long long deadline = now_ms() + 5000;
    for (;;) {
        CHECK(now_ms() < deadline);
        struct pollfd p = {.fd = fd, .events = POLLIN};
        CHECK(poll(&p, 1, 100) >= 0);
        ssize_t r = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        if (r == 0) return total;
        if (r < 0) {
            CHECK(errno == EAGAIN || errno == EWOULDBLOCK);
            continue;
        }
        total += (size_t)r;
    }
}

static void fill_pattern(unsigned char *p, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(seed + i * 7u + (i >> 8));
}

static fdcast_stats get_stats(fdcast *fc) {
    fdcast_stats s;
    memset(&s, 0xA5, sizeof s);
    fdcast_get_stats(fc, &s);
    return s;
}

static fdcast *new_fc(void) {
    fdcast *fc = fdcast_new();
    CHECK(fc != NULL);
    return fc;
}

/* ------------------------------------------------------------------------ */
/* Callbacks that record what they saw                                      */

struct evict_log {
    fdcast *fc;
    int calls;
    int fds[16];
    int reasons[16];
    int64_t count_in_cb[16]; /* fdcast_subscriber_count from inside the callback */
    int64_t unsub_in_cb[16]; /* fdcast_unsubscribe_fd(fd) from inside the callback */
};

static void on_evict(void *user, int fd, int reason) {
    struct evict_log *log = user;
    CHECK(log->calls < 16);
    log->fds[log->calls] = fd;
    log->reasons[log->calls] = reason;
    /* Runs with no lock held: calling back into the registry must not deadlock. */
    log->count_in_cb[log->calls] = fdcast_subscriber_count(log->fc);
    /* What a host typically does here; the fd's subscriptions are already gone. */
    log->unsub_in_cb[log->calls] = fdcast_unsubscribe_fd(log->fc, fd);
    log->calls++;
}

struct auth_log {
    fdcast *fc;
    int calls;
    char topic[64];
    size_t topic_len;
    int fd;
    int mode;
    int64_t count_in_cb;
};

/* Refuses every topic that starts with "secret". */
static bool authorize(void *user, const char *topic, size_t topic_len, int fd,
                      fdcast_mode mode) {
    struct auth_log *log = user;
    log->calls++;
    log->topic_len = topic_len;
    memcpy(log->topic, topic, topic_len < sizeof log->topic ? topic_len : sizeof log->topic);
    log->fd = fd;
    log->mode = (int)mode;
    log->count_in_cb = fdcast_subscriber_count(log->fc);
    return !(topic_len >= 6 && memcmp(topic, "secret", 6) == 0);
}

/* ------------------------------------------------------------------------ */
/* Conventions and Types                                                    */

static void test_version(void) {
    const char *v = fdcast_version();
    CHECK(v != NULL);
    char want[64];
    snprintf(want, sizeof want, "%d.%d.%d", FDCAST_VERSION_MAJOR, FDCAST_VERSION_MINOR,
             FDCAST_VERSION_PATCH);
    size_t n = strlen(want);
    CHECK(strncmp(v, want, n) == 0);
    /* "0.1.0" must not match "0.1.01"; a pre-release or build suffix is fine. */
    CHECK(v[n] == '\0' || v[n] == '-' || v[n] == '+');
    CHECK_EQ(FDCAST_MAX_TOPIC_LEN, 4096);
    /* The enum values cross the ABI as these integers. */
    CHECK_EQ(FDCAST_RAW, 0);
    CHECK_EQ(FDCAST_WS_TEXT, 1);
    CHECK_EQ(FDCAST_WS_BINARY, 2);
    CHECK_EQ(FDCAST_SSE, 3);
    CHECK_EQ(FDCAST_DROP_MESSAGE, 0);
    CHECK_EQ(FDCAST_EVICT, 1);
    CHECK_EQ(sizeof(fdcast_stats), 9 * sizeof(uint64_t));
}

/* Reports the length of this thread's message, -1 for NULL. The pointer
 * itself must not outlive the thread (the message is thread-local). */
static void *last_error_in_fresh_thread(void *arg) {
    long *out = arg;
    const char *e = fdcast_last_error();
    *out = e == NULL ? -1 : (long)strlen(e);
    return NULL;
}

static void test_last_error(void) {
    fdcast *fc = new_fc();
    CHECK_ERR(fdcast_unsubscribe(fc, 424242), ENOENT);
    const char *msg = fdcast_last_error();
    CHECK(msg != NULL && msg[0] != '\0');

    /* The message is per thread: a thread that made no failing call sees "". */
    pthread_t th;
    long other_len = -2;
    CHECK_EQ(pthread_create(&th, NULL, last_error_in_fresh_thread, &other_len), 0);
    CHECK_EQ(pthread_join(th, NULL), 0);
    CHECK_EQ(other_len, 0);
    /* ... and this thread's message is still there. */
    CHECK(fdcast_last_error()[0] != '\0');
    fdcast_free(fc);
}

static void test_null_handle(void) {
    int sv[2];
    make_pair(sv);
    int fds[4];
    CHECK_ERR(fdcast_subscribe(NULL, T("t"), sv[0], FDCAST_RAW), EINVAL);
    CHECK_ERR(fdcast_unsubscribe(NULL, 1), EINVAL);
    CHECK_ERR(fdcast_unsubscribe_fd(NULL, sv[0]), EINVAL);
    CHECK_ERR(fdcast_subscriber_count(NULL), EINVAL);
    CHECK_ERR(fdcast_subscribers_for(NULL, T("t"), fds, 4), EINVAL);
    CHECK_ERR(fdcast_publish(NULL, T("t"), "x", 1), EINVAL);
    CHECK_ERR(fdcast_publish_except(NULL, T("t"), "x", 1, -1), EINVAL);
    CHECK_ERR(fdcast_send(NULL, sv[0], FDCAST_RAW, "x", 1), EINVAL);
    CHECK_ERR(fdcast_fd(NULL), EINVAL);
    CHECK_ERR(fdcast_dispatch(NULL, 0), EINVAL);
    CHECK_ERR(fdcast_pending_bytes(NULL, sv[0]), EINVAL);
    CHECK_ERR(fdcast_set_outbox_limit(NULL, 1024), EINVAL);
    CHECK_ERR(fdcast_set_overflow(NULL, FDCAST_EVICT), EINVAL);
    CHECK_ERR(fdcast_set_fd_check(NULL, 1), EINVAL);
    CHECK_ERR(fdcast_set_fd_check(NULL, 1), EINVAL);

    /* void functions: NULL handle (or NULL out pointer) is a no-op. */
    fdcast_free(NULL);
    fdcast_clear(NULL);
    fdcast_set_authorizer(NULL, authorize, NULL);
    fdcast_set_evict_callback(NULL, on_evict, NULL);
    fdcast_stats s;
    fdcast_get_stats(NULL, &s);
    fdcast *fc = new_fc();
    fdcast_get_stats(fc, NULL);
    fdcast_free(fc);
    expect_nothing(sv[1]);
    close_pair(sv);
}

static void test_argument_errors(void) {
    fdcast *fc = new_fc();
    int sv[2];
    make_pair(sv);
    int fds[4] = {0};
    static char big_topic[FDCAST_MAX_TOPIC_LEN + 1];
    memset(big_topic, 't', sizeof big_topic);

    /* Topics: NULL with a length, empty, one byte too long. */
    CHECK_ERR(fdcast_subscribe(fc, NULL, 3, sv[0], FDCAST_RAW), EINVAL);
    CHECK_ERR(fdcast_subscribe(fc, "abc", 0, sv[0], FDCAST_RAW), EINVAL);
    CHECK_ERR(fdcast_subscribe(fc, NULL, 0, sv[0], FDCAST_RAW), EINVAL);
    CHECK_ERR(fdcast_subscribe(fc, big_topic, FDCAST_MAX_TOPIC_LEN + 1, sv[0], FDCAST_RAW), EINVAL);
    CHECK_ERR(fdcast_publish(fc, NULL, 3, "x", 1), EINVAL);
    CHECK_ERR(fdcast_publish(fc, "abc", 0, "x", 1), EINVAL);
    CHECK_ERR(fdcast_publish(fc, big_topic, FDCAST_MAX_TOPIC_LEN + 1, "x", 1), EINVAL);
    CHECK_ERR(fdcast_publish_except(fc, NULL, 3, "x", 1, -1), EINVAL);
    CHECK_ERR(fdcast_publish_except(fc, "abc", 0, "x", 1, -1), EINVAL);
    CHECK_ERR(fdcast_publish_except(fc, big_topic, FDCAST_MAX_TOPIC_LEN + 1, "x", 1, -1), EINVAL);
    CHECK_ERR(fdcast_subscribers_for(fc, NULL, 3, fds, 4), EINVAL);
    CHECK_ERR(fdcast_subscribers_for(fc, "abc", 0, fds, 4), EINVAL);
    CHECK_ERR(fdcast_subscribers_for(fc, big_topic, FDCAST_MAX_TOPIC_LEN + 1, fds, 4), EINVAL);
    CHECK_EQ(fdcast_subscriber_count(fc), 0);

    /* The longest topic is fine, and any byte, NUL included, is part of it. */
    int64_t id_big = fdcast_subscribe(fc, big_topic, FDCAST_MAX_TOPIC_LEN, sv[0], FDCAST_RAW);
    CHECK(id_big > 0);
    CHECK_EQ(fdcast_publish(fc, big_topic, FDCAST_MAX_TOPIC_LEN, "L", 1), 1);
    expect_bytes(fc, sv[1], "L", 1);
    CHECK_EQ(fdcast_publish(fc, big_topic, FDCAST_MAX_TOPIC_LEN - 1, "S", 1), 0);
    int64_t id_a = fdcast_subscribe(fc, "a\0b", 3, sv[0], FDCAST_RAW);
    CHECK(id_a > 0 && id_a != id_big);
    CHECK_EQ(fdcast_publish(fc, "a\0c", 3, "no", 2), 0);
    CHECK_EQ(fdcast_publish(fc, "a", 1, "no", 2), 0);
    CHECK_EQ(fdcast_publish(fc, "a\0b", 3, "yes", 3), 1);
    expect_bytes(fc, sv[1], "yes", 3);

    /* Payloads: NULL with a length is invalid; NULL or not, 0 bytes is fine. */
    CHECK_ERR(fdcast_publish(fc, "a\0b", 3, NULL, 1), EINVAL);
    CHECK_ERR(fdcast_publish_except(fc, "a\0b", 3, NULL, 1, -1), EINVAL);
    CHECK_ERR(fdcast_send(fc, sv[0], FDCAST_RAW, NULL, 1), EINVAL);
    CHECK_EQ(fdcast_publish(fc, "a\0b", 3, NULL, 0), 1);
    CHECK_EQ(fdcast_send(fc, sv[0], FDCAST_RAW, NULL, 0), 0);
    expect_nothing(sv[1]); /* RAW framing of 0 bytes is 0 bytes */

    /* subscribers_for: NULL buffer only with cap 0. */
    CHECK_ERR(fdcast_subscribers_for(fc, "a\0b", 3, NULL, 2), EINVAL);

    /* fds: negative, closed, never opened. */
    int closed[2];
    make_pair(closed);
    close_pair(closed); /* closed[0] is now a free number */
    CHECK_ERR(fdcast_subscribe(fc, T("t"), -1, FDCAST_RAW), EBADF);
    CHECK_ERR(fdcast_subscribe(fc, T("t"), -100, FDCAST_RAW), EBADF);
    CHECK_ERR(fdcast_subscribe(fc, T("t"), closed[0], FDCAST_RAW), EBADF);
    CHECK_ERR(fdcast_subscribe(fc, T("t"), 1000000, FDCAST_RAW), EBADF);
    CHECK_ERR(fdcast_send(fc, -1, FDCAST_RAW, "x", 1), EBADF);
    CHECK_ERR(fdcast_send(fc, closed[0], FDCAST_RAW, "x", 1), EBADF);
    CHECK_ERR(fdcast_unsubscribe_fd(fc, -1), EBADF);
    CHECK_ERR(fdcast_pending_bytes(fc, -1), EBADF);
    CHECK_EQ(fdcast_pending_bytes(fc, closed[0]), 0); /* unknown fd: nothing queued */
    CHECK_EQ(fdcast_unsubscribe_fd(fc, closed[0]), 0);

    /* Enum values outside the enum. */
    CHECK_ERR(fdcast_subscribe(fc, T("t"), sv[0], (fdcast_mode)7), EINVAL);
    CHECK_ERR(fdcast_subscribe(fc, T("t"), sv[0], (fdcast_mode)6), EINVAL); /* one past FDCAST_WS_BINARY_ID */
    CHECK_ERR(fdcast_subscribe(fc, T("t"), sv[0], (fdcast_mode)-1), EINVAL);
    CHECK_ERR(fdcast_send(fc, sv[0], (fdcast_mode)7, "x", 1), EINVAL);
    CHECK_ERR(fdcast_send(fc, sv[0], (fdcast_mode)-1, "x", 1), EINVAL);
    CHECK_ERR(fdcast_set_overflow(fc, (fdcast_overflow)2), EINVAL);
    CHECK_ERR(fdcast_set_overflow(fc, (fdcast_overflow)-1), EINVAL);
    CHECK_EQ(fdcast_set_overflow(fc, FDCAST_EVICT), 0);
    CHECK_EQ(fdcast_set_overflow(fc, FDCAST_DROP_MESSAGE), 0);
    CHECK_ERR(fdcast_set_fd_check(fc, 2), EINVAL);
    CHECK_ERR(fdcast_set_fd_check(fc, -1), EINVAL);
    CHECK_EQ(fdcast_set_fd_check(fc, 1), 0);
    CHECK_EQ(fdcast_set_fd_check(fc, 0), 0);
    CHECK_EQ(fdcast_set_outbox_limit(fc, 0), 0);
    CHECK_EQ(fdcast_set_outbox_limit(fc, (size_t)1 << 20), 0);

    /* Nothing above created a subscription or wrote a byte. */
    CHECK_EQ(fdcast_subscriber_count(fc), 2);
    expect_nothing(sv[1]);

    /* Unknown subscription ids. */
    CHECK_ERR(fdcast_unsubscribe(fc, 0), ENOENT);
    CHECK_ERR(fdcast_unsubscribe(fc, -1), ENOENT);
    CHECK_ERR(fdcast_unsubscribe(fc, id_a + id_big + 1000), ENOENT);
    CHECK_EQ(fdcast_unsubscribe(fc, id_a), 0);
    CHECK_ERR(fdcast_unsubscribe(fc, id_a), ENOENT);
    CHECK_EQ(fdcast_subscriber_count(fc), 1);

    fdcast_free(fc);
    close_pair(sv);
}

/* ------------------------------------------------------------------------ */
/* Registry                                                                 */

static bool contains(const int *a, size_t n, int v) {
    for (size_t i = 0; i < n; i++)
        if (a[i] == v) return true;
    return false;
}

static void test_registry(void) {
    fdcast *fc = new_fc();
    int a[2], b[2], c[2];
    make_pair(a);
    make_pair(b);
    make_pair(c);

    CHECK_EQ(fdcast_subscriber_count(fc), 0);
    int64_t ida = fdcast_subscribe(fc, T("news"), a[0], FDCAST_RAW);
    int64_t idb = fdcast_subscribe(fc, T("news"), b[0], FDCAST_RAW);
    int64_t idc = fdcast_subscribe(fc, T("news"), c[0], FDCAST_RAW);
    CHECK(ida > 0 && idb > 0 && idc > 0);
    CHECK(ida != idb && idb != idc && ida != idc);
    CHECK_EQ(fdcast_subscriber_count(fc), 3);

    /* Idempotent per (topic, fd): same id, mode updated, no new subscription. */
    CHECK_EQ(fdcast_subscribe(fc, T("news"), a[0], FDCAST_WS_TEXT), ida);
    CHECK_EQ(fdcast_subscriber_count(fc), 3);
    CHECK_EQ(fdcast_publish(fc, T("news"), "hi", 2), 3);
    expect_bytes(fc, a[1], "\x81\x02hi", 4);
    expect_bytes(fc, b[1], "hi", 2);
    expect_bytes(fc, c[1], "hi", 2);
    CHECK_EQ(fdcast_subscribe(fc, T("news"), a[0], FDCAST_RAW), ida);
    CHECK_EQ(fdcast_publish(fc, T("news"), "hi", 2), 3);
    expect_bytes(fc, a[1], "hi", 2);
    expect_bytes(fc, b[1], "hi", 2);
    expect_bytes(fc, c[1], "hi", 2);

    /* subscribers_for: count always, at most cap fds written. */
    int fds[8];
    for (int i = 0; i < 8; i++) fds[i] = -77;
    CHECK_EQ(fdcast_subscribers_for(fc, T("news"), NULL, 0), 3);
    CHECK_EQ(fdcast_subscribers_for(fc, T("news"), fds, 0), 3);
    CHECK_EQ(fds[0], -77);
    CHECK_EQ(fdcast_subscribers_for(fc, T("news"), fds, 2), 3);
    CHECK(fds[0] != fds[1]);
    CHECK(fds[0] == a[0] || fds[0] == b[0] || fds[0] == c[0]);
    CHECK(fds[1] == a[0] || fds[1] == b[0] || fds[1] == c[0]);
    CHECK_EQ(fds[2], -77);
    CHECK_EQ(fdcast_subscribers_for(fc, T("news"), fds, 8), 3);
    CHECK(contains(fds, 3, a[0]) && contains(fds, 3, b[0]) && contains(fds, 3, c[0]));
    CHECK_EQ(fds[3], -77);
    CHECK_EQ(fdcast_subscribers_for(fc, T("nobody"), fds, 8), 0);

    /* unsubscribe by id. */
    CHECK_EQ(fdcast_unsubscribe(fc, idb), 0);
    CHECK_ERR(fdcast_unsubscribe(fc, idb), ENOENT);
    CHECK_EQ(fdcast_subscribers_for(fc, T("news"), fds, 8), 2);
    CHECK(contains(fds, 2, a[0]) && contains(fds, 2, c[0]));
    CHECK_EQ(fdcast_publish(fc, T("news"), "x", 1), 2);
    expect_bytes(fc, a[1], "x", 1);
    expect_bytes(fc, c[1], "x", 1);
    expect_nothing(b[1]);
    /* A new subscription after unsubscribe gets a fresh id. */
    int64_t idb2 = fdcast_subscribe(fc, T("news"), b[0], FDCAST_RAW);
    CHECK(idb2 > 0 && idb2 != idb);

    /* unsubscribe_fd returns how many subscriptions it dropped. */
    CHECK(fdcast_subscribe(fc, T("sports"), a[0], FDCAST_RAW) > 0);
    CHECK(fdcast_subscribe(fc, T("weather"), a[0], FDCAST_SSE) > 0);
    CHECK_EQ(fdcast_subscriber_count(fc), 5);
    CHECK_EQ(fdcast_unsubscribe_fd(fc, a[0]), 3);
    CHECK_EQ(fdcast_unsubscribe_fd(fc, a[0]), 0);
    CHECK_ERR(fdcast_unsubscribe(fc, ida), ENOENT);
    CHECK_EQ(fdcast_subscriber_count(fc), 2);
    CHECK_EQ(fdcast_publish(fc, T("sports"), "x", 1), 0);
    CHECK_EQ(fdcast_publish(fc, T("news"), "y", 1), 2);
    expect_bytes(fc, b[1], "y", 1);
    expect_bytes(fc, c[1], "y", 1);
    expect_nothing(a[1]);

    /* Two registries are independent. */
    fdcast *other = new_fc();
    CHECK_EQ(fdcast_subscriber_count(other), 0);
    CHECK_EQ(fdcast_publish(other, T("news"), "z", 1), 0);
    fdcast_free(other);
    expect_nothing(b[1]);

    /* clear drops everything. */
    fdcast_clear(fc);
    CHECK_EQ(fdcast_subscriber_count(fc), 0);
    CHECK_EQ(fdcast_subscribers_for(fc, T("news"), NULL, 0), 0);
    CHECK_EQ(fdcast_publish(fc, T("news"), "z", 1), 0);
    CHECK_ERR(fdcast_unsubscribe(fc, idc), ENOENT);
    expect_nothing(b[1]);
    expect_nothing(c[1]);
    /* The registry is still usable after clear. */
    CHECK(fdcast_subscribe(fc, T("news"), c[0], FDCAST_RAW) > 0);
    CHECK_EQ(fdcast_publish(fc, T("news"), "w", 1), 1);
    expect_bytes(fc, c[1], "w", 1);

    fdcast_free(fc);
    close_pair(a);
    close_pair(b);
    close_pair(c);
}

/* ------------------------------------------------------------------------ */
/* Publishing: framing                                                      */

static void test_raw_and_publish_except(void) {
    fdcast *fc = new_fc();
    int a[2], b[2], c[2];
    make_pair(a);
    make_pair(b);
    make_pair(c);
    CHECK(fdcast_subscribe(fc, T("log"), a[0], FDCAST_RAW) > 0);
    CHECK(fdcast_subscribe(fc, T("log"), b[0], FDCAST_RAW) > 0);
    CHECK(fdcast_subscribe(fc, T("log"), c[0], FDCAST_RAW) > 0);

    /* RAW is the payload as it is: any bytes, NUL and invalid UTF-8 included. */
    static const char raw[] = "line 1\n\0\xff\xfe line 2\r\n";
    CHECK_EQ(fdcast_publish(fc, T("log"), raw, sizeof raw - 1), 3);
    expect_bytes(fc, a[1], raw, sizeof raw - 1);
    expect_bytes(fc, b[1], raw, sizeof raw - 1);
    expect_bytes(fc, c[1], raw, sizeof raw - 1);

    /* Socket flags are left alone: no O_NONBLOCK appears on a blocking socket. */
    CHECK_EQ(fcntl(a[0], F_GETFL) & O_NONBLOCK, 0);

    /* publish_except skips the sender and does not count it. */
    CHECK_EQ(fdcast_publish_except(fc, T("log"), "from b", 6, b[0]), 2);
    expect_bytes(fc, a[1], "from b", 6);
    expect_bytes(fc, c[1], "from b", 6);
    expect_nothing(b[1]);
    CHECK_EQ(fdcast_publish_except(fc, T("log"), "all", 3, -1), 3);
    expect_bytes(fc, a[1], "all", 3);
    expect_bytes(fc, b[1], "all", 3);
    expect_bytes(fc, c[1], "all", 3);
    /* An except_fd that is not subscribed skips nobody. */
    CHECK_EQ(fdcast_publish_except(fc, T("log"), "n", 1, 1000000), 3);
    expect_bytes(fc, a[1], "n", 1);
    expect_bytes(fc, b[1], "n", 1);
    expect_bytes(fc, c[1], "n", 1);
    CHECK_EQ(fdcast_publish_except(fc, T("nobody"), "n", 1, a[0]), 0);

    /* Several frames to one fd arrive in order, back to back. */
    CHECK_EQ(fdcast_send(fc, a[0], FDCAST_RAW, "one,", 4), 0);
    CHECK_EQ(fdcast_publish(fc, T("log"), "two,", 4), 3);
    CHECK_EQ(fdcast_send(fc, a[0], FDCAST_RAW, "three", 5), 0);
    expect_bytes(fc, a[1], "one,two,three", 13);
    expect_bytes(fc, b[1], "two,", 4);
    expect_bytes(fc, c[1], "two,", 4);

    fdcast_free(fc);
    close_pair(a);
    close_pair(b);
    close_pair(c);
}

/* Expected WebSocket server frame for a payload of n bytes. */
static size_t ws_frame(unsigned char *out, unsigned char opcode, const unsigned char *p,
                       size_t n) {
    size_t h = 0;
    out[h++] = (unsigned char)(0x80 | opcode);
    if (n < 126) {
        out[h++] = (unsigned char)n;
    } else if (n <= 0xFFFF) {
        out[h++] = 126;
        out[h++] = (unsigned char)(n >> 8);
        out[h++] = (unsigned char)n;
    } else {
        out[h++] = 127;
        for (int i = 7; i >= 0; i--) out[h++] = (unsigned char)((uint64_t)n >> (8 * i));
    }
    memcpy(out + h, p, n);
    return h + n;
}

static void test_websocket_frames(void) {
    fdcast *fc = new_fc();
    int t[2], b[2];
    make_pair(t);
    make_pair(b);
    CHECK(fdcast_subscribe(fc, T("ws"), t[0], FDCAST_WS_TEXT) > 0);
    CHECK(fdcast_subscribe(fc, T("ws"), b[0], FDCAST_WS_BINARY) > 0);

    /* The literal RFC 6455 example: FIN + text, unmasked, length 5. */
    CHECK_EQ(fdcast_publish(fc, T("ws"), "hello", 5), 2);
    expect_bytes(fc, t[1], "\x81\x05hello", 7);
    expect_bytes(fc, b[1], "\x82\x05hello", 7);

    /* Length boundaries: 7-bit, 16-bit (126) and 64-bit (127) forms. */
    static const size_t sizes[] = {0, 1, 125, 126, 127, 65535, 65536, 70000};
    size_t max = 70000;
    unsigned char *payload = malloc(max);
    unsigned char *want = malloc(max + 14);
    CHECK(payload != NULL && want != NULL);
    for (size_t i = 0; i < max; i++) payload[i] = (unsigned char)('a' + i % 26); /* ASCII */
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        size_t n = sizes[k];
        CHECK_EQ(fdcast_publish(fc, T("ws"), payload, n), 2);
        size_t wn = ws_frame(want, 0x1, payload, n);
        expect_bytes(fc, t[1], want, wn);
        wn = ws_frame(want, 0x2, payload, n);
        expect_bytes(fc, b[1], want, wn);
    }
    /* Check the header bytes literally once, not only through ws_frame(). */
    CHECK_EQ(fdcast_send(fc, b[0], FDCAST_WS_BINARY, payload, 126), 0);
    read_exact(fc, b[1], want, 4 + 126);
    CHECK(memcmp(want, "\x82\x7e\x00\x7e", 4) == 0);
    CHECK_EQ(fdcast_send(fc, b[0], FDCAST_WS_BINARY, payload, 65536), 0);
    read_exact(fc, b[1], want, 10 + 65536);
    CHECK(memcmp(want, "\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00", 10) == 0);

    /* WS_BINARY carries any bytes. */
    CHECK_EQ(fdcast_send(fc, b[0], FDCAST_WS_BINARY, "\xff\x00\xfe", 3), 0);
    expect_bytes(fc, b[1], "\x82\x03\xff\x00\xfe", 5);
    /* send frames per its own mode argument, whatever the subscription mode. */
    CHECK_EQ(fdcast_send(fc, t[0], FDCAST_WS_BINARY, "ab", 2), 0);
    expect_bytes(fc, t[1], "\x82\x02" "ab", 4);
    CHECK_EQ(fdcast_send(fc, t[0], FDCAST_RAW, "ab", 2), 0);
    expect_bytes(fc, t[1], "ab", 2);
    /* Multi-byte UTF-8 is valid text. */
    CHECK_EQ(fdcast_send(fc, t[0], FDCAST_WS_TEXT, "\xc3\xa9\xe2\x82\xac", 5), 0);
    expect_bytes(fc, t[1], "\x81\x05\xc3\xa9\xe2\x82\xac", 7);

    free(payload);
    free(want);
    fdcast_free(fc);
    close_pair(t);
    close_pair(b);
}

#define sse_case(fc, sv, payload, n, want) sse_case_at(__LINE__, fc, sv, payload, n, want)
static void sse_case_at(int line, fdcast *fc, int sv[2], const char *payload, size_t n,
                        const char *want) {
    CHECK_EQ(fdcast_publish(fc, T("sse"), payload, n), 1);
    expect_bytes_at(__FILE__, line, fc, sv[1], want, strlen(want));
    CHECK_EQ(fdcast_send(fc, sv[0], FDCAST_SSE, payload, n), 0);
    expect_bytes_at(__FILE__, line, fc, sv[1], want, strlen(want));
}

static void test_sse_frames(void) {
    fdcast *fc = new_fc();
    int s[2];
    make_pair(s);
    CHECK(fdcast_subscribe(fc, T("sse"), s[0], FDCAST_SSE) > 0);
    sse_case(fc, s, "hello", 5, "data: hello\n\n");
    sse_case(fc, s, "a\r\nb", 4, "data: a\ndata: b\n\n");
    sse_case(fc, s, "a\nb", 3, "data: a\ndata: b\n\n");
    sse_case(fc, s, "a\rb", 3, "data: a\ndata: b\n\n");
    sse_case(fc, s, "", 0, "data: \n\n");
    sse_case(fc, s, "x\n", 2, "data: x\ndata: \n\n");
    sse_case(fc, s, "\n", 1, "data: \ndata: \n\n");
    sse_case(fc, s, "a\n\nb", 4, "data: a\ndata: \ndata: b\n\n");
    /* CR CR LF is a CR line break followed by a CRLF one. */
    sse_case(fc, s, "a\r\r\nb", 5, "data: a\ndata: \ndata: b\n\n");
    sse_case(fc, s, "\xc3\xa9t\xc3\xa9", 5, "data: \xc3\xa9t\xc3\xa9\n\n");
    fdcast_free(fc);
    close_pair(s);
}

/* Invalid UTF-8 for a WS_TEXT or SSE subscriber: -EILSEQ, nothing written to
 * anyone, RAW and WS_BINARY subscribers of the same topic included. */
static void test_invalid_utf8(void) {
    fdcast *fc = new_fc();
    int r[2], b[2], t[2], s[2];
    make_pair(r);
    make_pair(b);
    make_pair(t);
    make_pair(s);
    CHECK(fdcast_subscribe(fc, T("mixed"), r[0], FDCAST_RAW) > 0);
    CHECK(fdcast_subscribe(fc, T("mixed"), b[0], FDCAST_WS_BINARY) > 0);
    CHECK(fdcast_subscribe(fc, T("mixed"), t[0], FDCAST_WS_TEXT) > 0);
    CHECK(fdcast_subscribe(fc, T("mixed"), s[0], FDCAST_SSE) > 0);
    CHECK(fdcast_subscribe(fc, T("text"), t[0], FDCAST_WS_TEXT) > 0);
    CHECK(fdcast_subscribe(fc, T("sse"), s[0], FDCAST_SSE) > 0);
    CHECK(fdcast_subscribe(fc, T("bytes"), r[0], FDCAST_RAW) > 0);
    CHECK(fdcast_subscribe(fc, T("bytes"), b[0], FDCAST_WS_BINARY) > 0);

    static const struct {
        const char *p;
        size_t n;
    } bad[] = {
        {"\xff", 1},             /* never valid */
        {"ok\x80", 3},           /* lone continuation byte */
        {"\xc3", 1},             /* truncated sequence */
        {"\xc0\xaf", 2},         /* overlong '/' */
        {"\xed\xa0\x80", 3},     /* UTF-16 surrogate */
        {"\xf4\x90\x80\x80", 4}, /* above U+10FFFF */
    };
    uint64_t publishes = get_stats(fc).publishes;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_ERR(fdcast_publish(fc, T("mixed"), bad[i].p, bad[i].n), EILSEQ);
        CHECK_ERR(fdcast_publish_except(fc, T("mixed"), bad[i].p, bad[i].n, r[0]), EILSEQ);
        CHECK_ERR(fdcast_publish(fc, T("text"), bad[i].p, bad[i].n), EILSEQ);
        CHECK_ERR(fdcast_publish(fc, T("sse"), bad[i].p, bad[i].n), EILSEQ);
        CHECK_ERR(fdcast_send(fc, t[0], FDCAST_WS_TEXT, bad[i].p, bad[i].n), EILSEQ);
        CHECK_ERR(fdcast_send(fc, s[0], FDCAST_SSE, bad[i].p, bad[i].n), EILSEQ);
        /* The same bytes are fine for RAW and WS_BINARY only. */
        CHECK_EQ(fdcast_send(fc, r[0], FDCAST_RAW, bad[i].p, bad[i].n), 0);
        expect_bytes(fc, r[1], bad[i].p, bad[i].n);
    }
    CHECK_EQ(get_stats(fc).publishes, publishes); /* failed publishes are not counted */
    expect_nothing(r[1]);
    expect_nothing(b[1]);
    expect_nothing(t[1]);
    expect_nothing(s[1]);
    CHECK_EQ(fdcast_pending_bytes(fc, r[0]), 0);
    CHECK_EQ(fdcast_pending_bytes(fc, b[0]), 0);

    CHECK_EQ(fdcast_publish(fc, T("bytes"), "\xff", 1), 2);
    expect_bytes(fc, r[1], "\xff", 1);
    expect_bytes(fc, b[1], "\x82\x01\xff", 3);
    /* Valid text still reaches all four framings after the failures. */
    CHECK_EQ(fdcast_publish(fc, T("mixed"), "ok", 2), 4);
    expect_bytes(fc, r[1], "ok", 2);
    expect_bytes(fc, b[1], "\x82\x02ok", 4);
    expect_bytes(fc, t[1], "\x81\x02ok", 4);
    expect_bytes(fc, s[1], "data: ok\n\n", 10);

    fdcast_free(fc);
    close_pair(r);
    close_pair(b);
    close_pair(t);
    close_pair(s);
}

/* ------------------------------------------------------------------------ */
/* Stats                                                                    */

static void test_stats(void) {
    fdcast *fc = new_fc();
    int a[2], b[2], c[2];
    make_pair(a);
    make_pair(b);
    make_slow_pair(c);

    fdcast_stats s = get_stats(fc);
    CHECK_EQ(s.publishes, 0);
    CHECK_EQ(s.deliveries, 0);
    CHECK_EQ(s.dropped_messages, 0);
    CHECK_EQ(s.evicted_fds, 0);
    CHECK_EQ(s.queued_bytes, 0);
    CHECK_EQ(s.subscriptions, 0);
    CHECK_EQ(s.topics, 0);
    CHECK_EQ(s.fds, 0);

    CHECK(fdcast_subscribe(fc, T("t1"), a[0], FDCAST_RAW) > 0);
    int64_t id_t2 = fdcast_subscribe(fc, T("t2"), a[0], FDCAST_RAW);
    CHECK(id_t2 > 0);
    CHECK(fdcast_subscribe(fc, T("t1"), b[0], FDCAST_WS_BINARY) > 0);
    s = get_stats(fc);
    CHECK_EQ(s.subscriptions, 3);
    CHECK_EQ(s.topics, 2);
    CHECK_EQ(s.fds, 2);

    CHECK_EQ(fdcast_publish(fc, T("t1"), "x", 1), 2);
    CHECK_EQ(fdcast_publish(fc, T("nobody"), "x", 1), 0); /* counted: it succeeded */
    CHECK_ERR(fdcast_publish(fc, T("t1"), NULL, 1), EINVAL); /* not counted */
    expect_bytes(fc, a[1], "x", 1);
    expect_bytes(fc, b[1], "\x82\x01x", 3);
    s = get_stats(fc);
    CHECK_EQ(s.publishes, 2);
    CHECK_EQ(s.deliveries, 2);
    CHECK_EQ(s.queued_bytes, 0);

    /* send is not a publish, but its frame is a delivery; an fd that only
     * received a send, fully written, holds nothing. */
    CHECK_EQ(fdcast_send(fc, b[0], FDCAST_RAW, "y", 1), 0);
    expect_bytes(fc, b[1], "y", 1);
    s = get_stats(fc);
    CHECK_EQ(s.publishes, 2);
    CHECK_EQ(s.deliveries, 3);
    CHECK_EQ(s.fds, 2);

    /* Dropping the only subscription of t2 drops the topic, not the fd. */
    CHECK_EQ(fdcast_unsubscribe(fc, id_t2), 0);
    s = get_stats(fc);
    CHECK_EQ(s.subscriptions, 2);
    CHECK_EQ(s.topics, 1);
    CHECK_EQ(s.fds, 2);

    /* Queued bytes: c takes only part of a large frame. */
    size_t big = 256 * 1024;
    unsigned char *p = malloc(big);
    CHECK(p != NULL);
    fill_pattern(p, big, 1);
    CHECK_EQ(fdcast_send(fc, c[0], FDCAST_RAW, p, big), 0);
    int64_t pend = fdcast_pending_bytes(fc, c[0]);
    CHECK(pend > 0 && pend < (int64_t)big);
    s = get_stats(fc);
    CHECK_EQ(s.queued_bytes, pend);
    CHECK_EQ(s.fds, 3);
    CHECK_EQ(s.deliveries, 3); /* last byte not yet in the kernel */

    /* unsubscribe_fd forgets the queued bytes too. */
    CHECK_EQ(fdcast_unsubscribe_fd(fc, c[0]), 0);
    CHECK_EQ(fdcast_pending_bytes(fc, c[0]), 0);
    s = get_stats(fc);
    CHECK_EQ(s.queued_bytes, 0);
    CHECK_EQ(s.fds, 2);
    CHECK_EQ(s.dropped_messages, 0);
    CHECK_EQ(s.evicted_fds, 0);

    fdcast_clear(fc);
    s = get_stats(fc);
    CHECK_EQ(s.subscriptions, 0);
    CHECK_EQ(s.topics, 0);
    CHECK_EQ(s.fds, 0);
    CHECK_EQ(s.publishes, 2); /* counters survive clear */

    free(p);
    fdcast_free(fc);
    close_pair(a);
    close_pair(b);
    close_pair(c);
}

/* ------------------------------------------------------------------------ */
/* Outbox, overflow, event-loop embedding                                   */

/* fdcast_fd() becomes readable when a slow fd can take more; dispatch flushes
 * it. The peer reads everything, in order, in whole frames. */
static void test_dispatch_flushes_slow_fd(void) {
    fdcast *fc = new_fc();
    int s[2];
    make_slow_pair(s);
    CHECK_EQ(fdcast_set_outbox_limit(fc, (size_t)64 << 20), 0);
    CHECK(fdcast_subscribe(fc, T("bulk"), s[0], FDCAST_WS_BINARY) > 0);
    int pfd = fdcast_fd(fc);
    CHECK(pfd >= 0);
    CHECK(pfd != s[0] && pfd != s[1]);

    enum { FRAMES = 20, SIZE = 64 * 1024 };
    unsigned char *p = malloc(SIZE);
    unsigned char *want = malloc((size_t)FRAMES * (SIZE + 10));
    CHECK(p != NULL && want != NULL);
    size_t total = 0;
    for (int i = 0; i < FRAMES; i++) {
        fill_pattern(p, SIZE, (unsigned)i);
        CHECK_EQ(fdcast_publish(fc, T("bulk"), p, SIZE), 1);
        total += ws_frame(want + total, 0x2, p, SIZE);
    }
    int64_t pend = fdcast_pending_bytes(fc, s[0]);
    CHECK(pend > 0);
    CHECK_EQ(get_stats(fc).queued_bytes, pend);

    /* The host loop: read what arrived, wait for fdcast_fd, dispatch. */
    unsigned char *got = malloc(total);
    CHECK(got != NULL);
    size_t n = 0;
    int rounds = 0;
    long long deadline = now_ms() + 30000;
    while (n < total) {
        CHECK(now_ms() < deadline);
        ssize_t r;
        size_t before = n;
        while (n < total && (r = recv(s[1], got + n, total - n, MSG_DONTWAIT)) > 0) n += (size_t)r;
        if (n == total) break;
        CHECK(n > before); /* each dispatch round wrote something */
        struct pollfd pp = {.fd = pfd, .events = POLLIN};
        CHECK_EQ(poll(&pp, 1, 5000), 1);
        int64_t served = fdcast_dispatch(fc, 0);
        CHECK(served >= 0);
        rounds++;
    }
    CHECK(rounds > 0);
    CHECK(memcmp(got, want, total) == 0);
    expect_nothing(s[1]);
    CHECK_EQ(fdcast_pending_bytes(fc, s[0]), 0);
    fdcast_stats st = get_stats(fc);
    CHECK_EQ(st.queued_bytes, 0);
    CHECK_EQ(st.deliveries, FRAMES);
    CHECK_EQ(st.dropped_messages, 0);

    /* With nothing to do, dispatch returns 0: at once for 0, after the
     * timeout for a positive one. */
    CHECK(fdcast_dispatch(fc, 0) >= 0); /* may still see the last writable edge */
    long long t0 = now_ms();
    CHECK_EQ(fdcast_dispatch(fc, 50), 0);
    CHECK(now_ms() - t0 < 5000);

    free(p);
    free(want);
    free(got);
    fdcast_free(fc);
    close_pair(s);
}

/* unsubscribe keeps the frames already queued for the fd; unsubscribe_fd and
 * clear drop them. */
static void test_unsubscribe_and_queued_bytes(void) {
    fdcast *fc = new_fc();
    int s[2];
    make_slow_pair(s);
    CHECK_EQ(fdcast_set_outbox_limit(fc, (size_t)8 << 20), 0);
    size_t big = 200 * 1000;
    unsigned char *p = malloc(big);
    unsigned char *got = malloc(big);
    CHECK(p != NULL && got != NULL);
    fill_pattern(p, big, 9);

    int64_t id = fdcast_subscribe(fc, T("q"), s[0], FDCAST_RAW);
    CHECK(id > 0);
    CHECK_EQ(fdcast_publish(fc, T("q"), p, big), 1);
    CHECK(fdcast_pending_bytes(fc, s[0]) > 0);
    CHECK_EQ(fdcast_unsubscribe(fc, id), 0);
    CHECK(fdcast_pending_bytes(fc, s[0]) > 0);
    CHECK_EQ(fdcast_publish(fc, T("q"), "late", 4), 0);
    /* A send queues behind the partly written frame: it neither overtakes nor splits it. */
    CHECK_EQ(fdcast_send(fc, s[0], FDCAST_RAW, "TAIL", 4), 0);
    read_exact(fc, s[1], got, big);
    CHECK(memcmp(got, p, big) == 0);
    expect_bytes(fc, s[1], "TAIL", 4);
    CHECK_EQ(fdcast_pending_bytes(fc, s[0]), 0);

    /* clear drops queued bytes too. */
    CHECK(fdcast_subscribe(fc, T("q"), s[0], FDCAST_RAW) > 0);
    CHECK_EQ(fdcast_publish(fc, T("q"), p, big), 1);
    CHECK(fdcast_pending_bytes(fc, s[0]) > 0);
    fdcast_clear(fc);
    CHECK_EQ(fdcast_pending_bytes(fc, s[0]), 0);
    CHECK_EQ(get_stats(fc).queued_bytes, 0);

    free(p);
    free(got);
    fdcast_free(fc);
    close_pair(s);
}

/* FDCAST_DROP_MESSAGE: a frame that would push a non-empty outbox past the
 * limit is dropped whole (-ENOBUFS from send); a started frame is always
 * completed; a frame on an empty outbox is always attempted. */
static void test_drop_message(void) {
    fdcast *fc = new_fc();
    struct evict_log ev = {.fc = fc};
    fdcast_set_evict_callback(fc, on_evict, &ev);
    int s[2];
    make_slow_pair(s);
    CHECK_EQ(fdcast_set_outbox_limit(fc, 4096), 0);
    CHECK_EQ(fdcast_set_overflow(fc, FDCAST_DROP_MESSAGE), 0);
    CHECK(fdcast_subscribe(fc, T("d"), s[0], FDCAST_RAW) > 0);

    /* 256 KiB on an empty outbox: attempted, remainder queued past the limit. */
    size_t big = 256 * 1024;
    unsigned char *p = malloc(big);
    unsigned char *got = malloc(big);
    CHECK(p != NULL && got != NULL);
    fill_pattern(p, big, 3);
    CHECK_EQ(fdcast_send(fc, s[0], FDCAST_RAW, p, big), 0);
    CHECK(fdcast_pending_bytes(fc, s[0]) > 4096);

    /* Outbox not empty and over the limit: dropped, whole. */
    CHECK_ERR(fdcast_send(fc, s[0], FDCAST_RAW, "dropped-1", 9), ENOBUFS);
    CHECK_EQ(fdcast_publish(fc, T("d"), "dropped-2", 9), 1); /* matched, then dropped */
    fdcast_stats st = get_stats(fc);
    CHECK_EQ(st.dropped_messages, 2);
    CHECK_EQ(st.evicted_fds, 0);
    CHECK_EQ(ev.calls, 0);
    CHECK_EQ(fdcast_subscriber_count(fc), 1); /* the fd keeps its subscription */

    read_exact(fc, s[1], got, big);
    CHECK(memcmp(got, p, big) == 0);
    expect_nothing(s[1]);
    CHECK_EQ(fdcast_pending_bytes(fc, s[0]), 0);
    /* Once drained, frames flow again. */
    CHECK_EQ(fdcast_publish(fc, T("d"), "after", 5), 1);
    expect_bytes(fc, s[1], "after", 5);

    /* Limit 0: only the rest of a started frame is ever queued. */
    CHECK_EQ(fdcast_set_outbox_limit(fc, 0), 0);
    CHECK_EQ(fdcast_publish(fc, T("d"), p, big), 1);
    CHECK(fdcast_pending_bytes(fc, s[0]) > 0);
    CHECK_ERR(fdcast_send(fc, s[0], FDCAST_RAW, "x", 1), ENOBUFS);
    CHECK_EQ(get_stats(fc).dropped_messages, 3);
    read_exact(fc, s[1], got, big);
    CHECK(memcmp(got, p, big) == 0);
    expect_nothing(s[1]);
    CHECK_EQ(fdcast_send(fc, s[0], FDCAST_RAW, "y", 1), 0);
    expect_bytes(fc, s[1], "y", 1);
    CHECK_EQ(ev.calls, 0);

    free(p);
    free(got);
    fdcast_free(fc);
    close_pair(s);
}

/* FDCAST_EVICT: every subscription of the fd dropped, shutdown(2), evict
 * callback with ENOBUFS; the peer sees EOF. The fd itself stays open. */
static void test_evict_policy(void) {
    fdcast *fc = new_fc();
    struct evict_log ev = {.fc = fc};
    fdcast_set_evict_callback(fc, on_evict, &ev);
    CHECK_EQ(fdcast_set_outbox_limit(fc, 4096), 0);
    CHECK_EQ(fdcast_set_overflow(fc, FDCAST_EVICT), 0);
    int s[2], k[2];
    make_slow_pair(s);
    make_pair(k);
    CHECK(fdcast_subscribe(fc, T("e1"), s[0], FDCAST_RAW) > 0);
    CHECK(fdcast_subscribe(fc, T("e2"), s[0], FDCAST_RAW) > 0);
    CHECK(fdcast_subscribe(fc, T("e1"), k[0], FDCAST_RAW) > 0);

    size_t big = 256 * 1024;
    unsigned char *p = malloc(big);
    CHECK(p != NULL);
    fill_pattern(p, big, 5);
    CHECK_EQ(fdcast_publish(fc, T("e2"), p, big), 1);
    CHECK(fdcast_pending_bytes(fc, s[0]) > 0);
    CHECK_EQ(ev.calls, 0);

    /* Overflow on s: evicted inside this publish; k still gets its frame. */
    CHECK_EQ(fdcast_publish(fc, T("e1"), "overflow", 8), 2);
    CHECK_EQ(ev.calls, 1);
    CHECK_EQ(ev.fds[0], s[0]);
    CHECK_EQ(ev.reasons[0], ENOBUFS);
    CHECK_EQ(ev.count_in_cb[0], 1); /* s's subscriptions were gone before the callback */
    CHECK_EQ(fdcast_subscriber_count(fc), 1);
    CHECK_EQ(fdcast_subscribers_for(fc, T("e2"), NULL, 0), 0);
    CHECK_EQ(fdcast_pending_bytes(fc, s[0]), 0);
    fdcast_stats st = get_stats(fc);
    CHECK_EQ(st.evicted_fds, 1);
    CHECK_EQ(st.queued_bytes, 0);
    expect_bytes(fc, k[1], "overflow", 8);
    /* The peer sees an aborted stream: some bytes, then EOF, never the whole frame. */
    size_t seen = read_until_eof(s[1]);
    CHECK(seen < big);
    /* shutdown, not close: the fd number is still ours. */
    CHECK(fcntl(s[0], F_GETFD) >= 0);

    /* The same through send: -ENOBUFS, fd evicted. */
    int u[2];
    make_slow_pair(u);
    CHECK(fdcast_subscribe(fc, T("e3"), u[0], FDCAST_SSE) > 0);
    memset(p, 'x', big);
    CHECK_EQ(fdcast_send(fc, u[0], FDCAST_RAW, p, big), 0);
    CHECK_ERR(fdcast_send(fc, u[0], FDCAST_RAW, "more", 4), ENOBUFS);
    CHECK_EQ(ev.calls, 2);
    CHECK_EQ(ev.fds[1], u[0]);
    CHECK_EQ(ev.reasons[1], ENOBUFS);
    CHECK_EQ(fdcast_subscribers_for(fc, T("e3"), NULL, 0), 0);
    CHECK_EQ(get_stats(fc).evicted_fds, 2);
    CHECK(read_until_eof(u[1]) < big);

    free(p);
    fdcast_free(fc);
    close_pair(s);
    close_pair(k);
    close_pair(u);
}

/* A peer that is gone: -EPIPE from send, eviction from publish, evict
 * callback with EPIPE in both cases. */
static void test_closed_peer(void) {
    fdcast *fc = new_fc();
    struct evict_log ev = {.fc = fc};
    fdcast_set_evict_callback(fc, on_evict, &ev);
    int a[2], b[2], k[2];
    make_pair(a);
    make_pair(b);
    make_pair(k);

    CHECK(fdcast_subscribe(fc, T("p"), a[0], FDCAST_RAW) > 0);
    CHECK_EQ(close(a[1]), 0);
    CHECK_ERR(fdcast_send(fc, a[0], FDCAST_RAW, "x", 1), EPIPE);
    CHECK_EQ(ev.calls, 1);
    CHECK_EQ(ev.fds[0], a[0]);
    CHECK_EQ(ev.reasons[0], EPIPE);
    CHECK_EQ(ev.count_in_cb[0], 0);
    CHECK_EQ(ev.unsub_in_cb[0], 0);
    CHECK_EQ(fdcast_subscriber_count(fc), 0);

    CHECK(fdcast_subscribe(fc, T("p"), b[0], FDCAST_WS_TEXT) > 0);
    CHECK(fdcast_subscribe(fc, T("p2"), b[0], FDCAST_WS_TEXT) > 0);
    CHECK(fdcast_subscribe(fc, T("p"), k[0], FDCAST_WS_TEXT) > 0);
    CHECK_EQ(close(b[1]), 0);
    CHECK_EQ(fdcast_publish(fc, T("p"), "bye", 3), 2);
    CHECK_EQ(ev.calls, 2);
    CHECK_EQ(ev.fds[1], b[0]);
    CHECK_EQ(ev.reasons[1], EPIPE);
    CHECK_EQ(ev.count_in_cb[1], 1);
    CHECK_EQ(ev.unsub_in_cb[1], 0);
    CHECK_EQ(fdcast_subscriber_count(fc), 1);
    CHECK_EQ(fdcast_subscribers_for(fc, T("p2"), NULL, 0), 0);
    CHECK_EQ(get_stats(fc).evicted_fds, 2);
    expect_bytes(fc, k[1], "\x81\x03" "bye", 5);

    fdcast_free(fc);
    CHECK_EQ(close(a[0]), 0); /* still open: the library never closes host fds */
    CHECK_EQ(close(b[0]), 0);
    close_pair(k);
}

/* Pipes: O_NONBLOCK is set, a full pipe is queued and flushed, and a pipe
 * whose reader is gone is evicted without SIGPIPE killing the process. */
static void test_pipe(void) {
    /* The default disposition: a SIGPIPE raised by a write would kill us. */
    struct sigaction dfl = {.sa_handler = SIG_DFL};
    CHECK_EQ(sigaction(SIGPIPE, &dfl, NULL), 0);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGPIPE);
    CHECK_EQ(pthread_sigmask(SIG_UNBLOCK, &set, NULL), 0);

    fdcast *fc = new_fc();
    struct evict_log ev = {.fc = fc};
    fdcast_set_evict_callback(fc, on_evict, &ev);
    CHECK_EQ(fdcast_set_outbox_limit(fc, (size_t)4 << 20), 0);
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
    CHECK_EQ(fcntl(p[1], F_GETFL) & O_NONBLOCK, 0);
    CHECK(fdcast_subscribe(fc, T("pipe"), p[1], FDCAST_RAW) > 0);
    CHECK(fcntl(p[1], F_GETFL) & O_NONBLOCK);

    /* More than a pipe holds (64 KiB by default): the publish does not block. */
    size_t big = 300 * 1000;
    unsigned char *buf = malloc(big);
    unsigned char *got = malloc(big);
    CHECK(buf != NULL && got != NULL);
    fill_pattern(buf, big, 11);
    CHECK_EQ(fdcast_publish(fc, T("pipe"), buf, big), 1);
    CHECK(fdcast_pending_bytes(fc, p[1]) > 0);
    read_exact(fc, p[0], got, big);
    CHECK(memcmp(got, buf, big) == 0);
    CHECK_EQ(fdcast_pending_bytes(fc, p[1]), 0);

    /* Reader gone. */
    CHECK_EQ(close(p[0]), 0);
    CHECK_EQ(fdcast_publish(fc, T("pipe"), "x", 1), 1);
    CHECK_EQ(ev.calls, 1);
    CHECK_EQ(ev.fds[0], p[1]);
    CHECK_EQ(ev.reasons[0], EPIPE);
    CHECK_EQ(fdcast_subscriber_count(fc), 0);

    /* send on a pipe (not subscribed) with no reader: -EPIPE, O_NONBLOCK set. */
    int q[2];
    CHECK_EQ(pipe2(q, O_CLOEXEC), 0);
    CHECK_EQ(close(q[0]), 0);
    CHECK_ERR(fdcast_send(fc, q[1], FDCAST_RAW, "x", 1), EPIPE);
    CHECK(fcntl(q[1], F_GETFL) & O_NONBLOCK);
    CHECK_EQ(ev.calls, 2);
    CHECK_EQ(ev.fds[1], q[1]);
    CHECK_EQ(ev.reasons[1], EPIPE);

    /* Still alive, and the library left signal state as it found it: default
     * disposition, not blocked, no SIGPIPE pending. */
    struct sigaction now;
    CHECK_EQ(sigaction(SIGPIPE, NULL, &now), 0);
    CHECK(now.sa_handler == SIG_DFL);
    sigset_t mask, pending;
    CHECK_EQ(pthread_sigmask(SIG_BLOCK, NULL, &mask), 0);
    CHECK_EQ(sigismember(&mask, SIGPIPE), 0);
    CHECK_EQ(sigpending(&pending), 0);
    CHECK_EQ(sigismember(&pending, SIGPIPE), 0);

    free(buf);
    free(got);
    fdcast_free(fc);
    CHECK_EQ(close(p[1]), 0);
    CHECK_EQ(close(q[1]), 0);
}

/* Give `want` the number of an fd that was just closed: a new socket that
 * reuses the number, as the kernel would for the next accept(). */
static void pair_on_number(int sv[2], int want) {
    make_pair(sv);
    if (sv[0] == want) return;
    if (sv[1] == want) {
        int t = sv[0];
        sv[0] = sv[1];
        sv[1] = t;
        return;
    }
    CHECK_EQ(dup3(sv[0], want, O_CLOEXEC), want);
    CHECK_EQ(close(sv[0]), 0);
    sv[0] = want;
}

/* The fd-reuse guard: a new file on an old number inherits neither the old
 * subscriptions nor the old queued bytes, and no evict callback is made. */
static void test_fd_reuse_guard(void) {
    fdcast *fc = new_fc();
    struct evict_log ev = {.fc = fc};
    fdcast_set_evict_callback(fc, on_evict, &ev);

    /* Through subscribe. */
    int old[2], fresh[2];
    make_pair(old);
    int num = old[0];
    CHECK(fdcast_subscribe(fc, T("old-topic"), num, FDCAST_RAW) > 0);
    CHECK(fdcast_subscribe(fc, T("old-topic-2"), num, FDCAST_RAW) > 0);
    close_pair(old); /* without unsubscribe_fd: the host's bug */
    pair_on_number(fresh, num);
    CHECK(fdcast_subscribe(fc, T("new-topic"), num, FDCAST_RAW) > 0);
    CHECK_EQ(fdcast_subscribers_for(fc, T("old-topic"), NULL, 0), 0);
    CHECK_EQ(fdcast_subscribers_for(fc, T("old-topic-2"), NULL, 0), 0);
    CHECK_EQ(fdcast_subscriber_count(fc), 1);
    CHECK_EQ(fdcast_publish(fc, T("old-topic"), "stale", 5), 0);
    CHECK_EQ(fdcast_publish(fc, T("new-topic"), "fresh", 5), 1);
    expect_bytes(fc, fresh[1], "fresh", 5);
    CHECK_EQ(ev.calls, 0);
    CHECK_EQ(fdcast_unsubscribe_fd(fc, num), 1);
    close_pair(fresh);

    /* Through send, with bytes still queued for the old file. */
    int slow[2];
    make_slow_pair(slow);
    num = slow[0];
    CHECK(fdcast_subscribe(fc, T("old-topic"), num, FDCAST_RAW) > 0);
    size_t big = 256 * 1024;
    unsigned char *p = malloc(big);
    CHECK(p != NULL);
    memset(p, 'o', big);
    CHECK_EQ(fdcast_publish(fc, T("old-topic"), p, big), 1);
    CHECK(fdcast_pending_bytes(fc, num) > 0);
    close_pair(slow);
    pair_on_number(fresh, num);
    CHECK_EQ(fdcast_send(fc, num, FDCAST_RAW, "hello new", 9), 0);
    expect_bytes(fc, fresh[1], "hello new", 9); /* none of the old 'o' bytes */
    CHECK_EQ(fdcast_pending_bytes(fc, num), 0);
    CHECK_EQ(fdcast_subscribers_for(fc, T("old-topic"), NULL, 0), 0);
    CHECK_EQ(get_stats(fc).queued_bytes, 0);
    CHECK_EQ(ev.calls, 0);

    free(p);
    fdcast_free(fc);
    close_pair(fresh);
}

/* ------------------------------------------------------------------------ */
/* Hooks                                                                    */

static void test_authorizer(void) {
    fdcast *fc = new_fc();
    struct auth_log log = {.fc = fc};
    int s[2];
    make_pair(s);
    fdcast_set_authorizer(fc, authorize, &log);

    int64_t id = fdcast_subscribe(fc, T("public"), s[0], FDCAST_SSE);
    CHECK(id > 0);
    CHECK_EQ(log.calls, 1);
    CHECK_EQ(log.topic_len, 6);
    CHECK(memcmp(log.topic, "public", 6) == 0);
    CHECK_EQ(log.fd, s[0]);
    CHECK_EQ(log.mode, FDCAST_SSE);
    CHECK_EQ(log.count_in_cb, 0); /* it may call back into the registry */

    CHECK_ERR(fdcast_subscribe(fc, T("secret-plans"), s[0], FDCAST_RAW), EACCES);
    CHECK_EQ(log.calls, 2);
    CHECK_EQ(log.mode, FDCAST_RAW);
    CHECK_EQ(fdcast_subscriber_count(fc), 1);
    CHECK_EQ(fdcast_publish(fc, T("secret-plans"), "x", 1), 0);

    /* It runs on every call, the idempotent repeat included, and sees the new mode. */
    CHECK_EQ(fdcast_subscribe(fc, T("public"), s[0], FDCAST_WS_TEXT), id);
    CHECK_EQ(log.calls, 3);
    CHECK_EQ(log.mode, FDCAST_WS_TEXT);
    CHECK_EQ(log.count_in_cb, 1);
    /* Argument errors are found before the authorizer is asked. */
    CHECK_ERR(fdcast_subscribe(fc, T("public"), s[0], (fdcast_mode)9), EINVAL);
    CHECK_ERR(fdcast_subscribe(fc, T("public"), -1, FDCAST_RAW), EBADF);
    CHECK_EQ(log.calls, 3);

    /* NULL allows everything again. */
    fdcast_set_authorizer(fc, NULL, NULL);
    CHECK(fdcast_subscribe(fc, T("secret-plans"), s[0], FDCAST_RAW) > 0);
    CHECK_EQ(log.calls, 3);
    CHECK_EQ(fdcast_publish(fc, T("secret-plans"), "ok", 2), 1);
    expect_bytes(fc, s[1], "ok", 2);

    /* A NULL evict callback is allowed too: eviction still happens. */
    fdcast_set_evict_callback(fc, NULL, NULL);
    CHECK_EQ(close(s[1]), 0);
    CHECK_EQ(fdcast_publish(fc, T("public"), "x", 1), 1);
    CHECK_EQ(fdcast_subscriber_count(fc), 0);

    fdcast_free(fc);
    CHECK_EQ(close(s[0]), 0);
}

/* The evict callback is not called for unsubscribe_fd, clear, or free. */
static void test_evict_callback_only_on_eviction(void) {
    fdcast *fc = new_fc();
    struct evict_log ev = {.fc = fc};
    fdcast_set_evict_callback(fc, on_evict, &ev);
    int a[2], b[2];
    make_slow_pair(a);
    make_pair(b);
    size_t big = 256 * 1024;
    unsigned char *p = malloc(big);
    CHECK(p != NULL);
    memset(p, 'z', big);
    CHECK(fdcast_subscribe(fc, T("t"), a[0], FDCAST_RAW) > 0);
    CHECK(fdcast_subscribe(fc, T("t"), b[0], FDCAST_RAW) > 0);
    CHECK_EQ(fdcast_publish(fc, T("t"), p, big), 2);
    CHECK_EQ(fdcast_unsubscribe_fd(fc, a[0]), 1);
    fdcast_clear(fc);
    CHECK(fdcast_subscribe(fc, T("t"), a[0], FDCAST_RAW) > 0);
    CHECK_EQ(fdcast_publish(fc, T("t"), p, big), 1);
    CHECK(fdcast_pending_bytes(fc, a[0]) > 0);
    CHECK_EQ(ev.calls, 0);
    fdcast_free(fc); /* with queued bytes and live subscriptions */
    CHECK_EQ(ev.calls, 0);
    free(p);
    close_pair(a);
    close_pair(b);
}

/* fdcast_dispatch is one thread at a time: a second concurrent call gets
 * -EBUSY. A negative timeout waits until there is work. */
struct dispatcher {
    fdcast *fc;
    int timeout;
    atomic_int started;
    atomic_int done;
    int64_t result;
};

static void *dispatch_thread(void *arg) {
    struct dispatcher *d = arg;
    atomic_store(&d->started, 1);
    d->result = fdcast_dispatch(d->fc, d->timeout);
    atomic_store(&d->done, 1);
    return NULL;
}

static void sleep_ms(int ms) {
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static void dispatch_busy_round(int timeout) {
    fdcast *fc = new_fc();
    struct dispatcher d = {.fc = fc, .timeout = timeout};
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, dispatch_thread, &d), 0);
    while (!atomic_load(&d.started)) sleep_ms(1);
    sleep_ms(300);
    CHECK_EQ(atomic_load(&d.done), 0); /* no work yet: still waiting */
    CHECK_ERR(fdcast_dispatch(fc, 0), EBUSY);

    /* Make work: a partly written frame, then the peer reads. */
    int s[2];
    make_slow_pair(s);
    size_t big = 128 * 1024;
    unsigned char *p = malloc(big);
    unsigned char *got = malloc(big);
    CHECK(p != NULL && got != NULL);
    fill_pattern(p, big, 21);
    CHECK_EQ(fdcast_send(fc, s[0], FDCAST_RAW, p, big), 0);
    CHECK(fdcast_pending_bytes(fc, s[0]) > 0);
    char tmp[1024];
    size_t n = 0;
    long long deadline = now_ms() + 10000;
    while (!atomic_load(&d.done)) {
        CHECK(now_ms() < deadline);
        ssize_t r = recv(s[1], tmp, sizeof tmp, MSG_DONTWAIT);
        if (r > 0) {
            CHECK(memcmp(tmp, p + n, (size_t)r) == 0);
            n += (size_t)r;
        } else {
            sleep_ms(1);
        }
    }
    CHECK_EQ(pthread_join(th, NULL), 0);
    CHECK(d.result >= 0);
    /* The rest, with this thread dispatching. */
    read_exact(fc, s[1], got, big - n);
    CHECK(memcmp(got, p + n, big - n) == 0);
    expect_nothing(s[1]);
    free(p);
    free(got);
    fdcast_free(fc);
    close_pair(s);
}

static void test_dispatch_busy_and_blocking(void) {
    dispatch_busy_round(-1);
    dispatch_busy_round(-7); /* any negative timeout waits */
}

/* ------------------------------------------------------------------------ */

int main(void) {
    /* A hang is a failure too (valgrind makes everything ~30x slower). */
    alarm(600);
    setvbuf(stdout, NULL, _IOLBF, 0);

    struct {
        const char *name;
        void (*fn)(void);
    } tests[] = {
        {"version_and_types", test_version},
        {"last_error", test_last_error},
        {"null_handle", test_null_handle},
        {"argument_errors", test_argument_errors},
        {"registry", test_registry},
        {"raw_and_publish_except", test_raw_and_publish_except},
        {"websocket_frames", test_websocket_frames},
        {"sse_frames", test_sse_frames},
        {"invalid_utf8", test_invalid_utf8},
        {"stats", test_stats},
        {"dispatch_flushes_slow_fd", test_dispatch_flushes_slow_fd},
        {"unsubscribe_and_queued_bytes", test_unsubscribe_and_queued_bytes},
        {"drop_message", test_drop_message},
        {"evict_policy", test_evict_policy},
        {"closed_peer", test_closed_peer},
        {"pipe", test_pipe},
        {"fd_reuse_guard", test_fd_reuse_guard},
        {"authorizer", test_authorizer},
        {"evict_callback_only_on_eviction", test_evict_callback_only_on_eviction},
        {"dispatch_busy_and_blocking", test_dispatch_busy_and_blocking},
    };
    size_t n = sizeof tests / sizeof tests[0];
    for (size_t i = 0; i < n; i++) {
        printf("test_api: %-34s ", tests[i].name);
        fflush(stdout);
        tests[i].fn();
        printf("ok\n");
    }
    printf("test_api: %zu tests, %lu checks passed (fdcast %s)\n", n, checks_run,
           fdcast_version());
    return 0;
}
