#!/usr/bin/env python3
"""End-to-end test of c-examples/log_fanout.c (run by `make log-fanout-test`).

Scenario "fan-out" (100 clients over TCP and a Unix socket: `nc`, `socat` and
Python sockets): a few thousand lines, long ones included, are written to the
server's stdin in chunks cut at arbitrary offsets (so lines arrive in pieces),
and the test checks that:

  - every client that stays gets exactly the expected byte stream: every line,
    in order, exactly once; lines over 65536 bytes split into 65536-byte pieces
    each ending in a newline (the documented rule), the last stdin line, which
    has no newline, sent with one at EOF;
  - a client that never reads (a Unix socket) is evicted once it is more than
    the outbox limit (-l) behind: the server logs "evicted: No buffer space
    available" for its fd before stdin ends, the client reads a prefix of the
    stream (possibly ending mid-line), strictly shorter than it, then EOF; the
    other clients kept receiving meanwhile (the feed is paced on them);
  - clients that go away mid-stream (2 Python sockets closed, 1 nc killed) are
    dropped by the server, and what they had received is a prefix;
  - EOF on stdin: the server reports the line count and 96 clients left, with
    bytes still queued for a client that paused reading; it keeps running
    until that client reads them, which then gets the whole stream; the
    server exits 0 and every client sees EOF (nc and socat exit 0).

Scenario "flush timeout": with -w 300 and a client that never reads less than
the limit, EOF reports queued bytes, the server gives up on them ("flush timed
out"), exits 0, and the client holds a strict prefix of the stream, then EOF.

Scenario "stdin not pollable": a regular file and /dev/null as stdin: the
server reads them to the end, reports the right line count (split pieces
included) and exits 0.

Scenario "SIGTERM": exits 0 and closes a connected client.

Python 3 standard library, plus the nc (netcat-openbsd) and socat binaries.
Every wait has a timeout. Usage: log_fanout_test.py [path/to/log_fanout]
"""

import os
import random
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/c/log_fanout"
TIMEOUT = 30.0  # seconds, for any single wait
HOST = "127.0.0.1"
MAX_LINE = 65536  # log_fanout.c's MAX_LINE
LIMIT = 512 * 1024  # outbox limit passed with -l in the fan-out scenario
N_CLIENTS = 100


class TestFailure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


def ok(msg):
    print(f"ok - {msg}", flush=True)


def wait_for(cond, what, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TestFailure(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


# --------------------------------------------------------------------------
# The model: what log_fanout must send for a given stdin.


def model(data, eof):
    """Output for stdin `data` (bytes): returns (stream, lines). Without `eof`,
    a trailing partial line only contributes the 65536-byte pieces already
    known to be followed by more of the line."""
    out = bytearray()
    lines = 0
    parts = data.split(b"\n")
    for ln in parts[:-1]:
        for i in range(0, max(len(ln), 1), MAX_LINE):
            out += ln[i:i + MAX_LINE] + b"\n"
            lines += 1
    tail = parts[-1]
    if tail:
        full = len(tail) if eof else (len(tail) - 1) // MAX_LINE * MAX_LINE
        for i in range(0, full, MAX_LINE):
            out += tail[i:i + MAX_LINE] + b"\n"
            lines += 1
    return bytes(out), lines


def make_input(rng, n_lines):
    """n_lines of assorted log-like bytes (never a newline inside a line),
    a few of them long, and a last line without a newline."""
    lines = []
    for i in range(n_lines):
        kind = rng.random()
        if kind < 0.03:
            body = b""
        elif kind < 0.10:
            body = f"{i:05d} ütf-8 ☃ crlf\r tab\t nul\0 ".encode() * rng.randint(1, 8)
        else:
            body = f"{i:05d} level=info msg=".encode() + bytes(
                rng.choice(b"abcdefghijklmnopqrstuvwxyz0123456789 =-_") for _ in
                range(rng.randint(0, 400)))
        lines.append(body)
    # Long lines around the split size, and a few much longer ones.
    for n in (MAX_LINE - 1, MAX_LINE, MAX_LINE + 1, 2 * MAX_LINE, 150_001, 200_000):
        lines.insert(rng.randrange(len(lines)), (b"L%d:" % n + b"x" * n)[:n])
    return b"\n".join(lines) + b"\ntail without a newline"


def chunks(rng, data):
    """Cuts data at arbitrary offsets: many small pieces, some large."""
    out, i = [], 0
    while i < len(data):
        n = rng.choice((1, 7, 100, 4096, 30_000, 65_536, 100_000))
        out.append(data[i:i + n])
        i += n
    return out


# --------------------------------------------------------------------------
# Clients


class PyClient:
    """A Python socket; its bytes are read by the Readers thread."""

    def __init__(self, name, family, addr, rcvbuf=None):
        self.name = name
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(addr)
        self.sock.setblocking(False)
        self.buf = bytearray()
        self.eof = False
        self.limit = None  # stop reading at this many bytes (None: read all)
        self.close_requested = False  # the Readers thread closes it
        self.closed = False

    def received(self):
        return len(self.buf)


class ProcClient:
    """`nc` or `socat` as a subprocess writing what it reads to a file."""

    def __init__(self, name, argv, tmpdir):
        self.name = name
        self.path = os.path.join(tmpdir, name.replace(" ", "_") + ".out")
        self.out = open(self.path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.out,
                                     stderr=subprocess.PIPE)
        self.eof = False

    def received(self):
        return os.path.getsize(self.path)

    def data(self):
        with open(self.path, "rb") as f:
            return f.read()

    def kill(self):
        self.proc.kill()
        self.proc.wait(TIMEOUT)

    def finish(self):
        try:
            rc = self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            raise TestFailure(f"{self.name}: did not exit within {TIMEOUT}s of the server's exit")
        err = self.proc.stderr.read().decode(errors="replace")
        check(rc == 0, f"{self.name}: exit status {rc}, stderr {err!r}")
        self.eof = True

    def cleanup(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stderr.close()
        self.out.close()


class Readers(threading.Thread):
    """One thread reading every PyClient (but those not yet started)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sel = selectors.DefaultSelector()
        self.clients = []
        self.lock = threading.Lock()
        self.stop = False
        self.error = None

    def add(self, c):
        with self.lock:
            self.clients.append(c)

    def run(self):
        try:
            registered = set()
            while not self.stop:
                with self.lock:
                    clients = list(self.clients)
                for c in clients:
                    if c.close_requested and not c.closed:
                        if c in registered:
                            self.sel.unregister(c.sock)
                            registered.discard(c)
                        c.sock.close()
                        c.closed = True
                    want = not c.eof and not c.closed and (c.limit is None or
                                                           len(c.buf) < c.limit)
                    if want and c not in registered:
                        self.sel.register(c.sock, selectors.EVENT_READ, c)
                        registered.add(c)
                    elif not want and c in registered:
                        self.sel.unregister(c.sock)
                        registered.discard(c)
                for key, _ in self.sel.select(0.02):
                    c = key.data
                    n = 262_144 if c.limit is None else min(262_144, c.limit - len(c.buf))
                    try:
                        chunk = c.sock.recv(n)
                    except BlockingIOError:
                        continue
                    if chunk:
                        c.buf += chunk
                    else:
                        c.eof = True
        except Exception as e:  # reported by the main thread
            self.error = e


def read_to_eof(sock, timeout=TIMEOUT):
    sock.setblocking(True)
    sock.settimeout(timeout)
    data = bytearray()
    while True:
        chunk = sock.recv(262_144)
        if not chunk:
            return bytes(data)
        data += chunk


# --------------------------------------------------------------------------
# The server


class Server:
    def __init__(self, args, tmpdir, stdin=subprocess.PIPE):
        self.out_path = os.path.join(tmpdir, "server.out")
        self.err_path = os.path.join(tmpdir, "server.err")
        self.out = open(self.out_path, "wb")
        self.err = open(self.err_path, "wb")
        self.proc = subprocess.Popen([BIN, *args], stdin=stdin, stdout=self.out,
                                     stderr=self.err)
        m = self.wait_stdout(r"listening on 127\.0\.0\.1:(\d+) \(tcp\)")
        self.port = int(m.group(1))

    def stdout(self):
        with open(self.out_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stderr(self):
        with open(self.err_path, "rb") as f:
            return f.read().decode(errors="replace")

    def wait_stdout(self, pattern, timeout=TIMEOUT):
        m = None

        def found():
            nonlocal m
            m = re.search(pattern, self.stdout())
            check(m is not None or self.proc.poll() is None,
                  f"server exited ({self.proc.returncode}) before printing /{pattern}/")
            return m is not None

        wait_for(found, f"server stdout /{pattern}/", timeout)
        return m

    def clients_now(self):
        counts = re.findall(r"\((\d+) clients\)", self.stderr())
        return int(counts[-1]) if counts else 0

    def wait_exit(self, timeout=TIMEOUT):
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TestFailure(f"server did not exit within {timeout}s")
        check(rc == 0, f"server exit status {rc}")
        log = self.stderr()
        check("Sanitizer" not in log and "runtime error" not in log,
              f"sanitizer report from the server:\n{log[-4000:]}")

    def cleanup(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self.out.close()
        self.err.close()

    def tail(self):
        return f"--- server stdout ---\n{self.stdout()[-2000:]}\n" \
               f"--- server stderr ---\n{self.stderr()[-4000:]}"


# --------------------------------------------------------------------------
# Scenarios


def fan_out(tmpdir):
    rng = random.Random(4)
    data = make_input(rng, 4000)
    expected, n_lines = model(data, eof=True)
    pieces = chunks(rng, data)
    check(len(expected) > 2 * LIMIT, "test input too small to force an eviction")

    sock_path = os.path.join(tmpdir, "log.sock")
    server = Server(["-u", sock_path, "-l", str(LIMIT), "-w", "60000", "0"], tmpdir)
    readers = Readers()
    procs, pys, slow = [], [], None
    try:
        tcp = (HOST, server.port)
        # The client that never reads connects first, so its fd is known.
        slow = PyClient("slow (unix, never reads)", socket.AF_UNIX, sock_path)
        wait_for(lambda: server.clients_now() == 1, "the first client to be counted")
        slow_fd = int(re.search(r"client (\d+) connected over unix \(1 clients\)",
                                server.stderr()).group(1))

        tools = [("nc tcp", ["nc", "-d", HOST, str(server.port)]),
                 ("nc unix", ["nc", "-d", "-U", sock_path]),
                 ("socat tcp", ["socat", "-u", f"TCP:{HOST}:{server.port}", "STDOUT"]),
                 ("socat unix", ["socat", "-u", f"UNIX-CONNECT:{sock_path}", "STDOUT"])]
        for name, argv in tools:
            for k in range(3 if name.startswith("nc") else 2):
                procs.append(ProcClient(f"{name} {k}", argv, tmpdir))
        n_py = N_CLIENTS - 1 - len(procs)
        for k in range(n_py):
            if k % 2:
                pys.append(PyClient(f"py tcp {k}", socket.AF_INET, tcp))
            else:
                pys.append(PyClient(f"py unix {k}", socket.AF_UNIX, sock_path))
        for c in pys:
            readers.add(c)
        readers.start()
        wait_for(lambda: server.clients_now() == N_CLIENTS,
                 f"{N_CLIENTS} clients to be connected (server says {server.clients_now()})")
        ok(f"{N_CLIENTS} clients connected: {len(procs)} nc/socat processes, "
           f"{n_py + 1} Python sockets, TCP and Unix")

        late = pys[0]  # a Unix socket that pauses near the end
        late.name = "late reader (unix)"
        late.limit = len(expected) - 300_000
        leavers = [pys[1], pys[2]]  # one TCP, one Unix
        leaver_proc = procs[0]  # nc tcp 0
        keep_procs = procs[1:]
        fast = [c for c in pys[3:]] + keep_procs

        fed = 0
        for i, piece in enumerate(pieces):
            os.write(server.proc.stdin.fileno(), piece)
            fed += len(piece)
            if i == len(pieces) // 3:
                for c in leavers:
                    c.close_requested = True
                leaver_proc.kill()
                wait_for(lambda: all(c.closed for c in leavers), "the leavers to close")
            want = len(model(data[:fed], eof=False)[0])
            wait_for(lambda: all(c.received() >= want for c in fast) and
                     late.received() >= min(want, late.limit) and readers.error is None,
                     f"every client to receive {want} bytes "
                     f"(slowest: {min(c.received() for c in fast)})")
        check(readers.error is None, f"reader thread failed: {readers.error!r}")
        ok(f"{len(pieces)} stdin chunks ({len(data)} bytes) reached every reading client")

        def leaves():
            log = server.stderr()
            gone = len(re.findall(r"client \d+ (disconnected|failed|evicted: "
                                  r"(Broken pipe|Connection reset by peer))", log))
            return gone

        wait_for(lambda: leaves() == 3, "the server to drop the 3 clients that left")
        slow_line = f"client {slow_fd} evicted: No buffer space available"
        wait_for(lambda: slow_line in server.stderr(), f"'{slow_line}' in the server log")
        check(len(re.findall(r"No buffer space", server.stderr())) == 1,
              "a client other than the non-reading one was evicted as too slow")
        ok("the 3 clients that left were dropped; the non-reading client was evicted "
           "(ENOBUFS) while the others kept up")

        server.proc.stdin.close()
        m = server.wait_stdout(r"stdin closed after (\d+) lines; flushing (\d+) bytes "
                               r"to (\d+) clients")
        lines, queued, left = map(int, m.groups())
        check(lines == n_lines, f"server counted {lines} lines, expected {n_lines}")
        check(left == N_CLIENTS - 4, f"{left} clients at EOF, expected {N_CLIENTS - 4}")
        check(queued > 0, "nothing queued at EOF although the late reader paused")
        check(server.proc.poll() is None, "server exited before the late reader read its bytes")
        late.limit = None  # resume reading: the server can finish its flush
        server.wait_exit()
        ok(f"EOF: {lines} lines counted, {queued} bytes queued were flushed to the late "
           "reader before exit 0")

        for p in keep_procs:
            p.finish()
        wait_for(lambda: all(c.eof for c in pys[3:] + [late]), "EOF on every Python client")
        for c in fast + [late]:
            got = c.data() if isinstance(c, ProcClient) else bytes(c.buf)
            if got != expected:
                at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b),
                          min(len(got), len(expected)))
                raise TestFailure(f"{c.name}: {len(got)} bytes, expected {len(expected)}; "
                                  f"first difference at byte {at}: {got[at:at + 40]!r} vs "
                                  f"{expected[at:at + 40]!r}")
        ok(f"{len(fast) + 1} clients got all {n_lines} lines ({len(expected)} bytes), in "
           "order, exactly once, long lines split at 65536 bytes; nc and socat exited 0")

        got = read_to_eof(slow.sock)
        check(0 < len(got) < len(expected) and expected.startswith(got),
              f"evicted client: {len(got)} bytes, not a strict prefix of the stream")
        for c in leavers:
            check(expected.startswith(bytes(c.buf)), f"{c.name}: not a prefix of the stream")
        check(expected.startswith(leaver_proc.data()), "killed nc: not a prefix of the stream")
        ok(f"the evicted client holds a strict prefix ({len(got)} bytes) then EOF; "
           "the leavers' data are prefixes")
    except TestFailure as e:
        raise TestFailure(f"{e}\n{server.tail()}")
    finally:
        readers.stop = True
        if readers.is_alive():
            readers.join(TIMEOUT)
        for c in pys + ([slow] if slow else []):
            c.sock.close()
        for p in procs:
            p.cleanup()
        server.cleanup()


def flush_timeout(tmpdir):
    rng = random.Random(5)
    lines = [b"%05d " % i + b"y" * rng.randint(100, 400) for i in range(2000)]
    data = b"\n".join(lines) + b"\n"
    expected, n_lines = model(data, eof=True)
    check(len(expected) < 1024 * 1024, "input must stay under the default outbox limit")
    sock_path = os.path.join(tmpdir, "t.sock")
    server = Server(["-u", sock_path, "-w", "300", "0"], tmpdir)
    try:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(TIMEOUT)
        c.connect(sock_path)
        wait_for(lambda: server.clients_now() == 1, "the client to be counted")
        server.proc.stdin.write(data)
        server.proc.stdin.close()
        m = server.wait_stdout(r"stdin closed after (\d+) lines; flushing (\d+) bytes "
                               r"to 1 clients")
        check(int(m.group(1)) == n_lines, f"{m.group(1)} lines counted, expected {n_lines}")
        check(int(m.group(2)) > 0, "nothing queued for a client that does not read")
        m = server.wait_stdout(r"flush timed out, dropping (\d+) bytes")
        check(int(m.group(1)) > 0, "flush timed out with nothing left")
        server.wait_exit()
        got = read_to_eof(c)
        c.close()
        check(0 < len(got) < len(expected) and expected.startswith(got),
              f"client got {len(got)} of {len(expected)} bytes, not a strict prefix")
        ok(f"flush timeout (-w 300): queued bytes dropped, exit 0, client got a strict prefix "
           f"({len(got)} of {len(expected)} bytes) then EOF")
    except TestFailure as e:
        raise TestFailure(f"{e}\n{server.tail()}")
    finally:
        server.cleanup()


def unpollable_stdin(tmpdir):
    rng = random.Random(6)
    data = make_input(rng, 500)
    _, n_lines = model(data, eof=True)
    path = os.path.join(tmpdir, "input.log")
    with open(path, "wb") as f:
        f.write(data)
    for name, src, want in (("a regular file", path, n_lines), ("/dev/null", os.devnull, 0)):
        with open(src, "rb") as f:
            server = Server(["0"], tmpdir, stdin=f)
            try:
                m = server.wait_stdout(r"stdin closed after (\d+) lines")
                check(int(m.group(1)) == want, f"{name}: {m.group(1)} lines, expected {want}")
                server.wait_exit()
            except TestFailure as e:
                raise TestFailure(f"{e}\n{server.tail()}")
            finally:
                server.cleanup()
    ok(f"stdin from a regular file ({n_lines} lines, split pieces included) and /dev/null: "
       "read to the end, exit 0")


def sigterm(tmpdir):
    server = Server(["0"], tmpdir)
    try:
        c = socket.create_connection((HOST, server.port), timeout=TIMEOUT)
        wait_for(lambda: server.clients_now() == 1, "the client to be counted")
        server.proc.stdin.write(b"one line\n")
        server.proc.stdin.flush()
        c.settimeout(TIMEOUT)
        got = b""
        while not got.endswith(b"\n"):
            chunk = c.recv(100)
            check(chunk, "EOF before the line")
            got += chunk
        check(got == b"one line\n", f"got {got!r}")
        server.proc.send_signal(signal.SIGTERM)
        server.wait_exit()
        check(read_to_eof(c) == b"", "bytes after the line")
        c.close()
        ok("SIGTERM: exit 0, the connected client sees EOF")
    except TestFailure as e:
        raise TestFailure(f"{e}\n{server.tail()}")
    finally:
        server.cleanup()


def main():
    if not os.access(BIN, os.X_OK):
        print(f"FAIL: {BIN} is not an executable (run `make examples` first)", file=sys.stderr)
        return 1

    def on_alarm(signum, frame):
        raise TestFailure("the whole test took longer than 300s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(300)
    try:
        for scenario in (fan_out, flush_timeout, unpollable_stdin, sigterm):
            with tempfile.TemporaryDirectory(prefix="log_fanout_test.") as tmpdir:
                scenario(tmpdir)
    except TestFailure as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return 1
    print("log_fanout_test: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
