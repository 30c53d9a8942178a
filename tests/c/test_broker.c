/*
 * test_broker.c: the Brokers section of the C API, from C.
 *
 * Every error path of fdcast_broker_*, then, for each engine, a live round trip between two
 * registries: a message crosses in the subscriber's framing, the publisher's own subscriber
 * gets it once (the engine's echo is filtered), the counters say so, and interest routing
 * follows the receiver's subscriptions; history shared through Redis streams and through NATS
 * JetStream. Servers: $FDCAST_REDIS_URL (default
 * redis://127.0.0.1:6379), $FDCAST_NATS_URL (nats://127.0.0.1:4222, with JetStream: -js),
 * $FDCAST_PG_URL (postgresql://127.0.0.1:5432/test, TLS off so valgrind sees only fdcast and
 * libpq). A missing server fails the test. Run by `make c-test` under ASan+UBSan and valgrind.
 */
#define _GNU_SOURCE
#include "check.h"

#include <ctype.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const char *env_or(const char *name, const char *fallback) {
    const char *value = getenv(name);
    return value && *value ? value : fallback;
}

static void test_errors(const char *redis_url) {
    CHECK_EQ(fdcast_broker_enable(NULL, redis_url, "p"), -EINVAL);
    CHECK(fdcast_last_error()[0] != '\0');
    CHECK_EQ(fdcast_broker_poll_once(NULL, 0), -EINVAL);
    fdcast_broker_disable(NULL);
    fdcast_broker_get_stats(NULL, NULL);
    fdcast_broker_stats zeroed;
    memset(&zeroed, 0xff, sizeof zeroed);
    fdcast_broker_get_stats(NULL, &zeroed);
    CHECK_EQ(zeroed.published, 0);
    CHECK_EQ(zeroed.connected, 0);
    CHECK_EQ(zeroed.topics, 0);

    fdcast *fc = fdcast_new();
    CHECK(fc != NULL);
    CHECK_EQ(fdcast_broker_enable(fc, NULL, "p"), -EINVAL);
    CHECK_EQ(fdcast_broker_enable(fc, redis_url, NULL), -EINVAL);
    CHECK_EQ(fdcast_broker_enable(fc, "\xff", "p"), -EINVAL);
    CHECK_EQ(fdcast_broker_enable(fc, "gopher://127.0.0.1", "p"), -EINVAL);
    CHECK(strstr(fdcast_last_error(), "scheme") != NULL);
    CHECK_EQ(fdcast_broker_enable(fc, "redis://127.0.0.1:notaport", "p"), -EINVAL);
    CHECK_EQ(fdcast_broker_enable(fc, "nats://127.0.0.1:4222", "bad subject"), -EINVAL);
    CHECK_EQ(fdcast_broker_enable(fc, "redis://127.0.0.1:6379?ca=ca.pem", "p"), -EINVAL);
    CHECK(strstr(fdcast_last_error(), "TLS") != NULL);
    CHECK_EQ(fdcast_broker_enable(fc, "redis://127.0.0.1:6379?bogus=1", "p"), -EINVAL);
    /* TLS to a server that does not speak it (NATS greets in the clear): the handshake
     * fails. */
    CHECK_EQ(fdcast_broker_enable(fc, "rediss://127.0.0.1:4222", "p"), -ECONNREFUSED);
    CHECK(strstr(fdcast_last_error(), "TLS") != NULL);
    /* Port 1: nothing listens, the connection is refused at once. */
    CHECK_EQ(fdcast_broker_enable(fc, "redis://127.0.0.1:1", "p"), -ECONNREFUSED);
    CHECK(fdcast_last_error()[0] != '\0');
    CHECK_EQ(fdcast_broker_enable(fc, "nats://127.0.0.1:1", "p"), -ECONNREFUSED);
    CHECK_EQ(fdcast_broker_poll_once(fc, 0), -ENOTCONN);
    fdcast_broker_disable(fc); /* after failed enables: a no-op */
    /* The first address refuses: the enable goes on to the next at once. */
    CHECK_EQ(fdcast_broker_enable(fc, "nats://127.0.0.1:1,127.0.0.1:4222", "p"), 0);
    fdcast_broker_disable(fc);
    fdcast_broker_stats stats;
    fdcast_broker_get_stats(fc, &stats);
    CHECK_EQ(stats.connected, 0);
    /* Nothing is left enabled: publishing is local-only and never refused. */
    CHECK_EQ(fdcast_publish(fc, T("t"), "a\0b", 3), 0);
    fdcast_free(fc);
}

/* Polls `fc` until `fd` has `want` (exactly, and nothing more after a few more polls). */
static void expect_bytes(fdcast *fc, int fd, const char *want, size_t want_len) {
    char got[256];
    size_t have = 0;
    double deadline = now_seconds() + 20;
    while (have < want_len) {
        CHECK(now_seconds() < deadline);
        CHECK(fdcast_broker_poll_once(fc, 50) >= 0);
        have += read_now(fd, got + have, sizeof got - have);
    }
    for (int i = 0; i < 3; i++) {
        CHECK(fdcast_broker_poll_once(fc, 20) >= 0);
        have += read_now(fd, got + have, sizeof got - have);
    }
    CHECK_EQ(have, want_len);
    CHECK(memcmp(got, want, want_len) == 0);
}

/* Polls `fc` until its broker reports `topics` subscribed topics. */
static void expect_topics(fdcast *fc, uint64_t topics) {
    fdcast_broker_stats stats;
    double deadline = now_seconds() + 20;
    for (;;) {
        CHECK(fdcast_broker_poll_once(fc, 20) >= 0);
        fdcast_broker_get_stats(fc, &stats);
        if (stats.topics == topics) return;
        CHECK(now_seconds() < deadline);
    }
}

static void test_round_trip(const char *engine, const char *url, int routes_interest) {
    char name[64];
    snprintf(name, sizeof name, "fdcast_c_%s_%ld", engine, (long)getpid());
    fdcast *sender = fdcast_new();
    fdcast *receiver = fdcast_new();
    CHECK(sender != NULL && receiver != NULL);

    int at_receiver[2], at_sender[2];
    make_pair(at_receiver);
    make_pair(at_sender);
    /* Subscribed before enable: the enable subscribes the engine to it. */
    CHECK(fdcast_subscribe(receiver, T("room:1"), at_receiver[0], FDCAST_WS_TEXT) > 0);
    CHECK(fdcast_subscribe(sender, T("room:1"), at_sender[0], FDCAST_RAW) > 0);
    CHECK_EQ(fdcast_broker_enable(receiver, url, name), 0);
    CHECK_EQ(fdcast_broker_enable(sender, url, name), 0);
    CHECK_EQ(fdcast_broker_enable(sender, url, name), -EALREADY);

    fdcast_broker_stats stats;
    fdcast_broker_get_stats(receiver, &stats);
    CHECK_EQ(stats.connected, 1);
    CHECK_EQ(stats.topics, routes_interest ? 1 : 0);

    CHECK_EQ(fdcast_publish(sender, T("room:1"), "hi", 2), 1);
    expect_bytes(receiver, at_receiver[1], "\x81\x02hi", 4);
    /* Once locally, at publish time, and not again when the engine echoes it. */
    expect_bytes(sender, at_sender[1], "hi", 2);

    fdcast_broker_get_stats(receiver, &stats);
    CHECK_EQ(stats.received, 1);
    CHECK_EQ(stats.malformed, 0);
    CHECK_EQ(stats.dropped, 0);
    fdcast_broker_get_stats(sender, &stats);
    CHECK_EQ(stats.published, 1);
    CHECK_EQ(stats.received, 0);
    CHECK_EQ(stats.queued, 0);

    if (routes_interest) {
        /* The receiver's last subscriber leaves: the engine stops sending it room:1. */
        CHECK_EQ(fdcast_unsubscribe_fd(receiver, at_receiver[0]), 1);
        expect_topics(receiver, 0);
        CHECK_EQ(fdcast_publish(sender, T("room:1"), "gone", 4), 1);
        expect_bytes(sender, at_sender[1], "gone", 4);
        for (int i = 0; i < 5; i++) CHECK(fdcast_broker_poll_once(receiver, 20) >= 0);
        fdcast_broker_get_stats(receiver, &stats);
        CHECK_EQ(stats.received, 1);
    }

    fdcast_broker_disable(sender);
    fdcast_broker_get_stats(sender, &stats);
    CHECK_EQ(stats.connected, 0);
    CHECK_EQ(fdcast_broker_poll_once(sender, 0), -ENOTCONN);
    fdcast_broker_disable(sender); /* twice: a no-op */

    fdcast_free(sender);
    fdcast_free(receiver); /* frees a live connection too */
    for (int i = 0; i < 2; i++) {
        close(at_receiver[i]);
        close(at_sender[i]);
    }
}

/* NATS refuses a payload over the server's max_payload (1 MiB by default) before anything
 * is written, and counts nothing. */
static void test_nats_payload_limit(const char *url) {
    fdcast *fc = fdcast_new();
    CHECK(fc != NULL);
    CHECK_EQ(fdcast_broker_enable(fc, url, "fdcast_c_limit"), 0);
    size_t size = ((size_t)64 << 20) + 1; /* over NATS's hard cap: refused whatever the server's setting */
    char *big = calloc(size, 1);
    CHECK(big != NULL);
    CHECK_EQ(fdcast_publish(fc, T("t"), big, size), -EMSGSIZE);
    CHECK(strstr(fdcast_last_error(), "NATS") != NULL);
    free(big);
    fdcast_broker_stats stats;
    fdcast_broker_get_stats(fc, &stats);
    CHECK_EQ(stats.queued, 0);
    CHECK_EQ(stats.dropped, 0);
    fdcast_free(fc);
}

/* Polls `fc` until `buf`, holding `have` bytes read from `fd`, holds `n` at least; returns
 * how many it holds. */
static size_t poll_for(fdcast *fc, int fd, char *buf, size_t cap, size_t have, size_t n) {
    double deadline = now_seconds() + 20;
    while (have < n) {
        CHECK(now_seconds() < deadline);
        CHECK(fdcast_broker_poll_once(fc, 50) >= 0);
        have += read_now(fd, buf + have, cap - have);
    }
    return have;
}

/* History shared through Redis streams: the publisher learns no id (Redis gives it later),
 * a reader in another registry gets the stream's id, and a third registry that never saw
 * the topic resumes after the first message with recovered = 1. */
static void test_shared_history(const char *url) {
    char name[64];
    snprintf(name, sizeof name, "fdcast_c_shared_%ld:", (long)getpid());
    fdcast *sender = fdcast_new();
    fdcast *reader = fdcast_new();
    fdcast *resumer = fdcast_new();
    CHECK(sender != NULL && reader != NULL && resumer != NULL);
    int at_reader[2], at_resumer[2];
    make_pair(at_reader);
    make_pair(at_resumer);
    fdcast *all[3] = {sender, reader, resumer};
    for (int i = 0; i < 3; i++) {
        CHECK_EQ(fdcast_set_history(all[i], 10, 0, 0), 0);
        CHECK_EQ(fdcast_broker_enable(all[i], url, name), 0);
    }
    CHECK(fdcast_subscribe_tail(reader, T("news"), at_reader[0], FDCAST_WS_TEXT_ID, 0) > 0);

    char id[FDCAST_MAX_EVENT_ID_LEN + 1];
    memset(id, 'x', sizeof id);
    CHECK_EQ(fdcast_publish_id(sender, T("news"), "a", 1, -1, id, sizeof id), 0);
    CHECK_EQ(strlen(id), 0);
    CHECK_EQ(fdcast_publish_id(sender, T("news"), "b", 1, -1, id, sizeof id), 0);
    for (int i = 0; i < 20; i++) CHECK(fdcast_broker_poll_once(sender, 10) >= 0);

    /* Two frames "\x81 <len> <id>\n<payload>". */
    char got[256];
    size_t have = 0;
    char first[FDCAST_MAX_EVENT_ID_LEN + 1], second[FDCAST_MAX_EVENT_ID_LEN + 1];
    char *ids[2] = {first, second};
    for (int i = 0; i < 2; i++) {
        have = poll_for(reader, at_reader[1], got, sizeof got, have, 2);
        size_t len = (unsigned char)got[1];
        have = poll_for(reader, at_reader[1], got, sizeof got, have, 2 + len);
        CHECK_EQ((unsigned char)got[0], 0x81);
        char *lf = memchr(got + 2, '\n', len);
        CHECK(lf != NULL);
        size_t id_len = (size_t)(lf - (got + 2));
        CHECK(id_len > 0 && id_len <= FDCAST_MAX_EVENT_ID_LEN);
        memcpy(ids[i], got + 2, id_len);
        ids[i][id_len] = 0;
        CHECK_EQ(got[2 + len - 1], i == 0 ? 'a' : 'b');
        memmove(got, got + 2 + len, have - (2 + len));
        have -= 2 + len;
    }
    CHECK(strcmp(first, second) != 0);

    int recovered = -1;
    CHECK(fdcast_subscribe_since(resumer, T("news"), at_resumer[0], FDCAST_SSE, first,
                                 strlen(first), &recovered) > 0);
    CHECK_EQ(recovered, 1);
    char want[128];
    int want_len = snprintf(want, sizeof want, "id: %s\ndata: b\n\n", second);
    expect_bytes(resumer, at_resumer[1], want, (size_t)want_len);

    for (int i = 0; i < 3; i++) fdcast_free(all[i]);
    for (int i = 0; i < 2; i++) {
        close(at_reader[i]);
        close(at_resumer[i]);
    }
}

/* Reads one SSE frame "id: <id>\ndata: <one line>\n\n" from `fd`, polling `fc`: its id into
 * `id` (FDCAST_MAX_EVENT_ID_LEN + 1 bytes), its data line into `data` (`data_cap` bytes),
 * and the whole frame into `frame` (`frame_cap` bytes). Reads a byte at a time, so that
 * nothing of the next frame is consumed. */
static void read_sse_frame(fdcast *fc, int fd, char *id, char *data, size_t data_cap,
                           char *frame, size_t frame_cap) {
    size_t have = 0;
    double deadline = now_seconds() + 20;
    while (have < 2 || frame[have - 1] != '\n' || frame[have - 2] != '\n') {
        CHECK(now_seconds() < deadline);
        CHECK(have + 1 < frame_cap);
        if (read_now(fd, frame + have, 1) == 1) {
            have++;
        } else {
            CHECK(fdcast_broker_poll_once(fc, 20) >= 0);
        }
    }
    frame[have] = 0;
    const char *data_at = strstr(frame, "\ndata: ");
    CHECK(strncmp(frame, "id: ", 4) == 0 && data_at != NULL);
    size_t id_len = (size_t)(data_at - (frame + 4));
    CHECK(id_len > 0 && id_len <= FDCAST_MAX_EVENT_ID_LEN);
    memcpy(id, frame + 4, id_len);
    id[id_len] = 0;
    size_t data_len = have - (size_t)(data_at + 7 - frame) - 2;
    CHECK(data_len < data_cap);
    memcpy(data, data_at + 7, data_len);
    data[data_len] = 0;
}

/* Splits a JetStream id "<created>-<seq>" (two decimal numbers, the stream's creation time
 * in nanoseconds and the message's stream sequence); fails the test on any other form. */
static void split_stream_id(const char *id, unsigned long long *created,
                            unsigned long long *seq) {
    const char *dash = strchr(id, '-');
    CHECK(dash != NULL && dash > id && dash[1] != 0);
    for (const char *c = id; *c; c++) CHECK(c == dash || isdigit((unsigned char)*c));
    *created = strtoull(id, NULL, 10);
    *seq = strtoull(dash + 1, NULL, 10);
    CHECK(*seq > 0);
}

static unsigned long long wall_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ULL + (unsigned long long)ts.tv_nsec;
}

/* A connection of a plain NATS client to the server of `url` ("nats://[user@]host[:port]",
 * the first of a list), past the server's INFO and our CONNECT. */
static int nats_plain_connect(const char *url) {
    char host[256];
    const char *at = strstr(url, "://");
    at = at ? at + 3 : url;
    const char *user_end = strchr(at, '@');
    if (user_end) at = user_end + 1;
    size_t len = strcspn(at, ",/?");
    CHECK(len > 0 && len < sizeof host);
    memcpy(host, at, len);
    host[len] = 0;
    const char *port = "4222";
    char *colon = strrchr(host, ':');
    if (colon) {
        *colon = 0;
        port = colon + 1;
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    struct addrinfo *found = NULL;
    CHECK_EQ(getaddrinfo(host, port, &hints, &found), 0);
    int fd = socket(found->ai_family, found->ai_socktype | SOCK_CLOEXEC, found->ai_protocol);
    CHECK(fd >= 0);
    CHECK_EQ(connect(fd, found->ai_addr, found->ai_addrlen), 0);
    freeaddrinfo(found);
    static const char hello[] = "CONNECT {\"verbose\":false,\"pedantic\":false}\r\n";
    CHECK_EQ(write(fd, hello, sizeof hello - 1), (long)(sizeof hello - 1));
    return fd;
}

/* Sends `request` on the plain connection `fd` and returns (NUL-terminated, in `buf`) the
 * payload of the first MSG that answers it within 10 s; PINGs meanwhile are answered. */
static const char *nats_plain_answer(int fd, const char *request, char *buf, size_t cap) {
    size_t request_len = strlen(request);
    CHECK_EQ(write(fd, request, request_len), (long)request_len);
    size_t have = 0;
    double deadline = now_seconds() + 10;
    for (;;) {
        char *end = memmem(buf, have, "\r\n", 2);
        if (end) {
            size_t line = (size_t)(end - buf) + 2;
            if (have >= 4 && memcmp(buf, "MSG ", 4) == 0) {
                *end = 0;
                const char *size_at = strrchr(buf, ' ');
                size_t size = strtoul(size_at + 1, NULL, 10);
                *end = '\r';
                CHECK(line + size + 2 < cap);
                if (have >= line + size + 2) {
                    memmove(buf, buf + line, size);
                    buf[size] = 0;
                    return buf;
                }
            } else {
                CHECK(have < 4 || memcmp(buf, "-ERR", 4) != 0);
                if (line == 6 && memcmp(buf, "PING", 4) == 0) {
                    CHECK_EQ(write(fd, "PONG\r\n", 6), 6);
                }
                memmove(buf, buf + line, have - line);
                have -= line;
                continue;
            }
        }
        CHECK(now_seconds() < deadline);
        CHECK(have + 1 < cap);
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        if (poll(&pfd, 1, 100) == 1) {
            ssize_t n = read(fd, buf + have, cap - 1 - have);
            CHECK(n > 0);
            have += (size_t)n;
        }
    }
}

/* History shared through NATS JetStream, from C: registry A publishes (its publish_id learns
 * no id: the stream gives it), registry B's FDCAST_SSE reader gets every message with the
 * stream's "<created>-<seq>" ids, A's own SSE reader gets the same frames byte for byte and
 * its except fd nothing; a resume through B from an id A's reader saw recovers the rest, in
 * order. The stream is deleted at the end, by a plain client, so runs do not pile up on the
 * server's disk (and its deletion proves the history went through JetStream). */
static void test_shared_history_nats(const char *url) {
    /* Only letters, digits and '-': the stream's name is then "fdcast_" + the name as it is
     * (other bytes would be escaped as _XX). Unique per run: pid and wall-clock ns. */
    unsigned long long started = wall_ns();
    char name[96], stream[128];
    snprintf(name, sizeof name, "fdcast-c-js-%ld-%llu", (long)getpid(), started);
    snprintf(stream, sizeof stream, "fdcast_%s", name);

    fdcast *a = fdcast_new();
    fdcast *b = fdcast_new();
    CHECK(a != NULL && b != NULL);
    int at_a[2], at_a_except[2], at_b[2], at_resumer[2];
    make_pair(at_a);
    make_pair(at_a_except);
    make_pair(at_b);
    make_pair(at_resumer);
    fdcast *both[2] = {a, b};
    for (int i = 0; i < 2; i++) {
        CHECK_EQ(fdcast_set_history(both[i], 100, 0, 0), 0);
        CHECK_EQ(fdcast_broker_enable(both[i], url, name), 0);
    }
    /* Tails of 0 wait for the topic's consumer to be in place: the messages below then come
     * live, not as the fill. */
    CHECK(fdcast_subscribe_tail(a, T("news"), at_a[0], FDCAST_SSE, 0) > 0);
    CHECK(fdcast_subscribe_tail(a, T("news"), at_a_except[0], FDCAST_SSE, 0) > 0);
    CHECK(fdcast_subscribe_tail(b, T("news"), at_b[0], FDCAST_SSE, 0) > 0);

    static const char *const payloads[3] = {"one", "two", "three"};
    char id[FDCAST_MAX_EVENT_ID_LEN + 1];
    for (int i = 0; i < 3; i++) {
        memset(id, 'x', sizeof id);
        /* It will reach A's reader, not the except fd. */
        CHECK_EQ(fdcast_publish_id(a, T("news"), payloads[i], strlen(payloads[i]),
                                   at_a_except[0], id, sizeof id),
                 1);
        CHECK_EQ(strlen(id), 0);
    }

    char ids[3][FDCAST_MAX_EVENT_ID_LEN + 1], frames[3][128];
    unsigned long long created = 0, last_seq = 0;
    for (int i = 0; i < 3; i++) {
        char data[32];
        read_sse_frame(b, at_b[1], ids[i], data, sizeof data, frames[i], sizeof frames[i]);
        CHECK(strcmp(data, payloads[i]) == 0);
        unsigned long long frame_created, seq;
        split_stream_id(ids[i], &frame_created, &seq);
        CHECK(i == 0 || frame_created == created);
        /* The epoch is the stream's creation time (ns since 1970), and the stream is this
         * run's, made after `started` (same machine, same clock; a second's slack for
         * clock steps), not a registry's random epoch. */
        CHECK(frame_created + 1000000000ULL >= started && frame_created <= wall_ns());
        CHECK(seq > last_seq);
        created = frame_created;
        last_seq = seq;
    }
    /* A's own reader: the same ids, the same frames, byte for byte. */
    char a_ids[3][FDCAST_MAX_EVENT_ID_LEN + 1];
    for (int i = 0; i < 3; i++) {
        char data[32], frame[128];
        read_sse_frame(a, at_a[1], a_ids[i], data, sizeof data, frame, sizeof frame);
        CHECK(strcmp(a_ids[i], ids[i]) == 0);
        CHECK(strcmp(frame, frames[i]) == 0);
    }
    /* The except fd: nothing, though A delivered all three to its other reader by now. */
    char scratch[64];
    for (int i = 0; i < 3; i++) CHECK(fdcast_broker_poll_once(a, 20) >= 0);
    CHECK_EQ(read_now(at_a_except[1], scratch, sizeof scratch), 0);
    fdcast_fd_counters counters;
    CHECK_EQ(fdcast_fd_stats(a, at_a_except[0], &counters), 0);
    CHECK_EQ(counters.delivered, 0);

    /* Through B, from the first id A's reader saw: the two after it, in order, recovered. */
    int recovered = -1;
    CHECK(fdcast_subscribe_since(b, T("news"), at_resumer[0], FDCAST_SSE, a_ids[0],
                                 strlen(a_ids[0]), &recovered) > 0);
    CHECK_EQ(recovered, 1);
    char want[256];
    int want_len = snprintf(want, sizeof want, "%s%s", frames[1], frames[2]);
    CHECK(want_len > 0 && (size_t)want_len < sizeof want);
    expect_bytes(b, at_resumer[1], want, (size_t)want_len);

    fdcast_free(a);
    fdcast_free(b);
    int fds[4][2];
    memcpy(fds[0], at_a, sizeof at_a);
    memcpy(fds[1], at_a_except, sizeof at_a_except);
    memcpy(fds[2], at_b, sizeof at_b);
    memcpy(fds[3], at_resumer, sizeof at_resumer);
    for (int i = 0; i < 4; i++) {
        close(fds[i][0]);
        close(fds[i][1]);
    }

    int plain = nats_plain_connect(url);
    char request[512], answer[4096];
    snprintf(request, sizeof request,
             "SUB _INBOX.%s 1\r\nPUB $JS.API.STREAM.DELETE.%s _INBOX.%s 0\r\n\r\n", name, stream,
             name);
    CHECK(strstr(nats_plain_answer(plain, request, answer, sizeof answer),
                 "\"success\":true") != NULL);
    close(plain);
}

int main(void) {
    const char *redis_url = env_or("FDCAST_REDIS_URL", "redis://127.0.0.1:6379");
    const char *nats_url = env_or("FDCAST_NATS_URL", "nats://127.0.0.1:4222");
    const char *pg_env = env_or("FDCAST_PG_URL", "postgresql://127.0.0.1:5432/test");
    char pg_url[512];
    snprintf(pg_url, sizeof pg_url, "%s%ssslmode=disable", pg_env,
             strchr(pg_env, '?') ? "&" : "?");

    test_errors(redis_url);
    test_round_trip("redis", redis_url, 1);
    test_round_trip("nats", nats_url, 1);
    test_round_trip("pg", pg_url, 0);
    test_nats_payload_limit(nats_url);
    test_shared_history(redis_url);
    test_shared_history_nats(nats_url);
    printf("test_broker: %lu checks passed\n", checks_run);
    return 0;
}
