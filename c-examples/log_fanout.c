/*
 * log_fanout: fans the lines of stdin out to every connected client, over TCP
 * and/or a Unix socket, with fdcast, in one epoll loop.
 *
 * Usage: log_fanout [-u PATH] [-l BYTES] [-w MS] [port]
 *   port      TCP port on 127.0.0.1 (default 9000, or $FDCAST_PORT; 0 picks a
 *             free port, printed on stdout)
 *   -u PATH   also listen on a Unix stream socket at PATH (a stale socket
 *             file there is replaced; the file is removed at exit)
 *   -l BYTES  per-client outbox limit (default 1 MiB, fdcast's default)
 *   -w MS     at EOF on stdin, wait at most MS milliseconds for slow clients
 *             to take what is queued for them (default 10000)
 *
 *   tail -F app.log | log_fanout -u /tmp/log.sock 9000
 *   nc -d 127.0.0.1 9000                 # in other terminals: each prints
 *   socat -u UNIX-CONNECT:/tmp/log.sock -    # every line from now on
 *
 * Behaviour, precisely:
 * - Each line, newline included, is published as one FDCAST_RAW frame to every
 *   client, in the order read. Clients get only lines read after they connect.
 * - A partial line is held until its newline arrives. A line longer than
 *   MAX_LINE bytes is SPLIT, not truncated: it goes out as pieces of MAX_LINE
 *   bytes, each followed by a newline, the last piece holding the rest (so
 *   every byte arrives, and no client ever buffers more than MAX_LINE + 1
 *   bytes to see a newline).
 * - A client that falls more than the outbox limit behind (it stopped reading)
 *   is evicted (FDCAST_EVICT): fdcast shuts the socket down, the client sees
 *   EOF, possibly in the middle of a line, and we close it. It never slows the
 *   others down: publishes never block.
 * - A client that closes, or shuts down its sending side (nc -N), is gone: it
 *   is unsubscribed and closed. What clients send is read and ignored.
 * - EOF on stdin: the listeners close, a last line without a newline is sent
 *   with one, then we dispatch until every queued byte is written or -w MS
 *   passed (then the rest is dropped), close every client and exit 0.
 *   SIGINT/SIGTERM exit at once (queued bytes are dropped), also with 0.
 */
#define _GNU_SOURCE
#include "http_util.h"

#include <sys/epoll.h>
#include <sys/stat.h>
#include <sys/un.h>

#define MAX_LINE (64 * 1024) /* longest line sent whole, newline excluded */
#define READ_SIZE (64 * 1024)

static const char TOPIC[] = "log";
#define TOPIC_LEN (sizeof TOPIC - 1)

enum client_state { FREE, CONNECTED };

static fdcast *fc;
static int ep = -1;
static enum client_state clients[MAX_FDS];
static int n_clients;
static struct evictions evictions;

static char line[MAX_LINE + 1]; /* the line being assembled, + room for '\n' */
static size_t line_len;
static unsigned long long n_lines;

/* ------------------------------------------------------------------------ */
/* clients                                                                  */

static void close_client(int fd, const char *why) {
    /* Forget the fd before close(2): the number may be reused by the very
     * next accept(), and fdcast must not write old lines to it. */
    int64_t dropped = fdcast_unsubscribe_fd(fc, fd);
    (void)dropped;
    evictions_forget(&evictions, fd);
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    clients[fd] = FREE;
    n_clients--;
    fprintf(stderr, "log_fanout: client %d %s (%d clients)\n", fd, why, n_clients);
}

/* Clients fdcast evicted during the batch close after it. */
static void reap_evicted(void) {
    int reason;
    for (int fd; (fd = evictions_next(&evictions, &reason)) >= 0;) {
        if (clients[fd] != CONNECTED) continue;
        char why[128];
        snprintf(why, sizeof why, "evicted: %s", strerror(reason));
        close_client(fd, why);
    }
}

/* Clients have nothing to say: drain and ignore what they send; EOF or an
 * error means the client is gone. A bounded number of reads per wakeup, so a
 * client that floods us cannot starve stdin (epoll is level-triggered and
 * brings us back). */
static void on_client(int fd) {
    for (int i = 0; i < 16; i++) {
        char scratch[4096];
        ssize_t r = recv(fd, scratch, sizeof scratch, 0);
        if (r > 0) continue;
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        close_client(fd, r == 0 ? "disconnected" : "failed");
        return;
    }
}

static void accept_all(int lfd, const char *kind) {
    for (int fd; (fd = accept_next(lfd)) >= 0;) {
        /* Subscribe before anything else can run: the client gets every line
         * read from now on. */
        int64_t id = fdcast_subscribe(fc, TOPIC, TOPIC_LEN, fd, FDCAST_RAW);
        struct epoll_event e = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = fd};
        if (id < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e) < 0) {
            fprintf(stderr, "log_fanout: cannot add client: %s\n",
                    id < 0 ? strerror((int)-id) : strerror(errno));
            if (id >= 0) fdcast_unsubscribe_fd(fc, fd);
            close(fd);
            continue;
        }
        clients[fd] = CONNECTED;
        n_clients++;
        fprintf(stderr, "log_fanout: client %d connected over %s (%d clients)\n", fd, kind,
                n_clients);
    }
}

/* ------------------------------------------------------------------------ */
/* lines                                                                    */

/* Publishes line[0..line_len) plus a newline to every client. */
static void emit_line(void) {
    line[line_len++] = '\n';
    int64_t n = fdcast_publish(fc, TOPIC, TOPIC_LEN, line, line_len);
    if (n < 0) fprintf(stderr, "log_fanout: publish: %s\n", strerror((int)-n));
    line_len = 0;
    n_lines++;
}

/* Cuts p[0..n) into lines. A piece is sent as soon as it is known to be a
 * whole line (its newline arrived) or a full MAX_LINE piece of a longer line
 * (a byte beyond it arrived), so a line of exactly MAX_LINE bytes goes out
 * whole, and the rest waits in `line` for the next read. */
static void take_input(const char *p, size_t n) {
    while (n > 0) {
        const char *nl = memchr(p, '\n', n);
        size_t take = nl != NULL ? (size_t)(nl - p) : n;
        p += take;
        n -= take;
        const char *src = p - take;
        while (take > 0) {
            if (line_len == MAX_LINE) emit_line(); /* split an overlong line */
            size_t k = MAX_LINE - line_len < take ? MAX_LINE - line_len : take;
            memcpy(line + line_len, src, k);
            line_len += k;
            src += k;
            take -= k;
        }
        if (nl != NULL) {
            emit_line();
            p++;
            n--;
        }
    }
}

/* One read of stdin. Returns false at EOF (or on a read error). */
static bool read_stdin(void) {
    static char buf[READ_SIZE];
    for (;;) {
        ssize_t r = read(STDIN_FILENO, buf, sizeof buf);
        if (r > 0) {
            take_input(buf, (size_t)r);
            return true;
        }
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
        if (r < 0) perror("log_fanout: read stdin");
        return false;
    }
}

/* ------------------------------------------------------------------------ */

static int listen_unix(const char *path) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) {
        fprintf(stderr, "log_fanout: unix socket path too long: %s\n", path);
        exit(2);
    }
    strcpy(addr.sun_path, path);
    /* Replace a socket left by an earlier run, never any other file. */
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode)) unlink(path);
    int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0) die("socket");
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind unix socket");
    if (listen(lfd, 128) < 0) die("listen");
    return lfd;
}

static long parse_num(const char *s, long max, const char *what) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || errno != 0 || v < 0 || v > max) {
        fprintf(stderr, "log_fanout: bad %s '%s'\n", what, s);
        exit(2);
    }
    return v;
}

static void usage(void) {
    fprintf(stderr, "usage: log_fanout [-u PATH] [-l BYTES] [-w MS] [port]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *unix_path = NULL;
    long outbox_limit = -1;
    long flush_ms = 10000;
    int opt;
    while ((opt = getopt(argc, argv, "u:l:w:")) != -1) {
        switch (opt) {
        case 'u': unix_path = optarg; break;
        case 'l': outbox_limit = parse_num(optarg, 1L << 30, "outbox limit"); break;
        case 'w': flush_ms = parse_num(optarg, 3600 * 1000L, "flush timeout"); break;
        default: usage();
        }
    }
    if (argc - optind > 1) usage();
    int port = 9000;
    const char *env = getenv("FDCAST_PORT");
    if (optind < argc)
        port = (int)parse_num(argv[optind], 65535, "port");
    else if (env != NULL && *env != '\0')
        port = (int)parse_num(env, 65535, "port");

    /* SIGINT/SIGTERM arrive as reads on a signalfd in the same epoll set. */
    int sfd = signals_fd();

    int bound_port;
    int tcp_lfd = listen_loopback(port, &bound_port);
    int unix_lfd = unix_path != NULL ? listen_unix(unix_path) : -1;

    /* A client that stopped reading is disconnected rather than silently
     * missing lines: a tail that reconnects knows it has a gap. */
    int fcfd;
    fc = evicting_fdcast(&evictions, &fcfd);
    if (outbox_limit >= 0 && fdcast_set_outbox_limit(fc, (size_t)outbox_limit) < 0) {
        fprintf(stderr, "log_fanout: configuring fdcast: %s\n", fdcast_last_error());
        return 1;
    }
    int watch[] = {sfd, fcfd, tcp_lfd, unix_lfd};
    ep = epoll_watching(watch, sizeof watch / sizeof watch[0]);
    /* stdin stays blocking (it may be a terminal shared with the shell): a
     * level-triggered EPOLLIN means one read() will not block. A regular file
     * or /dev/null cannot be polled (EPERM): it is always readable, so we read
     * it on every turn of the loop without waiting. */
    bool stdin_polled = true;
    struct epoll_event in_ev = {.events = EPOLLIN, .data.fd = STDIN_FILENO};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, STDIN_FILENO, &in_ev) < 0) {
        if (errno != EPERM) die("epoll_ctl stdin");
        stdin_polled = false;
    }

    printf("log_fanout: listening on 127.0.0.1:%d (tcp)\n", bound_port);
    if (unix_path != NULL) printf("log_fanout: listening on %s (unix)\n", unix_path);
    printf("log_fanout: fdcast %s, lines up to %d bytes, fanning out stdin\n", fdcast_version(),
           MAX_LINE);
    fflush(stdout);

    bool stdin_open = true, signalled = false;
    long long flush_deadline = 0;
    for (;;) {
        if (!stdin_open) {
            /* Draining: done when nothing is queued any more, or time is up. */
            fdcast_stats st;
            fdcast_get_stats(fc, &st);
            if (st.queued_bytes == 0) break;
            if (now_ms() >= flush_deadline) {
                printf("log_fanout: flush timed out, dropping %llu bytes\n",
                       (unsigned long long)st.queued_bytes);
                break;
            }
        }
        int timeout = -1;
        if (stdin_open && !stdin_polled) timeout = 0;
        if (!stdin_open) {
            long long left = flush_deadline - now_ms();
            timeout = left > 0 ? (int)left : 0;
        }

        struct epoll_event evs[64];
        int n = epoll_wait(ep, evs, 64, timeout);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        bool eof = false;
        if (stdin_open && !stdin_polled) eof = !read_stdin();
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == sfd) {
                struct signalfd_siginfo si;
                if (read(sfd, &si, sizeof si) == (ssize_t)sizeof si) signalled = true;
            } else if (fd == STDIN_FILENO && stdin_open) {
                if (!read_stdin()) eof = true;
            } else if (fd == tcp_lfd) {
                accept_all(tcp_lfd, "tcp");
            } else if (fd == unix_lfd) {
                accept_all(unix_lfd, "unix");
            } else if (fd == fcfd) {
                /* Slow clients became writable: let fdcast flush their outboxes
                 * (and evict those that went away meanwhile). */
                int64_t served = fdcast_dispatch(fc, 0);
                if (served < 0)
                    fprintf(stderr, "log_fanout: dispatch: %s\n", strerror((int)-served));
            } else if (fd >= 0 && fd < MAX_FDS && clients[fd] == CONNECTED &&
                       !evictions_pending(&evictions, fd)) {
                on_client(fd);
            }
        }
        if (eof) {
            if (line_len > 0) emit_line(); /* a last line without its newline */
            stdin_open = false;
            if (stdin_polled) epoll_ctl(ep, EPOLL_CTL_DEL, STDIN_FILENO, NULL);
            /* No new clients: there is nothing left to send them. */
            epoll_ctl(ep, EPOLL_CTL_DEL, tcp_lfd, NULL);
            close(tcp_lfd);
            tcp_lfd = -1;
            if (unix_lfd >= 0) {
                epoll_ctl(ep, EPOLL_CTL_DEL, unix_lfd, NULL);
                close(unix_lfd);
                unlink(unix_path);
                unix_lfd = -1;
            }
            fdcast_stats st;
            fdcast_get_stats(fc, &st);
            printf("log_fanout: stdin closed after %llu lines; flushing %llu bytes to %d clients\n",
                   n_lines, (unsigned long long)st.queued_bytes, n_clients);
            fflush(stdout);
            flush_deadline = now_ms() + flush_ms;
        }
        reap_evicted();
        if (signalled) break;
    }

    fdcast_stats st;
    fdcast_get_stats(fc, &st);
    printf("log_fanout: exiting: %llu lines, %llu deliveries, %llu clients evicted\n", n_lines,
           (unsigned long long)st.deliveries, (unsigned long long)st.evicted_fds);
    for (int fd = 0; fd < MAX_FDS; fd++)
        if (clients[fd] != FREE) close_client(fd, "closed at exit");
    fdcast_free(fc);
    close(ep);
    close(sfd);
    if (tcp_lfd >= 0) close(tcp_lfd);
    if (unix_lfd >= 0) {
        close(unix_lfd);
        unlink(unix_path);
    }
    return 0;
}
