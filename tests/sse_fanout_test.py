#!/usr/bin/env python3
"""End-to-end test of c-examples/sse_fanout.c (run by `make example-test`).

Starts the built server on a free port, subscribes several SSE clients to two
topics (a real `curl -N` process, raw sockets and http.client), publishes with
`curl -d`, `curl --data-binary` (100 KB, Expect: 100-continue), http.client and
a hand-written request whose body arrives in pieces, and checks that:

  - every client receives exactly the events of its own topic, in order, with
    the right `data:` lines (multi-line bodies become several data lines);
  - each publish answers 200 with the number of subscribers reached;
  - a client that disconnects stops being counted;
  - unknown paths get 404 and invalid UTF-8 gets 400 and reaches nobody;
  - a subscriber that stops reading gets events queued in fdcast's outbox
    (measured: published bytes beyond the kernel's send and receive queues,
    read from /proc/net/tcp and FIONREAD), and once it reads again, the rest
    arrives whole and in order: the server's loop watches fdcast_fd() and
    calls fdcast_dispatch();
  - SIGTERM makes the server exit 0 (under ASan this includes no leaks);
  - scaled out: two server processes with $FDCAST_BROKER on Redis, then on NATS
    ($FDCAST_REDIS_URL, $FDCAST_NATS_URL; a missing server fails the test)
    deliver each other's publishes, in order per publisher, once each.

Python 3 standard library and the curl binary only. Every wait has a timeout.
The same test drives c-examples/uv_embed.c (the same server in a libuv loop).
Usage: sse_fanout_test.py [path/to/sse_fanout or path/to/uv_embed]
"""

import fcntl
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import struct
import tempfile
import termios
import threading
import time

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/c/sse_fanout"
TIMEOUT = 20.0  # seconds, for any single wait
HOST = "127.0.0.1"


class TestFailure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


def ok(msg):
    print(f"ok - {msg}", flush=True)


# --------------------------------------------------------------------------
# SSE clients: each one feeds a Stream from a background reader thread.


class Stream:
    """Bytes of one SSE response body, read in the background until EOF."""

    def __init__(self, name, read_chunk):
        self.name = name
        self.data = b""
        self.eof = False
        self.error = None
        self.cond = threading.Condition()
        self.expected = []  # payloads (str) this client must receive, in order
        self.thread = threading.Thread(target=self._run, args=(read_chunk,), daemon=True)
        self.thread.start()

    def _run(self, read_chunk):
        while True:
            try:
                chunk = read_chunk()
            except (OSError, ValueError, http.client.HTTPException) as e:
                chunk, err = b"", e
            else:
                err = None
            with self.cond:
                if not chunk:
                    self.eof, self.error = True, err
                    self.cond.notify_all()
                    return
                self.data += chunk
                self.cond.notify_all()

    def events(self):
        """Complete events so far, as payload strings (data lines joined by LF)."""
        with self.cond:
            data = self.data
        parts = data.split(b"\n\n")
        out = []
        for raw in parts[:-1]:
            lines = raw.split(b"\n")
            for line in lines:
                check(line.startswith(b"data: "),
                      f"{self.name}: line without 'data: ' prefix: {line[:80]!r}")
            out.append(b"\n".join(line[6:] for line in lines).decode("utf-8"))
        return out

    def wait_events(self, timeout=TIMEOUT):
        """Waits until this client has received all its expected events."""
        want = len(self.expected)
        deadline = time.monotonic() + timeout
        while True:
            got = self.events()
            if len(got) >= want:
                break
            with self.cond:
                if self.eof:
                    raise TestFailure(f"{self.name}: stream ended after {len(got)} of "
                                      f"{want} events ({self.error!r})")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TestFailure(f"{self.name}: got {len(got)} of {want} events "
                                      f"within {timeout}s; last: {got[-1:]!r}")
                self.cond.wait(min(left, 0.2))
        check(len(got) == want, f"{self.name}: {len(got)} events, expected {want}")
        for i, (g, w) in enumerate(zip(got, self.expected)):
            check(g == w, f"{self.name}: event {i} is {short(g)!r}, expected {short(w)!r}")
        with self.cond:
            rest = self.data.split(b"\n\n")[-1]
        check(rest == b"", f"{self.name}: trailing partial event {rest[:80]!r}")

    def wait_eof(self, timeout=TIMEOUT):
        self.thread.join(timeout)
        check(not self.thread.is_alive(), f"{self.name}: no EOF within {timeout}s")


def short(s):
    return s if len(s) < 80 else f"{s[:40]}...({len(s)} chars)...{s[-20:]}"


def check_sse_head(name, status_line, headers):
    check(status_line.startswith("HTTP/1.1 200"), f"{name}: status line {status_line!r}")
    h = {k.lower(): v.strip() for k, v in headers}
    check(h.get("content-type") == "text/event-stream", f"{name}: Content-Type {h!r}")
    check(h.get("cache-control") == "no-cache", f"{name}: Cache-Control {h!r}")
    check(h.get("connection") == "keep-alive", f"{name}: Connection {h!r}")


def split_head(name, raw):
    lines = raw.decode("latin-1").split("\r\n")
    headers = [tuple(line.split(":", 1)) for line in lines[1:]]
    check(all(len(h) == 2 for h in headers), f"{name}: malformed headers {lines!r}")
    return lines[0], headers


class SocketClient:
    """GET /events/<topic> on a plain socket."""

    def __init__(self, port, topic, name):
        self.sock = socket.create_connection((HOST, port), timeout=TIMEOUT)
        self.sock.sendall(f"GET /events/{topic} HTTP/1.1\r\nHost: {HOST}\r\n"
                          "Accept: text/event-stream\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            check(chunk, f"{name}: connection closed before the response head")
            buf += chunk
        head, rest = buf.split(b"\r\n\r\n", 1)
        check_sse_head(name, *split_head(name, head))
        # The server subscribes the connection in the same step as it sends the
        # head, so from here on the client is counted by publishes.
        self.sock.settimeout(None)  # the reader blocks; close() ends it
        first = [rest]

        def read_chunk():
            if first:
                return first.pop() or self.sock.recv(65536)
            return self.sock.recv(65536)

        self.stream = Stream(name, read_chunk)

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class HttpClientClient:
    """GET /events/<topic> with http.client."""

    def __init__(self, port, topic, name):
        self.conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT)
        self.conn.connect()
        # http.client hands a response without Content-Length to the response
        # object and forgets the socket: keep our own reference to it.
        self.sock = self.conn.sock
        self.conn.request("GET", f"/events/{topic}", headers={"Accept": "text/event-stream"})
        resp = self.conn.getresponse()
        check_sse_head(name, f"HTTP/1.1 {resp.status} {resp.reason}", resp.getheaders())
        self.sock.settimeout(None)  # the reader blocks; close() ends it
        self.stream = Stream(name, lambda: resp.read1(65536))

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()


class CurlClient:
    """`curl -N` as a subprocess: the stream on its stdout, the response head on
    its stderr (curl buffers `-i` output until the first body byte, while
    `-D /dev/stderr` is written as soon as the head arrives)."""

    def __init__(self, port, topic, name):
        self.proc = subprocess.Popen(
            ["curl", "-N", "-s", "-D", "/dev/stderr", "--max-time", "120",
             f"http://{HOST}:{port}/events/{topic}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = self.proc.stdout.fileno(), self.proc.stderr.fileno()
        head = Stream(name + " head", lambda: os.read(err, 65536))
        deadline = time.monotonic() + TIMEOUT
        with head.cond:
            while b"\r\n\r\n" not in head.data:
                check(not head.eof, f"{name}: curl exited before the response head")
                left = deadline - time.monotonic()
                check(left > 0, f"{name}: no response head within {TIMEOUT}s")
                head.cond.wait(min(left, 0.2))
            raw = head.data.split(b"\r\n\r\n", 1)[0]
        check_sse_head(name, *split_head(name, raw))
        self.stream = Stream(name, lambda: os.read(out, 65536))

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(TIMEOUT)
        self.proc.stdout.close()
        self.proc.stderr.close()


# --------------------------------------------------------------------------
# Publishing


def curl_publish(port, topic, args):
    r = subprocess.run(["curl", "-s", "-S", "--max-time", str(int(TIMEOUT)), "-o", "-",
                        "-w", "\n%{http_code}", *args, f"http://{HOST}:{port}/publish/{topic}"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=TIMEOUT + 5)
    check(r.returncode == 0, f"curl publish to {topic} failed: {r.stderr.decode()!r}")
    body, _, code = r.stdout.decode().rpartition("\n")
    return int(code), body


def http_request(port, method, path, body=None):
    conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body,
                     headers={"Content-Type": "text/plain"} if body is not None else {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


def count_of(what, status, text):
    check(status == 200, f"{what}: status {status} {text!r}")
    check(re.fullmatch(r"\d+\n?", text) is not None, f"{what}: body {text!r}")
    return int(text)


def publish(port, topic, payload):
    """Publishes with http.client; returns the subscriber count the server reports."""
    status, text = http_request(port, "POST", f"/publish/{topic}", payload)
    return count_of(f"publish to {topic}", status, text)


def publish_curl(port, topic, args):
    """Publishes with curl `args` (e.g. ["-d", "hello"]); returns the count."""
    status, text = curl_publish(port, topic, args)
    return count_of(f"curl {args[:2]} to {topic}", status, text)


def publish_in_pieces(port, topic, body):
    """A POST with Expect: 100-continue whose body is sent in three pieces."""
    s = socket.create_connection((HOST, port), timeout=TIMEOUT)
    try:
        s.sendall(f"POST /publish/{topic} HTTP/1.1\r\nHost: {HOST}\r\n"
                  f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
        interim = b""
        while b"\r\n\r\n" not in interim:
            chunk = s.recv(1)
            check(chunk, "server closed instead of answering 100 Continue")
            interim += chunk
        check(interim.startswith(b"HTTP/1.1 100"), f"expected 100 Continue, got {interim!r}")
        third = len(body) // 3
        for piece in (body[:third], body[third:2 * third], body[2 * third:]):
            s.sendall(piece)
            time.sleep(0.05)
        resp = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            resp += chunk
        head, _, text = resp.partition(b"\r\n\r\n")
        check(head.startswith(b"HTTP/1.1 200"), f"pieces publish: response {resp!r}")
        return int(text)
    finally:
        s.close()


def server_send_queue(port, peer_port):
    """Bytes the server's socket to peer_port has not had acknowledged
    (tx_queue in /proc/net/tcp): what sits in the kernel's send queue."""
    with open("/proc/net/tcp") as f:
        for row in f.readlines()[1:]:
            fields = row.split()
            local, remote = fields[1].split(":"), fields[2].split(":")
            if int(local[1], 16) == port and int(remote[1], 16) == peer_port:
                return int(fields[4].split(":")[0], 16)
    raise TestFailure(f"no socket {port} -> {peer_port} in /proc/net/tcp")


def check_slow_reader(port):
    """A subscriber stops reading: publish 200 KB events until some bytes are
    beyond both kernel queues, i.e. in fdcast's outbox (well under its 1 MiB
    limit, so no eviction); then read: the rest must arrive, which takes
    fdcast_dispatch() called by the server's loop when fdcast_fd() is readable."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(TIMEOUT)
    try:
        s.connect((HOST, port))
        s.sendall(f"GET /events/slow HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):  # byte by byte: no event is read
            chunk = s.recv(1)
            check(chunk, "slow reader: closed before the response head")
            head += chunk
        check_sse_head("slow reader", *split_head("slow reader", head[:-4]))
        peer_port = s.getsockname()[1]
        payloads, published, outbox = [], 0, 0
        while outbox <= 0:
            check(len(payloads) < 100, "slow reader: 20 MB published and nothing ever "
                                       "waited in fdcast's outbox")
            payload = f"{len(payloads):04d}" + "x" * 199_996
            n = publish(port, "slow", payload.encode())
            check(n == 1, f"publish to the slow reader reached {n}, expected 1")
            payloads.append(payload)
            published += len(payload) + len("data: \n\n")
            in_kernel = server_send_queue(port, peer_port)
            waiting = struct.unpack("i", fcntl.ioctl(s, termios.FIONREAD, b"\0" * 4))[0]
            outbox = published - in_kernel - waiting
        want = b"".join(f"data: {p}\n\n".encode() for p in payloads)
        got = b""
        while len(got) < len(want):
            try:
                chunk = s.recv(262_144)
            except socket.timeout:
                raise TestFailure(f"slow reader: stuck at {len(got)} of {len(want)} bytes "
                                  f"for {TIMEOUT}s (is fdcast_fd() watched?)")
            check(chunk, f"slow reader: EOF after {len(got)} of {len(want)} bytes "
                         "(evicted?)")
            got += chunk
        check(got == want, "slow reader: events differ from those published")
        return len(payloads), outbox
    finally:
        s.close()


# --------------------------------------------------------------------------


def start_server(out, err, env=None):
    proc = subprocess.Popen([BIN, "0"], stdout=out, stderr=err, env=env)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        with open(out.name) as f:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", f.read())
        if m:
            return proc, int(m.group(1))
        check(proc.poll() is None, f"server exited early with {proc.returncode}")
        time.sleep(0.05)
    raise TestFailure("server did not report its port")


def run(out, err):
    server, port = start_server(out, err)
    clients = []
    try:
        ok(f"server started on port {port}")

        # Not-found and malformed requests.
        check(http_request(port, "GET", "/nope")[0] == 404, "GET /nope is not 404")
        check(http_request(port, "GET", "/publish/news")[0] == 404, "GET /publish/x is not 404")
        check(http_request(port, "POST", "/events/news", b"x")[0] == 404, "POST /events/x not 404")
        check(http_request(port, "POST", "/publish/", b"x")[0] == 404, "empty topic is not 404")
        ok("unknown paths answer 404")

        curl_news = CurlClient(port, "news", "curl(news)")
        sock_news = SocketClient(port, "news", "socket(news)")
        gone_news = SocketClient(port, "news", "socket2(news)")
        http_sports = HttpClientClient(port, "sports", "http.client(sports)")
        sock_sports = SocketClient(port, "sports", "socket(sports)")
        clients = [curl_news, sock_news, gone_news, http_sports, sock_sports]
        news = [curl_news.stream, sock_news.stream, gone_news.stream]
        sports = [http_sports.stream, sock_sports.stream]
        ok("5 SSE clients connected (3 on news, 2 on sports)")

        def expect(streams, payload):
            for s in streams:
                s.expected.append(payload)

        n = publish_curl(port, "news", ["-d", "hello"])
        check(n == 3, f"curl -d hello to news reached {n}, expected 3")
        expect(news, "hello")

        n = publish(port, "sports", "score 1-0".encode())
        check(n == 2, f"publish to sports reached {n}, expected 2")
        expect(sports, "score 1-0")

        body = "line one\nline two\r\nline three\rline four\n\nafter a blank line"
        n = publish(port, "news", body.encode())
        check(n == 3, f"multi-line publish reached {n}, expected 3")
        expect(news, body.replace("\r\n", "\n").replace("\r", "\n"))

        big = "\n".join(f"row {i:05d} " + "x" * 89 for i in range(1000))  # ~100 KB
        with tempfile.NamedTemporaryFile("wb", suffix=".txt") as f:
            f.write(big.encode())
            f.flush()
            n = publish_curl(port, "sports", ["--data-binary", f"@{f.name}",
                                              "-H", "Expect: 100-continue"])
        check(n == 2, f"100 KB curl publish reached {n}, expected 2")
        expect(sports, big)

        big2 = "".join(chr(0x41 + i % 26) for i in range(100_000))
        n = publish(port, "news", big2.encode())
        check(n == 3, f"100 KB http.client publish reached {n}, expected 3")
        expect(news, big2)

        pieces = "sent in pieces: h\u00e9llo w\u00f6rld \u2603"
        n = publish_in_pieces(port, "news", pieces.encode())
        check(n == 3, f"publish in pieces reached {n}, expected 3")
        expect(news, pieces)

        n = publish(port, "nobody-listens", b"void")
        check(n == 0, f"publish to an empty topic reached {n}")

        status, text = http_request(port, "POST", "/publish/news", b"bad \xff utf-8")
        check(status == 400, f"invalid UTF-8 publish: status {status} {text!r}")

        n = publish_curl(port, "sports", ["-d", ""])
        check(n == 2, f"empty publish reached {n}, expected 2")
        expect(sports, "")

        for s in news + sports:
            s.wait_events()
        ok("each client got exactly its topic's events (curl -d, --data-binary 100 KB with "
           "Expect: 100-continue, http.client multi-line and 100 KB, body in pieces, empty)")

        # A client goes away: the server notices EOF, unsubscribes and closes it.
        # Publish until the count drops; the survivors receive every probe.
        def publish_until(topic, streams, want):
            deadline = time.monotonic() + TIMEOUT
            for k in range(1000):
                payload = f"probe {topic} {k}"
                n = publish(port, topic, payload.encode())
                expect(streams, payload)
                if n == want:
                    return
                check(n == want + 1, f"publish to {topic} reached {n}, expected {want}")
                check(time.monotonic() < deadline, f"{topic}: count never dropped to {want}")
                time.sleep(0.05)

        gone_news.close()
        publish_until("news", [curl_news.stream, sock_news.stream], 2)
        curl_news.close()
        publish_until("news", [sock_news.stream], 1)
        n = publish(port, "sports", b"still here")
        check(n == 2, f"sports reached {n} after news clients left, expected 2")
        expect(sports, "still here")
        for s in [sock_news.stream] + sports:
            s.wait_events()
        ok("disconnected clients (socket close, curl killed) are no longer counted")

        events, queued = check_slow_reader(port)
        ok(f"a reader that paused got all {events} events of 200 KB once it read again "
           f"({queued} bytes had waited in fdcast's outbox: the loop's dispatch sent them)")

        # Clean shutdown with live subscribers.
        server.send_signal(signal.SIGTERM)
        try:
            rc = server.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            raise TestFailure("server did not exit within 20s of SIGTERM")
        check(rc == 0, f"server exit status {rc} after SIGTERM")
        for s in [sock_news.stream] + sports:
            s.wait_eof()
            s.wait_events()  # nothing extra arrived before EOF
        ok("SIGTERM: server exited 0 and closed the remaining streams")
    finally:
        for c in clients:
            try:
                c.close()
            except OSError:
                pass
        if server.poll() is None:
            server.kill()
            server.wait()


def run_scaled_out(engine, url, err):
    """Two sse_fanout processes on one broker serve one set of topics."""
    env = dict(os.environ, FDCAST_BROKER=url, FDCAST_BROKER_NAME=f"sse_test_{os.getpid()}")
    servers, clients = [], []
    try:
        ports = []
        for _ in range(2):
            out = tempfile.NamedTemporaryFile("w+")
            server, port = start_server(out, err, env)
            servers.append((server, out))
            ports.append(port)
        a_port, b_port = ports
        a_news = SocketClient(a_port, "news", f"{engine} A socket(news)")
        b_news = SocketClient(b_port, "news", f"{engine} B socket(news)")
        b_sports = SocketClient(b_port, "sports", f"{engine} B socket(sports)")
        clients = [a_news, b_news, b_sports]

        # B subscribes on the broker without waiting for it (fdcast pipelines the
        # subscribe): probe from A until B's subscriber sees one, then expect exactly the
        # probes from that one on, in order.
        probes = []
        deadline = time.monotonic() + TIMEOUT
        while not b_news.stream.events():
            check(time.monotonic() < deadline, f"{engine}: nothing crossed from A to B")
            probes.append(f"probe {len(probes)}")
            check(publish(a_port, "news", probes[-1].encode()) == 1, "A has 1 news subscriber")
            time.sleep(0.05)
        a_news.stream.expected += probes
        a_news.stream.wait_events()
        b_news.stream.expected = [probes[-1]]
        while b_news.stream.events()[-1:] != [probes[-1]]:
            check(time.monotonic() < deadline, f"{engine}: probes stopped crossing")
            time.sleep(0.02)
        got = b_news.stream.events()
        check(got == probes[len(probes) - len(got):], f"{engine}: B got probes {got!r}")
        b_news.stream.expected = got

        # Order holds per publisher: wait for B's message at A before A publishes.
        check(publish(b_port, "news", b"from B") == 1, "B has 1 news subscriber")
        for stream in (a_news.stream, b_news.stream):
            stream.expected.append("from B")
        a_news.stream.wait_events()
        check(publish(a_port, "news", b"from A\nline 2") == 1, "A has 1 news subscriber")
        check(publish(a_port, "sports", b"1-0") == 0, "A has no sports subscriber")
        for stream in (a_news.stream, b_news.stream):
            stream.expected.append("from A\nline 2")
        b_sports.stream.expected.append("1-0")
        for c in clients:
            c.stream.wait_events()
        ok(f"{engine}: two sse_fanout processes on {url} share topics both ways, in order, "
           "once each")
    finally:
        for c in clients:
            try:
                c.close()
            except OSError:
                pass
        for server, out in servers:
            server.send_signal(signal.SIGTERM)
            try:
                rc = server.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
                rc = "killed"
            out.close()
            check(rc == 0, f"{engine}: server exit status {rc} after SIGTERM")


def main():
    if not os.access(BIN, os.X_OK):
        print(f"FAIL: {BIN} is not an executable (run `make examples` first)", file=sys.stderr)
        return 1

    def on_alarm(signum, frame):
        raise TestFailure("the whole test took longer than 180s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(180)
    with tempfile.NamedTemporaryFile("w+") as out, tempfile.NamedTemporaryFile("w+") as err:
        try:
            run(out, err)
            run_scaled_out("redis", os.environ.get("FDCAST_REDIS_URL", "redis://127.0.0.1:6379"),
                           err)
            run_scaled_out("nats", os.environ.get("FDCAST_NATS_URL", "nats://127.0.0.1:4222"),
                           err)
        except TestFailure as e:
            print(f"FAIL: {e}", file=sys.stderr)
            err.seek(0)
            tail = err.read()[-4000:]
            if tail:
                print(f"--- server stderr ---\n{tail}", file=sys.stderr)
            return 1
        err.seek(0)
        log = err.read()
        if "Sanitizer" in log or "runtime error" in log:
            print(f"FAIL: sanitizer report from the server:\n{log[-4000:]}", file=sys.stderr)
            return 1
    print("sse_fanout_test: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
