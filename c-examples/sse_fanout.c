/*
 * sse_fanout: a Server-Sent Events fan-out server on fdcast, in one epoll loop.
 *
 *   GET  /events/<topic>    the connection becomes a text/event-stream
 *                           subscriber of <topic>
 *   POST /publish/<topic>   publishes the request body to <topic>; answers
 *                           200 with the number of subscribers reached
 *
 * Usage: sse_fanout [port]      (default 8080, or $FDCAST_PORT; 0 picks a
 *                                free port, printed on stdout)
 *   curl -N localhost:8080/events/news
 *   curl -d hello localhost:8080/publish/news      -> the first shows "data: hello"
 *
 * Scaled out: with $FDCAST_BROKER set to a broker URL (redis://127.0.0.1:6379,
 * nats://127.0.0.1:4222, postgresql://127.0.0.1/test), every sse_fanout
 * process on that broker with the same $FDCAST_BROKER_NAME (default
 * "sse_fanout") serves one set of topics: a POST to any of them reaches the
 * event streams of all of them. The 200's count is the local subscribers.
 *
 * fdcast owns framing and slow readers, and http_util.h the HTTP of the two
 * endpoints (uv_embed.c serves them too): this file is the epoll loop, and
 * the life of a connection in it.
 */
#define _GNU_SOURCE
#include "http_util.h"

#include <sys/epoll.h>

static fdcast *fc;
static int ep = -1;
static struct fanout_client *conns[MAX_FDS];
static struct evictions evictions;
static size_t n_closing;

/* ------------------------------------------------------------------------ */
/* connections                                                              */

static void close_conn(struct fanout_client *c) {
    /* Forget the fd before close(2): the number may be reused by the very
     * next accept(), and fdcast must not write old frames to it. */
    int fd = c->fd;
    int64_t dropped = fdcast_unsubscribe_fd(fc, fd);
    (void)dropped;
    if (c->state == FANOUT_CLOSING) n_closing--;
    evictions_forget(&evictions, fd);
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    conns[fd] = NULL;
    free(c->body);
    free(c);
}

static void reap_evicted(void) {
    int reason;
    for (int fd; (fd = evictions_next(&evictions, &reason)) >= 0;)
        if (conns[fd] != NULL) close_conn(conns[fd]);
}

/* Close connections whose last response bytes have left fdcast's outbox. */
static void reap_closing(void) {
    for (int fd = 0; fd < MAX_FDS && n_closing > 0; fd++) {
        struct fanout_client *c = conns[fd];
        if (c != NULL && c->state == FANOUT_CLOSING && fdcast_pending_bytes(fc, fd) == 0)
            close_conn(c);
    }
}

/* Reads what the client sent, in whatever pieces it arrives. */
static void on_client(struct fanout_client *c) {
    for (;;) {
        size_t room;
        char *dst = fanout_buffer(c, &room);
        ssize_t r = recv(c->fd, dst, room, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        if (r <= 0) {
            /* EOF or error. A closing response still being flushed is kept
             * until reap_closing sees it leave (the client may have only
             * shut down its sending side). */
            if (r == 0 && c->state == FANOUT_CLOSING &&
                fdcast_pending_bytes(fc, c->fd) > 0) {
                struct epoll_event e = {.events = 0, .data.fd = c->fd};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
                return;
            }
            close_conn(c);
            return;
        }
        switch (fanout_input(fc, c, (size_t)r)) {
        case FANOUT_READ_MORE: continue;
        case FANOUT_CLOSE_WHEN_FLUSHED: n_closing++; return; /* reap_closing closes it */
        case FANOUT_CLOSE: close_conn(c); return;
        }
    }
}

static void accept_all(int lfd) {
    for (int fd; (fd = accept_next(lfd)) >= 0;) {
        struct fanout_client *c = calloc(1, sizeof *c);
        if (c == NULL || !epoll_watch(ep, fd)) {
            close(fd);
            free(c);
            continue;
        }
        c->fd = fd;
        c->state = FANOUT_READING_HEAD;
        conns[fd] = c;
    }
}

/* ------------------------------------------------------------------------ */

int main(int argc, char **argv) {
    int port = port_from_args(argc, argv, 8080);
    /* SIGINT/SIGTERM arrive as reads on a signalfd in the same epoll set. */
    int sfd = signals_fd();
    int bound_port;
    int lfd = listen_loopback(port, &bound_port);

    /* A client more than the outbox limit (1 MiB) behind is disconnected
     * rather than silently missing events; EventSource then reconnects. */
    int fcfd;
    fc = evicting_fdcast(&evictions, &fcfd);
    fanout_enable_broker(fc);
    int watch[] = {lfd, sfd, fcfd};
    ep = epoll_watching(watch, sizeof watch / sizeof watch[0]);

    printf("sse_fanout: listening on http://127.0.0.1:%d (fdcast %s)\n", bound_port,
           fdcast_version());
    fflush(stdout);

    bool running = true;
    while (running) {
        struct epoll_event evs[64];
        int n = epoll_wait(ep, evs, 64, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == sfd) {
                struct signalfd_siginfo si;
                if (read(sfd, &si, sizeof si) == (ssize_t)sizeof si) running = false;
            } else if (fd == lfd) {
                accept_all(lfd);
            } else if (fd == fcfd) {
                /* Slow clients became writable: let fdcast flush their outboxes. */
                int64_t served = fdcast_dispatch(fc, 0);
                if (served < 0)
                    fprintf(stderr, "sse_fanout: dispatch: %s\n", strerror((int)-served));
            } else if (fd >= 0 && fd < MAX_FDS && conns[fd] != NULL) {
                on_client(conns[fd]);
            }
        }
        reap_evicted();
        if (n_closing > 0) reap_closing();
    }

    printf("sse_fanout: shutting down\n");
    for (int fd = 0; fd < MAX_FDS; fd++)
        if (conns[fd] != NULL) close_conn(conns[fd]);
    fdcast_free(fc);
    close(ep);
    close(lfd);
    close(sfd);
    return 0;
}
