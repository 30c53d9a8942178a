#!/usr/bin/env python3
"""End-to-end test of c-examples/ws_chat.c with real clients (run by `make ws-chat-test`).

Starts the built server (an ASan+UBSan build under `make`) on a free port and talks to it
with the `websockets` library (a third-party RFC 6455 client), raw sockets speaking
WebSocket frame by frame, and raw-socket Server-Sent Events readers. Checks that:

  - the handshake answers the RFC 6455 example key with its accept value, and bad
    handshakes (no Upgrade, wrong version, bad key, bad room) get 4xx;
  - text messages reach the other members of the room, over WebSocket and SSE, never the
    other room, and are not echoed to the sender; multi-line text arrives whole over SSE;
  - messages fragmented by the client (websockets' fragments, and raw fragments that split
    a UTF-8 character, with a ping between them) are delivered joined;
  - ping gets a pong with the same payload; a close gets a close echoing the code, then EOF;
  - invalid frames close the connection with the right status: unmasked 1002, RSV bit
    1002, continuation without start 1002, long ping 1002, close code 1005 1002, invalid
    UTF-8 1007, binary 1003, over 64 KiB 1009;
  - SIGTERM makes the server exit 0 (under ASan: with no leak or error report).

Every wait has a timeout. Usage: ws_chat_test.py [path/to/ws_chat]
"""

import asyncio
import base64
import hashlib
import os
import signal
import struct
import subprocess
import sys
import tempfile

import websockets
from websockets.asyncio.client import connect

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/c/ws_chat"
HOST = "127.0.0.1"
TIMEOUT = 10.0  # seconds, for any single wait
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class TestFailure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


def ok(msg):
    print(f"ok - {msg}", flush=True)


async def within(awaitable, what):
    try:
        return await asyncio.wait_for(awaitable, TIMEOUT)
    except asyncio.TimeoutError:
        raise TestFailure(f"timed out after {TIMEOUT}s: {what}") from None


# --------------------------------------------------------------------------
# Raw clients


async def read_head(reader, name):
    head = await within(reader.readuntil(b"\r\n\r\n"), f"{name}: response head")
    lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return lines[0], headers


async def http_get(port, target, extra=""):
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\n{extra}\r\n".encode())
    status, headers = await read_head(reader, target)
    body = await within(reader.read(), f"{target}: body until EOF")
    writer.close()
    return status, headers, body


class SseReader:
    """GET /events?room=<r> on a raw socket; parses the event stream."""

    async def open(self, port, room):
        self.name = f"sse[{room}]"
        self.reader, self.writer = await asyncio.open_connection(HOST, port)
        self.writer.write(f"GET /events?room={room} HTTP/1.1\r\nHost: {HOST}\r\n"
                          "Accept: text/event-stream\r\n\r\n".encode())
        status, headers = await read_head(self.reader, self.name)
        check(status.startswith("HTTP/1.1 200"), f"{self.name}: status {status!r}")
        check(headers.get("content-type") == "text/event-stream",
              f"{self.name}: headers {headers!r}")
        return self

    async def event(self):
        """The next event's data (data lines joined by LF). The room keeps history, so
        events start with an "id: " line; the stream starts with a "retry: " block."""
        while True:
            raw = await within(self.reader.readuntil(b"\n\n"), f"{self.name}: next event")
            lines = raw[:-2].split(b"\n")
            if lines[0].startswith(b"retry: ") and len(lines) == 1:
                continue
            check(lines[0].startswith(b"id: "), f"{self.name}: first line {lines[0]!r}")
            for line in lines[1:]:
                check(line.startswith(b"data: "), f"{self.name}: line {line!r}")
            return b"\n".join(line[6:] for line in lines[1:]).decode("utf-8")

    async def eof(self):
        rest = await within(self.reader.read(), f"{self.name}: EOF")
        check(rest == b"", f"{self.name}: unexpected bytes before EOF: {rest[:80]!r}")

    def close(self):
        self.writer.close()


def client_frame(b0, payload, masked=True, mask=b"\x1f\x2e\x3d\x4c"):
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        head = bytes([b0, bit | n])
    elif n < 65536:
        head = bytes([b0, bit | 126]) + struct.pack("!H", n)
    else:
        head = bytes([b0, bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawWs:
    """A WebSocket client written frame by frame, to send what libraries never would."""

    async def open(self, port, room, key="dGhlIHNhbXBsZSBub25jZQ=="):
        self.name = f"raw[{room}]"
        self.reader, self.writer = await asyncio.open_connection(HOST, port)
        self.writer.write(
            f"GET /ws?room={room} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        self.status, self.headers = await read_head(self.reader, self.name)
        return self

    def send(self, data):
        self.writer.write(data)

    async def frame(self):
        """The next server frame: (opcode, fin, payload). Server frames are unmasked."""
        b0, b1 = await within(self.reader.readexactly(2), f"{self.name}: frame header")
        check(b1 & 0x80 == 0, f"{self.name}: server frame is masked")
        check(b0 & 0x70 == 0, f"{self.name}: RSV bits set in {b0:#x}")
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        payload = await within(self.reader.readexactly(n), f"{self.name}: payload")
        return b0 & 0x0F, bool(b0 & 0x80), payload

    async def expect_close(self, code, what):
        op, fin, payload = await self.frame()
        check(op == 8 and fin, f"{what}: expected a close frame, got opcode {op}")
        got = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
        check(got == code, f"{what}: close code {got}, expected {code}")
        rest = await within(self.reader.read(), f"{what}: EOF after the close frame")
        check(rest == b"", f"{what}: bytes after the close frame: {rest[:40]!r}")

    def close(self):
        self.writer.close()


# --------------------------------------------------------------------------


async def scenario(port):
    # --- HTTP surface ----------------------------------------------------
    status, headers, body = await http_get(port, "/?room=a")
    check(status.startswith("HTTP/1.1 200") and "text/html" in headers.get("content-type", ""),
          f"chat page: {status} {headers}")
    check(b"new WebSocket(" in body and b"/ws?room=" in body, "chat page has no WebSocket")
    check(int(headers["content-length"]) == len(body), "chat page Content-Length")
    status, _, body = await http_get(port, "/sse.html?room=a")
    check(status.startswith("HTTP/1.1 200") and b"new EventSource(" in body, "SSE page")
    status, _, _ = await http_get(port, "/nope")
    check(status.startswith("HTTP/1.1 404"), f"/nope: {status}")
    status, _, _ = await http_get(port, "/ws?room=a")
    check(status.startswith("HTTP/1.1 426"), f"/ws without Upgrade: {status}")
    status, headers, _ = await http_get(
        port, "/ws?room=a", "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n")
    check(status.startswith("HTTP/1.1 426") and headers.get("sec-websocket-version") == "13",
          f"version 8: {status} {headers}")
    for room in ["bad!name", "", "x" * 65]:
        status, _, _ = await http_get(port, f"/events?room={room}")
        check(status.startswith("HTTP/1.1 400"), f"room {room!r}: {status}")
    ok("pages served; unknown path 404, plain GET /ws 426, version 8 426, bad rooms 400")

    # --- handshake --------------------------------------------------------
    raw = await RawWs().open(port, "hs")
    check(raw.status.startswith("HTTP/1.1 101"), f"handshake: {raw.status}")
    check(raw.headers.get("sec-websocket-accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
          f"accept for the RFC 6455 example key: {raw.headers}")
    check(raw.headers.get("upgrade", "").lower() == "websocket", f"{raw.headers}")
    raw.close()
    key = base64.b64encode(os.urandom(16)).decode()
    raw = await RawWs().open(port, "hs", key)
    want = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
    check(raw.headers.get("sec-websocket-accept") == want, "accept for a random key")
    raw.close()
    for bad in ["short", "AAAAAAAAAAAAAAAAAAAAAAAA", "dGhlIHNhbXBsZSBub25jZQ=!"]:
        raw = await RawWs().open(port, "hs", bad)
        check(raw.status.startswith("HTTP/1.1 400"), f"key {bad!r}: {raw.status}")
        raw.close()
    ok("handshake: RFC 6455 example key and a random key accepted correctly, bad keys 400")

    # --- rooms, over WebSocket and SSE ------------------------------------
    url = f"ws://{HOST}:{port}/ws?room="
    kw = dict(ping_interval=None, open_timeout=TIMEOUT, close_timeout=TIMEOUT)
    a1 = await within(connect(url + "a", **kw), "connect a1")
    a2 = await within(connect(url + "a", compression=None, **kw), "connect a2")
    b1 = await within(connect(url + "b", **kw), "connect b1")
    sse_a = await SseReader().open(port, "a")
    sse_b = await SseReader().open(port, "b")

    await a1.send("hello from a1")
    check(await within(a2.recv(), "a2 recv") == "hello from a1", "a2 got a1's message")
    check(await sse_a.event() == "hello from a1", "SSE a got a1's message")
    await b1.send("hello from b1")
    check(await sse_b.event() == "hello from b1", "SSE b got b1's message")
    # Sentinels: what each client receives next proves what it did not receive before.
    await a2.send("from a2")
    check(await within(a1.recv(), "a1 recv") == "from a2",
          "a1's next message is a2's: no echo of its own, nothing from room b")
    check(await sse_a.event() == "from a2", "SSE a: nothing from room b in between")
    await b1.send("b again")
    check(await sse_b.event() == "b again", "SSE b: nothing from room a in between")
    await a1.send("to a")
    check(await within(a2.recv(), "a2 recv") == "to a", "a2: nothing from room b")
    check(await sse_a.event() == "to a", "SSE a")
    await a1.send("line one\nline two\n\nline four")
    check(await within(a2.recv(), "a2") == "line one\nline two\n\nline four", "multi-line WS")
    check(await sse_a.event() == "line one\nline two\n\nline four", "multi-line SSE")
    b_next = asyncio.ensure_future(b1.recv())
    await b1.send("b last")  # b1 is alone in b (plus SSE): it gets nothing back
    check(await sse_b.event() == "b last", "SSE b")
    await asyncio.sleep(0.2)
    check(not b_next.done(), "b1 received something: an echo or another room's message")
    b_next.cancel()
    ok("text messages reach the room's other WebSocket and SSE clients only, no echo")

    # --- fragmentation ----------------------------------------------------
    await a1.send(["frag", "mented ", "€ 😀"])
    check(await within(a2.recv(), "a2") == "fragmented € 😀", "websockets fragments joined")
    check(await sse_a.event() == "fragmented € 😀", "SSE: fragments joined")
    big = "x" * 60000 + "é"
    await a1.send(big)
    check(await within(a2.recv(), "a2 big") == big, "60 KB message (16-bit lengths both ways)")
    check(await sse_a.event() == big, "SSE 60 KB")
    raw = await RawWs().open(port, "a")
    raw.send(client_frame(0x01, "café ".encode()[:4]))        # "caf" + first byte of é
    raw.send(client_frame(0x89, b"between"))                  # a ping between fragments
    raw.send(client_frame(0x00, "café ".encode()[4:]))        # rest of é, space
    raw.send(client_frame(0x80, "ok".encode()))
    check(await raw.frame() == (0xA, True, b"between"), "pong between fragments")
    check(await within(a2.recv(), "a2") == "café ok", "raw fragments split inside é")
    check(await within(a1.recv(), "a1") == "café ok", "a1 got the raw client's message")
    check(await sse_a.event() == "café ok", "SSE raw fragments")
    ok("fragmented messages (library and raw, split inside a character, ping between) joined")

    # --- ping/pong, close handshake ----------------------------------------
    waiter = await a1.ping(b"are you there")
    await within(waiter, "pong for a1's ping")
    raw.send(client_frame(0x89, b""))
    check(await raw.frame() == (0xA, True, b""), "empty ping gets an empty pong")
    raw.send(client_frame(0x88, struct.pack("!H", 3001) + b"done"))
    await raw.expect_close(3001, "raw close 3001")
    raw.close()
    await within(a2.close(code=1000, reason="bye"), "a2 close")
    check(a2.close_code == 1000, f"a2 close code from the server: {a2.close_code}")
    ok("ping -> pong with the same payload; close -> close echoing the code, then EOF")

    await a1.send("after a2 left")
    check(await sse_a.event() == "after a2 left", "SSE a after a2 left")
    await a1.close()
    await b1.close()

    # --- protocol errors ----------------------------------------------------
    cases = [
        ("unmasked text frame", client_frame(0x81, b"hi", masked=False), 1002),
        ("RSV1 set", client_frame(0xC1, b"hi"), 1002),
        ("reserved opcode 3", client_frame(0x83, b""), 1002),
        ("continuation without a start", client_frame(0x80, b"x"), 1002),
        ("new message inside a fragmented one",
         client_frame(0x01, b"a") + client_frame(0x81, b"b"), 1002),
        ("fragmented ping", client_frame(0x09, b""), 1002),
        ("ping of 126 bytes", client_frame(0x89, b"p" * 126), 1002),
        ("close code 1005", client_frame(0x88, struct.pack("!H", 1005)), 1002),
        ("close payload of 1 byte", client_frame(0x88, b"\x03"), 1002),
        ("invalid UTF-8 text", client_frame(0x81, b"\xff\xfe"), 1007),
        ("UTF-8 broken across fragments",
         client_frame(0x01, b"\xe2\x82") + client_frame(0x80, b"("), 1007),
        ("binary message", client_frame(0x82, b"\x00\x01"), 1003),
        ("message over 64 KiB", client_frame(0x81, b"y" * (64 * 1024 + 1)), 1009),
        ("fragments over 64 KiB",
         client_frame(0x01, b"y" * 40000) + client_frame(0x80, b"y" * 40000), 1009),
    ]
    for what, data, code in cases:
        raw = await RawWs().open(port, "a")
        check(raw.status.startswith("HTTP/1.1 101"), f"{what}: handshake {raw.status}")
        raw.send(data)
        await raw.expect_close(code, what)
        raw.close()
        ok(f"{what}: server closes with {code}")
    # None of those reached the room.
    async with connect(url + "a", **kw) as a3:
        await a3.send("still fine")
        check(await sse_a.event() == "still fine", "SSE a: no message from the bad clients")
    ok("frames refused by the server were not published")
    return sse_a, sse_b


async def run_async(server):
    line = await within(asyncio.to_thread(server.stdout.readline), "the server's first line")
    check(b"listening on http://127.0.0.1:" in line, f"server said {line!r}")
    port = int(line.split(b"127.0.0.1:")[1].split()[0])
    sse_a, sse_b = await scenario(port)
    server.send_signal(signal.SIGTERM)
    rc = await within(asyncio.to_thread(server.wait), "server exit after SIGTERM")
    check(rc == 0, f"server exit status {rc} after SIGTERM")
    await sse_a.eof()
    await sse_b.eof()
    ok("SIGTERM: server exited 0 and closed the remaining streams")


def main():
    if not os.access(BIN, os.X_OK):
        print(f"FAIL: {BIN} is not an executable (run `make examples` first)", file=sys.stderr)
        return 1
    print(f"ws_chat_test: websockets {websockets.__version__} against {BIN}", flush=True)

    def on_alarm(signum, frame):
        raise TestFailure("the whole test took longer than 120s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(120)
    with tempfile.TemporaryFile("w+") as err:
        server = subprocess.Popen([BIN, "0"], stdout=subprocess.PIPE, stderr=err)
        try:
            asyncio.run(run_async(server))
        except (TestFailure, websockets.exceptions.WebSocketException, OSError,
                asyncio.IncompleteReadError) as e:
            print(f"FAIL: {type(e).__name__}: {e}", file=sys.stderr)
            err.seek(0)
            tail = err.read()[-4000:]
            if tail:
                print(f"--- server stderr ---\n{tail}", file=sys.stderr)
            return 1
        finally:
            signal.alarm(0)
            if server.poll() is None:
                server.kill()
                server.wait()
        err.seek(0)
        log = err.read()
        if "Sanitizer" in log or "runtime error" in log:
            print(f"FAIL: sanitizer report from the server:\n{log[-4000:]}", file=sys.stderr)
            return 1
    print("ws_chat_test: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
