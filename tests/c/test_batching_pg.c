/*
 * test_batching_pg.c: the Batching and PostgreSQL sections of the C API, from C.
 *
 * Corking over real socketpairs, every error path of fdcast_cork/uncork/flush and of the
 * fdcast_pg_* functions, and one live round trip between two registries through the
 * PostgreSQL server at $FDCAST_PG_URL (default postgresql://127.0.0.1:5432/test, TLS off so
 * valgrind sees only fdcast and libpq). A missing server fails the test. Run by
 * `make c-test` under ASan+UBSan and valgrind.
 */
#define _GNU_SOURCE
#include "check.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static void test_batching_errors(void) {
    CHECK_EQ(fdcast_cork(NULL), -EINVAL);
    CHECK(fdcast_last_error()[0] != '\0');
    CHECK_EQ(fdcast_uncork(NULL), -EINVAL);
    CHECK_EQ(fdcast_flush(NULL), -EINVAL);
}

static void test_cork_queues_until_flush(void) {
    fdcast *fc = fdcast_new();
    CHECK(fc != NULL);
    int a[2], b[2];
    make_pair(a);
    make_pair(b);
    CHECK(fdcast_subscribe(fc, T("t"), a[0], FDCAST_RAW) > 0);
    CHECK(fdcast_subscribe(fc, T("t"), b[0], FDCAST_WS_TEXT) > 0);

    CHECK_EQ(fdcast_cork(fc), 0);
    CHECK_EQ(fdcast_cork(fc), 0); /* twice is once */
    CHECK_EQ(fdcast_publish(fc, T("t"), "ab", 2), 2);
    CHECK_EQ(fdcast_publish(fc, T("t"), "cd", 2), 2);
    CHECK_EQ(fdcast_send(fc, a[0], FDCAST_RAW, "!", 1), 0);
    char buf[64];
    CHECK_EQ(read_now(a[1], buf, sizeof buf), 0);
    CHECK_EQ(fdcast_pending_bytes(fc, a[0]), 5);

    /* fdcast_fd() turns readable, and dispatch writes the queued frames. */
    struct pollfd pfd = {.fd = fdcast_fd(fc), .events = POLLIN};
    CHECK_EQ(poll(&pfd, 1, 1000), 1);
    CHECK_EQ(fdcast_flush(fc), 2);
    CHECK_EQ(read_now(a[1], buf, sizeof buf), 5);
    CHECK(memcmp(buf, "abcd!", 5) == 0);
    CHECK_EQ(read_now(b[1], buf, sizeof buf), 8);
    CHECK(memcmp(buf, "\x81\x02" "ab\x81\x02" "cd", 8) == 0);
    CHECK_EQ(fdcast_flush(fc), 0);

    CHECK_EQ(fdcast_publish(fc, T("t"), "ef", 2), 2);
    CHECK_EQ(fdcast_uncork(fc), 2);
    CHECK_EQ(read_now(a[1], buf, sizeof buf), 2);
    CHECK_EQ(fdcast_publish(fc, T("t"), "gh", 2), 2); /* immediate again */
    CHECK_EQ(read_now(a[1], buf, sizeof buf), 2);
    CHECK(memcmp(buf, "gh", 2) == 0);

    fdcast_stats stats;
    fdcast_get_stats(fc, &stats);
    CHECK_EQ(stats.deliveries, 9);
    CHECK_EQ(stats.queued_bytes, 0);
    CHECK_EQ(fdcast_dispatch(fc, 0), 0);
    fdcast_free(fc);
    for (int i = 0; i < 2; i++) {
        close(a[i]);
        close(b[i]);
    }
}

static void test_pg_errors(const char *url) {
    CHECK_EQ(fdcast_pg_enable(NULL, url, "c"), -EINVAL);
    CHECK_EQ(fdcast_pg_poll_once(NULL, 0), -EINVAL);
    fdcast_pg_disable(NULL);
    fdcast_pg_get_stats(NULL, NULL);
    fdcast_pg_stats zeroed;
    memset(&zeroed, 0xff, sizeof zeroed);
    fdcast_pg_get_stats(NULL, &zeroed);
    CHECK_EQ(zeroed.sent, 0);
    CHECK_EQ(zeroed.connected, 0);

    fdcast *fc = fdcast_new();
    CHECK(fc != NULL);
    CHECK_EQ(fdcast_pg_enable(fc, NULL, "c"), -EINVAL);
    CHECK_EQ(fdcast_pg_enable(fc, url, NULL), -EINVAL);
    CHECK_EQ(fdcast_pg_enable(fc, "no = such = thing", "c"), -EINVAL);
    CHECK(strstr(fdcast_last_error(), "conninfo") != NULL);
    CHECK_EQ(fdcast_pg_enable(fc, url, ""), -EINVAL);
    CHECK_EQ(fdcast_pg_enable(fc, "postgresql://127.0.0.1:1/test?connect_timeout=2", "c"),
             -ECONNREFUSED);
    CHECK(fdcast_last_error()[0] != '\0');
    CHECK_EQ(fdcast_pg_poll_once(fc, 0), -ENOTCONN);
    fdcast_pg_disable(fc); /* after a failed enable: a no-op */
    fdcast_free(fc);
}

static void test_pg_round_trip(const char *url) {
    char channel[64];
    snprintf(channel, sizeof channel, "fdcast_c_%ld", (long)getpid());
    fdcast *sender = fdcast_new();
    fdcast *receiver = fdcast_new();
    CHECK(sender != NULL && receiver != NULL);
    CHECK_EQ(fdcast_pg_enable(sender, url, channel), 0);
    CHECK_EQ(fdcast_pg_enable(receiver, url, channel), 0);
    CHECK_EQ(fdcast_pg_enable(receiver, url, channel), -EALREADY);

    int sv[2];
    make_pair(sv);
    CHECK(fdcast_subscribe(receiver, T("room:1"), sv[0], FDCAST_SSE) > 0);

    /* Refused before anything is written anywhere. */
    char big[8000];
    memset(big, 'x', sizeof big);
    CHECK_EQ(fdcast_publish(sender, T("room:1"), big, sizeof big), -EMSGSIZE);
    CHECK_EQ(fdcast_publish(sender, T("room:1"), "a\0b", 3), -EILSEQ);
    CHECK_EQ(fdcast_publish(sender, T("room:1"), "\xff", 1), -EILSEQ);

    CHECK_EQ(fdcast_publish(sender, T("room:1"), "hi", 2), 0);
    const char want[] = "data: hi\n\n";
    char got[64];
    size_t have = 0;
    double deadline = now_seconds() + 20;
    while (have < sizeof want - 1) {
        CHECK(now_seconds() < deadline);
        /* The host-driven style: no dispatch, only pg_poll_once. */
        CHECK(fdcast_pg_poll_once(receiver, 100) >= 0);
        have += read_now(sv[1], got + have, sizeof got - have);
    }
    CHECK_EQ(have, sizeof want - 1);
    CHECK(memcmp(got, want, have) == 0);

    fdcast_pg_stats stats;
    fdcast_pg_get_stats(receiver, &stats);
    CHECK_EQ(stats.received, 1);
    CHECK_EQ(stats.connected, 1);
    CHECK_EQ(stats.malformed, 0);

    fdcast_pg_disable(sender);
    fdcast_pg_get_stats(sender, &stats);
    CHECK_EQ(stats.connected, 0);
    CHECK_EQ(fdcast_publish(sender, T("room:1"), "a\0b", 3), 0); /* local-only again */

    fdcast_free(sender);
    fdcast_free(receiver); /* frees a live connection too */
    close(sv[0]);
    close(sv[1]);
}

int main(void) {
    const char *env = getenv("FDCAST_PG_URL");
    char url[512];
    snprintf(url, sizeof url, "%s%ssslmode=disable",
             env ? env : "postgresql://127.0.0.1:5432/test",
             env && strchr(env, '?') ? "&" : "?");
    test_batching_errors();
    test_cork_queues_until_flush();
    test_pg_errors(url);
    test_pg_round_trip(url);
    printf("test_batching_pg: %lu checks passed\n", checks_run);
    return 0;
}
