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
 * The HTTP handling is sse_fanout.c's; what differs is the loop:
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
#include "fdcast.h"

#include <arpa/inet.h>
#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <uv.h>

#define MAX_HEAD 8192       /* request line + headers */
#define MAX_BODY (1 << 20)  /* largest POST body we accept */
#define MAX_FDS 16384       /* connections are looked up by fd number */

enum state {
    READING_HEAD, /* waiting for the blank line that ends the headers */
    READING_BODY, /* POST: waiting for Content-Length bytes */
    STREAMING,    /* subscribed: fdcast writes, libuv only watches for EOF */
    CLOSING,      /* response queued: close once fdcast has flushed it */
};

struct conn {
    uv_tcp_t tcp; /* first member: a handle pointer is a conn pointer */
    int fd;       /* uv_fileno(tcp): where fdcast writes */
    enum state state;
    bool evicted; /* set by the evict callback; reaped by the check handle */
    bool closed;  /* uv_close() called; freed in its callback */
    char head[MAX_HEAD + 1];
    size_t head_len;
    const char *topic; /* points into head */
    size_t topic_len;
    char *body;
    size_t body_len, body_want;
};

static uv_loop_t loop;
static uv_tcp_t server;
static uv_poll_t fdcast_watcher; /* fdcast_fd() readable -> fdcast_dispatch() */
static uv_check_t reaper;        /* after each poll phase: close evicted/done conns */
static uv_signal_t sigint_watcher, sigterm_watcher;
static fdcast *fc;
static struct conn *conns[MAX_FDS];
static int evicted[MAX_FDS]; /* fds reported by the evict callback */
static size_t n_evicted;
static size_t n_closing;

/* ------------------------------------------------------------------------ */
/* connections                                                              */

static void free_conn(uv_handle_t *h) {
    struct conn *c = (struct conn *)h;
    free(c->body);
    free(c);
}

static void close_conn(struct conn *c) {
    if (c->closed) return;
    c->closed = true;
    /* fdcast first: uv_close() closes the fd at once, and the number may be
     * reused by the very next accept. */
    int64_t dropped = fdcast_unsubscribe_fd(fc, c->fd);
    (void)dropped;
    if (c->state == CLOSING) n_closing--;
    conns[c->fd] = NULL;
    uv_close((uv_handle_t *)&c->tcp, free_conn);
}

/* Called by fdcast inside publish/send/dispatch, on the loop thread, when a
 * peer is gone or too slow. We may be inside a callback for that very
 * connection, so only record it; the check handle closes it. */
static void on_evict(void *user, int fd, int reason) {
    (void)user;
    (void)reason;
    if (fd >= 0 && fd < MAX_FDS && conns[fd] != NULL && !conns[fd]->evicted) {
        conns[fd]->evicted = true;
        evicted[n_evicted++] = fd;
    }
}

/* uv_check_t: runs once per loop iteration, right after the poll phase, so
 * once per batch of callbacks, like the reaping at the end of sse_fanout's
 * epoll batch. */
static void on_check(uv_check_t *h) {
    (void)h;
    for (size_t i = 0; i < n_evicted; i++) {
        struct conn *c = conns[evicted[i]];
        if (c != NULL && c->evicted) close_conn(c);
    }
    n_evicted = 0;
    /* Close connections whose last response bytes have left the outbox. */
    for (int fd = 0; fd < MAX_FDS && n_closing > 0; fd++) {
        struct conn *c = conns[fd];
        if (c != NULL && c->state == CLOSING && fdcast_pending_bytes(fc, fd) == 0) close_conn(c);
    }
}

/* Any failure (peer gone, outbox full) means the connection is done. */
static bool send_raw(struct conn *c, const char *p, size_t n) {
    return fdcast_send(fc, c->fd, FDCAST_RAW, p, n) == 0;
}

/* A complete response with a text body; the connection closes after it. */
static void respond(struct conn *c, const char *status, const char *text) {
    char buf[512];
    int n = snprintf(buf, sizeof buf,
                     "HTTP/1.1 %s\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n"
                     "Connection: close\r\n\r\n%s",
                     status, strlen(text), text);
    bool ok = n > 0 && (size_t)n < sizeof buf && send_raw(c, buf, (size_t)n);
    if (c->state != CLOSING) n_closing++;
    c->state = CLOSING;
    if (!ok || fdcast_pending_bytes(fc, c->fd) == 0) close_conn(c);
}

/* ------------------------------------------------------------------------ */
/* HTTP (as in sse_fanout.c)                                                */

static void start_stream(struct conn *c) {
    static const char head[] = "HTTP/1.1 200 OK\r\n"
                               "Content-Type: text/event-stream\r\n"
                               "Cache-Control: no-cache\r\n"
                               "Connection: keep-alive\r\n"
                               "\r\n";
    /* Headers first, then subscribe: everything is on the loop thread, so no
     * publish can run in between and the first event follows the headers. */
    if (!send_raw(c, head, sizeof head - 1)) {
        close_conn(c);
        return;
    }
    int64_t id = fdcast_subscribe(fc, c->topic, c->topic_len, c->fd, FDCAST_SSE);
    if (id < 0) {
        fprintf(stderr, "uv_embed: subscribe: %s\n", strerror((int)-id));
        close_conn(c);
        return;
    }
    c->state = STREAMING;
}

static void finish_publish(struct conn *c) {
    int64_t n = fdcast_publish(fc, c->topic, c->topic_len, c->body, c->body_len);
    free(c->body);
    c->body = NULL;
    char text[64];
    if (n >= 0) {
        snprintf(text, sizeof text, "%lld\n", (long long)n);
        respond(c, "200 OK", text);
    } else if (n == -EILSEQ) {
        respond(c, "400 Bad Request", "payload is not valid UTF-8\n");
    } else {
        snprintf(text, sizeof text, "%s\n", strerror((int)-n));
        respond(c, "500 Internal Server Error", text);
    }
}

/* Case-insensitive header name match on a "Name: value" line. */
static const char *header_value(const char *line, size_t len, const char *name) {
    size_t nl = strlen(name);
    if (len <= nl || line[nl] != ':' || strncasecmp(line, name, nl) != 0) return NULL;
    const char *v = line + nl + 1;
    while (*v == ' ' || *v == '\t') v++;
    return v;
}

/* Parses c->head (NUL-terminated, ends with the blank line at head_end) and
 * acts on the request; bytes after head_end are the start of the body.
 * May close c. */
static void handle_request(struct conn *c, size_t head_end) {
    char *line_end = strstr(c->head, "\r\n");
    /* Request line: METHOD SP TARGET SP HTTP/1.x */
    char *sp1 = memchr(c->head, ' ', (size_t)(line_end - c->head));
    char *sp2 = sp1 ? memchr(sp1 + 1, ' ', (size_t)(line_end - sp1 - 1)) : NULL;
    if (sp1 == NULL || sp2 == NULL || line_end - sp2 - 1 != 8 ||
        strncmp(sp2 + 1, "HTTP/1.", 7) != 0) {
        respond(c, "400 Bad Request", "bad request line\n");
        return;
    }
    bool is_11 = sp2[8] == '1';
    size_t mlen = (size_t)(sp1 - c->head);
    const char *target = sp1 + 1;
    size_t tlen = (size_t)(sp2 - target);
    const char *q = memchr(target, '?', tlen);
    if (q != NULL) tlen = (size_t)(q - target);

    /* Headers: only Content-Length, Expect and Transfer-Encoding matter. */
    long long content_length = -1;
    bool expect_continue = false;
    for (char *l = line_end + 2; l < c->head + head_end - 2;) {
        char *e = strstr(l, "\r\n");
        size_t len = (size_t)(e - l);
        const char *v;
        if (memchr(l, ':', len) == NULL) {
            respond(c, "400 Bad Request", "bad header line\n");
            return;
        }
        if ((v = header_value(l, len, "Content-Length")) != NULL) {
            char *end;
            errno = 0;
            long long cl = strtoll(v, &end, 10);
            while (*end == ' ' || *end == '\t') end++;
            if (errno != 0 || end != e || cl < 0 || *v < '0' || *v > '9' ||
                (content_length >= 0 && cl != content_length)) {
                respond(c, "400 Bad Request", "bad Content-Length\n");
                return;
            }
            content_length = cl;
        } else if ((v = header_value(l, len, "Expect")) != NULL) {
            expect_continue = strncasecmp(v, "100-continue", 12) == 0;
        } else if (header_value(l, len, "Transfer-Encoding") != NULL) {
            respond(c, "501 Not Implemented", "chunked bodies are not supported\n");
            return;
        }
        l = e + 2;
    }

    static const char ev[] = "/events/", pub[] = "/publish/";
    if (mlen == 3 && memcmp(c->head, "GET", 3) == 0 && tlen > sizeof ev - 1 &&
        memcmp(target, ev, sizeof ev - 1) == 0) {
        c->topic = target + sizeof ev - 1;
        c->topic_len = tlen - (sizeof ev - 1);
    } else if (mlen == 4 && memcmp(c->head, "POST", 4) == 0 && tlen > sizeof pub - 1 &&
               memcmp(target, pub, sizeof pub - 1) == 0) {
        c->topic = target + sizeof pub - 1;
        c->topic_len = tlen - (sizeof pub - 1);
    } else {
        respond(c, "404 Not Found", "not found\n");
        return;
    }
    if (c->topic_len > FDCAST_MAX_TOPIC_LEN) {
        respond(c, "414 URI Too Long", "topic too long\n");
        return;
    }

    if (mlen == 3) {
        start_stream(c);
        return;
    }

    if (content_length < 0) {
        respond(c, "411 Length Required", "Content-Length required\n");
        return;
    }
    if (content_length > MAX_BODY) {
        respond(c, "413 Content Too Large", "body too large\n");
        return;
    }
    c->body_want = (size_t)content_length;
    c->body = malloc(c->body_want ? c->body_want : 1);
    if (c->body == NULL) {
        respond(c, "500 Internal Server Error", "out of memory\n");
        return;
    }
    /* Body bytes that came in the same reads as the head. */
    size_t extra = c->head_len - head_end;
    c->body_len = extra < c->body_want ? extra : c->body_want;
    memcpy(c->body, c->head + head_end, c->body_len);
    if (c->body_len == c->body_want) {
        finish_publish(c);
        return;
    }
    /* curl sends "Expect: 100-continue" for large bodies and waits (a while)
     * for this interim response before sending the body. */
    if (expect_continue && is_11 && c->body_len == 0) {
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        if (!send_raw(c, cont, sizeof cont - 1)) {
            close_conn(c);
            return;
        }
    }
    c->state = READING_BODY;
}

/* ------------------------------------------------------------------------ */
/* libuv callbacks                                                          */

/* libuv reads straight into the connection's buffers: the head, the body,
 * or (once the request is complete) a scratch buffer whose bytes we drop. */
static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    static char scratch[4096];
    struct conn *c = (struct conn *)h;
    (void)suggested;
    switch (c->state) {
    case READING_HEAD:
        *buf = uv_buf_init(c->head + c->head_len, (unsigned)(MAX_HEAD - c->head_len));
        break;
    case READING_BODY:
        *buf = uv_buf_init(c->body + c->body_len, (unsigned)(c->body_want - c->body_len));
        break;
    default:
        *buf = uv_buf_init(scratch, sizeof scratch);
        break;
    }
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    struct conn *c = (struct conn *)s;
    (void)buf;
    if (nread == 0) return; /* EAGAIN */
    if (nread < 0) {
        /* EOF or error. A CLOSING response still being flushed is kept until
         * the check handle sees it leave (the client may have only shut down
         * its sending side). */
        if (nread == UV_EOF && c->state == CLOSING && fdcast_pending_bytes(fc, c->fd) > 0) {
            uv_read_stop(s);
            return;
        }
        close_conn(c);
        return;
    }
    if (c->state == READING_HEAD) {
        c->head_len += (size_t)nread;
        c->head[c->head_len] = '\0';
        char *end = memmem(c->head, c->head_len, "\r\n\r\n", 4);
        if (end == NULL) {
            if (c->head_len == MAX_HEAD)
                respond(c, "431 Request Header Fields Too Large", "request head too large\n");
            return;
        }
        size_t head_end = (size_t)(end - c->head) + 4;
        if (memchr(c->head, '\0', head_end) != NULL) {
            respond(c, "400 Bad Request", "NUL in request head\n");
            return;
        }
        handle_request(c, head_end); /* may close c */
    } else if (c->state == READING_BODY) {
        c->body_len += (size_t)nread;
        if (c->body_len == c->body_want) finish_publish(c);
    }
    /* STREAMING, CLOSING: a client has nothing more to say; dropped. */
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
    c->fd = fd;
    c->state = READING_HEAD;
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

static int parse_port(const char *s) {
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < 0 || v > 65535) {
        fprintf(stderr, "uv_embed: bad port '%s'\n", s);
        exit(2);
    }
    return (int)v;
}

static void check_uv(int rc, const char *what) {
    if (rc < 0) {
        fprintf(stderr, "uv_embed: %s: %s\n", what, uv_strerror(rc));
        exit(1);
    }
}

int main(int argc, char **argv) {
    int port = 8080;
    const char *env = getenv("FDCAST_PORT");
    if (argc > 1)
        port = parse_port(argv[1]);
    else if (env != NULL && *env != '\0')
        port = parse_port(env);

    check_uv(uv_loop_init(&loop), "uv_loop_init");

    fc = fdcast_new();
    if (fc == NULL) {
        fprintf(stderr, "uv_embed: fdcast_new: %s\n", fdcast_last_error());
        return 1;
    }
    fdcast_set_evict_callback(fc, on_evict, NULL);
    /* A client more than the outbox limit (1 MiB) behind is disconnected
     * rather than silently missing events; EventSource then reconnects. */
    if (fdcast_set_overflow(fc, FDCAST_EVICT) < 0) {
        fprintf(stderr, "uv_embed: fdcast_set_overflow: %s\n", fdcast_last_error());
        return 1;
    }
    const char *broker = getenv("FDCAST_BROKER");
    if (broker != NULL && *broker != '\0') {
        const char *name = getenv("FDCAST_BROKER_NAME");
        /* The broker's socket is inside fdcast_fd(): the poll below covers it. */
        if (fdcast_broker_enable(fc, broker, name && *name ? name : "sse_fanout") < 0) {
            fprintf(stderr, "uv_embed: broker %s: %s\n", broker, fdcast_last_error());
            return 1;
        }
    }
    int fcfd = fdcast_fd(fc);
    if (fcfd < 0) {
        fprintf(stderr, "uv_embed: fdcast_fd: %s\n", strerror(-fcfd));
        return 1;
    }
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
