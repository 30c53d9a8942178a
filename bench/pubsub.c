/*
 * pubsub.c: fdcast against Redis pub/sub (benchmark part 2). Unix sockets throughout.
 *
 * N subscriber connections on one channel, M messages of S bytes, everything verified at the
 * receivers (a separate process). Contenders, alternating, `reps` times each:
 *
 *   redis          a redis-server started here (Unix socket only, no persistence, pubsub
 *                  output buffers unlimited so no subscriber is cut off) with N subscribers of
 *                  channel "ch"; one publisher connection pipelines PUBLISH commands in
 *                  batches of B, reading the replies with at most two batches unanswered.
 *   fdcast         fdcast in this process, corked, fdcast_flush after every B publishes, RAW
 *                  subscribers over N Unix connections.
 *   fdcast-server  fdcast_server (fdcast_server.c) started here, N subscriber connections,
 *                  one publisher connection streaming its requests in batches of B.
 *
 * Subscribers receive what each system sends them: Redis's RESP "message" reply (S + ~30
 * bytes), fdcast's RAW payload (S bytes).
 *
 * usage: pubsub n=100 s=64 batch=64 deliveries=2000000 reps=3 receivers=1
 *               server=target/bench/fdcast_server redis=redis-server
 * prints RESULT lines as fanout does (part=pubsub).
 */
#define _GNU_SOURCE
#include "common.h"
#include "fdcast.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

enum { MAX_REPS = 32, N_CONTENDERS = 3 };
#define CHANNEL "ch"

typedef struct ctx {
    int n, *tx, redis_pub, server_pub;
    size_t s;
    uint32_t batch, m;
} ctx;

static pid_t spawn(char *const argv[]) {
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGTERM); /* never outlive the bench */
        execvp(argv[0], argv);
        fprintf(stderr, "bench: cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    return pid;
}

static void unix_addr(const char *path, struct sockaddr_storage *ss, socklen_t *len) {
    struct sockaddr_un *un = (struct sockaddr_un *)ss;
    memset(ss, 0, sizeof *ss);
    un->sun_family = AF_UNIX;
    snprintf(un->sun_path, sizeof un->sun_path, "%s", path);
    *len = sizeof *un;
}

/* connects to a freshly started server, retrying for up to 10 s */
static int connect_when_up(const char *path) {
    struct sockaddr_storage ss;
    socklen_t len;
    unix_addr(path, &ss, &len);
    for (int i = 0; i < 1000; i++) {
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd >= 0 && connect(fd, (struct sockaddr *)&ss, len) == 0) return fd;
        close(fd);
        usleep(10000);
    }
    die("nothing listens on %s", path);
}

/* M messages as `batch`-sized runs of one request template each, sequence numbers patched in */
static unsigned char *batch_template(size_t *req_len, size_t *seq_at, const char *head,
                                     size_t head_len, size_t s, const char *tail, uint32_t b) {
    size_t tail_len = strlen(tail);
    *req_len = head_len + s + tail_len;
    *seq_at = head_len;
    unsigned char *buf = malloc(*req_len * b);
    if (!buf) die("malloc");
    for (uint32_t j = 0; j < b; j++) {
        unsigned char *r = buf + j * *req_len;
        memcpy(r, head, head_len);
        fill_payload(r + head_len, s, j);
        memcpy(r + head_len + s, tail, tail_len);
    }
    return buf;
}

static void run_redis(const ctx *c) {
    char head[64];
    size_t req_len, seq_at;
    int head_len = snprintf(head, sizeof head, "*3\r\n$7\r\nPUBLISH\r\n$2\r\n" CHANNEL "\r\n$%zu\r\n", c->s);
    unsigned char *buf = batch_template(&req_len, &seq_at, head, (size_t)head_len, c->s, "\r\n", c->batch);
    uint64_t unanswered = 0;
    char replies[65536];
    for (uint32_t m = 0; m < c->m || unanswered > 0;) {
        if (m < c->m) {
            for (uint32_t j = 0; j < c->batch; j++) put_seq(buf + j * req_len + seq_at, m + j);
            send_all(c->redis_pub, buf, req_len * c->batch);
            m += c->batch;
            unanswered += c->batch;
        }
        while (unanswered > (m < c->m ? c->batch : 0)) { /* one ":N\r\n" per PUBLISH */
            ssize_t got = read(c->redis_pub, replies, sizeof replies);
            if (got <= 0 && errno != EINTR) die("reading PUBLISH replies");
            for (ssize_t i = 0; i < got; i++) unanswered -= replies[i] == '\n';
        }
    }
    free(buf);
}

static void run_server(const ctx *c) {
    char head[8 + 2] = {'P', 2, 0, 0, (char)(c->s & 255), (char)(c->s >> 8), 0, 0, 'c', 'h'};
    size_t req_len, seq_at;
    unsigned char *buf = batch_template(&req_len, &seq_at, head, sizeof head, c->s, "", c->batch);
    for (uint32_t m = 0; m < c->m; m += c->batch) {
        for (uint32_t j = 0; j < c->batch; j++) put_seq(buf + j * req_len + seq_at, m + j);
        send_all(c->server_pub, buf, req_len * c->batch);
    }
    free(buf);
}

static void run_fdcast(const ctx *c) {
    fdcast *fc = fdcast_new();
    if (!fc || fdcast_set_outbox_limit(fc, (size_t)1 << 40) != 0) die("fdcast_new");
    for (int i = 0; i < c->n; i++)
        if (fdcast_subscribe(fc, CHANNEL, 2, c->tx[i], FDCAST_RAW) <= 0) die("fdcast_subscribe");
    unsigned char *payload = malloc(c->s);
    if (!payload) die("malloc");
    fill_payload(payload, c->s, 0);
    uint64_t high = (uint64_t)c->n * (2 * c->batch * c->s > 16384 ? 2 * c->batch * c->s : 16384);
    if (fdcast_cork(fc) != 0) die("fdcast_cork");
    for (uint32_t m = 0; m < c->m; m++) {
        put_seq(payload, m);
        if (fdcast_publish(fc, CHANNEL, 2, payload, c->s) != c->n) die("fdcast_publish");
        if ((m + 1) % c->batch == 0) {
            if (fdcast_flush(fc) < 0) die("fdcast_flush");
            fc_settle(fc, high, high / 2);
        }
    }
    if (fdcast_uncork(fc) < 0) die("fdcast_uncork");
    fc_settle(fc, 0, 0);
    fdcast_stats st;
    fdcast_get_stats(fc, &st);
    if (st.dropped_messages != 0) die("fdcast dropped %llu frames", (unsigned long long)st.dropped_messages);
    fdcast_free(fc);
    free(payload);
}

int main(int argc, char **argv) {
    int n = (int)opt_long(argc, argv, "n", 100);
    size_t s = (size_t)opt_long(argc, argv, "s", 64);
    uint32_t batch = (uint32_t)opt_long(argc, argv, "batch", 64);
    long deliveries = opt_long(argc, argv, "deliveries", 2000000);
    int reps = (int)opt_long(argc, argv, "reps", 3);
    int receivers = (int)opt_long(argc, argv, "receivers", 1);
    const char *server_bin = opt(argc, argv, "server", "target/bench/fdcast_server");
    const char *redis_bin = opt(argc, argv, "redis", "redis-server");
    if (n < 1 || batch < 1 || reps < 1 || reps > MAX_REPS || s > 65535) die("bad arguments");
    uint64_t m64 = (uint64_t)deliveries / (uint64_t)n;
    if (m64 < 4 * (uint64_t)batch) m64 = 4 * (uint64_t)batch;
    m64 = (m64 + batch - 1) / batch * batch;

    rx_proc *rx = rx_spawn(receivers);
    char dir[] = "/tmp/fdcast-pubsub-XXXXXX", redis_sock[128], server_sock[128], log[128];
    if (!mkdtemp(dir)) die("mkdtemp");
    snprintf(redis_sock, sizeof redis_sock, "%s/redis.sock", dir);
    snprintf(server_sock, sizeof server_sock, "%s/fdcast.sock", dir);
    snprintf(log, sizeof log, "%s/redis.log", dir);
    char *redis_argv[] = {(char *)redis_bin, "--port", "0", "--unixsocket", redis_sock,
                          "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                          "--daemonize", "no", "--dir", dir, "--logfile", log,
                          "--client-output-buffer-limit", "pubsub 0 0 0", NULL};
    char *server_argv[] = {(char *)server_bin, server_sock, NULL};
    pid_t redis_pid = spawn(redis_argv), server_pid = spawn(server_argv);

    ctx c = {.n = n, .s = s, .batch = batch, .m = (uint32_t)m64, .tx = malloc(sizeof(int) * (size_t)n)};
    if (!c.tx) die("malloc");
    struct sockaddr_storage ss;
    socklen_t len;
    int first[N_CONTENDERS];
    /* redis: subscribers, then the publisher */
    c.redis_pub = connect_when_up(redis_sock);
    const char *sub = "*2\r\n$9\r\nSUBSCRIBE\r\n$2\r\n" CHANNEL "\r\n";
    const char *ack = "*3\r\n$9\r\nsubscribe\r\n$2\r\n" CHANNEL "\r\n:1\r\n";
    unix_addr(redis_sock, &ss, &len);
    first[0] = rx_count(rx);
    rx_connect(rx, &ss, len, n, sub, strlen(sub), strlen(ack), -1, NULL);
    /* fdcast in-process */
    first[1] = rx_count(rx);
    rx_pairs(rx, T_UNIX, n, c.tx);
    /* fdcast_server */
    c.server_pub = connect_when_up(server_sock);
    const char server_sub[] = {'S', 2, 0, 0, 0, 0, 0, 0, 'c', 'h'};
    unix_addr(server_sock, &ss, &len);
    first[2] = rx_count(rx);
    rx_connect(rx, &ss, len, n, server_sub, sizeof server_sub, 1, -1, NULL);

    static const struct {
        const char *name;
        void (*fn)(const ctx *);
        enum framing framing;
    } contenders[N_CONTENDERS] = {
        {"redis", run_redis, F_RESP}, {"fdcast", run_fdcast, F_RAW}, {"fdcast-server", run_server, F_RAW}};
    double rates[N_CONTENDERS][MAX_REPS];
    int failures = 0;
    for (int rep = 0; rep < reps; rep++) {
        for (int j = 0; j < N_CONTENDERS; j++) {
            int ci = (j + rep) % N_CONTENDERS;
            rx_arm(rx, first[ci], n, contenders[ci].framing, s, CHANNEL, c.m);
            double t0 = now_s(), t1;
            contenders[ci].fn(&c);
            char what[128];
            snprintf(what, sizeof what, "pubsub n=%d s=%zu %s", n, s, contenders[ci].name);
            if (rx_finish(rx, c.m - 1, 60, what, &t1) != 0) {
                failures++;
                rates[ci][rep] = 0;
                continue;
            }
            rates[ci][rep] = (double)c.m * n / (t1 - t0);
        }
    }
    for (int ci = 0; ci < N_CONTENDERS; ci++) {
        char runs[MAX_REPS * 24] = "";
        size_t at = 0;
        for (int rep = 0; rep < reps; rep++)
            at += (size_t)snprintf(runs + at, sizeof runs - at, "%s%.0f", rep ? ";" : "", rates[ci][rep]);
        printf("RESULT part=pubsub transport=unix n=%d s=%zu k=%u m=%u contender=%s rate=%.0f runs=%s\n",
               n, s, batch, c.m, contenders[ci].name, median(rates[ci], reps), runs);
    }
    kill(redis_pid, SIGTERM);
    kill(server_pid, SIGTERM);
    waitpid(redis_pid, NULL, 0);
    waitpid(server_pid, NULL, 0);
    unlink(redis_sock);
    unlink(server_sock);
    unlink(log);
    rmdir(dir);
    return failures ? 1 : 0;
}
