/*
 * http_util.h: what the examples share, so that each file shows only what it
 * is about.
 *
 *   - a server's setup: the port, SIGINT/SIGTERM as a signalfd, a listening
 *     socket on 127.0.0.1 and its new connections, a registry that evicts slow
 *     clients, an epoll set, a monotonic clock;
 *   - an HTTP/1.1 request head: finding its end, its request line, a header's
 *     value, and the text of a response;
 *   - the request side of sse_fanout.c's two endpoints (GET /events/<topic>,
 *     POST /publish/<topic>), which uv_embed.c serves from a libuv loop: the
 *     examples differ only in how they read, watch and close connections.
 *
 * Every function is static inline: an example includes this file after
 * defining _GNU_SOURCE, and uses what it needs.
 */
#ifndef FDCAST_EXAMPLES_HTTP_UTIL_H
#define FDCAST_EXAMPLES_HTTP_UTIL_H

#include "fdcast.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------------ */
/* a server's setup                                                         */

#define MAX_FDS 16384 /* connections are looked up by fd number, below this */

static inline void die(const char *what) {
    perror(what);
    exit(1);
}

/* The port to listen on: argv[1], else $FDCAST_PORT, else `fallback`. 0 lets
 * the kernel pick one. Exits with status 2 on anything but 0-65535. */
static inline int port_from_args(int argc, char **argv, int fallback) {
    const char *s = argc > 1 ? argv[1] : getenv("FDCAST_PORT");
    if (argc <= 1 && (s == NULL || *s == '\0')) return fallback;
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < 0 || v > 65535) {
        fprintf(stderr, "%s: bad port '%s'\n", program_invocation_short_name, s);
        exit(2);
    }
    return (int)v;
}

/* SIGINT and SIGTERM as reads on a signalfd, so that an epoll loop shuts down
 * between events, never inside one. Call it before any thread exists, so
 * that every thread inherits the blocked mask. */
static inline int signals_fd(void) {
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGTERM);
    if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0) die("sigprocmask");
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sfd < 0) die("signalfd");
    return sfd;
}

/* Milliseconds on the monotonic clock. */
static inline long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* A non-blocking TCP socket listening on 127.0.0.1:`port`; the port it got
 * in *bound_port (the kernel's pick for port 0). */
static inline int listen_loopback(int port, int *bound_port) {
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0) die("socket");
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(lfd, 128) < 0) die("listen");
    socklen_t alen = sizeof addr;
    if (getsockname(lfd, (struct sockaddr *)&addr, &alen) < 0) die("getsockname");
    *bound_port = ntohs(addr.sin_port);
    return lfd;
}

/* The next connection on the listening socket `lfd`, non-blocking; -1 when
 * there is none left for now. Connections whose fd is MAX_FDS or more are
 * closed at once. */
static inline int accept_next(int lfd) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                fprintf(stderr, "%s: accept: %s\n", program_invocation_short_name,
                        strerror(errno));
            return -1;
        }
        if (fd < MAX_FDS) return fd;
        close(fd);
    }
}

/* Fds fdcast evicted. Its evict callback runs inside publish, send or
 * dispatch, in the middle of the loop's batch of events (perhaps in a callback
 * for that very connection), so closing there would pull the fd out from under
 * the batch: the callback only records the fd, and the loop closes the
 * recorded ones once the batch is done. */
struct evictions {
    int fds[MAX_FDS];
    int reasons[MAX_FDS];
    size_t n;
    bool pending[MAX_FDS]; /* recorded, and neither reaped nor closed since */
};

static inline void evictions_record(void *user, int fd, int reason) {
    struct evictions *ev = user;
    if (fd < 0 || fd >= MAX_FDS || ev->pending[fd]) return;
    ev->pending[fd] = true;
    ev->fds[ev->n] = fd;
    ev->reasons[ev->n++] = reason;
}

static inline bool evictions_pending(const struct evictions *ev, int fd) {
    return fd >= 0 && fd < MAX_FDS && ev->pending[fd];
}

/* The connection on `fd` closes for another reason: its recorded eviction must
 * not close the connection that gets the number next, within the same batch. */
static inline void evictions_forget(struct evictions *ev, int fd) {
    if (fd >= 0 && fd < MAX_FDS) ev->pending[fd] = false;
}

/* The next recorded fd still to close, and its reason (a positive errno); -1
 * when there is none left. */
static inline int evictions_next(struct evictions *ev, int *reason) {
    while (ev->n > 0) {
        size_t i = --ev->n;
        int fd = ev->fds[i];
        if (ev->pending[fd]) {
            ev->pending[fd] = false;
            *reason = ev->reasons[i];
            return fd;
        }
    }
    return -1;
}

/* A registry whose overflow policy is FDCAST_EVICT: a client more than the
 * outbox limit behind is disconnected (recorded in `ev`, for the loop to close)
 * rather than silently missing frames. *fcfd is fdcast_fd(), for the loop to
 * watch. Exits with a message when fdcast cannot start. */
static inline fdcast *evicting_fdcast(struct evictions *ev, int *fcfd) {
    fdcast *fc = fdcast_new();
    if (fc == NULL) {
        fprintf(stderr, "%s: fdcast_new: %s\n", program_invocation_short_name,
                fdcast_last_error());
        exit(1);
    }
    fdcast_set_evict_callback(fc, evictions_record, ev);
    if (fdcast_set_overflow(fc, FDCAST_EVICT) < 0) {
        fprintf(stderr, "%s: fdcast_set_overflow: %s\n", program_invocation_short_name,
                fdcast_last_error());
        exit(1);
    }
    *fcfd = fdcast_fd(fc);
    if (*fcfd < 0) {
        fprintf(stderr, "%s: fdcast_fd: %s\n", program_invocation_short_name, strerror(-*fcfd));
        exit(1);
    }
    return fc;
}

/* Adds `fd` to the epoll set `ep` for EPOLLIN; false, said on stderr, if it
 * cannot be. */
static inline bool epoll_watch(int ep, int fd) {
    struct epoll_event e = {.events = EPOLLIN, .data.fd = fd};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e) == 0) return true;
    fprintf(stderr, "%s: epoll_ctl: %s\n", program_invocation_short_name, strerror(errno));
    return false;
}

/* An epoll set watching each of fds[0..n) that is not -1 for EPOLLIN. */
static inline int epoll_watching(const int *fds, size_t n) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    for (size_t i = 0; i < n; i++)
        if (fds[i] >= 0 && !epoll_watch(ep, fds[i])) exit(1);
    return ep;
}

/* ------------------------------------------------------------------------ */
/* an HTTP/1.1 request head                                                 */

#define HTTP_MAX_HEAD 8192 /* request line + headers */

/* The head of a text/event-stream response; the events follow it. */
#define HTTP_SSE_HEAD                                                                         \
    "HTTP/1.1 200 OK\r\n"                                                                     \
    "Content-Type: text/event-stream\r\n"                                                     \
    "Cache-Control: no-cache\r\n"                                                             \
    "Connection: keep-alive\r\n"                                                              \
    "\r\n"

/* A response that ends the connection: its status line and text body. */
struct http_refusal {
    const char *status;
    const char *text;
};

/* Looks for the blank line that ends the head in head[0..len), which the
 * caller keeps NUL-terminated (head has room for HTTP_MAX_HEAD + 1 bytes).
 * Returns 1 with *head_end just past the blank line; 0 when more bytes are
 * needed; -1 with *refusal set when the head is too large or holds a NUL. */
static inline int http_head_end(const char *head, size_t len, size_t *head_end,
                                struct http_refusal *refusal) {
    const char *end = memmem(head, len, "\r\n\r\n", 4);
    if (end == NULL) {
        if (len < HTTP_MAX_HEAD) return 0;
        *refusal = (struct http_refusal){"431 Request Header Fields Too Large",
                                         "request head too large\n"};
        return -1;
    }
    *head_end = (size_t)(end - head) + 4;
    if (memchr(head, '\0', *head_end) != NULL) {
        *refusal = (struct http_refusal){"400 Bad Request", "NUL in request head\n"};
        return -1;
    }
    return 1;
}

/* The request line of a head that http_head_end() accepted. */
struct http_request {
    const char *method;
    size_t method_len;
    const char *path; /* the target up to '?' */
    size_t path_len;
    const char *query; /* after '?' (not included); NULL when there is none */
    size_t query_len;
    bool is_11; /* HTTP/1.1 (else 1.0) */
};

/* Parses "METHOD SP TARGET SP HTTP/1.x"; false for anything else. */
static inline bool http_parse_request_line(const char *head, struct http_request *req) {
    const char *line_end = strstr(head, "\r\n");
    const char *sp1 = memchr(head, ' ', (size_t)(line_end - head));
    const char *sp2 = sp1 ? memchr(sp1 + 1, ' ', (size_t)(line_end - sp1 - 1)) : NULL;
    if (sp1 == NULL || sp2 == NULL || line_end - sp2 - 1 != 8 ||
        strncmp(sp2 + 1, "HTTP/1.", 7) != 0)
        return false;
    req->is_11 = sp2[8] == '1';
    req->method = head;
    req->method_len = (size_t)(sp1 - head);
    req->path = sp1 + 1;
    req->path_len = (size_t)(sp2 - req->path);
    req->query = memchr(req->path, '?', req->path_len);
    req->query_len = 0;
    if (req->query != NULL) {
        req->query_len = (size_t)(sp2 - req->query - 1);
        req->path_len = (size_t)(req->query - req->path);
        req->query++;
    }
    return true;
}

static inline bool http_method_is(const struct http_request *req, const char *method) {
    return req->method_len == strlen(method) && memcmp(req->method, method, req->method_len) == 0;
}

static inline bool http_path_is(const struct http_request *req, const char *path) {
    return req->path_len == strlen(path) && memcmp(req->path, path, req->path_len) == 0;
}

/* Whether the path is `prefix` followed by at least one byte, which *rest
 * and *rest_len then name. */
static inline bool http_path_under(const struct http_request *req, const char *prefix,
                                   const char **rest, size_t *rest_len) {
    size_t n = strlen(prefix);
    if (req->path_len <= n || memcmp(req->path, prefix, n) != 0) return false;
    *rest = req->path + n;
    *rest_len = req->path_len - n;
    return true;
}

/* If the "Name: value" line line[0..len) is header `name` (any case), its
 * value after leading blanks; else NULL. */
static inline const char *http_header_line_value(const char *line, size_t len, const char *name) {
    size_t nl = strlen(name);
    if (len <= nl || line[nl] != ':' || strncasecmp(line, name, nl) != 0) return NULL;
    const char *v = line + nl + 1;
    while (*v == ' ' || *v == '\t') v++;
    return v;
}

/* The value of header `name` (any case) in a head that http_head_end()
 * accepted, and its length without trailing blanks; NULL when absent. */
static inline const char *http_header(const char *head, const char *name, size_t *len) {
    const char *line = strstr(head, "\r\n") + 2;
    while (strncmp(line, "\r\n", 2) != 0) {
        const char *end = strstr(line, "\r\n");
        const char *v = http_header_line_value(line, (size_t)(end - line), name);
        if (v != NULL) {
            const char *e = end;
            while (e > v && (e[-1] == ' ' || e[-1] == '\t')) e--;
            *len = (size_t)(e - v);
            return v;
        }
        line = end + 2;
    }
    return NULL;
}

/* Whether the comma-separated header value v[0..len) holds `token` (any case). */
static inline bool http_has_token(const char *v, size_t len, const char *token) {
    size_t tl = strlen(token);
    const char *end = v + len;
    while (v < end) {
        while (v < end && (*v == ' ' || *v == '\t' || *v == ',')) v++;
        const char *t = v;
        while (v < end && *v != ',') v++;
        const char *te = v;
        while (te > t && (te[-1] == ' ' || te[-1] == '\t')) te--;
        if ((size_t)(te - t) == tl && strncasecmp(t, token, tl) == 0) return true;
    }
    return false;
}

/* Writes the head of a response that closes the connection after a body of
 * `content_length` bytes; `extra_headers` is "" or whole "Name: value\r\n"
 * lines. Returns its length, or 0 when it does not fit in `cap` bytes. */
static inline size_t http_response_head(char *buf, size_t cap, const char *status,
                                        const char *content_type, const char *extra_headers,
                                        size_t content_length) {
    int n = snprintf(buf, cap,
                     "HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                     "%sConnection: close\r\n\r\n",
                     status, content_type, content_length, extra_headers);
    return n > 0 && (size_t)n < cap ? (size_t)n : 0;
}

/* http_response_head() followed by the body `text`. */
static inline size_t http_text_response(char *buf, size_t cap, const char *status,
                                        const char *content_type, const char *extra_headers,
                                        const char *text) {
    size_t len = strlen(text);
    size_t n = http_response_head(buf, cap, status, content_type, extra_headers, len);
    if (n == 0 || cap - n <= len) return 0;
    memcpy(buf + n, text, len + 1);
    return n + len;
}

/* ------------------------------------------------------------------------ */
/* the endpoints of sse_fanout.c and uv_embed.c                             */
/*                                                                          */
/*   GET  /events/<topic>    the connection becomes a text/event-stream     */
/*                           subscriber of <topic>                          */
/*   POST /publish/<topic>   publishes the request body to <topic>; answers */
/*                           200 with the number of subscribers reached     */
/*                                                                          */
/* Every byte to a client goes through fdcast_send(), so a response or the  */
/* SSE headers can never overtake or split frames fdcast has queued.        */

#define FANOUT_MAX_BODY (1 << 20) /* largest POST body we accept */

enum fanout_state {
    FANOUT_READING_HEAD, /* waiting for the blank line that ends the headers */
    FANOUT_READING_BODY, /* POST: waiting for Content-Length bytes */
    FANOUT_STREAMING,    /* subscribed: fdcast writes, the loop only watches for EOF */
    FANOUT_CLOSING,      /* response queued: close once fdcast has flushed it */
};

/* One client's request, as its bytes arrive. Zero it, then set `fd`. */
struct fanout_client {
    int fd; /* where fdcast writes */
    enum fanout_state state;
    char head[HTTP_MAX_HEAD + 1];
    size_t head_len;
    const char *topic; /* points into head */
    size_t topic_len;
    char *body; /* free() it with the client */
    size_t body_len, body_want;
};

/* What the loop does with the client once fanout_input() returns. */
enum fanout_next {
    FANOUT_READ_MORE,          /* keep reading (and watching for EOF) */
    FANOUT_CLOSE_WHEN_FLUSHED, /* now FANOUT_CLOSING: close once fdcast_pending_bytes() is 0 */
    FANOUT_CLOSE,              /* close now (peer gone, outbox full) */
};

/* Scaled out: with $FDCAST_BROKER set to a broker URL, every process on that
 * broker with the same $FDCAST_BROKER_NAME (default "sse_fanout") serves one
 * set of topics. Other processes' publishes arrive through fdcast_fd() and
 * fdcast_dispatch(), like everything else fdcast does: the loop does not
 * change. Exits with a message when the broker cannot be enabled. */
static inline void fanout_enable_broker(fdcast *fc) {
    const char *broker = getenv("FDCAST_BROKER");
    if (broker == NULL || *broker == '\0') return;
    const char *name = getenv("FDCAST_BROKER_NAME");
    if (name == NULL || *name == '\0') name = "sse_fanout";
    if (fdcast_broker_enable(fc, broker, name) < 0) {
        fprintf(stderr, "%s: broker %s: %s\n", program_invocation_short_name, broker,
                fdcast_last_error());
        exit(1);
    }
}

/* Where the client's next bytes go, and how many fit: the head, the body,
 * or (once the request is complete) a scratch buffer whose bytes are dropped:
 * a streaming or closing client has nothing more to say. */
static inline char *fanout_buffer(struct fanout_client *c, size_t *room) {
    static char scratch[4096];
    switch (c->state) {
    case FANOUT_READING_HEAD:
        *room = HTTP_MAX_HEAD - c->head_len;
        return c->head + c->head_len;
    case FANOUT_READING_BODY:
        *room = c->body_want - c->body_len;
        return c->body + c->body_len;
    default:
        *room = sizeof scratch;
        return scratch;
    }
}

/* Any failure (peer gone, outbox full) means the connection is done. */
static inline bool fanout_send(fdcast *fc, struct fanout_client *c, const char *p, size_t n) {
    return fdcast_send(fc, c->fd, FDCAST_RAW, p, n) == 0;
}

/* A complete response with a text body; the connection closes after it. */
static inline enum fanout_next fanout_respond(fdcast *fc, struct fanout_client *c,
                                              const char *status, const char *text) {
    char buf[512];
    size_t n = http_text_response(buf, sizeof buf, status, "text/plain", "", text);
    if (n == 0 || !fanout_send(fc, c, buf, n)) return FANOUT_CLOSE;
    c->state = FANOUT_CLOSING;
    return FANOUT_CLOSE_WHEN_FLUSHED;
}

static inline enum fanout_next fanout_start_stream(fdcast *fc, struct fanout_client *c) {
    static const char head[] = HTTP_SSE_HEAD;
    /* Headers first, then subscribe: the loop runs on one thread, so no
     * publish can run in between and the first event follows the headers. */
    if (!fanout_send(fc, c, head, sizeof head - 1)) return FANOUT_CLOSE;
    int64_t id = fdcast_subscribe(fc, c->topic, c->topic_len, c->fd, FDCAST_SSE);
    if (id < 0) {
        fprintf(stderr, "%s: subscribe: %s\n", program_invocation_short_name,
                strerror((int)-id));
        return FANOUT_CLOSE;
    }
    c->state = FANOUT_STREAMING;
    return FANOUT_READ_MORE;
}

static inline enum fanout_next fanout_publish(fdcast *fc, struct fanout_client *c) {
    int64_t n = fdcast_publish(fc, c->topic, c->topic_len, c->body, c->body_len);
    free(c->body);
    c->body = NULL;
    char text[64];
    if (n >= 0) {
        snprintf(text, sizeof text, "%lld\n", (long long)n);
        return fanout_respond(fc, c, "200 OK", text);
    }
    if (n == -EILSEQ)
        return fanout_respond(fc, c, "400 Bad Request", "payload is not valid UTF-8\n");
    snprintf(text, sizeof text, "%s\n", strerror((int)-n));
    return fanout_respond(fc, c, "500 Internal Server Error", text);
}

/* The headers a POST body depends on: Content-Length (*content_length, -1
 * when absent) and Expect: 100-continue. False with *refusal set for a
 * malformed header line, a bad or conflicting Content-Length, or a
 * Transfer-Encoding (chunked bodies are not supported). */
static inline bool fanout_body_headers(const char *head, size_t head_end,
                                       long long *content_length, bool *expect_continue,
                                       struct http_refusal *refusal) {
    *content_length = -1;
    *expect_continue = false;
    for (const char *l = strstr(head, "\r\n") + 2; l < head + head_end - 2;) {
        const char *e = strstr(l, "\r\n");
        size_t len = (size_t)(e - l);
        const char *v;
        if (memchr(l, ':', len) == NULL) {
            *refusal = (struct http_refusal){"400 Bad Request", "bad header line\n"};
            return false;
        }
        if ((v = http_header_line_value(l, len, "Content-Length")) != NULL) {
            char *end;
            errno = 0;
            long long cl = strtoll(v, &end, 10);
            while (*end == ' ' || *end == '\t') end++;
            if (errno != 0 || end != e || cl < 0 || *v < '0' || *v > '9' ||
                (*content_length >= 0 && cl != *content_length)) {
                *refusal = (struct http_refusal){"400 Bad Request", "bad Content-Length\n"};
                return false;
            }
            *content_length = cl;
        } else if ((v = http_header_line_value(l, len, "Expect")) != NULL) {
            *expect_continue = strncasecmp(v, "100-continue", 12) == 0;
        } else if (http_header_line_value(l, len, "Transfer-Encoding") != NULL) {
            *refusal = (struct http_refusal){"501 Not Implemented",
                                             "chunked bodies are not supported\n"};
            return false;
        }
        l = e + 2;
    }
    return true;
}

/* Acts on a complete head; bytes after head_end are the start of the body. */
static inline enum fanout_next fanout_request(fdcast *fc, struct fanout_client *c,
                                              size_t head_end) {
    struct http_request req;
    if (!http_parse_request_line(c->head, &req))
        return fanout_respond(fc, c, "400 Bad Request", "bad request line\n");
    long long content_length;
    bool expect_continue;
    struct http_refusal refusal;
    if (!fanout_body_headers(c->head, head_end, &content_length, &expect_continue, &refusal))
        return fanout_respond(fc, c, refusal.status, refusal.text);

    bool events = http_method_is(&req, "GET") &&
                  http_path_under(&req, "/events/", &c->topic, &c->topic_len);
    if (!events && !(http_method_is(&req, "POST") &&
                     http_path_under(&req, "/publish/", &c->topic, &c->topic_len)))
        return fanout_respond(fc, c, "404 Not Found", "not found\n");
    if (c->topic_len > FDCAST_MAX_TOPIC_LEN)
        return fanout_respond(fc, c, "414 URI Too Long", "topic too long\n");
    if (events) return fanout_start_stream(fc, c);

    if (content_length < 0)
        return fanout_respond(fc, c, "411 Length Required", "Content-Length required\n");
    if (content_length > FANOUT_MAX_BODY)
        return fanout_respond(fc, c, "413 Content Too Large", "body too large\n");
    c->body_want = (size_t)content_length;
    c->body = malloc(c->body_want ? c->body_want : 1);
    if (c->body == NULL)
        return fanout_respond(fc, c, "500 Internal Server Error", "out of memory\n");
    /* Body bytes that came in the same reads as the head. */
    size_t extra = c->head_len - head_end;
    c->body_len = extra < c->body_want ? extra : c->body_want;
    memcpy(c->body, c->head + head_end, c->body_len);
    if (c->body_len == c->body_want) return fanout_publish(fc, c);
    /* curl sends "Expect: 100-continue" for large bodies and waits (a while)
     * for this interim response before sending the body. */
    if (expect_continue && req.is_11 && c->body_len == 0) {
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        if (!fanout_send(fc, c, cont, sizeof cont - 1)) return FANOUT_CLOSE;
    }
    c->state = FANOUT_READING_BODY;
    return FANOUT_READ_MORE;
}

/* Takes the `n` (> 0) bytes just read into fanout_buffer(), and acts on the
 * request once it is complete. */
static inline enum fanout_next fanout_input(fdcast *fc, struct fanout_client *c, size_t n) {
    if (c->state == FANOUT_READING_HEAD) {
        c->head_len += n;
        c->head[c->head_len] = '\0';
        size_t head_end;
        struct http_refusal refusal;
        switch (http_head_end(c->head, c->head_len, &head_end, &refusal)) {
        case 0: return FANOUT_READ_MORE;
        case -1: return fanout_respond(fc, c, refusal.status, refusal.text);
        default: return fanout_request(fc, c, head_end);
        }
    }
    if (c->state == FANOUT_READING_BODY) {
        c->body_len += n;
        if (c->body_len == c->body_want) return fanout_publish(fc, c);
    }
    return FANOUT_READ_MORE;
}

#endif
