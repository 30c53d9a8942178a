/*
 * common.h: what the C benchmarks share.
 *
 *  - connected stream pairs (Unix or TCP loopback) whose receiving ends live in a receiver
 *    process;
 *  - fixed-size test frames: a payload of S bytes whose first 8 bytes are the message's
 *    sequence number in decimal (valid UTF-8, no line break), framed as RAW, WebSocket text,
 *    SSE or a Redis pub/sub "message" reply;
 *  - the receiver process: threads that drain fds with epoll, count bytes per fd and keep each
 *    fd's last frame; a run is complete when every fd has its expected byte count, and
 *    verified when, in addition, each fd's last frame is the frame of the last message;
 *  - clocks, medians, RSS, RLIMIT_NOFILE.
 */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#include <stddef.h>
#include <stdint.h>

#define SEQ_DIGITS 8

/* --- misc -------------------------------------------------------------------------------- */
_Noreturn void die(const char *fmt, ...);
double now_s(void);
double thread_cpu_s(void);                /* this thread's user + system time */
double median(double *v, int n);          /* sorts v */
long rss_bytes(void);                     /* resident set size of this process */
void raise_nofile(void);                  /* RLIMIT_NOFILE soft limit to the hard limit */
/* options are key=value arguments: opt(argc, argv, "n", "100") */
const char *opt(int argc, char **argv, const char *key, const char *def);
long opt_long(int argc, char **argv, const char *key, long def);

/* --- fds ----------------------------------------------------------------------------------- */
#include <sys/socket.h>
enum transport { T_UNIX, T_TCP };
enum transport parse_transport(const char *s);
const char *transport_name(enum transport t);
/* a listening socket on 127.0.0.1:<any> or an abstract Unix address; its address in *addr */
int listen_any(enum transport t, struct sockaddr_storage *addr, socklen_t *addr_len);
/* TCP_NODELAY, and SO_LINGER 0 so that no TIME_WAIT piles up across runs (no-op for Unix) */
void stream_options(int fd);
/* send all of buf with MSG_NOSIGNAL|MSG_DONTWAIT, polling for POLLOUT on EAGAIN. */
void send_all(int fd, const void *buf, size_t len);
/* the same for an iovec array (sendmsg); modifies iov as it goes */
struct iovec;
void sendmsg_all(int fd, struct iovec *iov, int iovcnt);
/* blocking read of exactly len bytes. */
void read_exact(int fd, void *buf, size_t len);

/* --- frames -------------------------------------------------------------------------------- */
enum framing { F_RAW, F_WS_TEXT, F_SSE, F_RESP };
typedef struct codec {
    enum framing framing;
    size_t payload_len; /* S, >= SEQ_DIGITS */
    size_t header_len;  /* bytes before the payload */
    size_t frame_len;   /* whole frame */
    const char *channel; /* F_RESP only */
} codec;
codec make_codec(enum framing f, size_t payload_len, const char *channel);
/* the payload of message seq (payload_len bytes); put_seq rewrites only its first 8 bytes */
void fill_payload(unsigned char *out, size_t payload_len, uint32_t seq);
void put_seq(unsigned char *out, uint32_t seq);
/* the whole frame of message seq (frame_len bytes) */
void encode_frame(const codec *c, unsigned char *out, uint32_t seq);

/* --- receivers ----------------------------------------------------------------------------- */
/* One fd's receiving state. rx_consume takes what was read from it. */
typedef struct rx_fd {
    int fd;
    const codec *codec;
    uint64_t expect;   /* bytes expected this run */
    uint64_t got;
    size_t tail_len;   /* how much of tail is filled (<= frame_len) */
    unsigned char *tail;
    /* full check, when check_frames is set: every frame whole and as encoded, sequence
     * numbers increasing */
    int check_frames;
    uint32_t frames;   /* whole frames seen (check_frames only) */
    int64_t last_seq;
    size_t fill;
    unsigned char *frame;
    int bad;
} rx_fd;
void rx_reset(rx_fd *r, const codec *c, uint64_t frames);
void rx_consume(rx_fd *r, const unsigned char *buf, size_t n);
/* "" if r got exactly its bytes and its last frame is message last_seq's, else why not */
const char *rx_problem(const rx_fd *r, uint32_t last_seq);

/* The receiver process: forked by rx_spawn, it owns the receiving ends and drains them with
 * `threads` epoll threads, so the sender's process holds only the sending ends (10,000
 * connections fit in RLIMIT_NOFILE). The caller drives it over a control socket. */
typedef struct rx_proc rx_proc;
rx_proc *rx_spawn(int threads);
/* The receiver process connects n stream sockets to addr, writes hello on each and reads
 * ack_len bytes back. With listen_fd >= 0 (the caller's listener at addr) the caller accepts
 * the n connections into tx[] meanwhile, with stream_options set. */
void rx_connect(rx_proc *p, const struct sockaddr_storage *addr, socklen_t addr_len, int n,
                const void *hello, size_t hello_len, size_t ack_len, int listen_fd, int *tx);
/* n connected pairs over transport t: the caller gets the sending ends */
void rx_pairs(rx_proc *p, enum transport t, int n, int *tx);
/* The fds connected so far, numbered in connection order. A run concerns fds [first,
 * first + count): rx_arm prepares them to expect `frames` frames (payload_len bytes,
 * framing f, channel for F_RESP) and rx_finish checks them. */
int rx_count(const rx_proc *p);
void rx_arm(rx_proc *p, int first, int count, enum framing f, size_t payload_len,
            const char *channel, uint64_t frames);
/* waits (up to timeout_s) until every fd has its bytes and verifies them; returns 0 and sets
 * *done_at (now_s clock) to when the last byte arrived, or prints the problems to stderr,
 * labelled with `what`, and returns how many fds are wrong */
int rx_finish(rx_proc *p, uint32_t last_seq, double timeout_s, const char *what, double *done_at);

/* --- fdcast host helpers ------------------------------------------------------------------- */
struct fdcast;
/* The host's back-pressure: when more than `high` bytes are queued, poll fdcast_fd() and call
 * fdcast_dispatch(fc, 0) until at most `low` are (fc_settle(fc, 0, 0) drains everything).
 * Dies if fdcast_fd() stays unreadable for 10 s with bytes queued. */
void fc_settle(struct fdcast *fc, uint64_t high, uint64_t low);

#endif
