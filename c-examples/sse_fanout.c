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
 * fdcast owns framing and slow readers; this file is only HTTP and the loop.
 * Every byte to a client goes through fdcast_send(), so a response or the
 * SSE headers can never overtake or split frames fdcast has queued.
 */
#define _GNU_SOURCE
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
#include <unistd.h>

#define MAX_HEAD 8192       /* request line + headers */
#define MAX_BODY (1 << 20)  /* largest POST body we accept */
#define MAX_FDS 16384       /* connections are looked up by fd number */

enum state {
    READING_HEAD, /* waiting for the blank line that ends the headers */
    READING_BODY, /* POST: waiting for Content-Length bytes */
    STREAMING,    /* subscribed: fdcast writes, we only watch for EOF */
    CLOSING,      /* response queued: close once fdcast has flushed it */
};

struct conn {
    int fd;
    enum state state;
    bool evicted; /* set by the evict callback; reaped after the batch */
    char head[MAX_HEAD + 1];
    size_t head_len;
    const char *topic; /* points into head */
    size_t topic_len;
    char *body;
    size_t body_len, body_want;
};

static fdcast *fc;
static int ep = -1;
static struct conn *conns[MAX_FDS];
static int evicted[MAX_FDS]; /* fds reported by the evict callback */
static size_t n_evicted;
static size_t n_closing;

static void die(const char *what) {
    perror(what);
    exit(1);
}

/* ------------------------------------------------------------------------ */
/* connections                                                              */

static void close_conn(struct conn *c) {
    /* Forget the fd before close(2): the number may be reused by the very
     * next accept(), and fdcast must not write old frames to it. */
    int64_t dropped = fdcast_unsubscribe_fd(fc, c->fd);
    (void)dropped;
    if (c->state == CLOSING) n_closing--;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    conns[c->fd] = NULL;
    free(c->body);
    free(c);
}

/* Called by fdcast inside publish/send/dispatch, on this thread, when a peer
 * is gone or too slow. Closing here would pull the fd out from under the
 * epoll batch we are in the middle of, so only record it. */
static void on_evict(void *user, int fd, int reason) {
    (void)user;
    (void)reason;
    if (fd >= 0 && fd < MAX_FDS && conns[fd] != NULL && !conns[fd]->evicted) {
        conns[fd]->evicted = true;
        evicted[n_evicted++] = fd;
    }
}

static void reap_evicted(void) {
    for (size_t i = 0; i < n_evicted; i++) {
        struct conn *c = conns[evicted[i]];
        /* The flag guards against a connection that was closed and whose
         * number was reused by accept() within the same batch. */
        if (c != NULL && c->evicted) close_conn(c);
    }
    n_evicted = 0;
}

/* Close connections whose last response bytes have left fdcast's outbox. */
static void reap_closing(void) {
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
/* HTTP                                                                     */

static void start_stream(struct conn *c) {
    static const char head[] = "HTTP/1.1 200 OK\r\n"
                               "Content-Type: text/event-stream\r\n"
                               "Cache-Control: no-cache\r\n"
                               "Connection: keep-alive\r\n"
                               "\r\n";
    /* Headers first, then subscribe: everything is on this one thread, so no
     * publish can run in between and the first event follows the headers. */
    if (!send_raw(c, head, sizeof head - 1)) {
        close_conn(c);
        return;
    }
    int64_t id = fdcast_subscribe(fc, c->topic, c->topic_len, c->fd, FDCAST_SSE);
    if (id < 0) {
        fprintf(stderr, "sse_fanout: subscribe: %s\n", strerror((int)-id));
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

/* Reads what the client sent, in whatever pieces it arrives. */
static void on_client(struct conn *c) {
    for (;;) {
        char scratch[4096];
        char *dst;
        size_t room;
        switch (c->state) {
        case READING_HEAD:
            dst = c->head + c->head_len;
            room = MAX_HEAD - c->head_len;
            break;
        case READING_BODY:
            dst = c->body + c->body_len;
            room = c->body_want - c->body_len;
            break;
        default: /* STREAMING, CLOSING: a client has nothing more to say */
            dst = scratch;
            room = sizeof scratch;
            break;
        }
        ssize_t r = recv(c->fd, dst, room, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        if (r <= 0) {
            /* EOF or error. A CLOSING response still being flushed is kept
             * until reap_closing sees it leave (the client may have only
             * shut down its sending side). */
            if (r == 0 && c->state == CLOSING && fdcast_pending_bytes(fc, c->fd) > 0) {
                struct epoll_event e = {.events = 0, .data.fd = c->fd};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
                return;
            }
            close_conn(c);
            return;
        }
        if (c->state == READING_HEAD) {
            c->head_len += (size_t)r;
            c->head[c->head_len] = '\0';
            char *end = memmem(c->head, c->head_len, "\r\n\r\n", 4);
            if (end == NULL) {
                if (c->head_len == MAX_HEAD) {
                    respond(c, "431 Request Header Fields Too Large", "request head too large\n");
                    return;
                }
                continue;
            }
            size_t head_end = (size_t)(end - c->head) + 4;
            if (memchr(c->head, '\0', head_end) != NULL) {
                respond(c, "400 Bad Request", "NUL in request head\n");
                return;
            }
            /* handle_request may close c: do not touch it afterwards. */
            handle_request(c, head_end);
            return;
        }
        if (c->state == READING_BODY) {
            c->body_len += (size_t)r;
            if (c->body_len == c->body_want) {
                finish_publish(c);
                return;
            }
        }
    }
}

static void accept_all(int lfd) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) perror("sse_fanout: accept");
            return;
        }
        struct conn *c = fd < MAX_FDS ? calloc(1, sizeof *c) : NULL;
        if (c == NULL) {
            close(fd);
            continue;
        }
        c->fd = fd;
        c->state = READING_HEAD;
        struct epoll_event e = {.events = EPOLLIN, .data.fd = fd};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e) < 0) {
            perror("sse_fanout: epoll_ctl");
            close(fd);
            free(c);
            continue;
        }
        conns[fd] = c;
    }
}

/* ------------------------------------------------------------------------ */

static int parse_port(const char *s) {
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < 0 || v > 65535) {
        fprintf(stderr, "sse_fanout: bad port '%s'\n", s);
        exit(2);
    }
    return (int)v;
}

int main(int argc, char **argv) {
    int port = 8080;
    const char *env = getenv("FDCAST_PORT");
    if (argc > 1)
        port = parse_port(argv[1]);
    else if (env != NULL && *env != '\0')
        port = parse_port(env);

    /* SIGINT/SIGTERM arrive as reads on a signalfd in the same epoll set, so
     * shutdown happens between events, never inside one. Block them before
     * any thread exists so every thread inherits the mask. */
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGTERM);
    if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0) die("sigprocmask");
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sfd < 0) die("signalfd");

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

    fc = fdcast_new();
    if (fc == NULL) {
        fprintf(stderr, "sse_fanout: fdcast_new failed\n");
        return 1;
    }
    fdcast_set_evict_callback(fc, on_evict, NULL);
    /* A client more than the outbox limit (1 MiB) behind is disconnected
     * rather than silently missing events; EventSource then reconnects. */
    if (fdcast_set_overflow(fc, FDCAST_EVICT) < 0) {
        fprintf(stderr, "sse_fanout: fdcast_set_overflow failed\n");
        return 1;
    }
    const char *broker = getenv("FDCAST_BROKER");
    if (broker != NULL && *broker != '\0') {
        const char *name = getenv("FDCAST_BROKER_NAME");
        if (name == NULL || *name == '\0') name = "sse_fanout";
        /* Other processes' publishes arrive through fdcast_fd() and
         * fdcast_dispatch(), like everything else fdcast does: the loop below
         * does not change. */
        int rc = fdcast_broker_enable(fc, broker, name);
        if (rc < 0) {
            fprintf(stderr, "sse_fanout: broker %s: %s\n", broker, fdcast_last_error());
            return 1;
        }
    }
    int fcfd = fdcast_fd(fc);
    if (fcfd < 0) {
        fprintf(stderr, "sse_fanout: fdcast_fd: %s\n", strerror(-fcfd));
        return 1;
    }

    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    int watch[] = {lfd, sfd, fcfd};
    for (size_t i = 0; i < sizeof watch / sizeof watch[0]; i++) {
        struct epoll_event e = {.events = EPOLLIN, .data.fd = watch[i]};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, watch[i], &e) < 0) die("epoll_ctl");
    }

    printf("sse_fanout: listening on http://127.0.0.1:%d (fdcast %s)\n", ntohs(addr.sin_port),
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
