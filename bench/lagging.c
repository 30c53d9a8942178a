/*
 * lagging.c: memory of readers that stop reading, with history on and off (part 9).
 *
 *   lagging n=10000 m=10000 s=100 limit=4096
 *
 * n Unix stream pairs subscribe RAW to one topic; their readers never read (they live in a
 * holder process, so that the publisher's fd limit covers only its own ends), except reader 0,
 * which reads only at the end. m messages of s bytes are published, then RSS is measured.
 * Each case runs in a process of its own, so that one's freed memory does not hide the other's:
 *
 *  - history on (m messages kept): every reader falls behind once its outbox (limit bytes)
 *    and socket buffer are full, and keeps only a cursor: RSS should grow by about the
 *    history once, not by a copy per reader;
 *  - history off: the same readers drop, as before history existed.
 *
 * With history on, reader 0 then reads while the publisher dispatches, and must get all m
 * messages, whole and in order (the run fails otherwise). Prints a Markdown section.
 */
#define _GNU_SOURCE
#include "common.h"
#include "fdcast.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define FDS_PER_MESSAGE 200

struct result {
    long rss_before, rss_after;
    double publish_s;
    uint64_t dropped, lost, catching_up, queued;
    long received_in_order; /* reader 0's messages, when history is on */
};

/* A process that holds the readers' ends it is sent and never reads them. */
static int spawn_holder(pid_t *pid) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) die("socketpair");
    fflush(NULL);
    *pid = fork();
    if (*pid < 0) die("fork");
    if (*pid == 0) {
        close(sv[0]);
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        raise_nofile();
        char data[1];
        union {
            char buf[CMSG_SPACE(FDS_PER_MESSAGE * sizeof(int))];
            struct cmsghdr align;
        } control;
        for (;;) {
            struct iovec iov = {data, sizeof data};
            struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
                                 .msg_control = control.buf, .msg_controllen = sizeof control.buf};
            ssize_t n = recvmsg(sv[1], &msg, 0);
            if (n <= 0) _exit(0); /* the publisher is done: every end closes with us */
        }
    }
    close(sv[1]);
    return sv[0];
}

static void send_fds(int holder, const int *fds, int count) {
    char data[1] = {0};
    union {
        char buf[CMSG_SPACE(FDS_PER_MESSAGE * sizeof(int))];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = {data, sizeof data};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                         .msg_controllen = CMSG_SPACE((size_t)count * sizeof(int))};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN((size_t)count * sizeof(int));
    memcpy(CMSG_DATA(cmsg), fds, (size_t)count * sizeof(int));
    if (sendmsg(holder, &msg, 0) != 1) die("sendmsg: %s", strerror(errno));
}

/* Reader 0 reads while the publisher dispatches, until it is caught up; returns how many
 * messages it got in order (-1 at the first one out of order or torn). */
static long read_caught_up(fdcast *fc, int fd, int reader, long s) {
    char *frame = malloc((size_t)s), *buf = malloc(1 << 16);
    size_t have = 0;
    long next = 0;
    double deadline = now_s() + 120;
    if (!frame || !buf) die("malloc");
    for (;;) {
        ssize_t n = read(reader, buf + have, (1 << 16) - have);
        if (n > 0) {
            have += (size_t)n;
            size_t at = 0;
            for (; have - at >= (size_t)s; at += (size_t)s) {
                if (strtol(buf + at, NULL, 10) != next) return -1;
                next++;
            }
            memmove(buf, buf + at, have - at);
            have -= at;
        }
        fdcast_fd_counters st;
        if (fdcast_fd_stats(fc, fd, &st) != 0) die("fdcast_fd_stats");
        if (st.catching_up == 0 && st.queued_bytes == 0 && n <= 0) break;
        if (now_s() > deadline) die("reader 0 is still behind after 120 s");
        if (fdcast_dispatch(fc, 1) < 0) die("fdcast_dispatch");
    }
    free(frame);
    free(buf);
    return next;
}

static struct result run_case(int history, long n, long m, long s, long limit) {
    raise_nofile();
    pid_t holder_pid;
    int holder = spawn_holder(&holder_pid);
    fdcast *fc = fdcast_new();
    if (!fc) die("fdcast_new");
    if (fdcast_set_outbox_limit(fc, (size_t)limit) != 0) die("set_outbox_limit");
    if (history && fdcast_set_history(fc, (size_t)m, 0, 0) != 0) die("set_history");
    int *fds = malloc((size_t)n * sizeof *fds);
    int batch[FDS_PER_MESSAGE], batched = 0, reader0 = -1;
    if (!fds) die("malloc");
    int small = 4096;
    for (long i = 0; i < n; i++) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0)
            die("socketpair %ld: %s", i, strerror(errno));
        setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
        setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
        fds[i] = sv[0];
        if (fdcast_subscribe(fc, "t", 1, sv[0], FDCAST_RAW) <= 0) die("subscribe");
        if (i == 0) {
            reader0 = sv[1];
            continue;
        }
        batch[batched++] = sv[1];
        if (batched == FDS_PER_MESSAGE || i == n - 1) {
            send_fds(holder, batch, batched);
            for (int k = 0; k < batched; k++) close(batch[k]);
            batched = 0;
        }
    }
    char *payload = malloc((size_t)s);
    if (!payload) die("malloc");
    memset(payload, 'x', (size_t)s);
    struct result r = {0};
    r.rss_before = rss_bytes();
    double t0 = now_s();
    for (long i = 0; i < m; i++) {
        char digits[32];
        int len = snprintf(digits, sizeof digits, "%0*ld", SEQ_DIGITS, i);
        memcpy(payload, digits, (size_t)len);
        if (fdcast_publish(fc, "t", 1, payload, (size_t)s) != n) die("publish");
    }
    r.publish_s = now_s() - t0;
    r.rss_after = rss_bytes();
    fdcast_stats st;
    fdcast_get_stats(fc, &st);
    r.dropped = st.dropped_messages;
    r.lost = st.lost_to_gaps;
    r.queued = st.queued_bytes;
    for (long i = 0; i < n; i++) {
        fdcast_fd_counters fs;
        if (fdcast_fd_stats(fc, fds[i], &fs) != 0) die("fdcast_fd_stats");
        r.catching_up += fs.catching_up;
    }
    r.received_in_order = history ? read_caught_up(fc, fds[0], reader0, s) : 0;
    fdcast_free(fc);
    close(holder);
    waitpid(holder_pid, NULL, 0);
    return r;
}

/* Runs one case in a child process and reads its result back through a pipe. */
static struct result run_isolated(int history, long n, long m, long s, long limit) {
    int p[2];
    if (pipe(p) != 0) die("pipe");
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
        close(p[0]);
        struct result r = run_case(history, n, m, s, limit);
        if (write(p[1], &r, sizeof r) != (ssize_t)sizeof r) _exit(1);
        _exit(0);
    }
    close(p[1]);
    struct result r;
    if (read(p[0], &r, sizeof r) != (ssize_t)sizeof r) die("case (history %d) failed", history);
    close(p[0]);
    int status;
    waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) die("case (history %d) failed", history);
    return r;
}

int main(int argc, char **argv) {
    long n = opt_long(argc, argv, "n", 10000);
    long m = opt_long(argc, argv, "m", 10000);
    long s = opt_long(argc, argv, "s", 100);
    long limit = opt_long(argc, argv, "limit", 4096);
    if (n < 1 || m < 1 || s < SEQ_DIGITS) die("n, m >= 1 and s >= %d", SEQ_DIGITS);
    struct result on = run_isolated(1, n, m, s, limit);
    struct result off = run_isolated(0, n, m, s, limit);
    double mib = 1024.0 * 1024.0;
    double grew_on = (double)(on.rss_after - on.rss_before);
    double grew_off = (double)(off.rss_after - off.rss_before);
    double history_bytes = (double)m * (double)s;
    printf("\n## 9. Readers that stop reading: history on and off\n\n");
    printf("%ld readers subscribed to one topic stop reading; %ld messages of %ld bytes are "
           "published (outbox limit %ld bytes, 4 KiB socket buffers). RSS of the publishing "
           "process, each case in a process of its own.\n\n",
           n, m, s, limit);
    printf("| history | RSS before MiB | RSS after MiB | growth MiB | dropped | lost to gaps | "
           "catching up | queued MiB | publish s |\n");
    printf("|---|---|---|---|---|---|---|---|---|\n");
    const struct result *cases[2] = {&on, &off};
    for (int i = 0; i < 2; i++) {
        const struct result *r = cases[i];
        printf("| %s | %.1f | %.1f | %.1f | %llu | %llu | %llu | %.1f | %.2f |\n",
               i == 0 ? "on" : "off", (double)r->rss_before / mib, (double)r->rss_after / mib,
               (double)(r->rss_after - r->rss_before) / mib, (unsigned long long)r->dropped,
               (unsigned long long)r->lost, (unsigned long long)r->catching_up,
               (double)r->queued / mib, r->publish_s);
    }
    printf("\nThe history holds %.1f MiB of payload. Growth with history on minus growth with it "
           "off: %.1f MiB (%.2f x the history); per lagging reader beyond the history's payload: "
           "%.0f bytes. Reader 0 then caught up with %ld of %ld messages, in order.\n",
           history_bytes / mib, (grew_on - grew_off) / mib, (grew_on - grew_off) / history_bytes,
           (grew_on - grew_off - history_bytes) / (double)n, on.received_in_order, m);
    fprintf(stderr, "lagging: n=%ld m=%ld s=%ld growth_on=%.0f growth_off=%.0f per_reader=%.0f "
           "caught_up=%ld\n",
           n, m, s, grew_on, grew_off, (grew_on - grew_off - history_bytes) / (double)n,
           on.received_in_order);
    if (on.received_in_order != m || on.dropped != 0 || off.dropped == 0) {
        fprintf(stderr, "lagging: reader 0 got %ld of %ld in order; dropped with history %llu, "
                        "without %llu\n",
                on.received_in_order, m, (unsigned long long)on.dropped,
                (unsigned long long)off.dropped);
        return 1;
    }
    return 0;
}
