#!/usr/bin/env python3
"""fdcast from Python through ctypes: the C ABI needs no C compiler (run by
`make ctypes-test`).

Loads target/release/libfdcast.so, declares the argument and result types of
the functions it calls, and checks over socketpairs:

  - RAW, WS_BINARY (7- and 16-bit lengths, empty payload) and SSE subscribers
    of one topic (a topic with a NUL byte inside) receive exactly the expected
    bytes from one publish, and the publish returns the subscriber count;
  - publish_except skips the given fd; fdcast_send frames for one fd;
  - error returns: -EINVAL (NULL handle, NULL topic with a length, bad mode,
    empty or over-long topic), -EBADF (negative fd, fd not open), -EILSEQ
    (invalid UTF-8 for an SSE subscriber: nothing is written to anyone),
    -ENOENT (unknown subscription id), -EACCES (a ctypes authorizer refuses),
    each with a fdcast_last_error() text;
  - the evict callback, a ctypes CFUNCTYPE: closing a subscriber's peer then
    publishing calls it with (user, fd, EPIPE) and drops the fd's subscriptions;
  - a payload larger than the socket buffer waits in the outbox
    (fdcast_pending_bytes > 0) and fdcast_dispatch() completes it as the peer
    reads; fdcast_get_stats fills a ctypes Structure;
  - fdcast_version() equals the header's FDCAST_VERSION_STRING; fdcast_free;
  - fdcast_broker_*: two handles through the Redis server at $FDCAST_REDIS_URL
    (default redis://127.0.0.1:6379; a missing server fails the test), the
    receiver driven by fdcast_broker_poll_once, the counters in a Structure.

Python 3 standard library only. Usage: ctypes_test.py [path/to/libfdcast.so]
"""

import ctypes
import errno
import os
import re
import signal
import socket
import sys
import time

LIB = sys.argv[1] if len(sys.argv) > 1 else "target/release/libfdcast.so"
HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "include", "fdcast.h")

RAW, WS_TEXT, WS_BINARY, SSE, WS_TEXT_ID, WS_BINARY_ID = 0, 1, 2, 3, 4, 5


class TestFailure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


def ok(msg):
    print(f"ok - {msg}", flush=True)


class Stats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "publishes", "deliveries", "dropped_messages", "evicted_fds", "queued_bytes",
        "subscriptions", "topics", "fds", "lost_to_gaps")]


class BrokerStats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "published", "received", "ignored", "malformed", "reconnects", "queued", "dropped",
        "connected", "topics")]


AUTHORIZE_FN = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                ctypes.c_int, ctypes.c_int)
EVICT_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)


def load(path):
    lib = ctypes.CDLL(os.path.abspath(path))
    h, buf, size, i64, cint = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                               ctypes.c_int64, ctypes.c_int)
    sigs = {
        "fdcast_new": ([], h),
        "fdcast_free": ([h], None),
        "fdcast_version": ([], ctypes.c_char_p),
        "fdcast_last_error": ([], ctypes.c_char_p),
        "fdcast_subscribe": ([h, buf, size, cint, cint], i64),
        "fdcast_unsubscribe": ([h, i64], cint),
        "fdcast_unsubscribe_fd": ([h, cint], i64),
        "fdcast_subscriber_count": ([h], i64),
        "fdcast_publish": ([h, buf, size, buf, size], i64),
        "fdcast_publish_except": ([h, buf, size, buf, size, cint], i64),
        "fdcast_send": ([h, cint, cint, buf, size], cint),
        "fdcast_dispatch": ([h, cint], i64),
        "fdcast_pending_bytes": ([h, cint], i64),
        "fdcast_get_stats": ([h, ctypes.POINTER(Stats)], None),
        "fdcast_set_authorizer": ([h, AUTHORIZE_FN, h], None),
        "fdcast_set_evict_callback": ([h, EVICT_FN, h], None),
        "fdcast_broker_enable": ([h, ctypes.c_char_p, ctypes.c_char_p], cint),
        "fdcast_broker_disable": ([h], None),
        "fdcast_broker_poll_once": ([h, cint], i64),
        "fdcast_broker_get_stats": ([h, ctypes.POINTER(BrokerStats)], None),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = res
    return lib


def last_error(lib):
    return lib.fdcast_last_error().decode()


def recv_exact(sock, n, timeout=10.0):
    sock.settimeout(timeout)
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        check(chunk, f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return data


def nothing_to_read(sock):
    sock.setblocking(False)
    try:
        sock.recv(1)
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)
    return False


def expect_error(lib, rc, err, what):
    check(rc == -err, f"{what}: returned {rc}, expected -{errno.errorcode[err]} ({-err})")
    text = last_error(lib)
    check(text != "", f"{what}: fdcast_last_error() is empty")
    return text


def run(lib):
    with open(HEADER) as f:
        header_version = re.search(r'#define FDCAST_VERSION_STRING "([^"]+)"', f.read()).group(1)
    version = lib.fdcast_version().decode()
    check(version == header_version, f"fdcast_version() {version!r}, header {header_version!r}")
    ok(f"loaded {LIB}: fdcast_version() = {version!r}, as in include/fdcast.h")

    fc = lib.fdcast_new()
    check(fc, "fdcast_new returned NULL")
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        run_with(lib, fc, pairs)
    finally:
        lib.fdcast_free(fc)
        for a, b in pairs:
            a.close()
            b.close()
    lib.fdcast_free(None)
    ok("fdcast_free(fc), then fdcast_free(NULL) as a no-op")


def run_with(lib, fc, pairs):
    topic = b"news\0room"  # pointer + length: a NUL inside is part of the topic
    (raw, raw_peer), (ws, ws_peer), (sse, sse_peer), (spare, spare_peer) = pairs
    ids = []
    for sock, mode in ((raw, RAW), (ws, WS_BINARY), (sse, SSE)):
        sub = lib.fdcast_subscribe(fc, topic, len(topic), sock.fileno(), mode)
        check(sub > 0, f"subscribe mode {mode}: {sub} ({last_error(lib)})")
        ids.append(sub)
    again = lib.fdcast_subscribe(fc, topic, len(topic), raw.fileno(), RAW)
    check(again == ids[0], f"subscribing again gave id {again}, expected {ids[0]}")
    check(lib.fdcast_subscriber_count(fc) == 3, "subscriber count is not 3")

    payload = b"hello\nworld"
    n = lib.fdcast_publish(fc, topic, len(topic), payload, len(payload))
    check(n == 3, f"publish matched {n}, expected 3")
    got = recv_exact(raw_peer, len(payload))
    check(got == payload, f"RAW got {got!r}")
    want_ws = b"\x82\x0b" + payload
    got = recv_exact(ws_peer, len(want_ws))
    check(got == want_ws, f"WS_BINARY got {got!r}, expected {want_ws!r}")
    want_sse = b"data: hello\ndata: world\n\n"
    got = recv_exact(sse_peer, len(want_sse))
    check(got == want_sse, f"SSE got {got!r}, expected {want_sse!r}")

    big = "é".encode() * 150  # 300 bytes of UTF-8: a 16-bit WebSocket length
    check(lib.fdcast_publish(fc, topic, len(topic), big, len(big)) == 3, "300-byte publish")
    check(lib.fdcast_publish(fc, topic, len(topic), None, 0) == 3, "empty publish (NULL, 0)")
    check(recv_exact(ws_peer, 4 + 300 + 2) == b"\x82\x7e\x01\x2c" + big + b"\x82\x00",
          "WS_BINARY 300-byte (16-bit length) and empty frames")
    check(recv_exact(raw_peer, 300) == big, "RAW 300 bytes (the empty frame is no bytes)")
    want_sse = b"data: " + big + b"\n\ndata: \n\n"
    check(recv_exact(sse_peer, len(want_sse)) == want_sse, "SSE 300-byte and empty events")
    ok("one publish: RAW, WS_BINARY (7- and 16-bit lengths, empty) and SSE bytes exact; "
       "idempotent subscribe")

    n = lib.fdcast_publish_except(fc, topic, len(topic), b"x", 1, raw.fileno())
    check(n == 2, f"publish_except matched {n}, expected 2")
    check(recv_exact(ws_peer, 3) == b"\x82\x01x", "publish_except: WS frame")
    check(recv_exact(sse_peer, 9) == b"data: x\n\n", "publish_except: SSE event")
    check(nothing_to_read(raw_peer), "publish_except wrote to the excepted fd")
    rc = lib.fdcast_send(fc, spare.fileno(), WS_BINARY, b"direct", 6)
    check(rc == 0, f"fdcast_send returned {rc}")
    check(recv_exact(spare_peer, 8) == b"\x82\x06direct", "fdcast_send frame")
    # The id modes without history: an empty id, its LF, then the payload.
    for mode, first in ((WS_TEXT_ID, 0x81), (WS_BINARY_ID, 0x82)):
        rc = lib.fdcast_send(fc, spare.fileno(), mode, b"hi", 2)
        check(rc == 0, f"fdcast_send(mode {mode}) returned {rc}")
        got = recv_exact(spare_peer, 5)
        check(got == bytes([first, 3]) + b"\nhi", f"mode {mode} frame {got!r}")
    ok("publish_except skips the sender; fdcast_send frames one message for one fd, "
       "WS_TEXT_ID and WS_BINARY_ID too")

    # Errors: negative errno values, with a detail text.
    e = expect_error(lib, lib.fdcast_subscribe(None, topic, len(topic), raw.fileno(), RAW),
                     errno.EINVAL, "subscribe(NULL handle)")
    expect_error(lib, lib.fdcast_publish(None, topic, len(topic), b"x", 1), errno.EINVAL,
                 "publish(NULL handle)")
    expect_error(lib, lib.fdcast_publish(fc, None, 3, b"x", 1), errno.EINVAL,
                 "publish(NULL topic, length 3)")
    expect_error(lib, lib.fdcast_publish(fc, topic, len(topic), None, 1), errno.EINVAL,
                 "publish(NULL payload, length 1)")
    expect_error(lib, lib.fdcast_subscribe(fc, topic, 0, raw.fileno(), RAW), errno.EINVAL,
                 "subscribe(empty topic)")
    long_topic = b"t" * 4097
    expect_error(lib, lib.fdcast_subscribe(fc, long_topic, 4097, raw.fileno(), RAW),
                 errno.EINVAL, "subscribe(4097-byte topic)")
    expect_error(lib, lib.fdcast_subscribe(fc, topic, len(topic), raw.fileno(), 7),
                 errno.EINVAL, "subscribe(mode 7)")
    expect_error(lib, lib.fdcast_subscribe(fc, topic, len(topic), raw.fileno(), 6),
                 errno.EINVAL, "subscribe(mode 6, one past WS_BINARY_ID)")
    expect_error(lib, lib.fdcast_subscribe(fc, topic, len(topic), -1, RAW), errno.EBADF,
                 "subscribe(fd -1)")
    closed_fd = os.dup(spare.fileno())
    os.close(closed_fd)
    expect_error(lib, lib.fdcast_subscribe(fc, topic, len(topic), closed_fd, RAW), errno.EBADF,
                 "subscribe(fd not open)")
    expect_error(lib, lib.fdcast_send(fc, -3, RAW, b"x", 1), errno.EBADF, "send(fd -3)")
    expect_error(lib, lib.fdcast_unsubscribe(fc, 999_999), errno.ENOENT,
                 "unsubscribe(unknown id)")
    bad = b"bad \xff utf-8"
    t = expect_error(lib, lib.fdcast_publish(fc, topic, len(topic), bad, len(bad)),
                     errno.EILSEQ, "publish(invalid UTF-8 to an SSE subscriber)")
    for peer, name in ((raw_peer, "RAW"), (ws_peer, "WS_BINARY"), (sse_peer, "SSE")):
        check(nothing_to_read(peer), f"-EILSEQ publish wrote to the {name} subscriber")
    expect_error(lib, lib.fdcast_send(fc, sse.fileno(), SSE, bad, len(bad)), errno.EILSEQ,
                 "send(invalid UTF-8, SSE)")
    check(lib.fdcast_subscriber_count(None) == -errno.EINVAL, "subscriber_count(NULL)")
    ok(f"errors: -EINVAL ({e!r}), -EBADF, -ENOENT, -EILSEQ ({t!r}, nothing written), "
       "each with a fdcast_last_error() text")

    refused = []

    @AUTHORIZE_FN
    def authorize(user, topic_ptr, topic_len, fd, mode):
        refused.append((user, ctypes.string_at(topic_ptr, topic_len), fd, mode))
        return False

    lib.fdcast_set_authorizer(fc, authorize, ctypes.c_void_p(77))
    expect_error(lib, lib.fdcast_subscribe(fc, b"private", 7, spare.fileno(), SSE), errno.EACCES,
                 "subscribe refused by the authorizer")
    check(refused == [(77, b"private", spare.fileno(), SSE)], f"authorizer saw {refused!r}")
    lib.fdcast_set_authorizer(fc, AUTHORIZE_FN(), None)  # NULL: allow all
    sub = lib.fdcast_subscribe(fc, b"private", 7, spare.fileno(), SSE)
    check(sub > 0, f"subscribe after removing the authorizer: {sub}")
    check(lib.fdcast_unsubscribe(fc, sub) == 0, "unsubscribe")
    ok("a ctypes authorizer refuses with -EACCES and sees (user, topic, fd, mode)")

    # The evict callback: the RAW subscriber's peer goes away.
    calls = []

    @EVICT_FN
    def on_evict(user, fd, reason):
        calls.append((user, fd, reason))

    lib.fdcast_set_evict_callback(fc, on_evict, ctypes.c_void_p(1234))
    raw_peer.close()
    n = lib.fdcast_publish(fc, topic, len(topic), b"after close", 11)
    check(n == 3, f"publish after a peer closed matched {n}, expected 3 (the evicted counts)")
    check(calls == [(1234, raw.fileno(), errno.EPIPE)],
          f"evict callback calls {calls!r}, expected [(1234, {raw.fileno()}, EPIPE)]")
    check(lib.fdcast_subscriber_count(fc) == 2, "the evicted fd is still subscribed")
    stats = Stats()
    lib.fdcast_get_stats(fc, ctypes.byref(stats))
    check(stats.evicted_fds == 1 and stats.subscriptions == 2 and stats.topics == 1,
          f"stats after the eviction: {[(f, getattr(stats, f)) for f, _ in Stats._fields_]}")
    check(recv_exact(ws_peer, 13) == b"\x82\x0bafter close", "WS subscriber after eviction")
    check(recv_exact(sse_peer, 19) == b"data: after close\n\n", "SSE subscriber after eviction")
    ok("evict callback (ctypes CFUNCTYPE) called with (user, fd, EPIPE); fd unsubscribed; "
       "stats filled")

    # A frame larger than the socket buffer: the rest waits in the outbox until
    # fdcast_dispatch() finds the fd writable again.
    lib.fdcast_set_evict_callback(fc, EVICT_FN(), None)
    spare.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    huge = os.urandom(2 * 1024 * 1024)
    rc = lib.fdcast_send(fc, spare.fileno(), RAW, huge, len(huge))
    check(rc == 0, f"send of 2 MiB returned {rc}")
    pending = lib.fdcast_pending_bytes(fc, spare.fileno())
    check(0 < pending < len(huge), f"pending bytes {pending} after a 2 MiB send")
    got = bytearray()
    spare_peer.setblocking(False)
    deadline = time.monotonic() + 20
    while len(got) < len(huge):
        check(time.monotonic() < deadline, f"2 MiB send stuck at {len(got)} bytes")
        try:
            got += spare_peer.recv(1 << 20)
        except BlockingIOError:
            pass
        served = lib.fdcast_dispatch(fc, 10)
        check(served >= 0, f"dispatch returned {served}")
    check(bytes(got) == huge, "2 MiB frame corrupted")
    check(lib.fdcast_pending_bytes(fc, spare.fileno()) == 0, "bytes still pending")
    ok(f"2 MiB send: {pending} bytes queued, completed by fdcast_dispatch() as the peer read")

    check(lib.fdcast_unsubscribe_fd(fc, ws.fileno()) == 1, "unsubscribe_fd(ws) != 1")
    check(lib.fdcast_unsubscribe_fd(fc, sse.fileno()) == 1, "unsubscribe_fd(sse) != 1")
    check(lib.fdcast_subscriber_count(fc) == 0, "subscriptions left after unsubscribe_fd")


def run_broker(lib):
    """Two handles fan out through Redis: the host drives the broker with poll_once."""
    url = os.environ.get("FDCAST_REDIS_URL", "redis://127.0.0.1:6379").encode()
    prefix = f"fdcast_ctypes_{os.getpid()}:".encode()
    expect_error(lib, lib.fdcast_broker_enable(None, url, prefix), errno.EINVAL,
                 "broker_enable(NULL)")
    sender, receiver = lib.fdcast_new(), lib.fdcast_new()
    ours, peer = socket.socketpair()
    try:
        expect_error(lib, lib.fdcast_broker_enable(sender, b"gopher://x", prefix), errno.EINVAL,
                     "broker_enable(unknown scheme)")
        check(lib.fdcast_subscribe(receiver, b"news", 4, ours.fileno(), SSE) > 0, "subscribe")
        for fc in (receiver, sender):
            rc = lib.fdcast_broker_enable(fc, url, prefix)
            check(rc == 0, f"broker_enable: {rc} {last_error(lib)}")
        check(lib.fdcast_publish(sender, b"news", 4, b"hello", 5) == 0, "publish")
        peer.setblocking(False)
        got = b""
        deadline = time.monotonic() + 20
        while len(got) < 13:
            check(time.monotonic() < deadline, f"only {got!r} arrived")
            check(lib.fdcast_broker_poll_once(receiver, 50) >= 0, "poll_once")
            try:
                got += peer.recv(64)
            except BlockingIOError:
                pass
        check(got == b"data: hello\n\n", f"received {got!r}")
        stats = BrokerStats()
        lib.fdcast_broker_get_stats(receiver, ctypes.byref(stats))
        check(stats.received == 1 and stats.connected == 1 and stats.topics == 1,
              f"broker stats {[(f, getattr(stats, f)) for f, _ in BrokerStats._fields_]}")
        lib.fdcast_broker_disable(receiver)
        check(lib.fdcast_broker_poll_once(receiver, 0) == -errno.ENOTCONN, "poll after disable")
    finally:
        lib.fdcast_free(sender)
        lib.fdcast_free(receiver)
        ours.close()
        peer.close()
    ok("fdcast_broker_*: two handles through Redis, SSE-framed, stats in a ctypes Structure")


def main():
    if not os.path.exists(LIB):
        print(f"FAIL: {LIB} does not exist (run `make lib` first)", file=sys.stderr)
        return 1

    def on_alarm(signum, frame):
        raise TestFailure("the test took longer than 60s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(60)
    try:
        lib = load(LIB)
        run(lib)
        run_broker(lib)
    except TestFailure as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return 1
    print("ctypes_test: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
