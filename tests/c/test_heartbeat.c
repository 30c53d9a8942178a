/*
 * test_heartbeat.c: fdcast_set_heartbeat from C. An idle WebSocket subscriber gets a ping
 * and an idle SSE subscriber a comment line when fdcast_fd() turns readable, with no timer
 * in the host. Run by `make c-test` under ASan+UBSan and valgrind.
 */
#define _GNU_SOURCE
#include "fdcast.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define CHECK(cond)                                                            \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "%s:%d: FAILED: %s\n", __FILE__, __LINE__, #cond); \
            _exit(1);                                                          \
        }                                                                      \
    } while (0)

int main(void) {
    CHECK(fdcast_set_heartbeat(NULL, 10) == -EINVAL);

    fdcast *fc = fdcast_new();
    CHECK(fc != NULL);
    int ws[2], sse[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, ws) == 0);
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sse) == 0);
    CHECK(fdcast_subscribe(fc, "t", 1, ws[0], FDCAST_WS_TEXT) > 0);
    CHECK(fdcast_subscribe(fc, "t", 1, sse[0], FDCAST_SSE) > 0);
    CHECK(fdcast_set_heartbeat(fc, 30) == 0);

    struct pollfd pfd = {.fd = fdcast_fd(fc), .events = POLLIN};
    CHECK(poll(&pfd, 1, 5000) == 1); /* due within the interval, no host timer */
    CHECK(fdcast_dispatch(fc, 0) == 2);
    char buf[16];
    CHECK(read(ws[1], buf, sizeof buf) == 2 && memcmp(buf, "\x89\x00", 2) == 0);
    CHECK(read(sse[1], buf, sizeof buf) == 3 && memcmp(buf, ":\n\n", 3) == 0);

    CHECK(fdcast_set_heartbeat(fc, 0) == 0); /* off */
    CHECK(poll(&pfd, 1, 150) == 0);

    fdcast_stats stats;
    fdcast_get_stats(fc, &stats);
    CHECK(stats.deliveries == 0);
    fdcast_free(fc);
    for (int i = 0; i < 2; i++) {
        close(ws[i]);
        close(sse[i]);
    }
    puts("test_heartbeat: ok");
    return 0;
}
