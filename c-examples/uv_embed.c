/*
 * uv_embed: the Server-Sent Events fan-out of sse_fanout.c, in a libuv loop.
 *
 *   GET  /events/<topic>    the connection becomes a text/event-stream
 *                           subscriber of <topic>
 *   POST /publish/<topic>   publishes the request body to <topic>; answers
 *                           200 with the number of subscribers reached
 *
 * Usage: uv_embed [port]        (default 8080, or $FDCAST_PORT; 0 picks a
 *                                free port, printed on stdout)
 *   curl -N localhost:8080/events/news
 *   curl -d hello localhost:8080/publish/news      -> the first shows "data: hello"
 * $FDCAST_BROKER and $FDCAST_BROKER_NAME scale it out as for sse_fanout.c.
 *
 * Build: cc ... uv_embed.c -lfdcast $(pkg-config --cflags --libs libuv)
 *
 * The HTTP handling is sse_fanout.c's, in http_util.h; what differs is the
 * loop:
 *
 * - fdcast_fd(fc) is watched by a uv_poll_t for UV_READABLE; its callback
 *   calls fdcast_dispatch(fc, 0), which flushes the outboxes of slow clients
 *   that became writable. That is all the embedding there is: fdcast needs no
 *   timer and no thread of its own.
 * - Clients are uv_tcp_t handles: libuv accepts them and reads their requests
 *   (uv_read_start). libuv never writes to them: every byte to a client, the
 *   HTTP response included, goes through fdcast_send() or fdcast_publish(),
 *   on the raw fd from uv_fileno().
 *
 * Why fdcast may write to a socket that libuv owns:
 * - libuv writes to a stream only for uv_write/uv_try_write/uv_shutdown, which
 *   this program never calls. Its write queue stays empty, so it never polls
 *   the fd for writability and never writes: the bytes on the wire come from
 *   fdcast alone, in the order fdcast queued them, never interleaved.
 * - fdcast only writes (send with MSG_DONTWAIT | MSG_NOSIGNAL) and watches the
 *   fd for writability in its own epoll set; libuv only reads and watches for
 *   readability in its own. One fd in two epoll sets is fine on Linux, and
 *   neither changes the socket's flags behind the other (libuv made it
 *   non-blocking; fdcast leaves socket flags alone).
 * - The fd's life is libuv's: uv_close() closes it. So fdcast must forget the
 *   fd first: close_conn() calls fdcast_unsubscribe_fd() before uv_close(),
 *   or a new connection that reuses the number could be sent old frames.
 * - Under FDCAST_EVICT fdcast may shutdown(2) the socket; libuv then reads
 *   EOF and we close the handle as for any client that left.
 */
#define _GNU_SOURCE
#include "http_util.h"

#include <uv.h>

struct conn {
    uv_tcp_t tcp; /* first member: a handle pointer is a conn pointer */
    struct fanout_client client; /* client.fd is uv_fileno(tcp): where fdcast writes */
    bool closed;  /* uv_close() called; freed in its callback */
};

static uv_loop_t loop;
static uv_tcp_t server;
static uv_poll_t fdcast_watcher; /* fdcast_fd() readable -> fdcast_dispatch() */
static uv_check_t reaper;        /* after each poll phase: close evicted/done conns */
static uv_signal_t sigint_watcher, sigterm_watcher;
static fdcast *fc;
static struct conn *conns[MAX_FDS];
static struct evictions evictions; /* closed by the check handle */
static size_t n_closing;

/* ------------------------------------------------------------------------ */
/* connections                                                              */

static void free_conn(uv_handle_t *h) {
    struct conn *c = (struct conn *)h;
    free(c->client.body);
    free(c);
}

static void close_conn(struct conn *c) {
    if (c->closed) return;
    c->closed = true;
    /* fdcast first: uv_close() closes the fd at once, and the number may be
     * reused by the very next accept. */
    int64_t dropped = fdcast_unsubscribe_fd(fc, c->client.fd);
    (void)dropped;
    if (c->client.state == FANOUT_CLOSING) n_closing--;
    evictions_forget(&evictions, c->client.fd);
    conns[c->client.fd] = NULL;
    uv_close((uv_handle_t *)&c->tcp, free_conn);
}

/* uv_check_t: runs once per loop iteration, right after the poll phase, so
 * once per batch of callbacks, like the reaping at the end of sse_fanout's
 * epoll batch. */
static void on_check(uv_check_t *h) {
    (void)h;
    int reason;
    for (int fd; (fd = evictions_next(&evictions, &reason)) >= 0;)
        if (conns[fd] != NULL) close_conn(conns[fd]);
    /* Close connections whose last response bytes have left the outbox. */
    for (int fd = 0; fd < MAX_FDS && n_closing > 0; fd++) {
        struct conn *c = conns[fd];
        if (c != NULL && c->client.state == FANOUT_CLOSING && fdcast_pending_bytes(fc, fd) == 0)
            close_conn(c);
    }
}

/* ------------------------------------------------------------------------ */
/* libuv callbacks                                                          */

/* libuv reads straight into the connection's buffers (fanout_buffer). */
static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    struct conn *c = (struct conn *)h;
    (void)suggested;
    size_t room;
    char *dst = fanout_buffer(&c->client, &room);
    *buf = uv_buf_init(dst, (unsigned)room);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    struct conn *c = (struct conn *)s;
    (void)buf;
    if (nread == 0) return; /* EAGAIN */
    if (nread < 0) {
        /* EOF or error. A closing response still being flushed is kept until
         * the check handle sees it leave (the client may have only shut down
         * its sending side). */
        if (nread == UV_EOF && c->client.state == FANOUT_CLOSING &&
            fdcast_pending_bytes(fc, c->client.fd) > 0) {
            uv_read_stop(s);
            return;
        }
        close_conn(c);
        return;
    }
    switch (fanout_input(fc, &c->client, (size_t)nread)) {
    case FANOUT_READ_MORE: break;
    case FANOUT_CLOSE_WHEN_FLUSHED: n_closing++; break; /* the check handle closes it */
    case FANOUT_CLOSE: close_conn(c); break;
    }
}

static void on_connection(uv_stream_t *srv, int status) {
    if (status < 0) {
        fprintf(stderr, "uv_embed: accept: %s\n", uv_strerror(status));
        return;
    }
    struct conn *c = calloc(1, sizeof *c);
    if (c == NULL) {
        fprintf(stderr, "uv_embed: out of memory\n");
        exit(1);
    }
    uv_tcp_init(&loop, &c->tcp);
    int rc = uv_accept(srv, (uv_stream_t *)&c->tcp);
    uv_os_fd_t fd = -1;
    if (rc == 0) rc = uv_fileno((uv_handle_t *)&c->tcp, &fd);
    if (rc == 0 && fd >= MAX_FDS) rc = UV_EMFILE;
    if (rc == 0) rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    if (rc != 0) {
        fprintf(stderr, "uv_embed: new connection: %s\n", uv_strerror(rc));
        uv_close((uv_handle_t *)&c->tcp, free_conn);
        return;
    }
    c->client.fd = fd;
    c->client.state = FANOUT_READING_HEAD;
    conns[fd] = c;
}

/* fdcast_fd() became readable: slow clients can take more bytes. */
static void on_fdcast(uv_poll_t *h, int status, int events) {
    (void)h;
    (void)events;
    if (status < 0) {
        fprintf(stderr, "uv_embed: poll fdcast_fd: %s\n", uv_strerror(status));
        return;
    }
    int64_t served = fdcast_dispatch(fc, 0);
    if (served < 0) fprintf(stderr, "uv_embed: dispatch: %s\n", strerror((int)-served));
}

/* SIGINT/SIGTERM: close every handle; uv_run() returns when they are gone. */
static void on_signal(uv_signal_t *h, int signum) {
    (void)h;
    (void)signum;
    printf("uv_embed: shutting down\n");
    fflush(stdout);
    for (int fd = 0; fd < MAX_FDS; fd++)
        if (conns[fd] != NULL) close_conn(conns[fd]);
    uv_close((uv_handle_t *)&server, NULL);
    uv_close((uv_handle_t *)&fdcast_watcher, NULL);
    uv_close((uv_handle_t *)&reaper, NULL);
    uv_close((uv_handle_t *)&sigint_watcher, NULL);
    uv_close((uv_handle_t *)&sigterm_watcher, NULL);
}

/* ------------------------------------------------------------------------ */

static void check_uv(int rc, const char *what) {
    if (rc < 0) {
        fprintf(stderr, "uv_embed: %s: %s\n", what, uv_strerror(rc));
        exit(1);
    }
}

int main(int argc, char **argv) {
    int port = port_from_args(argc, argv, 8080);

    check_uv(uv_loop_init(&loop), "uv_loop_init");

    /* A client more than the outbox limit (1 MiB) behind is disconnected
     * rather than silently missing events; EventSource then reconnects. The
     * broker's socket is inside fdcast_fd(): the poll below covers it. */
    int fcfd;
    fc = evicting_fdcast(&evictions, &fcfd);
    fanout_enable_broker(fc);
    /* The whole embedding: fdcast's fd in the loop, dispatch when readable. */
    check_uv(uv_poll_init(&loop, &fdcast_watcher, fcfd), "uv_poll_init");
    check_uv(uv_poll_start(&fdcast_watcher, UV_READABLE, on_fdcast), "uv_poll_start");
    check_uv(uv_check_init(&loop, &reaper), "uv_check_init");
    check_uv(uv_check_start(&reaper, on_check), "uv_check_start");

    struct sockaddr_in addr;
    check_uv(uv_ip4_addr("127.0.0.1", port, &addr), "uv_ip4_addr");
    check_uv(uv_tcp_init(&loop, &server), "uv_tcp_init");
    check_uv(uv_tcp_bind(&server, (const struct sockaddr *)&addr, 0), "bind");
    check_uv(uv_listen((uv_stream_t *)&server, 128, on_connection), "listen");
    int alen = sizeof addr;
    check_uv(uv_tcp_getsockname(&server, (struct sockaddr *)&addr, &alen), "getsockname");

    check_uv(uv_signal_init(&loop, &sigint_watcher), "uv_signal_init");
    check_uv(uv_signal_start(&sigint_watcher, on_signal, SIGINT), "uv_signal_start");
    check_uv(uv_signal_init(&loop, &sigterm_watcher), "uv_signal_init");
    check_uv(uv_signal_start(&sigterm_watcher, on_signal, SIGTERM), "uv_signal_start");

    printf("uv_embed: listening on http://127.0.0.1:%d (fdcast %s, libuv %s)\n",
           ntohs(addr.sin_port), fdcast_version(), uv_version_string());
    fflush(stdout);

    check_uv(uv_run(&loop, UV_RUN_DEFAULT), "uv_run");

    fdcast_free(fc);
    check_uv(uv_loop_close(&loop), "uv_loop_close");
    return 0;
}
