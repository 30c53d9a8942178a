/*
 * test_history.c: per-topic history from C. Ids from fdcast_publish_id, SSE frames carrying
 * them, resume with fdcast_subscribe_since (recovered or not), fdcast_subscribe_tail, ids
 * that do not parse refused with -EINVAL and no change, and the WebSocket id modes
 * (FDCAST_WS_TEXT_ID, FDCAST_WS_BINARY_ID: "<id>\n<payload>" as the frame payload) live, in
 * replay, resumed from an id read out of a frame, and without history. Run by `make c-test`
 * under ASan+UBSan and valgrind.
 */
#define _GNU_SOURCE
#include "check.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

/* An unmasked server frame (FIN, `opcode`) whose payload is `id`, a LF, then `payload`, all
 * under 126 bytes; returns its length. */
static size_t ws_id_frame(char *out, unsigned opcode, const char *id, const char *payload) {
    size_t id_len = strlen(id), payload_len = strlen(payload);
    CHECK(id_len + 1 + payload_len < 126);
    out[0] = (char)(0x80 | opcode);
    out[1] = (char)(id_len + 1 + payload_len);
    memcpy(out + 2, id, id_len);
    out[2 + id_len] = '\n';
    memcpy(out + 3 + id_len, payload, payload_len);
    return 3 + id_len + payload_len;
}

int main(void) {
    char id[FDCAST_MAX_EVENT_ID_LEN + 1];
    CHECK_EQ(fdcast_set_history(NULL, 10, 0, 0), -EINVAL);

    fdcast *fc = fdcast_new();
    CHECK(fc != NULL);

    /* History off: no id, SSE frames as before. */
    CHECK_EQ(fdcast_publish_id(fc, T("t"), T("x"), -1, id, sizeof id), 0);
    CHECK_EQ(strlen(id), 0);

    CHECK_EQ(fdcast_set_history(fc, 3, 0, 0), 0);
    /* Too small an id buffer publishes nothing. */
    CHECK_EQ(fdcast_publish_id(fc, T("t"), T("x"), -1, id, FDCAST_MAX_EVENT_ID_LEN), -EINVAL);
    CHECK_EQ(fdcast_publish_id(fc, T("t"), T("x"), -1, NULL, sizeof id), -EINVAL);

    char ids[5][FDCAST_MAX_EVENT_ID_LEN + 1];
    const char *payloads[5] = {"m1", "m2", "m3", "m4", "m5"};
    for (int i = 0; i < 5; i++) {
        CHECK_EQ(fdcast_publish_id(fc, T("t"), payloads[i], 2, -1, ids[i], sizeof ids[i]), 0);
    }
    /* Same epoch, offsets 1..5. */
    const char *dash = strchr(ids[0], '-');
    CHECK(dash != NULL && strcmp(dash, "-1") == 0);
    CHECK(strncmp(ids[4], ids[0], (size_t)(dash - ids[0] + 1)) == 0);
    CHECK(strcmp(strchr(ids[4], '-'), "-5") == 0);

    /* Resume after m3: m4 and m5 replayed with their ids, recovered. */
    int sse[2];
    make_pair(sse);
    int recovered = -1;
    CHECK(fdcast_subscribe_since(fc, T("t"), sse[0], FDCAST_SSE, ids[2], strlen(ids[2]),
                                 &recovered) > 0);
    CHECK_EQ(recovered, 1);
    char expected[256], buf[256];
    int len = snprintf(expected, sizeof expected, "id: %s\ndata: m4\n\nid: %s\ndata: m5\n\n",
                       ids[3], ids[4]);
    CHECK_EQ(read_now(sse[1], buf, sizeof buf), len);
    CHECK(memcmp(buf, expected, (size_t)len) == 0);

    /* Live after replay, with the next id. */
    CHECK_EQ(fdcast_publish_id(fc, T("t"), T("m6"), -1, id, sizeof id), 1);
    len = snprintf(expected, sizeof expected, "id: %s\ndata: m6\n\n", id);
    CHECK_EQ(read_now(sse[1], buf, sizeof buf), len);
    CHECK(memcmp(buf, expected, (size_t)len) == 0);

    /* m2 was evicted (3 kept: m4 m5 m6): not recovered, every kept one replayed. */
    int raw[2];
    make_pair(raw);
    CHECK(fdcast_subscribe_since(fc, T("t"), raw[0], FDCAST_RAW, ids[0], strlen(ids[0]),
                                 &recovered) > 0);
    CHECK_EQ(recovered, 0);
    CHECK_EQ(read_now(raw[1], buf, sizeof buf), 6);
    CHECK(memcmp(buf, "m4m5m6", 6) == 0);

    /* Ids that do not parse: -EINVAL, nothing subscribed, *recovered untouched. */
    int bad[2];
    make_pair(bad);
    fdcast_stats before, after;
    fdcast_get_stats(fc, &before);
    const char *invalid[] = {"", "1", "-1", "1-", "01-2", "1-02", "+1-2", "1-2-3", "a-b",
                             "1 -2", "18446744073709551616-1"};
    for (size_t i = 0; i < sizeof invalid / sizeof invalid[0]; i++) {
        recovered = 7;
        CHECK_EQ(fdcast_subscribe_since(fc, T("t"), bad[0], FDCAST_RAW, invalid[i],
                                        strlen(invalid[i]), &recovered),
                 -EINVAL);
        CHECK_EQ(recovered, 7);
    }
    CHECK_EQ(fdcast_subscribe_since(fc, T("t"), bad[0], FDCAST_RAW, NULL, 3, NULL), -EINVAL);
    fdcast_get_stats(fc, &after);
    CHECK_EQ(after.subscriptions, before.subscriptions);
    CHECK_EQ(read_now(bad[1], buf, sizeof buf), 0);

    /* Tail: the last 2, then live. */
    int tail[2];
    make_pair(tail);
    CHECK(fdcast_subscribe_tail(fc, T("t"), tail[0], FDCAST_RAW, 2) > 0);
    CHECK_EQ(fdcast_publish(fc, T("t"), T("m7")), 3); /* sse, raw, tail */
    CHECK_EQ(read_now(tail[1], buf, sizeof buf), 6);
    CHECK(memcmp(buf, "m5m6m7", 6) == 0);

    /* WebSocket id modes. A client that got m6 (its id is in `id`) resumes in
     * FDCAST_WS_TEXT_ID: m7 (kept: m5 m6 m7) is replayed, then m8 live, each frame's payload
     * "<id>\n<payload>". */
    char m7_id[FDCAST_MAX_EVENT_ID_LEN + 1], m8_id[FDCAST_MAX_EVENT_ID_LEN + 1];
    snprintf(m7_id, sizeof m7_id, "%.*s-7", (int)(dash - ids[0]), ids[0]);
    int ws[2];
    make_pair(ws);
    CHECK(fdcast_subscribe_since(fc, T("t"), ws[0], FDCAST_WS_TEXT_ID, id, strlen(id),
                                 &recovered) > 0);
    CHECK_EQ(recovered, 1);
    CHECK_EQ(fdcast_publish_id(fc, T("t"), T("m8"), -1, m8_id, sizeof m8_id), 4);
    size_t n = ws_id_frame(expected, 0x1, m7_id, "m7");
    n += ws_id_frame(expected + n, 0x1, m8_id, "m8");
    CHECK_EQ(read_now(ws[1], buf, sizeof buf), n);
    CHECK(memcmp(buf, expected, n) == 0);

    /* The client drops; m9 comes; it resumes in FDCAST_WS_BINARY_ID from the id before the
     * first LF of the last frame it got (m8's): m9 only, recovered. */
    CHECK_EQ(fdcast_unsubscribe_fd(fc, ws[0]), 1);
    CHECK_EQ(fdcast_publish(fc, T("t"), T("m9")), 3);
    const char *frame_id = buf + n - (2 + strlen(m8_id) + 1 + 2) + 2;
    const char *lf = memchr(frame_id, '\n', strlen(m8_id) + 1);
    CHECK(lf != NULL);
    CHECK(fdcast_subscribe_since(fc, T("t"), ws[0], FDCAST_WS_BINARY_ID, frame_id,
                                 (size_t)(lf - frame_id), &recovered) > 0);
    CHECK_EQ(recovered, 1);
    char m9_id[FDCAST_MAX_EVENT_ID_LEN + 1];
    snprintf(m9_id, sizeof m9_id, "%.*s-9", (int)(dash - ids[0]), ids[0]);
    n = ws_id_frame(expected, 0x2, m9_id, "m9");
    CHECK_EQ(read_now(ws[1], buf, sizeof buf), n);
    CHECK(memcmp(buf, expected, n) == 0);

    /* TEXT_ID needs UTF-8; modes past FDCAST_WS_BINARY_ID are refused. */
    CHECK_EQ(fdcast_send(fc, ws[0], FDCAST_WS_TEXT_ID, "\xff", 1), -EILSEQ);
    CHECK_EQ(fdcast_send(fc, ws[0], (fdcast_mode)6, T("x")), -EINVAL);
    CHECK_EQ(fdcast_subscribe(fc, T("u"), ws[0], (fdcast_mode)6), -EINVAL);
    CHECK_EQ(read_now(ws[1], buf, sizeof buf), 0);

    /* Off again: what was kept is gone. */
    CHECK_EQ(fdcast_set_history(fc, 0, 0, 0), 0);
    CHECK_EQ(fdcast_set_history(fc, 3, 0, 0), 0);
    int late[2];
    make_pair(late);
    CHECK(fdcast_subscribe_tail(fc, T("t"), late[0], FDCAST_RAW, 10) > 0);
    CHECK_EQ(read_now(late[1], buf, sizeof buf), 0);

    /* A topic without history: an id mode's frame starts with an empty id, its LF alone. */
    CHECK(fdcast_subscribe(fc, T("plain"), late[0], FDCAST_WS_TEXT_ID) > 0);
    CHECK_EQ(fdcast_set_history(fc, 0, 0, 0), 0);
    CHECK_EQ(fdcast_publish(fc, T("plain"), T("hi")), 1);
    CHECK_EQ(fdcast_send(fc, late[0], FDCAST_WS_BINARY_ID, T("yo")), 0);
    CHECK_EQ(read_now(late[1], buf, sizeof buf), 10);
    CHECK(memcmp(buf, "\x81\x03\nhi\x82\x03\nyo", 10) == 0);

    fdcast_free(fc);
    int *pairs[] = {sse, raw, bad, tail, ws, late};
    for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++) {
        close(pairs[i][0]);
        close(pairs[i][1]);
    }
    printf("test_history: %lu checks passed\n", checks_run);
    return 0;
}
