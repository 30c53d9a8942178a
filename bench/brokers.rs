//! Cross-process fan-out through each broker engine (PostgreSQL LISTEN/NOTIFY, Redis pub/sub,
//! NATS core), against a plain client of the same engine.
//!
//! `cargo run --release --example broker_bench -- [--quick]` prints markdown tables:
//! 1. publish throughput from one publisher process to one receiving process, 64-byte and
//!    1 KiB payloads: fdcast → fdcast against a plain client of the engine (Redis: pipelined
//!    PUBLISH over TCP into a plain SUBSCRIBE connection; NATS: `PUB` in big writes into a
//!    plain `SUB` connection; PostgreSQL: the old design, one `SELECT pg_notify($1, $2)`
//!    transaction per publish through libpq's pipeline, into the same fdcast receiver);
//! 2. latency from `publish` in this process to the bytes on a socket in another, at a fixed
//!    rate (CLOCK_MONOTONIC, which both processes share);
//! 3. interest routing: what a third process, connected to the same broker but subscribed
//!    only to another topic, received meanwhile (`broker_stats().received`, and the bytes its
//!    broker connection received, from the socket's TCP_INFO).
//!
//! Every receiver checks that each message arrived once, in order; a miss makes the program
//! exit 1 (never a time). Servers: FDCAST_PG_URL (default postgresql://127.0.0.1:5432/test),
//! FDCAST_REDIS_URL (redis://127.0.0.1:6379), FDCAST_NATS_URL (nats://127.0.0.1:4222); an
//! engine whose server is down is skipped with a note.
//!
//! Knobs: BROKER_BENCH_ENGINES=pg,redis runs only those; BROKER_BENCH_VERBOSE=1 prints the
//! publisher's own time; BROKER_BENCH_PG_BATCH=n makes the plain PostgreSQL publisher sync
//! every n publishes instead of every one (what batching alone buys, without fdcast).
//!
//! Roles (this binary runs itself as the other processes):
//! `receiver ENGINE URL NAME N SIZE` (fdcast), `plain-sub ENGINE URL NAME N SIZE` (Redis,
//! NATS), `bystander URL NAME` (fdcast, subscribed to another topic until stdin says stop).

use std::ffi::{CStr, CString, c_char, c_int};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fdcast::{Mode, Registry};

/// The topic every benchmark publishes on.
const TOPIC: &str = "bench";
/// The topic the bystander subscribes to (nobody publishes on it).
const OTHER_TOPIC: &str = "other";
/// Publishes an fdcast publisher lets queue (unsent or unconfirmed) before it waits.
const WINDOW: u64 = 16_384;
/// A receiver that gets nothing for this long gives up: a message was lost.
const STALL: Duration = Duration::from_secs(10);

fn env_url(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.into())
}

fn fail(message: &str) -> ! {
    eprintln!("broker_bench: FAILED: {message}");
    std::process::exit(1);
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process on the machine.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the pointer it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Bytes received by this process's TCP sockets (its broker connection: the only TCP socket
/// a receiver or bystander has), from TCP_INFO's `tcpi_bytes_received` (Linux 4.1+).
fn tcp_bytes_received() -> u64 {
    /// `offsetof(struct tcp_info, tcpi_bytes_received)` in linux/tcp.h.
    const BYTES_RECEIVED: usize = 128;
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    for entry in entries.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<c_int>().ok())
        else {
            continue;
        };
        let mut info = [0u8; 256];
        let mut len = info.len() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `info` and the length it wrote
        // into `len`; on an fd that is not a TCP socket it fails and writes nothing we read.
        let ok = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                info.as_mut_ptr().cast(),
                &mut len,
            )
        } == 0;
        if ok && len as usize >= BYTES_RECEIVED + 8 {
            let bytes: [u8; 8] = info[BYTES_RECEIVED..BYTES_RECEIVED + 8]
                .try_into()
                .expect("8 bytes");
            total += u64::from_ne_bytes(bytes);
        }
    }
    total
}

/// A message: `<seq, 10 digits> <CLOCK_MONOTONIC ns, 20 digits> ` padded with `x` to `size`
/// bytes, the last one `\n`. ASCII, so every engine carries it as it is.
fn message(seq: u64, size: usize) -> Vec<u8> {
    let mut out = format!("{seq:010} {:020} ", monotonic_ns()).into_bytes();
    out.resize(size - 1, b'x');
    out.push(b'\n');
    out
}

/// Checks that messages arrive once, in order, and times them.
struct Checker {
    expected: u64,
    size: usize,
    latencies_us: Vec<f64>,
    first_ns: u64,
    last_ns: u64,
}

impl Checker {
    fn new(messages: u64, size: usize) -> Checker {
        Checker {
            expected: 0,
            size,
            latencies_us: Vec::with_capacity(messages as usize),
            first_ns: 0,
            last_ns: 0,
        }
    }

    fn take(&mut self, payload: &[u8], now: u64) {
        if payload.len() != self.size {
            fail(&format!(
                "message {} is {} bytes, not {}",
                self.expected,
                payload.len(),
                self.size
            ));
        }
        let field = |range: std::ops::Range<usize>| -> u64 {
            std::str::from_utf8(&payload[range])
                .ok()
                .and_then(|text| text.parse().ok())
                .unwrap_or_else(|| fail("a message is not in the benchmark's format"))
        };
        let seq = field(0..10);
        let sent = field(11..31);
        if seq != self.expected {
            fail(&format!(
                "expected message {}, got {seq}: lost, duplicated or out of order",
                self.expected
            ));
        }
        if self.expected == 0 {
            self.first_ns = now;
        }
        self.last_ns = now;
        self.expected += 1;
        self.latencies_us
            .push(now.saturating_sub(sent) as f64 / 1000.0);
    }

    /// "first_ns last_ns p50_us p99_us max_us"
    fn report(mut self) -> String {
        self.latencies_us.sort_by(f64::total_cmp);
        let at = |q: f64| {
            self.latencies_us
                .get(((self.latencies_us.len().max(1) - 1) as f64 * q) as usize)
                .copied()
                .unwrap_or(0.0)
        };
        format!(
            "{} {} {:.1} {:.1} {:.1}",
            self.first_ns,
            self.last_ns,
            at(0.5),
            at(0.99),
            at(1.0)
        )
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

// --- child processes ---------------------------------------------------------------------

/// fdcast receiver: a socketpair subscribed (RAW) through its own registry and broker
/// connection. Prints "ready", then the checker's report, its broker's `received` and the
/// bytes its broker connection received.
fn receiver(url: &str, name: &str, messages: u64, size: usize) {
    let registry = Registry::new().unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    theirs.set_nonblocking(true).unwrap();
    // Subscribed before the broker is enabled: enable returns once the subscription is in
    // effect on the engine, so nothing published after "ready" is missed.
    registry
        .subscribe(TOPIC.as_bytes(), ours.as_raw_fd(), Mode::Raw)
        .unwrap();
    registry
        .broker_enable(url, name)
        .unwrap_or_else(|e| fail(&format!("receiver: broker_enable: {e}")));
    // This process reads everything: a burst must queue, not be dropped at the default
    // outbox limit (1 MiB).
    registry.set_outbox_limit(1 << 30);
    let bytes_before = tcp_bytes_received();
    say("ready");
    let mut checker = Checker::new(messages, size);
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut progress = Instant::now();
    while checker.expected < messages {
        registry.dispatch(Some(Duration::from_millis(2))).unwrap();
        let mut got = false;
        loop {
            match (&theirs).read(&mut buf) {
                Ok(n) if n > 0 => {
                    pending.extend_from_slice(&buf[..n]);
                    got = true;
                }
                _ => break,
            }
        }
        let now = monotonic_ns();
        let whole = pending.len() / size * size;
        for record in pending[..whole].chunks_exact(size) {
            checker.take(record, now);
        }
        pending.drain(..whole);
        if got {
            progress = Instant::now();
        } else if progress.elapsed() > STALL {
            fail(&format!(
                "receiver: {} of {messages} messages, then nothing for {STALL:?} ({:?})",
                checker.expected,
                registry.broker_stats()
            ));
        }
    }
    let received = registry.broker_stats().received;
    let bytes = tcp_bytes_received() - bytes_before;
    say(&format!("{} {received} {bytes}", checker.report()));
}

/// A plain Redis or NATS subscriber, no fdcast: prints "ready", then what `receiver` prints.
fn plain_sub(engine: &str, url: &str, name: &str, messages: u64, size: usize) {
    let mut stream = connect(url);
    let subject = subject(engine, name);
    let mut input = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    match engine {
        "redis" => {
            stream
                .write_all(&resp_command(&[b"SUBSCRIBE", subject.as_bytes()]))
                .unwrap();
            // The confirmation: *3 subscribe <channel> :1
            loop {
                if let Some((_, used)) = resp_array(&input) {
                    input.drain(..used);
                    break;
                }
                read_more(&mut stream, &mut input, &mut buf);
            }
        }
        _ => {
            nats_handshake(&mut stream, &mut input, &mut buf);
            stream
                .write_all(format!("SUB {subject} 1\r\nPING\r\n").as_bytes())
                .unwrap();
            wait_pong(&mut stream, &mut input, &mut buf);
        }
    }
    let bytes_before = tcp_bytes_received();
    say("ready");
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut checker = Checker::new(messages, size);
    let mut progress = Instant::now();
    while checker.expected < messages {
        match stream.read(&mut buf) {
            Ok(0) => fail("plain subscriber: the server closed the connection"),
            Ok(n) => {
                input.extend_from_slice(&buf[..n]);
                progress = Instant::now();
            }
            Err(_) if progress.elapsed() > STALL => fail(&format!(
                "plain subscriber: {} of {messages} messages, then nothing for {STALL:?}",
                checker.expected
            )),
            Err(_) => continue,
        }
        let now = monotonic_ns();
        let mut at = 0;
        if engine == "redis" {
            while let Some((items, used)) = resp_array(&input[at..]) {
                let base = at;
                at += used;
                if items.len() == 3
                    && &input[base + items[0].start..base + items[0].end] == b"message"
                {
                    checker.take(&input[base + items[2].start..base + items[2].end], now);
                }
            }
        } else {
            while let Some((payload, used)) = nats_frame(&input[at..]) {
                let base = at;
                at += used;
                match payload {
                    NatsFrame::Msg(range) => {
                        checker.take(&input[base + range.start..base + range.end], now)
                    }
                    NatsFrame::Ping => stream.write_all(b"PONG\r\n").unwrap(),
                    NatsFrame::Other => {}
                }
            }
        }
        input.drain(..at);
    }
    let bytes = tcp_bytes_received() - bytes_before;
    say(&format!("{} 0 {bytes}", checker.report()));
}

/// fdcast registry subscribed only to another topic; dispatches until stdin says stop (or
/// closes), then prints its broker's `received` and the bytes its broker connection received.
fn bystander(url: &str, name: &str) {
    let registry = Registry::new().unwrap();
    let (ours, _theirs) = UnixStream::pair().unwrap();
    registry
        .subscribe(OTHER_TOPIC.as_bytes(), ours.as_raw_fd(), Mode::Raw)
        .unwrap();
    registry
        .broker_enable(url, name)
        .unwrap_or_else(|e| fail(&format!("bystander: broker_enable: {e}")));
    let bytes_before = tcp_bytes_received();
    let received_before = registry.broker_stats().received;
    let stop = Arc::new(AtomicBool::new(false));
    let stop_reader = Arc::clone(&stop);
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        stop_reader.store(true, Ordering::Release);
    });
    say("ready");
    while !stop.load(Ordering::Acquire) {
        registry.dispatch(Some(Duration::from_millis(5))).unwrap();
    }
    // What is still on its way: until the connection is quiet for 100 ms (at most 2 s).
    let until = Instant::now() + Duration::from_secs(2);
    let mut last = (registry.broker_stats().received, tcp_bytes_received());
    let mut quiet_since = Instant::now();
    while Instant::now() < until && quiet_since.elapsed() < Duration::from_millis(100) {
        registry.dispatch(Some(Duration::from_millis(10))).unwrap();
        let now = (registry.broker_stats().received, tcp_bytes_received());
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
    }
    say(&format!(
        "{} {}",
        last.0 - received_before,
        last.1 - bytes_before
    ));
}

// --- plain clients: Redis (RESP2) and NATS ---------------------------------------------

fn host_port(url: &str, default_port: u16) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, rest)| rest);
    let hostport = rest.split('/').next().unwrap_or(rest);
    if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:{default_port}")
    }
}

fn connect(url: &str) -> TcpStream {
    let port = if url.starts_with("redis") { 6379 } else { 4222 };
    let stream = TcpStream::connect(host_port(url, port))
        .unwrap_or_else(|e| fail(&format!("plain client: connect {url}: {e}")));
    stream.set_nodelay(true).unwrap();
    stream
}

/// The Redis channel or NATS subject fdcast uses for TOPIC under `name` (src/broker/topic.rs).
fn subject(engine: &str, name: &str) -> String {
    if engine == "redis" {
        format!("{name}{TOPIC}")
    } else {
        format!("{name}.{TOPIC}")
    }
}

fn read_more(stream: &mut TcpStream, input: &mut Vec<u8>, buf: &mut [u8]) {
    match stream.read(buf) {
        Ok(0) => fail("plain client: the server closed the connection"),
        Ok(n) => input.extend_from_slice(&buf[..n]),
        Err(e) => fail(&format!("plain client: read: {e}")),
    }
}

fn resp_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn line_end(input: &[u8]) -> Option<usize> {
    input.windows(2).position(|w| w == b"\r\n")
}

fn number(bytes: &[u8]) -> usize {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| fail("plain client: bad length in a reply"))
}

/// One RESP2 array of bulk strings and integers at the front of `input`: the items' ranges
/// and the bytes used; `None` while incomplete.
fn resp_array(input: &[u8]) -> Option<(Vec<std::ops::Range<usize>>, usize)> {
    let end = line_end(input)?;
    if input[0] != b'*' {
        fail(&format!(
            "plain client: unexpected reply {:?}",
            String::from_utf8_lossy(&input[..end])
        ));
    }
    let count = number(&input[1..end]);
    let mut at = end + 2;
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        let end = at + line_end(&input[at..])?;
        match input[at] {
            b'$' => {
                let len = number(&input[at + 1..end]);
                let start = end + 2;
                if input.len() < start + len + 2 {
                    return None;
                }
                items.push(start..start + len);
                at = start + len + 2;
            }
            _ => {
                items.push(at + 1..end);
                at = end + 2;
            }
        }
    }
    Some((items, at))
}

enum NatsFrame {
    Msg(std::ops::Range<usize>),
    Ping,
    Other,
}

/// One NATS server frame at the front of `input`, and the bytes used; `None` while incomplete.
fn nats_frame(input: &[u8]) -> Option<(NatsFrame, usize)> {
    let end = line_end(input)?;
    let line = &input[..end];
    if let Some(rest) = line.strip_prefix(b"MSG ") {
        let len = number(rest.rsplit(|&b| b == b' ').next().unwrap_or_default());
        let start = end + 2;
        if input.len() < start + len + 2 {
            return None;
        }
        return Some((NatsFrame::Msg(start..start + len), start + len + 2));
    }
    if line == b"PING" {
        return Some((NatsFrame::Ping, end + 2));
    }
    if line.starts_with(b"-ERR") {
        fail(&format!(
            "plain NATS client: {}",
            String::from_utf8_lossy(line)
        ));
    }
    Some((NatsFrame::Other, end + 2))
}

fn nats_handshake(stream: &mut TcpStream, input: &mut Vec<u8>, buf: &mut [u8]) {
    while line_end(input).is_none() {
        read_more(stream, input, buf);
    }
    let end = line_end(input).unwrap();
    input.drain(..end + 2);
    stream
        .write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false}\r\n")
        .unwrap();
}

fn wait_pong(stream: &mut TcpStream, input: &mut Vec<u8>, buf: &mut [u8]) {
    stream.write_all(b"PING\r\n").unwrap();
    loop {
        while let Some((frame, used)) = nats_frame(input) {
            let pong = &input[..used] == b"PONG\r\n";
            if matches!(frame, NatsFrame::Ping) {
                stream.write_all(b"PONG\r\n").unwrap();
            }
            input.drain(..used);
            if pong {
                return;
            }
        }
        read_more(stream, input, buf);
    }
}

/// Plain Redis publisher: PUBLISH pipelined in batches of 256, at most two batches
/// unanswered. Returns when every PUBLISH is answered.
fn plain_redis_publish(url: &str, name: &str, messages: u64, size: usize) -> u64 {
    const BATCH: u64 = 256;
    let mut stream = connect(url);
    let channel = subject("redis", name);
    let mut buf = vec![0u8; 1 << 16];
    let (mut sent, mut answered) = (0u64, 0u64);
    let mut out = Vec::new();
    let start_ns = monotonic_ns();
    while answered < messages {
        if sent < messages && sent - answered < 2 * BATCH {
            out.clear();
            for seq in sent..(sent + BATCH).min(messages) {
                out.extend_from_slice(&resp_command(&[
                    b"PUBLISH",
                    channel.as_bytes(),
                    &message(seq, size),
                ]));
            }
            stream.write_all(&out).unwrap();
            sent = (sent + BATCH).min(messages);
            continue;
        }
        let n = stream.read(&mut buf).unwrap();
        if n == 0 {
            fail("plain Redis publisher: the server closed the connection");
        }
        if buf[..n].contains(&b'-') {
            fail("plain Redis publisher: an error reply");
        }
        // Every reply is one `:<receivers>\r\n` line.
        answered += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
    }
    start_ns
}

/// Plain NATS publisher: `PUB` commands written in writes of about 64 KiB, then a PING whose
/// PONG says the server has taken them all.
fn plain_nats_publish(url: &str, name: &str, messages: u64, size: usize) -> u64 {
    let mut stream = connect(url);
    let mut input = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    nats_handshake(&mut stream, &mut input, &mut buf);
    wait_pong(&mut stream, &mut input, &mut buf);
    let header = format!("PUB {} {size}\r\n", subject("nats", name));
    let mut out = Vec::with_capacity(1 << 17);
    let start_ns = monotonic_ns();
    for seq in 0..messages {
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&message(seq, size));
        out.extend_from_slice(b"\r\n");
        if out.len() >= 1 << 16 {
            stream.write_all(&out).unwrap();
            out.clear();
        }
    }
    stream.write_all(&out).unwrap();
    wait_pong(&mut stream, &mut input, &mut buf);
    start_ns
}

// --- the old PostgreSQL design, through libpq --------------------------------------------

/// The publisher of fdcast's first PostgreSQL backend: LISTEN on the channel (it was a
/// registry, which hears its own notifications and ignores them), non-blocking pipeline mode,
/// one `SELECT pg_notify($1, $2)` and one pipeline sync (its own transaction) per publish, at
/// most WINDOW unconfirmed. Returns when every sync has come back.
fn old_pg_publish(url: &str, channel: &str, messages: u64, size: usize) -> u64 {
    use pq_sys::*;
    let conninfo = CString::new(url).unwrap();
    let channel = CString::new(channel).unwrap();
    let sql = c"SELECT pg_notify($1, $2)";
    // SAFETY: every call below gets the live PGconn from PQconnectdb (finished once at the
    // end) and NUL-terminated strings that outlive the call; results are cleared once and
    // notifications freed once, after being read.
    unsafe {
        let conn = PQconnectdb(conninfo.as_ptr());
        let error = |conn: *mut PGconn| -> String {
            CStr::from_ptr(PQerrorMessage(conn))
                .to_string_lossy()
                .into_owned()
        };
        if PQstatus(conn) != ConnStatusType::CONNECTION_OK {
            fail(&format!("old PostgreSQL publisher: {}", error(conn)));
        }
        let listen = CString::new(format!("LISTEN \"{}\"", channel.to_str().unwrap())).unwrap();
        let result = PQexec(conn, listen.as_ptr());
        if PQresultStatus(result) != ExecStatusType::PGRES_COMMAND_OK {
            fail(&format!(
                "old PostgreSQL publisher: LISTEN: {}",
                error(conn)
            ));
        }
        PQclear(result);
        if PQsetnonblocking(conn, 1) != 0 || PQenterPipelineMode(conn) != 1 {
            fail(&format!("old PostgreSQL publisher: {}", error(conn)));
        }
        let (mut sent, mut confirmed) = (0u64, 0u64);
        let batch: u64 = std::env::var("BROKER_BENCH_PG_BATCH")
            .ok()
            .and_then(|b| b.parse().ok())
            .unwrap_or(1);
        let start_ns = monotonic_ns();
        while confirmed < messages {
            while sent < messages && sent - confirmed < WINDOW {
                let mut notification = format!("{}:{TOPIC}", TOPIC.len()).into_bytes();
                notification.extend_from_slice(&message(sent, size));
                let notification = CString::new(notification).unwrap();
                let values: [*const c_char; 2] = [channel.as_ptr(), notification.as_ptr()];
                if PQsendQueryParams(
                    conn,
                    sql.as_ptr(),
                    2,
                    std::ptr::null(),
                    values.as_ptr(),
                    std::ptr::null(),
                    std::ptr::null(),
                    0,
                ) != 1
                    || ((sent + 1) % batch == 0 || sent + 1 == messages)
                        && PQsendPipelineSync(conn) != 1
                {
                    fail(&format!("old PostgreSQL publisher: {}", error(conn)));
                }
                sent += 1;
                if sent % 64 == 0 {
                    break;
                }
            }
            if PQflush(conn) < 0 {
                fail(&format!("old PostgreSQL publisher: {}", error(conn)));
            }
            let window_full = sent == messages || sent - confirmed >= WINDOW;
            if window_full {
                // Wait for the server (it may also be waiting to write to us).
                let mut pollfd = libc::pollfd {
                    fd: PQsocket(conn),
                    events: libc::POLLIN,
                    revents: 0,
                };
                libc::poll(&mut pollfd, 1, 10);
            }
            if PQconsumeInput(conn) != 1 {
                fail(&format!("old PostgreSQL publisher: {}", error(conn)));
            }
            let mut nulls = 0;
            while confirmed < sent && PQisBusy(conn) == 0 && nulls < 2 {
                let result = PQgetResult(conn);
                if result.is_null() {
                    nulls += 1;
                    continue;
                }
                nulls = 0;
                match PQresultStatus(result) {
                    ExecStatusType::PGRES_PIPELINE_SYNC => {
                        confirmed = (confirmed + batch).min(sent)
                    }
                    ExecStatusType::PGRES_TUPLES_OK => {}
                    _ => fail(&format!(
                        "old PostgreSQL publisher: {}",
                        CStr::from_ptr(PQresultErrorMessage(result)).to_string_lossy()
                    )),
                }
                PQclear(result);
            }
            loop {
                let notify = PQnotifies(conn);
                if notify.is_null() {
                    break;
                }
                PQfreemem(notify.cast());
            }
        }
        PQfinish(conn);
        start_ns
    }
}

// --- fdcast publisher --------------------------------------------------------------------

/// Publishes `messages` through a fresh registry and broker connection, `rate` per second
/// (0: as fast as the window allows). Returns when the engine has taken every publish
/// (`published`: confirmed by PostgreSQL and Redis, written for NATS).
fn fdcast_publish(url: &str, name: &str, messages: u64, size: usize, rate: u64) -> u64 {
    let registry = Registry::new().unwrap();
    registry
        .broker_enable(url, name)
        .unwrap_or_else(|e| fail(&format!("publisher: broker_enable: {e}")));
    let start = Instant::now();
    let start_ns = monotonic_ns();
    for seq in 0..messages {
        if rate > 0 {
            let due = start + Duration::from_secs_f64(seq as f64 / rate as f64);
            loop {
                let now = Instant::now();
                if now >= due {
                    break;
                }
                registry
                    .dispatch(Some((due - now).min(Duration::from_micros(200))))
                    .unwrap();
            }
        }
        registry
            .publish(TOPIC.as_bytes(), &message(seq, size))
            .unwrap();
        if seq % 64 == 63 {
            registry.dispatch(Some(Duration::ZERO)).unwrap();
            while registry.broker_stats().queued > WINDOW {
                registry.dispatch(Some(Duration::from_millis(1))).unwrap();
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while registry.broker_stats().published < messages {
        registry.dispatch(Some(Duration::from_millis(1))).unwrap();
        let stats = registry.broker_stats();
        if stats.dropped > 0 || Instant::now() > deadline {
            fail(&format!("publisher: not all published: {stats:?}"));
        }
    }
    if std::env::var_os("BROKER_BENCH_VERBOSE").is_some() {
        eprintln!(
            "publisher: {messages} x {size} B published in {:.3} s",
            start.elapsed().as_secs_f64()
        );
    }
    registry.broker_disable();
    start_ns
}

// --- the runs ----------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Publisher {
    Fdcast,
    Plain,
}

#[derive(Clone, Copy, PartialEq)]
enum Subscriber {
    Fdcast,
    Plain,
}

struct Engine {
    key: &'static str,
    label: &'static str,
    url: String,
}

struct Outcome {
    /// Messages per second from the first publish to the last message read by the receiver.
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    /// The receiver's broker connection: bytes received.
    receiver_bytes: u64,
    /// The bystander's broker `received` and bytes, when there was one.
    bystander: Option<(u64, u64)>,
}

fn spawn(args: &[&str]) -> (Child, std::io::Lines<BufReader<std::process::ChildStdout>>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("child starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    match lines.next() {
        Some(Ok(line)) if line == "ready" => {}
        _ => fail(&format!("{} did not start", args[0])),
    }
    (child, lines)
}

fn finish(
    mut child: Child,
    lines: &mut std::io::Lines<BufReader<std::process::ChildStdout>>,
) -> Vec<f64> {
    let report = match lines.next() {
        Some(Ok(line)) => line,
        _ => String::new(),
    };
    if !child.wait().unwrap().success() || report.is_empty() {
        fail("a receiving process failed (see above)");
    }
    report
        .split_whitespace()
        .map(|f| f.parse::<f64>().unwrap())
        .collect()
}

static RUN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One run: a receiving process (and a bystander if asked), `messages` published from here.
fn run(
    engine: &Engine,
    publisher: Publisher,
    subscriber: Subscriber,
    messages: u64,
    size: usize,
    rate: u64,
    with_bystander: bool,
) -> Outcome {
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let name = match engine.key {
        "pg" => format!("fdcast_bench_{}_{run}", std::process::id()),
        "redis" => format!("fdcast_bench:{}:{run}:", std::process::id()),
        _ => format!("fdcast_bench.{}.{run}", std::process::id()),
    };
    let (n, s) = (messages.to_string(), size.to_string());
    let role = match subscriber {
        Subscriber::Fdcast => "receiver",
        Subscriber::Plain => "plain-sub",
    };
    let (child, mut lines) = spawn(&[role, engine.key, &engine.url, &name, &n, &s]);
    let mut bystander = with_bystander.then(|| spawn(&["bystander", &engine.url, &name]));
    let start_ns = match (publisher, engine.key) {
        (Publisher::Fdcast, _) => fdcast_publish(&engine.url, &name, messages, size, rate),
        (Publisher::Plain, "pg") => old_pg_publish(&engine.url, &name, messages, size),
        (Publisher::Plain, "redis") => plain_redis_publish(&engine.url, &name, messages, size),
        (Publisher::Plain, _) => plain_nats_publish(&engine.url, &name, messages, size),
    };
    let report = finish(child, &mut lines);
    let bystander = bystander.take().map(|(mut child, mut lines)| {
        let mut stdin: ChildStdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(b"stop\n");
        drop(stdin);
        let numbers = finish(child, &mut lines);
        (numbers[0] as u64, numbers[1] as u64)
    });
    let last_ns = report[1];
    Outcome {
        rate: messages as f64 / ((last_ns - start_ns as f64).max(1.0) / 1e9),
        p50_us: report[2],
        p99_us: report[3],
        max_us: report[4],
        receiver_bytes: report[6] as u64,
        bystander,
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn reachable(engine: &Engine) -> bool {
    let registry = Registry::new().unwrap();
    let name = match engine.key {
        "pg" => "fdcast_bench_probe",
        "redis" => "fdcast_bench_probe:",
        _ => "fdcast_bench_probe",
    };
    match registry.broker_enable(&engine.url, name) {
        Ok(()) => {
            registry.broker_disable();
            true
        }
        Err(e) => {
            eprintln!("broker_bench: {} skipped: {e}", engine.label);
            false
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or_default();
    match arg(1) {
        "receiver" => {
            return receiver(
                arg(3),
                arg(4),
                arg(5).parse().unwrap(),
                arg(6).parse().unwrap(),
            );
        }
        "plain-sub" => {
            return plain_sub(
                arg(2),
                arg(3),
                arg(4),
                arg(5).parse().unwrap(),
                arg(6).parse().unwrap(),
            );
        }
        "bystander" => return bystander(arg(2), arg(3)),
        "" | "--quick" => {}
        _ => {
            eprintln!("usage: broker_bench [--quick]");
            std::process::exit(2);
        }
    }
    let quick = arg(1) == "--quick";
    let engines = [
        Engine {
            key: "pg",
            label: "PostgreSQL",
            url: env_url("FDCAST_PG_URL", "postgresql://127.0.0.1:5432/test"),
        },
        Engine {
            key: "redis",
            label: "Redis",
            url: env_url("FDCAST_REDIS_URL", "redis://127.0.0.1:6379"),
        },
        Engine {
            key: "nats",
            label: "NATS",
            url: env_url("FDCAST_NATS_URL", "nats://127.0.0.1:4222"),
        },
    ];
    // BROKER_BENCH_ENGINES=pg,redis: only those.
    let only = std::env::var("BROKER_BENCH_ENGINES").unwrap_or_default();
    let (engines, skipped): (Vec<&Engine>, Vec<&Engine>) = engines
        .iter()
        .filter(|e| only.is_empty() || only.split(',').any(|k| k == e.key))
        .partition(|e| reachable(e));
    let reps = if quick { 1 } else { 3 };
    let sizes = [64usize, 1024];
    // Messages per run: under a second for each contender on a quiet 2-core machine.
    let messages = |engine: &str, publisher: Publisher, size: usize| -> u64 {
        let full: u64 = match (engine, publisher) {
            ("pg", Publisher::Plain) => 8_000,
            ("pg", Publisher::Fdcast) if size > 64 => 30_000,
            ("pg", Publisher::Fdcast) => 60_000,
            (_, _) if size > 64 => 30_000,
            _ => 100_000,
        };
        if quick { full / 10 } else { full }
    };

    say("## 7. Cross-process through PostgreSQL, Redis and NATS (bench/brokers.rs)\n");
    say(&format!(
        "One publisher process, one receiving process, each with its own connection to the local \
         server; every message checked at the receiver (once, in order). Rates: messages from \
         the first publish to the last message read by the receiver, median of {reps} \
         alternating run(s). Plain clients: Redis — PUBLISH pipelined 256 per write over TCP \
         into a plain SUBSCRIBE connection; NATS — `PUB` in 64 KiB writes into a plain `SUB` \
         connection; PostgreSQL — the old design (one `SELECT pg_notify` transaction per \
         publish, libpq pipeline) into the same fdcast receiver.\n"
    ));
    for engine in &skipped {
        say(&format!(
            "**{} skipped**: its server did not answer (see stderr).\n",
            engine.label
        ));
    }
    say("### 7.1 Publish throughput\n");
    say(
        "| engine | payload | messages | fdcast → fdcast msgs/s | plain pub → fdcast sub msgs/s \
         | plain → plain msgs/s | fdcast / plain |",
    );
    say("|---|---|---|---|---|---|---|");
    let mut routing: Vec<(String, u64, (u64, u64), u64)> = Vec::new();
    for engine in &engines {
        for &size in &sizes {
            let (n_fdcast, n_plain) = (
                messages(engine.key, Publisher::Fdcast, size),
                messages(engine.key, Publisher::Plain, size),
            );
            // PostgreSQL's plain publisher (the old design) feeds the fdcast receiver; Redis's
            // and NATS's feed both a plain subscriber and the fdcast receiver.
            let plain_to_plain = engine.key != "pg";
            let (mut fdcast, mut mixed, mut plain) = (Vec::new(), Vec::new(), Vec::new());
            for rep in 0..reps {
                let bystander = rep == 0 && size == 64;
                let outcome = run(
                    engine,
                    Publisher::Fdcast,
                    Subscriber::Fdcast,
                    n_fdcast,
                    size,
                    0,
                    bystander,
                );
                if let Some(b) = outcome.bystander {
                    routing.push((
                        engine.label.to_string(),
                        n_fdcast,
                        b,
                        outcome.receiver_bytes,
                    ));
                }
                fdcast.push(outcome.rate);
                let run_plain = |subscriber| {
                    run(
                        engine,
                        Publisher::Plain,
                        subscriber,
                        n_plain,
                        size,
                        0,
                        false,
                    )
                    .rate
                };
                mixed.push(run_plain(Subscriber::Fdcast));
                if plain_to_plain {
                    plain.push(run_plain(Subscriber::Plain));
                }
            }
            let (f, m) = (median(fdcast), median(mixed));
            let (p, p_text) = if plain_to_plain {
                let p = median(plain);
                (p, format!("{p:.0}"))
            } else {
                (m, "–".to_string())
            };
            let messages = if n_fdcast == n_plain {
                n_fdcast.to_string()
            } else {
                format!("{n_fdcast} / {n_plain}")
            };
            let mark = match engine.key {
                "pg" if f / p >= 5.0 => " ✓",
                "pg" => " ✗",
                _ => "",
            };
            say(&format!(
                "| {} | {size} B | {messages} | {f:.0} | {m:.0} | {p_text} | {:.2}{mark} |",
                engine.label,
                f / p,
            ));
        }
    }
    say(
        "\nPostgreSQL: the plain publisher is the old design (one transaction per publish), into \
         the fdcast receiver; fdcast / plain is batched / old (target ≥ 5, ✓/✗). Redis, NATS: \
         fdcast / plain is fdcast → fdcast against plain → plain; the middle column (plain \
         publisher into the fdcast receiver) shows which side limits fdcast.\n",
    );

    let (rate, n_latency) = (2_000u64, if quick { 1_000 } else { 4_000 });
    say(&format!(
        "### 7.2 Latency at {rate} publishes/s\n\n`publish` in this process to the bytes read \
         from the receiver's socket in another (64-byte payloads, {n_latency} messages).\n"
    ));
    say("| engine | p50 µs | p99 µs | max µs |");
    say("|---|---|---|---|");
    for engine in &engines {
        let o = run(
            engine,
            Publisher::Fdcast,
            Subscriber::Fdcast,
            n_latency,
            64,
            rate,
            false,
        );
        say(&format!(
            "| {} | {:.0} | {:.0} | {:.0} |",
            engine.label, o.p50_us, o.p99_us, o.max_us
        ));
    }

    say(
        "\n### 7.3 Interest routing\n\nDuring the first 64-byte fdcast run, a third process \
         connected to the same broker, subscribed only to another topic: what it received \
         (`broker_stats().received`, and bytes on its broker connection from TCP_INFO), next \
         to the subscribed receiver's bytes.\n",
    );
    say(
        "| engine | published | bystander received | bystander bytes | bystander bytes / message | receiver bytes / message |",
    );
    say("|---|---|---|---|---|---|");
    for (label, n, (received, bytes), receiver_bytes) in routing {
        say(&format!(
            "| {label} | {n} | {received} | {bytes} | {:.1} | {:.1} |",
            bytes as f64 / n as f64,
            receiver_bytes as f64 / n as f64
        ));
    }
    let mut load = [0f64; 3];
    // SAFETY: getloadavg writes at most 3 doubles into the array it is given.
    let got = unsafe { libc::getloadavg(load.as_mut_ptr(), 3) };
    say(&format!(
        "\nMachine: {} CPUs, shared with other jobs (numbers are noisy); load average at the end \
         {}.",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if got == 3 {
            format!("{:.1}, {:.1}, {:.1}", load[0], load[1], load[2])
        } else {
            "unknown".to_string()
        }
    ));
}
