/*
 * fdcast_server.c: a tiny pub/sub server on fdcast, for the comparison with Redis pub/sub
 * (pubsub.c): publishers and subscribers connect to a Unix socket and speak a length-prefixed
 * protocol.
 *
 * Request: an 8-byte header, then the topic, then the payload:
 *   byte 0     'S' (subscribe this connection to the topic, RAW frames) or 'P' (publish)
 *   byte 1     topic length (1..255)
 *   bytes 2-3  zero
 *   bytes 4-7  payload length, little-endian (0 for 'S')
 * A subscribe is answered with the one byte 'K'; a publish is not answered. Subscribers then
 * receive each payload as it is (RAW).
 *
 * The loop works like Redis's: it reads at most 16 KiB per ready connection per iteration
 * (Redis's PROTO_IOBUF_LEN), publishes with fdcast corked, and flushes once per iteration,
 * so each subscriber gets one write per iteration, as Redis's before-sleep flush gives.
 * Back-pressure: with more than 64 MiB queued it stops reading until dispatch has written
 * half of it (Redis instead buffers without bound when its pubsub limit is 0, as here).
 *
 * usage: fdcast_server SOCKET_PATH    (runs until killed)
 */
#define _GNU_SOURCE
#include "common.h"
#include "fdcast.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/un.h>
#include <unistd.h>

enum { READ_MAX = 16 * 1024, BUF_CAP = 16 * 1024 + 8 + 255 + 65536, HIGH_WATER = 64 << 20 };

typedef struct conn {
    int fd;
    size_t len;
    unsigned char buf[BUF_CAP];
} conn;

static fdcast *fc;

/* Handles the complete requests in c->buf; returns -1 on a protocol error. */
static int handle(conn *c) {
    size_t at = 0;
    while (c->len - at >= 8) {
        const unsigned char *h = c->buf + at;
        size_t topic_len = h[1];
        size_t payload_len = (size_t)h[4] | (size_t)h[5] << 8 | (size_t)h[6] << 16 | (size_t)h[7] << 24;
        if (topic_len == 0 || payload_len > 65536 || (h[0] != 'S' && h[0] != 'P')) return -1;
        if (c->len - at < 8 + topic_len + payload_len) break;
        const char *topic = (const char *)h + 8;
        if (h[0] == 'S') {
            if (fdcast_subscribe(fc, topic, topic_len, c->fd, FDCAST_RAW) <= 0 ||
                fdcast_send(fc, c->fd, FDCAST_RAW, "K", 1) != 0)
                return -1;
        } else if (fdcast_publish(fc, topic, topic_len, topic + topic_len, payload_len) < 0) {
            return -1;
        }
        at += 8 + topic_len + payload_len;
    }
    memmove(c->buf, c->buf + at, c->len - at);
    c->len -= at;
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) die("usage: fdcast_server SOCKET_PATH");
    raise_nofile();
    fc = fdcast_new();
    if (!fc || fdcast_set_outbox_limit(fc, (size_t)1 << 30) != 0 || fdcast_cork(fc) != 0)
        die("fdcast_new");

    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", argv[1]);
    unlink(addr.sun_path);
    int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(lfd, 4096) != 0 ||
        ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev) != 0)
        die("listen on %s", argv[1]);
    static conn fdcast_marker; /* data.ptr of fdcast_fd() */
    ev.data.ptr = &fdcast_marker;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fdcast_fd(fc), &ev) != 0) die("epoll_ctl");

    struct epoll_event events[256];
    for (;;) {
        int k = epoll_wait(ep, events, 256, -1);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) die("epoll_wait");
        for (int i = 0; i < k; i++) {
            conn *c = events[i].data.ptr;
            if (c == &fdcast_marker) {
                if (fdcast_dispatch(fc, 0) < 0) die("fdcast_dispatch");
            } else if (c == NULL) {
                int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
                if (fd < 0) continue;
                conn *nc = malloc(sizeof *nc);
                if (!nc) die("malloc");
                nc->fd = fd;
                nc->len = 0;
                ev.data.ptr = nc;
                if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) die("epoll_ctl");
            } else {
                size_t room = BUF_CAP - c->len < READ_MAX ? BUF_CAP - c->len : READ_MAX;
                ssize_t got = read(c->fd, c->buf + c->len, room);
                if (got < 0 && (errno == EAGAIN || errno == EINTR)) continue;
                if (got > 0) c->len += (size_t)got;
                if (got <= 0 || handle(c) != 0) { /* EOF, error or protocol error: close */
                    (void)fdcast_unsubscribe_fd(fc, c->fd);
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                    close(c->fd);
                    free(c);
                }
            }
        }
        if (fdcast_flush(fc) < 0) die("fdcast_flush"); /* one write per subscriber */
        fc_settle(fc, HIGH_WATER, HIGH_WATER / 2);
    }
}
