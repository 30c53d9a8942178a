/*
 * ws_chat: a chat server on fdcast, in one epoll loop. Rooms are fdcast
 * topics ("room:<name>"); browsers join them over WebSocket, and anything can
 * watch them over Server-Sent Events.
 *
 *   GET /?room=<r>           the chat page (room "lobby" by default)
 *   GET /sse.html?room=<r>   a read-only page showing the room via EventSource
 *   GET /ws?room=<r>         WebSocket: each text message the client sends is
 *                            published to every other member of the room (no
 *                            echo to the sender: the page shows its own
 *                            messages itself)
 *   GET /events?room=<r>     text/event-stream of the room's messages, each
 *                            event with its id; a request with a Last-Event-ID
 *                            header (an EventSource reconnecting) first gets
 *                            every kept message after that id
 *   GET /resume.html?room=<r>  a read-only page on the WebSocket below that
 *                            reconnects by itself with the last id it saw
 *   GET /ws?room=<r>&last_id=<id>  WebSocket in FDCAST_WS_TEXT_ID: each message
 *                            arrives as "<id>\n<text>" (split at the first LF);
 *                            first every kept message after <id> (empty: none).
 *                            Read-only in spirit: what it sends is published too
 *   POST /admin/drop?room=<r>  closes every connection that can resume (event
 *                            streams and last_id WebSockets) in the room at
 *                            once, as a network failure would; answers their
 *                            count. For tests and demos: the server listens on
 *                            127.0.0.1 only
 *
 * History: each room keeps its last HISTORY_MESSAGES messages (at most
 * HISTORY_BYTES bytes), so a client that lost its connection resumes without a
 * gap or a duplicate: an EventSource on its own (it sends Last-Event-ID; the
 * stream's "retry: 250" makes it come back after 250 ms), resume.html by
 * putting its last id in the URL. Each resume is logged on stdout ("ws_chat:
 * resume ..."). $WS_CHAT_HISTORY=0 turns history off.
 *
 * Usage: ws_chat [port]     (default 8081, or $FDCAST_PORT; 0 picks a free
 *                            port, printed on stdout)
 *   open http://127.0.0.1:8081/?room=a in two browser tabs and chat, or
 *   curl -N 'localhost:8081/events?room=a'
 *   curl -N -H 'Last-Event-ID: <an id it printed>' 'localhost:8081/events?room=a'
 *   curl -X POST 'localhost:8081/admin/drop?room=a'
 *
 * Room names are 1 to 64 characters of [A-Za-z0-9._~-]. Text messages are at
 * most MAX_MESSAGE bytes (longer: close 1009); binary messages are refused
 * (close 1003). fdcast does the framing, the fan-out and slow readers; this
 * file does HTTP, the handshake (fdcast_ws_accept_key), reading client frames
 * (fdcast_ws_read) and the control replies (fdcast_ws_encode). Every byte to a
 * client goes through fdcast_send() or a publish, so nothing ever overtakes or
 * splits a queued frame.
 */
#define _GNU_SOURCE
#include "http_util.h"

#include <ctype.h>
#include <sys/epoll.h>

#define MAX_ROOM 64              /* characters in a room name */
#define MAX_MESSAGE (64 * 1024)  /* bytes in one text message */
#define IN_CAP (MAX_MESSAGE + 14) /* one whole frame of the largest message */
#define LINGER_MS 5000           /* how long a closing client may take to hang up */
#define HISTORY_MESSAGES 1000    /* kept per room, for clients that resume */
#define HISTORY_BYTES (1 << 20)  /* as much as the outbox limit: a replay fits */
#define SSE_RETRY "retry: 250\n\n" /* EventSource reconnects after 250 ms, not ~3 s */

/* WebSocket close status codes (RFC 6455 7.4.1). */
enum {
    WS_NORMAL = 1000,
    WS_PROTOCOL_ERROR = 1002,
    WS_UNSUPPORTED_DATA = 1003,
    WS_INVALID_PAYLOAD = 1007,
    WS_POLICY_VIOLATION = 1008,
    WS_TOO_BIG = 1009,
};

enum state {
    READING_HEAD, /* waiting for the blank line that ends the request head */
    WEBSOCKET,    /* upgraded: reading client frames */
    SSE,          /* streaming events: we only watch for EOF */
    CLOSING,      /* last bytes queued: once fdcast has flushed them, shut down our
                     side, read until the client hangs up (or LINGER_MS), close */
};

struct conn {
    int fd;
    enum state state;
    bool shut;    /* CLOSING: our side is shut down, waiting for the client's EOF */
    bool peer_done; /* CLOSING: the client already hung up */
    long long deadline; /* CLOSING and shut: close at this monotonic time (ms) */
    int64_t sub;  /* subscription id, 0 when none */
    bool resumable; /* an event stream or a last_id WebSocket: /admin/drop closes it */
    char topic[sizeof "room:" + MAX_ROOM];
    size_t topic_len;
    char head[HTTP_MAX_HEAD + 1];
    size_t head_len;
    /* WebSocket only (allocated at the upgrade): */
    fdcast_ws_reader reader; /* fragmentation and UTF-8 state, zero = ready */
    uint8_t *in;             /* received bytes not yet decoded */
    size_t in_len;
    char *msg; /* fragments of the text message in progress */
    size_t msg_len;
};

static fdcast *fc;
static int ep = -1;
static struct conn *conns[MAX_FDS];
static int max_fd = -1; /* highest fd in conns */
static struct evictions evictions;
static size_t n_closing;

/* ------------------------------------------------------------------------ */
/* The pages. Pieces stay under 4095 characters, the longest string literal  */
/* C11 compilers must accept; they are sent one after another.              */

static const char *const CHAT_PAGE[] = {
    "<!doctype html>\n"
    "<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
    "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
    "<title>fdcast chat</title>\n"
    "<style>\n"
    "body{font:15px/1.4 system-ui,sans-serif;max-width:40em;margin:2em auto;padding:0 1em;"
    "color:#222}\n"
    "h1{font-size:1.3em}#room{color:#0a5}\n"
    "#state{font-size:.85em;color:#777}\n"
    "#log{list-style:none;padding:.5em;border:1px solid #ccc;border-radius:6px;height:18em;"
    "overflow-y:auto;margin:.5em 0}\n"
    "#log li{margin:.2em 0;padding:.2em .5em;border-radius:4px;white-space:pre-wrap}\n"
    "#log li.me{background:#e6f4ea;text-align:right}\n"
    "#log li.them{background:#eef}\n"
    "#log li.info{color:#888;font-style:italic}\n"
    "form{display:flex;gap:.5em}#text{flex:1;padding:.4em}\n"
    "</style></head>\n"
    "<body>\n"
    "<h1>fdcast chat &mdash; room <span id=\"room\"></span></h1>\n"
    "<div id=\"state\">connecting&hellip;</div>\n"
    "<ul id=\"log\"></ul>\n"
    "<form id=\"form\"><input id=\"text\" autocomplete=\"off\" placeholder=\"Say something\">"
    "<button id=\"send\">Send</button></form>\n"
    "<p>Your own messages are shown by this page (right, green); the server sends you\n"
    "everyone else's (left, blue). Other rooms: add <code>?room=name</code>.\n"
    "<a id=\"sse\">EventSource view of this room</a></p>\n",

    "<script>\n"
    "'use strict';\n"
    "const room = new URLSearchParams(location.search).get('room') || 'lobby';\n"
    "const log = document.getElementById('log');\n"
    "const state = document.getElementById('state');\n"
    "const text = document.getElementById('text');\n"
    "document.getElementById('room').textContent = room;\n"
    "document.title = 'fdcast chat: ' + room;\n"
    "document.getElementById('sse').href = '/sse.html?room=' + encodeURIComponent(room);\n"
    "function add(message, who) {\n"
    "  const li = document.createElement('li');\n"
    "  li.className = who;\n"
    "  li.textContent = message;\n"
    "  log.append(li);\n"
    "  log.scrollTop = log.scrollHeight;\n"
    "}\n"
    "const ws = new WebSocket('ws://' + location.host + '/ws?room=' +\n"
    "                         encodeURIComponent(room));\n"
    "ws.onopen = () => {\n"
    "  state.textContent = 'connected';\n"
    "  document.body.dataset.state = 'open';\n"
    "};\n"
    "ws.onmessage = (event) => add(event.data, 'them');\n"
    "ws.onclose = (event) => {\n"
    "  state.textContent = 'disconnected (' + event.code + ')';\n"
    "  document.body.dataset.state = 'closed';\n"
    "  add('connection closed: ' + event.code, 'info');\n"
    "};\n"
    "document.getElementById('form').onsubmit = (event) => {\n"
    "  event.preventDefault();\n"
    "  if (text.value === '' || ws.readyState !== WebSocket.OPEN) return;\n"
    "  ws.send(text.value);\n"
    "  add(text.value, 'me');\n"
    "  text.value = '';\n"
    "};\n"
    "</script>\n"
    "</body></html>\n",
    NULL,
};

static const char *const SSE_PAGE[] = {
    "<!doctype html>\n"
    "<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
    "<title>fdcast room (EventSource)</title>\n"
    "<style>\n"
    "body{font:15px/1.4 system-ui,sans-serif;max-width:40em;margin:2em auto;padding:0 1em}\n"
    "h1{font-size:1.3em}#room{color:#0a5}#state{font-size:.85em;color:#777}\n"
    "#log{list-style:none;padding:.5em;border:1px solid #ccc;border-radius:6px}\n"
    "#log li{margin:.2em 0;padding:.2em .5em;background:#fef6e4;border-radius:4px;"
    "white-space:pre-wrap}\n"
    "</style></head>\n"
    "<body>\n"
    "<h1>Room <span id=\"room\"></span>, read-only, over EventSource</h1>\n"
    "<div id=\"state\">connecting&hellip;</div>\n"
    "<ul id=\"log\"></ul>\n"
    "<script>\n"
    "'use strict';\n"
    "const room = new URLSearchParams(location.search).get('room') || 'lobby';\n"
    "const log = document.getElementById('log');\n"
    "const state = document.getElementById('state');\n"
    "document.getElementById('room').textContent = room;\n"
    "const es = new EventSource('/events?room=' + encodeURIComponent(room));\n"
    "let opens = 0;\n"
    "es.onopen = () => {\n"
    "  state.textContent = 'connected';\n"
    "  document.body.dataset.state = 'open';\n"
    "  document.body.dataset.opens = ++opens;\n"
    "};\n"
    "es.onerror = () => {\n"
    "  state.textContent = 'reconnecting';\n"
    "  document.body.dataset.state = 'error';\n"
    "};\n"
    "es.onmessage = (event) => {\n"
    "  const li = document.createElement('li');\n"
    "  li.textContent = event.data;\n"
    "  li.dataset.id = event.lastEventId;\n"
    "  log.append(li);\n"
    "};\n"
    "</script>\n"
    "</body></html>\n",
    NULL,
};

/* What an EventSource does by itself, by hand over a WebSocket: remember the
 * id of the last message, and reconnect with it. */
static const char *const RESUME_PAGE[] = {
    "<!doctype html>\n"
    "<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
    "<title>fdcast room (WebSocket, resuming)</title>\n"
    "<style>\n"
    "body{font:15px/1.4 system-ui,sans-serif;max-width:40em;margin:2em auto;padding:0 1em}\n"
    "h1{font-size:1.3em}#room{color:#0a5}#state{font-size:.85em;color:#777}\n"
    "#log{list-style:none;padding:.5em;border:1px solid #ccc;border-radius:6px}\n"
    "#log li{margin:.2em 0;padding:.2em .5em;background:#e4f0fe;border-radius:4px;"
    "white-space:pre-wrap}\n"
    "</style></head>\n"
    "<body>\n"
    "<h1>Room <span id=\"room\"></span>, read-only, over a WebSocket that resumes</h1>\n"
    "<div id=\"state\">connecting&hellip;</div>\n"
    "<ul id=\"log\"></ul>\n"
    "<script>\n"
    "'use strict';\n"
    "const room = new URLSearchParams(location.search).get('room') || 'lobby';\n"
    "const log = document.getElementById('log');\n"
    "const state = document.getElementById('state');\n"
    "document.getElementById('room').textContent = room;\n"
    "let lastId = '';\n"
    "let opens = 0;\n"
    "function connect() {\n"
    "  const ws = new WebSocket('ws://' + location.host + '/ws?room=' +\n"
    "                           encodeURIComponent(room) + '&last_id=' + lastId);\n"
    "  ws.onopen = () => {\n"
    "    state.textContent = lastId ? 'connected, resumed after ' + lastId : 'connected';\n"
    "    document.body.dataset.state = 'open';\n"
    "    document.body.dataset.opens = ++opens;\n"
    "  };\n"
    "  ws.onmessage = (event) => {\n"
    "    const lf = event.data.indexOf('\\n');\n"
    "    lastId = event.data.slice(0, lf);\n"
    "    const li = document.createElement('li');\n"
    "    li.textContent = event.data.slice(lf + 1);\n"
    "    li.dataset.id = lastId;\n"
    "    log.append(li);\n"
    "  };\n"
    "  ws.onclose = () => {\n"
    "    state.textContent = 'reconnecting';\n"
    "    document.body.dataset.state = 'closed';\n"
    "    setTimeout(connect, 250);\n"
    "  };\n"
    "}\n"
    "connect();\n"
    "</script>\n"
    "</body></html>\n",
    NULL,
};

/* ------------------------------------------------------------------------ */
/* connections                                                              */

static void close_conn(struct conn *c) {
    /* Forget the fd before close(2): the number may be reused by the very
     * next accept(), and fdcast must not write old frames to it. */
    int64_t dropped = fdcast_unsubscribe_fd(fc, c->fd);
    (void)dropped;
    if (c->state == CLOSING) n_closing--;
    evictions_forget(&evictions, c->fd);
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    conns[c->fd] = NULL;
    free(c->in);
    free(c->msg);
    free(c);
}

/* Connections fdcast evicted during the batch (or the publish loop) close
 * after it. */
static void reap_evicted(void) {
    int reason;
    for (int fd; (fd = evictions_next(&evictions, &reason)) >= 0;)
        if (conns[fd] != NULL) close_conn(conns[fd]);
}

static bool evicted(const struct conn *c) { return evictions_pending(&evictions, c->fd); }

/* A closing connection whose last bytes have left fdcast's outbox: send our
 * FIN, and wait for the client's before closing. Closing at once could turn
 * our last bytes into a reset if the client is still sending (a frame we
 * refused, say), and the client would never read the close frame. */
static void linger(struct conn *c) {
    shutdown(c->fd, SHUT_WR);
    c->shut = true;
    c->deadline = now_ms() + LINGER_MS;
}

/* Moves closing connections along: flushed ones linger, lingering ones that
 * outstayed LINGER_MS are closed. */
static void reap_closing(void) {
    long long now = now_ms();
    for (int fd = 0; fd <= max_fd && n_closing > 0; fd++) {
        struct conn *c = conns[fd];
        if (c == NULL || c->state != CLOSING || evicted(c)) continue;
        if (!c->shut && fdcast_pending_bytes(fc, fd) == 0) {
            if (c->peer_done) close_conn(c);
            else linger(c);
        }
        else if (c->shut && now >= c->deadline) close_conn(c);
    }
}

/* The connection is done once what is queued has been written: stop
 * broadcasting to it (queued frames still go out), and let reap_closing
 * finish it. */
static void finish(struct conn *c) {
    if (c->sub > 0) {
        int rc = fdcast_unsubscribe(fc, c->sub);
        (void)rc;
        c->sub = 0;
    }
    if (c->state != CLOSING) n_closing++;
    c->state = CLOSING;
    if (!evicted(c) && fdcast_pending_bytes(fc, c->fd) == 0) linger(c);
}

/* Any failure (peer gone, outbox full) means the connection is done; the
 * evict callback has then recorded it. */
static bool send_raw(struct conn *c, const void *p, size_t n) {
    return fdcast_send(fc, c->fd, FDCAST_RAW, p, n) == 0;
}

/* A complete response with a text body; the connection closes after it. */
static void respond(struct conn *c, const char *status, const char *extra_headers,
                    const char *text) {
    char buf[1024];
    size_t n = http_text_response(buf, sizeof buf, status, "text/plain; charset=utf-8",
                                  extra_headers, text);
    if (n > 0) send_raw(c, buf, n);
    finish(c);
}

static void serve_page(struct conn *c, const char *const *pieces) {
    size_t len = 0;
    for (size_t i = 0; pieces[i] != NULL; i++) len += strlen(pieces[i]);
    char head[256];
    size_t n = http_response_head(head, sizeof head, "200 OK", "text/html; charset=utf-8",
                                  "Cache-Control: no-store\r\n", len);
    bool ok = n > 0 && send_raw(c, head, n);
    for (size_t i = 0; ok && pieces[i] != NULL; i++) ok = send_raw(c, pieces[i], strlen(pieces[i]));
    finish(c);
}

/* ------------------------------------------------------------------------ */
/* WebSocket                                                                */

/* Sends a close frame with `code` (0: none) and closes once it is written. */
static void ws_close(struct conn *c, uint16_t code, const char *reason) {
    uint8_t payload[125];
    size_t len = 0;
    if (code != 0) {
        size_t rlen = strlen(reason);
        if (rlen > sizeof payload - 2) rlen = sizeof payload - 2;
        payload[0] = (uint8_t)(code >> 8);
        payload[1] = (uint8_t)(code & 0xff);
        memcpy(payload + 2, reason, rlen);
        len = 2 + rlen;
    }
    uint8_t frame[sizeof payload + FDCAST_WS_MAX_HEADER];
    int64_t n = fdcast_ws_encode(FDCAST_WS_OP_CLOSE, payload, len, frame, sizeof frame);
    if (n > 0) send_raw(c, frame, (size_t)n);
    else fprintf(stderr, "ws_chat: encode close: %s\n", fdcast_last_error());
    finish(c);
}

/* A whole text message from the client: to everyone else in the room. */
static void ws_message(struct conn *c, const void *text, size_t len) {
    int64_t n = fdcast_publish_except(fc, c->topic, c->topic_len, text, len, c->fd);
    if (n < 0) fprintf(stderr, "ws_chat: publish: %s\n", fdcast_last_error());
}

/* Acts on one decoded frame. Returns false once the connection is closing. */
static bool ws_frame(struct conn *c, const fdcast_ws_frame *f) {
    switch (f->opcode) {
    case FDCAST_WS_OP_TEXT:
        if (f->fin) { /* the common case: one frame, no copy */
            if (f->payload_len > MAX_MESSAGE) {
                ws_close(c, WS_TOO_BIG, "message too big");
                return false;
            }
            ws_message(c, f->payload, f->payload_len);
            return true;
        }
        /* The first fragment of a message: stored like the next ones. */
        c->msg_len = 0;
        /* fall through */
    case FDCAST_WS_OP_CONTINUATION:
        /* fdcast_ws_read has checked the order: a continuation follows a
         * text start (binary starts are refused below). */
        if (f->payload_len > MAX_MESSAGE - c->msg_len) {
            ws_close(c, WS_TOO_BIG, "message too big");
            return false;
        }
        memcpy(c->msg + c->msg_len, f->payload, f->payload_len);
        c->msg_len += f->payload_len;
        if (f->fin) ws_message(c, c->msg, c->msg_len);
        return true;
    case FDCAST_WS_OP_BINARY:
        ws_close(c, WS_UNSUPPORTED_DATA, "text messages only");
        return false;
    case FDCAST_WS_OP_PING: {
        uint8_t pong[125 + FDCAST_WS_MAX_HEADER];
        int64_t n = fdcast_ws_encode(FDCAST_WS_OP_PONG, f->payload, f->payload_len, pong,
                                     sizeof pong);
        if (n > 0) send_raw(c, pong, (size_t)n);
        return true;
    }
    case FDCAST_WS_OP_PONG:
        return true;
    case FDCAST_WS_OP_CLOSE:
    default:
        /* Echo the status code (RFC 6455 5.5.1), then close our side. */
        ws_close(c, f->close_code, "");
        return false;
    }
}

/* Decodes every whole frame in c->in; keeps the incomplete rest. */
static void ws_input(struct conn *c) {
    size_t off = 0;
    while (c->state == WEBSOCKET && !evicted(c)) {
        fdcast_ws_frame f;
        int64_t n = fdcast_ws_read(&c->reader, c->in + off, c->in_len - off, &f);
        if (n == 0) break;
        if (n < 0) {
            uint16_t code = n == -EILSEQ     ? WS_INVALID_PAYLOAD
                            : n == -EMSGSIZE ? WS_TOO_BIG
                                             : WS_PROTOCOL_ERROR;
            fprintf(stderr, "ws_chat: fd %d: %s\n", c->fd, fdcast_last_error());
            ws_close(c, code, n == -EPROTO ? "protocol error" : "");
            return;
        }
        off += (size_t)n;
        if (!ws_frame(c, &f)) return;
    }
    memmove(c->in, c->in + off, c->in_len - off);
    c->in_len -= off;
    /* A full buffer without one whole frame: a frame larger than we take. */
    if (c->in_len == IN_CAP) ws_close(c, WS_TOO_BIG, "frame too big");
}

/* ------------------------------------------------------------------------ */
/* HTTP                                                                     */

/* The value of `name` ("name=value") in the query string, NULL when absent. */
static const char *query_value(const char *query, size_t qlen, const char *name, size_t *len) {
    size_t nlen = strlen(name);
    const char *p = query, *end = query + qlen, *found = NULL;
    while (p < end) {
        const char *amp = memchr(p, '&', (size_t)(end - p));
        const char *pe = amp != NULL ? amp : end;
        if ((size_t)(pe - p) > nlen && memcmp(p, name, nlen) == 0 && p[nlen] == '=') {
            found = p + nlen + 1;
            *len = (size_t)(pe - found);
        }
        p = pe + 1;
    }
    return found;
}

/* Sets c->topic to "room:<r>" from the query string. False for a bad name. */
static bool parse_room(struct conn *c, const char *query, size_t qlen) {
    size_t rlen = 5;
    const char *room = query_value(query, qlen, "room", &rlen);
    if (room == NULL) {
        room = "lobby";
        rlen = 5;
    }
    if (rlen == 0 || rlen > MAX_ROOM) return false;
    for (size_t i = 0; i < rlen; i++) {
        unsigned char ch = (unsigned char)room[i];
        if (!isalnum(ch) && ch != '.' && ch != '_' && ch != '~' && ch != '-') return false;
    }
    memcpy(c->topic, "room:", 5);
    memcpy(c->topic + 5, room, rlen);
    c->topic_len = 5 + rlen;
    return true;
}

static bool subscribe(struct conn *c, fdcast_mode mode) {
    int64_t id = fdcast_subscribe(fc, c->topic, c->topic_len, c->fd, mode);
    if (id < 0) {
        fprintf(stderr, "ws_chat: subscribe: %s\n", fdcast_last_error());
        return false;
    }
    c->sub = id;
    return true;
}

/* Subscribes, first replaying every kept message after `last_id` (a client's
 * last id, not NUL-terminated). Returns the subscription id, or -EINVAL for
 * an id that does not parse (nothing changed), or another negative errno. */
static int64_t subscribe_after(struct conn *c, fdcast_mode mode, const char *last_id,
                               size_t id_len) {
    int recovered = 0;
    int64_t id = fdcast_subscribe_since(fc, c->topic, c->topic_len, c->fd, mode, last_id,
                                        id_len, &recovered);
    if (id > 0) {
        c->sub = id;
        /* Not recovered: messages after the id are gone (evicted, or the id is
         * from before a restart); the client still gets every one kept. */
        printf("ws_chat: resume %s %.*s after %.*s%s\n", mode == FDCAST_SSE ? "SSE" : "WebSocket",
               (int)c->topic_len, c->topic, (int)id_len, last_id,
               recovered ? "" : " (messages lost)");
        fflush(stdout);
    }
    return id;
}

static void start_events(struct conn *c) {
    static const char head[] = HTTP_SSE_HEAD SSE_RETRY;
    /* Headers first, then subscribe: everything runs on this thread, so no
     * publish comes in between and the first event follows the headers. */
    if (!send_raw(c, head, sizeof head - 1)) {
        finish(c);
        return;
    }
    size_t id_len = 0;
    const char *last_id = http_header(c->head, "Last-Event-ID", &id_len);
    bool subscribed = false;
    if (last_id != NULL) {
        int64_t id = subscribe_after(c, FDCAST_SSE, last_id, id_len);
        if (id == -EINVAL) fprintf(stderr, "ws_chat: fd %d: Last-Event-ID is no id of ours\n", c->fd);
        subscribed = id > 0;
        if (id < 0 && id != -EINVAL) {
            finish(c);
            return;
        }
    }
    if (!subscribed && !subscribe(c, FDCAST_SSE)) {
        finish(c);
        return;
    }
    c->resumable = true;
    c->state = SSE;
}

/* RFC 6455 4.2: checks the opening handshake, answers 101 and joins the room:
 * with `last_id` (from the query; may be empty), in FDCAST_WS_TEXT_ID after
 * replaying what came after it. `extra` bytes after the head are the client's
 * first frames. */
static void upgrade(struct conn *c, const char *last_id, size_t id_len, const char *extra,
                    size_t extra_len) {
    size_t ulen = 0, clen = 0, vlen = 0, klen = 0;
    const char *up = http_header(c->head, "Upgrade", &ulen);
    const char *conn = http_header(c->head, "Connection", &clen);
    const char *version = http_header(c->head, "Sec-WebSocket-Version", &vlen);
    const char *key = http_header(c->head, "Sec-WebSocket-Key", &klen);
    if (up == NULL || !http_has_token(up, ulen, "websocket") || conn == NULL ||
        !http_has_token(conn, clen, "upgrade")) {
        respond(c, "426 Upgrade Required", "Upgrade: websocket\r\n",
                "this is a WebSocket endpoint\n");
        return;
    }
    if (version == NULL || vlen != 2 || memcmp(version, "13", 2) != 0) {
        respond(c, "426 Upgrade Required", "Sec-WebSocket-Version: 13\r\n",
                "WebSocket version 13 only\n");
        return;
    }
    char accept[FDCAST_WS_ACCEPT_KEY_SIZE];
    if (key == NULL || fdcast_ws_accept_key(key, klen, accept) != 0) {
        respond(c, "400 Bad Request", "", "bad Sec-WebSocket-Key\n");
        return;
    }
    c->in = malloc(IN_CAP);
    c->msg = malloc(MAX_MESSAGE);
    if (c->in == NULL || c->msg == NULL || extra_len > IN_CAP) {
        respond(c, "500 Internal Server Error", "", "out of memory\n");
        return;
    }
    char resp[256];
    int n = snprintf(resp, sizeof resp,
                     "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
                     accept);
    if (!send_raw(c, resp, (size_t)n)) {
        finish(c);
        return;
    }
    c->state = WEBSOCKET;
    if (last_id == NULL) {
        if (!subscribe(c, FDCAST_WS_TEXT)) {
            finish(c);
            return;
        }
    } else if (id_len == 0) {
        if (!subscribe(c, FDCAST_WS_TEXT_ID)) {
            finish(c);
            return;
        }
        c->resumable = true;
    } else {
        int64_t id = subscribe_after(c, FDCAST_WS_TEXT_ID, last_id, id_len);
        if (id == -EINVAL) {
            ws_close(c, WS_POLICY_VIOLATION, "last_id is no id of ours");
            return;
        }
        if (id < 0) {
            finish(c);
            return;
        }
        c->resumable = true;
    }
    memset(&c->reader, 0, sizeof c->reader);
    memcpy(c->in, extra, extra_len);
    c->in_len = extra_len;
    ws_input(c);
}

/* POST /admin/drop: closes every resumable connection in c's room at once,
 * without a goodbye, as a lost network would, and answers how many. */
static void drop_room(struct conn *c) {
    int dropped = 0;
    for (int fd = 0; fd <= max_fd; fd++) {
        struct conn *other = conns[fd];
        if (other == NULL || other == c || !other->resumable || other->state == CLOSING ||
            other->topic_len != c->topic_len || memcmp(other->topic, c->topic, c->topic_len) != 0)
            continue;
        close_conn(other);
        dropped++;
    }
    char text[32];
    snprintf(text, sizeof text, "%d\n", dropped);
    respond(c, "200 OK", "", text);
}

/* Parses the request head (NUL-terminated, blank line at head_end) and acts
 * on it. May close c. */
static void handle_request(struct conn *c, size_t head_end) {
    struct http_request req;
    if (!http_parse_request_line(c->head, &req)) {
        respond(c, "400 Bad Request", "", "bad request line\n");
        return;
    }
    if (http_path_is(&req, "/admin/drop")) {
        if (!http_method_is(&req, "POST"))
            respond(c, "405 Method Not Allowed", "Allow: POST\r\n", "POST only\n");
        else if (!parse_room(c, req.query, req.query_len))
            respond(c, "400 Bad Request", "", "room names are 1-64 of [A-Za-z0-9._~-]\n");
        else
            drop_room(c);
        return;
    }
    if (!http_method_is(&req, "GET")) {
        respond(c, "405 Method Not Allowed", "Allow: GET\r\n", "GET only\n");
        return;
    }
    if (http_path_is(&req, "/") || http_path_is(&req, "/index.html")) {
        serve_page(c, CHAT_PAGE);
    } else if (http_path_is(&req, "/sse.html")) {
        serve_page(c, SSE_PAGE);
    } else if (http_path_is(&req, "/resume.html")) {
        serve_page(c, RESUME_PAGE);
    } else if (http_path_is(&req, "/ws") || http_path_is(&req, "/events")) {
        if (!parse_room(c, req.query, req.query_len)) {
            respond(c, "400 Bad Request", "", "room names are 1-64 of [A-Za-z0-9._~-]\n");
        } else if (http_path_is(&req, "/ws")) {
            size_t id_len = 0;
            const char *last_id = query_value(req.query, req.query_len, "last_id", &id_len);
            upgrade(c, last_id, id_len, c->head + head_end, c->head_len - head_end);
        } else {
            start_events(c);
        }
    } else {
        respond(c, "404 Not Found", "", "not found\n");
    }
}

/* Reads what the client sent, in whatever pieces it arrives. */
static void on_client(struct conn *c) {
    for (;;) {
        char scratch[4096];
        char *dst = scratch;
        size_t room = sizeof scratch; /* SSE, CLOSING: input is discarded */
        if (c->state == READING_HEAD) {
            dst = c->head + c->head_len;
            room = HTTP_MAX_HEAD - c->head_len;
        } else if (c->state == WEBSOCKET) {
            dst = (char *)c->in + c->in_len;
            room = IN_CAP - c->in_len;
        }
        ssize_t r = recv(c->fd, dst, room, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        if (r <= 0) {
            /* EOF or error. A CLOSING connection whose last bytes are still
             * queued is kept (unwatched) until reap_closing sees them leave:
             * the client may have shut down only its sending side. */
            if (r == 0 && c->state == CLOSING && !c->shut &&
                fdcast_pending_bytes(fc, c->fd) > 0) {
                struct epoll_event e = {.events = 0, .data.fd = c->fd};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
                c->peer_done = true;
                return;
            }
            close_conn(c);
            return;
        }
        if (c->state == WEBSOCKET) {
            c->in_len += (size_t)r;
            ws_input(c); /* may close c */
            return;
        }
        if (c->state != READING_HEAD) continue;
        c->head_len += (size_t)r;
        c->head[c->head_len] = '\0';
        size_t head_end;
        struct http_refusal refusal;
        switch (http_head_end(c->head, c->head_len, &head_end, &refusal)) {
        case 0: continue;
        case -1: respond(c, refusal.status, "", refusal.text); return;
        default: handle_request(c, head_end); return; /* may close c */
        }
    }
}

static void accept_all(int lfd) {
    for (int fd; (fd = accept_next(lfd)) >= 0;) {
        struct conn *c = calloc(1, sizeof *c);
        if (c == NULL || !epoll_watch(ep, fd)) {
            close(fd);
            free(c);
            continue;
        }
        c->fd = fd;
        c->state = READING_HEAD;
        conns[fd] = c;
        if (fd > max_fd) max_fd = fd;
    }
}

/* ------------------------------------------------------------------------ */

int main(int argc, char **argv) {
    int port = port_from_args(argc, argv, 8081);
    /* SIGINT/SIGTERM arrive as reads on a signalfd in the epoll set. */
    int sfd = signals_fd();
    int bound_port;
    int lfd = listen_loopback(port, &bound_port);

    /* A client more than the outbox limit (1 MiB) behind is disconnected
     * rather than silently missing messages. */
    int fcfd;
    fc = evicting_fdcast(&evictions, &fcfd);
    const char *history = getenv("WS_CHAT_HISTORY");
    if ((history == NULL || strcmp(history, "0") != 0) &&
        fdcast_set_history(fc, HISTORY_MESSAGES, HISTORY_BYTES, 0) != 0)
        die("fdcast_set_history");
    int watch[] = {lfd, sfd, fcfd};
    ep = epoll_watching(watch, sizeof watch / sizeof watch[0]);

    printf("ws_chat: listening on http://127.0.0.1:%d (fdcast %s)\n", bound_port,
           fdcast_version());
    fflush(stdout);

    bool running = true;
    while (running) {
        struct epoll_event evs[64];
        /* While connections are closing, wake up now and then to expire them. */
        int n = epoll_wait(ep, evs, 64, n_closing > 0 ? 250 : -1);
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
                /* Slow clients became writable: let fdcast flush them. */
                int64_t served = fdcast_dispatch(fc, 0);
                if (served < 0) fprintf(stderr, "ws_chat: dispatch: %s\n", fdcast_last_error());
            } else if (fd >= 0 && fd < MAX_FDS && conns[fd] != NULL && !evicted(conns[fd])) {
                on_client(conns[fd]);
            }
        }
        reap_evicted();
        if (n_closing > 0) reap_closing();
    }

    printf("ws_chat: shutting down\n");
    for (int fd = 0; fd <= max_fd; fd++)
        if (conns[fd] != NULL) close_conn(conns[fd]);
    fdcast_free(fc);
    close(ep);
    close(lfd);
    close(sfd);
    return 0;
}
