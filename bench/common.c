/* common.c: see common.h. */
#define _GNU_SOURCE
#include "common.h"
#include "fdcast.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <errno.h>
#include <signal.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* --- misc -------------------------------------------------------------------------------- */

void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("bench: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    if (errno) fprintf(stderr, " (%s)", strerror(errno));
    fputc('\n', stderr);
    exit(2);
}

double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

double thread_cpu_s(void) {
    struct rusage ru;
    if (getrusage(RUSAGE_THREAD, &ru) != 0) die("getrusage");
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e-6;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

long rss_bytes(void) {
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f || fscanf(f, "%ld %ld", &pages, &resident) != 2) die("reading /proc/self/statm");
    fclose(f);
    return resident * sysconf(_SC_PAGESIZE);
}

void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) die("getrlimit");
    rl.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0) die("setrlimit");
}

const char *opt(int argc, char **argv, const char *key, const char *def) {
    size_t k = strlen(key);
    for (int i = 1; i < argc; i++)
        if (strncmp(argv[i], key, k) == 0 && argv[i][k] == '=') return argv[i] + k + 1;
    return def;
}

long opt_long(int argc, char **argv, const char *key, long def) {
    const char *s = opt(argc, argv, key, NULL);
    if (!s) return def;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s) die("bad number for %s: %s", key, s);
    return v;
}

/* --- fds ----------------------------------------------------------------------------------- */

enum transport parse_transport(const char *s) {
    if (strcmp(s, "unix") == 0) return T_UNIX;
    if (strcmp(s, "tcp") == 0) return T_TCP;
    die("transport must be unix or tcp, not %s", s);
}

const char *transport_name(enum transport t) { return t == T_UNIX ? "unix" : "tcp"; }

static void set_nonblocking(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) die("fcntl");
}

void stream_options(int fd) {
    struct sockaddr_storage a;
    socklen_t len = sizeof a;
    if (getsockname(fd, (struct sockaddr *)&a, &len) != 0) die("getsockname");
    if (a.ss_family != AF_INET) return;
    int one = 1;
    struct linger no_linger = {1, 0};
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0 ||
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &no_linger, sizeof no_linger) != 0)
        die("setsockopt");
}

int listen_any(enum transport t, struct sockaddr_storage *addr, socklen_t *addr_len) {
    memset(addr, 0, sizeof *addr);
    if (t == T_TCP) {
        struct sockaddr_in *in = (struct sockaddr_in *)addr;
        in->sin_family = AF_INET;
        in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        *addr_len = sizeof *in;
    } else { /* abstract address: nothing in the file system to clean up */
        struct sockaddr_un *un = (struct sockaddr_un *)addr;
        un->sun_family = AF_UNIX;
        int len = snprintf(un->sun_path + 1, sizeof un->sun_path - 1, "fdcast-bench-%d-%.0f",
                           (int)getpid(), now_s() * 1e6);
        *addr_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)len);
    }
    int fd = socket(addr->ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)addr, *addr_len) != 0 || listen(fd, 4096) != 0 ||
        getsockname(fd, (struct sockaddr *)addr, addr_len) != 0)
        die("listen_any");
    return fd;
}

void send_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t w = send(fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            p += w;
            len -= (size_t)w;
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd pfd = {.fd = fd, .events = POLLOUT};
            poll(&pfd, 1, -1);
        } else if (!(w < 0 && errno == EINTR)) {
            die("send");
        }
    }
}

void sendmsg_all(int fd, struct iovec *iov, int iovcnt) {
    while (iovcnt > 0) {
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)iovcnt};
        ssize_t w = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                struct pollfd pfd = {.fd = fd, .events = POLLOUT};
                poll(&pfd, 1, -1);
            } else if (errno != EINTR) {
                die("sendmsg");
            }
            continue;
        }
        while (iovcnt > 0 && (size_t)w >= iov->iov_len) { /* skip what went out */
            w -= (ssize_t)iov->iov_len;
            iov++;
            iovcnt--;
        }
        if (iovcnt > 0) {
            iov->iov_base = (char *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
}

void read_exact(int fd, void *buf, size_t len) {
    char *p = buf;
    while (len > 0) {
        ssize_t r = read(fd, p, len);
        if (r > 0) {
            p += r;
            len -= (size_t)r;
        } else if (r < 0 && (errno == EAGAIN || errno == EINTR)) {
            struct pollfd pfd = {.fd = fd, .events = POLLIN};
            poll(&pfd, 1, -1);
        } else {
            die("read_exact: %s", r == 0 ? "EOF" : "error");
        }
    }
}

/* --- frames -------------------------------------------------------------------------------- */

codec make_codec(enum framing f, size_t payload_len, const char *channel) {
    if (payload_len < SEQ_DIGITS || payload_len > 65535) die("payload size out of range");
    codec c = {.framing = f, .payload_len = payload_len, .channel = channel};
    switch (f) {
    case F_RAW: c.header_len = 0; break;
    case F_WS_TEXT: c.header_len = payload_len < 126 ? 2 : 4; break;
    case F_SSE: c.header_len = 6; break; /* "data: " */
    case F_RESP: {
        char h[128];
        c.header_len = (size_t)snprintf(h, sizeof h, "*3\r\n$7\r\nmessage\r\n$%zu\r\n%s\r\n$%zu\r\n",
                                        strlen(channel), channel, payload_len);
        break;
    }
    }
    size_t trailer = f == F_SSE || f == F_RESP ? 2 : 0; /* "\n\n" or "\r\n" */
    c.frame_len = c.header_len + payload_len + trailer;
    return c;
}

void put_seq(unsigned char *out, uint32_t seq) {
    for (int i = SEQ_DIGITS - 1; i >= 0; i--, seq /= 10) out[i] = (unsigned char)('0' + seq % 10);
}

void fill_payload(unsigned char *out, size_t payload_len, uint32_t seq) {
    put_seq(out, seq);
    for (size_t i = SEQ_DIGITS; i < payload_len; i++) out[i] = (unsigned char)('a' + i % 26);
}

void encode_frame(const codec *c, unsigned char *out, uint32_t seq) {
    size_t s = c->payload_len;
    unsigned char *p = out + c->header_len;
    switch (c->framing) {
    case F_RAW: break;
    case F_WS_TEXT:
        out[0] = 0x81;
        if (s < 126) {
            out[1] = (unsigned char)s;
        } else {
            out[1] = 126;
            out[2] = (unsigned char)(s >> 8);
            out[3] = (unsigned char)s;
        }
        break;
    case F_SSE:
        memcpy(out, "data: ", 6);
        memcpy(p + s, "\n\n", 2);
        break;
    case F_RESP: {
        char h[128];
        snprintf(h, sizeof h, "*3\r\n$7\r\nmessage\r\n$%zu\r\n%s\r\n$%zu\r\n", strlen(c->channel),
                 c->channel, s);
        memcpy(out, h, c->header_len);
        memcpy(p + s, "\r\n", 2);
        break;
    }
    }
    fill_payload(p, s, seq);
}

/* --- receivers ----------------------------------------------------------------------------- */

static uint32_t parse_seq(const unsigned char *p) {
    uint32_t v = 0;
    for (int i = 0; i < SEQ_DIGITS; i++) v = v * 10 + (uint32_t)(p[i] - '0');
    return v;
}

static void check_frames(rx_fd *r, const unsigned char *buf, size_t n) {
    size_t f = r->codec->frame_len;
    while (n > 0) {
        size_t take = f - r->fill < n ? f - r->fill : n;
        memcpy(r->frame + r->fill, buf, take);
        r->fill += take;
        buf += take;
        n -= take;
        if (r->fill < f) break;
        r->fill = 0;
        uint32_t seq = parse_seq(r->frame + r->codec->header_len);
        encode_frame(r->codec, r->frame + f, seq);
        if ((int64_t)seq <= r->last_seq || memcmp(r->frame, r->frame + f, f) != 0) r->bad = 1;
        r->last_seq = seq;
        r->frames++;
    }
}

void rx_reset(rx_fd *r, const codec *c, uint64_t frames) {
    if (!r->tail || r->codec->frame_len < c->frame_len) {
        free(r->tail);
        free(r->frame);
        r->tail = malloc(c->frame_len);
        r->frame = malloc(2 * c->frame_len);
        if (!r->tail || !r->frame) die("malloc");
    }
    r->codec = c;
    r->expect = frames * c->frame_len;
    r->got = r->tail_len = r->fill = 0;
    r->frames = 0;
    r->last_seq = -1;
    r->bad = 0;
}

void rx_consume(rx_fd *r, const unsigned char *buf, size_t n) {
    size_t f = r->codec->frame_len;
    r->got += n;
    if (n >= f) {
        memcpy(r->tail, buf + n - f, f);
        r->tail_len = f;
    } else {
        if (r->tail_len + n > f) {
            size_t keep = f - n;
            memmove(r->tail, r->tail + r->tail_len - keep, keep);
            r->tail_len = keep;
        }
        memcpy(r->tail + r->tail_len, buf, n);
        r->tail_len += n;
    }
    if (r->check_frames) check_frames(r, buf, n);
}

const char *rx_problem(const rx_fd *r, uint32_t last_seq) {
    size_t f = r->codec->frame_len;
    if (r->got != r->expect) return "wrong byte count";
    if (r->bad) return "a frame out of order or damaged";
    unsigned char *want = malloc(f);
    if (!want) die("malloc");
    encode_frame(r->codec, want, last_seq);
    int same = r->tail_len == f && memcmp(r->tail, want, f) == 0;
    free(want);
    return same ? "" : "wrong last frame";
}

/* The control protocol between the caller and the receiver process (SOCK_SEQPACKET). */
enum { OP_CONNECT = 1, OP_ARM, OP_FINISH };
typedef struct ctl {
    int op, framing;
    uint64_t n, first, payload_len, frames, hello_len, ack_len;
    uint32_t last_seq;
    double timeout_s;
    char channel[64], what[192], hello[256];
    socklen_t addr_len;
    struct sockaddr_storage addr;
} ctl;
typedef struct ctl_reply {
    int64_t bad;
    double done_at;
} ctl_reply;

struct rx_proc {
    int ctl, count;
    pid_t pid;
};

/* The receiver process's state. */
static struct {
    int nthreads, n, cap;
    int first, count; /* the armed fds */
    rx_fd *fds;
    int *epfd;
    codec codec;
    char channel[64];
    atomic_int remaining;
    atomic_uint generation;
    _Atomic double done_at;
    int done_efd;
} rx;

enum { RX_BUF = 256 * 1024 };

static void *rx_thread(void *arg) {
    int ep = rx.epfd[(intptr_t)arg];
    unsigned char *buf = malloc(RX_BUF);
    struct epoll_event ev[256];
    if (!buf) die("malloc");
    for (;;) {
        int k = epoll_wait(ep, ev, 256, -1);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) die("epoll_wait");
        /* pairs with the release in OP_ARM, which runs while no byte is in flight */
        (void)atomic_load_explicit(&rx.generation, memory_order_acquire);
        for (int i = 0; i < k; i++) {
            rx_fd *r = ev[i].data.ptr;
            ssize_t got = read(r->fd, buf, RX_BUF);
            if (got <= 0) {
                if (got == 0 || (errno != EAGAIN && errno != EINTR))
                    epoll_ctl(ep, EPOLL_CTL_DEL, r->fd, NULL); /* gone: the check tells */
                continue;
            }
            uint64_t before = r->got;
            rx_consume(r, buf, (size_t)got);
            if (before < r->expect && r->got >= r->expect &&
                atomic_fetch_sub(&rx.remaining, 1) == 1) {
                atomic_store(&rx.done_at, now_s());
                uint64_t one = 1;
                if (write(rx.done_efd, &one, sizeof one) != sizeof one) die("eventfd write");
            }
        }
    }
    return NULL;
}

static void rx_serve_connect(const ctl *c) {
    for (uint64_t i = 0; i < c->n; i++) {
        if (rx.n == rx.cap) die("receiver process: too many fds");
        int fd = socket(c->addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || connect(fd, (const struct sockaddr *)&c->addr, c->addr_len) != 0)
            die("receiver process: connect");
        stream_options(fd);
        if (c->hello_len) send_all(fd, c->hello, c->hello_len);
        char ack[256];
        if (c->ack_len > sizeof ack) die("ack too long");
        if (c->ack_len) read_exact(fd, ack, c->ack_len);
        set_nonblocking(fd);
        rx_fd *r = &rx.fds[rx.n];
        r->fd = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = r};
        if (epoll_ctl(rx.epfd[rx.n % rx.nthreads], EPOLL_CTL_ADD, fd, &ev) != 0) die("epoll_ctl");
        rx.n++;
    }
}

static int64_t rx_serve_finish(const ctl *c, double *done_at) {
    struct pollfd pfd = {.fd = rx.done_efd, .events = POLLIN};
    int rc;
    do rc = poll(&pfd, 1, (int)(c->timeout_s * 1000));
    while (rc < 0 && errno == EINTR);
    uint64_t v;
    *done_at = rc > 0 && read(rx.done_efd, &v, sizeof v) == sizeof v ? atomic_load(&rx.done_at) : -1;
    int64_t bad = 0;
    for (int i = rx.first; i < rx.first + rx.count; i++) {
        const char *why = rx_problem(&rx.fds[i], c->last_seq);
        if (*why && bad++ < 5)
            fprintf(stderr, "FAIL %s: fd %d of %d: %s: %llu bytes, expected %llu\n", c->what,
                    i - rx.first, rx.count, why, (unsigned long long)rx.fds[i].got,
                    (unsigned long long)rx.fds[i].expect);
    }
    if (*done_at < 0 && !bad) bad = 1; /* cannot happen: complete fds signal completion */
    return bad;
}

_Noreturn static void rx_serve(int ctl_fd, int threads) {
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rx.cap = (int)rl.rlim_cur;
    rx.nthreads = threads;
    rx.fds = calloc((size_t)rx.cap, sizeof *rx.fds);
    rx.epfd = calloc((size_t)threads, sizeof *rx.epfd);
    rx.done_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (!rx.fds || !rx.epfd || rx.done_efd < 0) die("receiver process");
    for (intptr_t t = 0; t < threads; t++) {
        pthread_t th;
        if ((rx.epfd[t] = epoll_create1(EPOLL_CLOEXEC)) < 0 ||
            pthread_create(&th, NULL, rx_thread, (void *)t) != 0)
            die("receiver threads");
    }
    for (;;) {
        ctl c;
        ssize_t got = recv(ctl_fd, &c, sizeof c, 0);
        if (got == 0) _exit(0); /* the caller is gone */
        if (got != sizeof c) die("receiver process: control message");
        ctl_reply reply = {0, 0};
        switch (c.op) {
        case OP_CONNECT: rx_serve_connect(&c); break;
        case OP_ARM: {
            uint64_t stale;
            (void)!read(rx.done_efd, &stale, sizeof stale); /* a late signal of a failed run */
            memcpy(rx.channel, c.channel, sizeof rx.channel);
            rx.codec = make_codec((enum framing)c.framing, c.payload_len, rx.channel);
            rx.first = (int)c.first;
            rx.count = (int)c.n;
            for (int i = 0; i < rx.n; i++)
                rx_reset(&rx.fds[i], &rx.codec, i >= rx.first && i < rx.first + rx.count ? c.frames : 0);
            atomic_store(&rx.remaining, rx.count);
            atomic_fetch_add_explicit(&rx.generation, 1, memory_order_release);
            break;
        }
        case OP_FINISH: reply.bad = rx_serve_finish(&c, &reply.done_at); break;
        default: die("receiver process: unknown op");
        }
        if (send(ctl_fd, &reply, sizeof reply, MSG_NOSIGNAL) != sizeof reply) _exit(0);
    }
}

rx_proc *rx_spawn(int threads) {
    raise_nofile();
    int sv[2];
    rx_proc *p = malloc(sizeof *p);
    if (!p || threads < 1 || socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0)
        die("rx_spawn");
    fflush(NULL);
    p->pid = fork();
    if (p->pid < 0) die("fork");
    if (p->pid == 0) {
        close(sv[0]);
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        prctl(PR_SET_NAME, "bench-receiver"); /* tells it apart in perf and top */
        rx_serve(sv[1], threads);
    }
    close(sv[1]);
    p->ctl = sv[0];
    p->count = 0;
    return p;
}

static ctl_reply rx_call(rx_proc *p, const ctl *c, int listen_fd, int *tx) {
    if (send(p->ctl, c, sizeof *c, MSG_NOSIGNAL) != sizeof *c) die("receiver process is gone");
    for (uint64_t i = 0; listen_fd >= 0 && i < c->n; i++) {
        struct pollfd pfd[2] = {{.fd = listen_fd, .events = POLLIN}, {.fd = p->ctl, .events = POLLIN}};
        while (poll(pfd, 2, -1) < 0)
            if (errno != EINTR) die("poll");
        if (!pfd[0].revents) die("receiver process failed while connecting");
        if ((tx[i] = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC)) < 0) die("accept");
        stream_options(tx[i]);
    }
    ctl_reply reply;
    if (recv(p->ctl, &reply, sizeof reply, 0) != sizeof reply) die("receiver process failed");
    return reply;
}

void rx_connect(rx_proc *p, const struct sockaddr_storage *addr, socklen_t addr_len, int n,
                const void *hello, size_t hello_len, size_t ack_len, int listen_fd, int *tx) {
    ctl c = {.op = OP_CONNECT, .n = (uint64_t)n, .hello_len = hello_len, .ack_len = ack_len,
             .addr_len = addr_len, .addr = *addr};
    if (hello_len > sizeof c.hello) die("hello too long");
    if (hello_len) memcpy(c.hello, hello, hello_len);
    rx_call(p, &c, listen_fd, tx);
    p->count += n;
}

int rx_count(const rx_proc *p) { return p->count; }

void rx_pairs(rx_proc *p, enum transport t, int n, int *tx) {
    struct sockaddr_storage addr;
    socklen_t len;
    int lfd = listen_any(t, &addr, &len);
    rx_connect(p, &addr, len, n, NULL, 0, 0, lfd, tx);
    close(lfd);
}

void rx_arm(rx_proc *p, int first, int count, enum framing f, size_t payload_len,
            const char *channel, uint64_t frames) {
    if (first < 0 || count < 1 || first + count > p->count) die("rx_arm: bad range");
    ctl c = {.op = OP_ARM, .first = (uint64_t)first, .n = (uint64_t)count, .framing = (int)f,
             .payload_len = payload_len, .frames = frames};
    snprintf(c.channel, sizeof c.channel, "%s", channel ? channel : "");
    rx_call(p, &c, -1, NULL);
}

int rx_finish(rx_proc *p, uint32_t last_seq, double timeout_s, const char *what, double *done_at) {
    ctl c = {.op = OP_FINISH, .last_seq = last_seq, .timeout_s = timeout_s};
    snprintf(c.what, sizeof c.what, "%s", what);
    ctl_reply reply = rx_call(p, &c, -1, NULL);
    *done_at = reply.done_at;
    return (int)reply.bad;
}

/* --- fdcast host helpers ------------------------------------------------------------------- */

void fc_settle(fdcast *fc, uint64_t high, uint64_t low) {
    fdcast_stats st;
    fdcast_get_stats(fc, &st);
    if (st.queued_bytes <= high) return;
    while (st.queued_bytes > low) {
        struct pollfd pfd = {.fd = fdcast_fd(fc), .events = POLLIN};
        if (poll(&pfd, 1, 10000) == 0)
            die("fdcast_fd() not readable for 10 s with %llu bytes queued",
                (unsigned long long)st.queued_bytes);
        if (fdcast_dispatch(fc, 0) < 0) die("fdcast_dispatch");
        fdcast_get_stats(fc, &st);
    }
}
