/*
 * test_catch_up.c: slow readers on topics with history, from C. A reader stalled for longer
 * than its outbox but within the history gets every message in order once it reads again;
 * one stalled past the history gets one gap callback with the exact count; fdcast_fd_stats
 * and fdcast_get_stats count both; bad arguments get -EINVAL / -ENOENT and change nothing.
 * Run by `make c-test` under ASan+UBSan and valgrind.
 */
#define _GNU_SOURCE
#include "check.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LINE_LEN 7 /* "000123\n" */

struct gap_log {
    int calls;
    int fd;
    char topic[16];
    uint64_t lost;
};

static void on_gap(void *user, int fd, const char *topic, size_t topic_len, uint64_t lost) {
    struct gap_log *log = user;
    log->calls++;
    log->fd = fd;
    CHECK(topic_len < sizeof log->topic);
    memcpy(log->topic, topic, topic_len);
    log->topic[topic_len] = '\0';
    log->lost = lost;
}

static void small_buffers(int sv[2]) {
    int size = 4096;
    CHECK_EQ(setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &size, sizeof size), 0);
    CHECK_EQ(setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &size, sizeof size), 0);
}

static void publish_lines(fdcast *fc, const char *topic, int from, int to) {
    char line[16];
    for (int n = from; n <= to; n++) {
        snprintf(line, sizeof line, "%06d\n", n);
        CHECK(fdcast_publish(fc, topic, strlen(topic), line, LINE_LEN) >= 0);
    }
}

/* Reads `reader` while dispatching until `fd` has nothing queued and is behind on nothing;
 * returns the bytes read (malloc'd) and their count in *len. */
static char *read_until_caught_up(fdcast *fc, int fd, int reader, size_t *len) {
    size_t cap = 1 << 20, got = 0;
    char *buf = malloc(cap);
    CHECK(buf != NULL);
    double deadline = now_seconds() + 20;
    for (;;) {
        got += read_now(reader, buf + got, cap - got);
        fdcast_fd_counters st;
        CHECK_EQ(fdcast_fd_stats(fc, fd, &st), 0);
        if (st.catching_up == 0 && st.queued_bytes == 0) {
            break;
        }
        CHECK(now_seconds() < deadline);
        CHECK(fdcast_dispatch(fc, 5) >= 0);
    }
    usleep(20000);
    got += read_now(reader, buf + got, cap - got);
    *len = got;
    return buf;
}

/* The message numbers in `buf`, which must be whole lines. */
static int parse_lines(const char *buf, size_t len, int *out, int cap) {
    CHECK_EQ(len % LINE_LEN, 0);
    int count = 0;
    for (size_t at = 0; at < len; at += LINE_LEN) {
        CHECK(count < cap);
        CHECK_EQ(buf[at + LINE_LEN - 1], '\n');
        out[count++] = atoi(buf + at);
    }
    return count;
}

static void stalled_inside_the_history(void) {
    fdcast *fc = fdcast_new();
    CHECK(fc != NULL);
    struct gap_log gaps = {0};
    CHECK_EQ(fdcast_set_gap_callback(fc, on_gap, &gaps), 0);
    CHECK_EQ(fdcast_set_history(fc, 10000, 0, 0), 0);
    CHECK_EQ(fdcast_set_outbox_limit(fc, 2000), 0);
    int sv[2];
    make_pair(sv);
    small_buffers(sv);
    CHECK(fdcast_subscribe(fc, T("t"), sv[0], FDCAST_RAW) > 0);
    publish_lines(fc, "t", 1, 3000);

    fdcast_fd_counters st;
    CHECK_EQ(fdcast_fd_stats(fc, sv[0], &st), 0);
    CHECK_EQ(st.catching_up, 1);
    CHECK_EQ(st.dropped, 0);
    CHECK_EQ(st.lost_to_gaps, 0);

    size_t len;
    char *buf = read_until_caught_up(fc, sv[0], sv[1], &len);
    static int got[4000];
    int count = parse_lines(buf, len, got, 4000);
    free(buf);
    CHECK_EQ(count, 3000);
    for (int i = 0; i < count; i++) {
        CHECK_EQ(got[i], i + 1);
    }
    CHECK_EQ(fdcast_fd_stats(fc, sv[0], &st), 0);
    CHECK_EQ(st.delivered, 3000);
    CHECK_EQ(st.dropped + st.lost_to_gaps + st.catching_up + st.queued_bytes, 0);
    CHECK_EQ(gaps.calls, 0);
    fdcast_free(fc);
    close(sv[0]);
    close(sv[1]);
}

static void stalled_past_the_history(void) {
    fdcast *fc = fdcast_new();
    CHECK(fc != NULL);
    struct gap_log gaps = {0};
    CHECK_EQ(fdcast_set_gap_callback(fc, on_gap, &gaps), 0);
    CHECK_EQ(fdcast_set_history(fc, 50, 0, 0), 0);
    CHECK_EQ(fdcast_set_outbox_limit(fc, 2000), 0);
    int sv[2];
    make_pair(sv);
    small_buffers(sv);
    CHECK(fdcast_subscribe(fc, T("gap"), sv[0], FDCAST_RAW) > 0);
    publish_lines(fc, "gap", 1, 3000);
    CHECK_EQ(gaps.calls, 0);

    size_t len;
    char *buf = read_until_caught_up(fc, sv[0], sv[1], &len);
    static int got[4000];
    int count = parse_lines(buf, len, got, 4000);
    free(buf);
    /* A prefix from before it fell behind, then the 50 the history kept. */
    int before = 0;
    while (before < count && got[before] == before + 1 && got[before] < 2951) {
        before++;
    }
    CHECK(before > 0);
    CHECK_EQ(count, before + 50);
    for (int i = 0; i < 50; i++) {
        CHECK_EQ(got[before + i], 2951 + i);
    }
    uint64_t lost = (uint64_t)(2951 - (before + 1));
    CHECK_EQ(gaps.calls, 1);
    CHECK_EQ(gaps.fd, sv[0]);
    CHECK(strcmp(gaps.topic, "gap") == 0);
    CHECK_EQ(gaps.lost, lost);

    fdcast_fd_counters st;
    CHECK_EQ(fdcast_fd_stats(fc, sv[0], &st), 0);
    CHECK_EQ(st.lost_to_gaps, lost);
    CHECK_EQ(st.delivered + st.lost_to_gaps, 3000);
    fdcast_stats totals;
    fdcast_get_stats(fc, &totals);
    CHECK_EQ(totals.lost_to_gaps, lost);
    CHECK_EQ(totals.dropped_messages, 0);

    /* Removing the callback keeps the counting. */
    CHECK_EQ(fdcast_set_gap_callback(fc, NULL, NULL), 0);
    fdcast_free(fc);
    close(sv[0]);
    close(sv[1]);
}

static void bad_arguments(void) {
    fdcast *fc = fdcast_new();
    CHECK(fc != NULL);
    int sv[2];
    make_pair(sv);
    fdcast_fd_counters st = {1, 2, 3, 4, 5};
    CHECK_EQ(fdcast_fd_stats(NULL, sv[0], &st), -EINVAL);
    CHECK_EQ(fdcast_fd_stats(fc, sv[0], NULL), -EINVAL);
    CHECK_EQ(fdcast_fd_stats(fc, sv[0], &st), -ENOENT);
    CHECK_EQ(fdcast_fd_stats(fc, -1, &st), -EBADF);
    CHECK_EQ(st.delivered + st.dropped + st.lost_to_gaps + st.queued_bytes + st.catching_up,
             15);
    CHECK_EQ(fdcast_set_gap_callback(NULL, on_gap, NULL), -EINVAL);
    CHECK(fdcast_subscribe(fc, T("t"), sv[0], FDCAST_RAW) > 0);
    CHECK_EQ(fdcast_publish(fc, T("t"), T("x")), 1);
    CHECK_EQ(fdcast_fd_stats(fc, sv[0], &st), 0);
    CHECK_EQ(st.delivered, 1);
    CHECK_EQ(st.dropped + st.lost_to_gaps + st.queued_bytes + st.catching_up, 0);
    fdcast_free(fc);
    close(sv[0]);
    close(sv[1]);
}

int main(void) {
    bad_arguments();
    stalled_inside_the_history();
    stalled_past_the_history();
    printf("test_catch_up: %lu checks passed\n", checks_run);
    return 0;
}
