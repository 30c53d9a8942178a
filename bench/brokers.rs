//! Cross-process fan-out through each broker engine (PostgreSQL LISTEN/NOTIFY, Redis pub/sub,
//! Redis Cluster sharded pub/sub, NATS core), against a baseline publisher of the same engine,
//! in one run.
//!
//! `cargo run --release --example broker_bench -- [--quick]` prints markdown tables:
//! 1. sustained publishes/s from one publisher process to two receiving processes, each with
//!    100 local subscribers (socketpairs whose other ends a thread reads), 64-byte and 1 KiB
//!    payloads: fdcast's publisher against each baseline, feeding the same receivers. Redis:
//!    `redis-benchmark -c 1 -P 16 … PUBLISH` (redis-tools) and a plain client pipelining
//!    PUBLISH 256 per write; NATS: a bare publisher writing `PUB` in 64 KiB writes;
//!    PostgreSQL: fdcast's first design, one `SELECT pg_notify($1, $2)` transaction per
//!    publish through libpq's pipeline; Redis Cluster: a plain client pipelining SPUBLISH
//!    to the primary owning each channel's slot, one connection per primary, on one topic
//!    and on 6 topics spread over the 3 primaries (each socket subscribed to one of them).
//!    Ratios against the targets (Redis, Redis Cluster, NATS ≥ 0.8×, PostgreSQL ≥ 5×) on the
//!    sustained rate, the one that reaches the receivers; the publisher's burst rate (how fast
//!    the server took the messages in) is shown beside it;
//! 2. latency from `publish` in this process to the bytes on each socket in the others at
//!    10,000 publishes/s (CLOCK_MONOTONIC, which every process shares; target p99 ≤ 2 ms for
//!    Redis and NATS);
//! 3. interest routing: what a third process, connected to the same broker but subscribed
//!    only to another topic, received meanwhile (`broker_stats().received`, and the bytes its
//!    broker connection received, from the socket's TCP_INFO);
//! 4. shared history (Redis streams, NATS JetStream): fdcast's 64-byte runs of part 1 with
//!    history on in every process (`set_history` before `broker_enable`, max_messages
//!    [`HISTORY_MESSAGES`], above the run's burst: JetStream discards a topic's oldest message
//!    at its limit whether or not a consumer delivered it), alternating with the same runs
//!    with history off; the ratio on / off. The history's Redis stream or JetStream stream is
//!    deleted after each run (its absence fails the bench: history was not shared), so runs
//!    stay alike and nothing piles up on the server.
//!
//! Every receiver checks that each message arrived once, in order, on every socket (from
//! redis-benchmark, whose payloads are all alike: their count and size); a miss makes the
//! program exit 1 (never a time). Servers: FDCAST_PG_URL (default
//! postgresql://127.0.0.1:5432/test), FDCAST_REDIS_URL (redis://127.0.0.1:6379; a
//! `user:password@` and a `/db` in it reach the baselines too: redis-benchmark's `-a`,
//! `--user` and `--dbnum`, the plain client's AUTH and SELECT),
//! FDCAST_NATS_URL (nats://127.0.0.1:4222); an engine whose server is down is skipped with a
//! note. Redis Cluster: three primaries of the bench's own (`redis-server --cluster-enabled
//! yes` on free ports, joined by `redis-cli --cluster create`), stopped when it ends or dies;
//! failing to start them fails the bench.
//!
//! Knobs: BROKER_BENCH_ENGINES=pg,redis runs only those (keys pg, redis, cluster, nats); BROKER_BENCH_VERBOSE=1 prints the
//! publishers' own time, and their CPU time; BROKER_BENCH_PG_BATCH=n makes the old PostgreSQL publisher sync
//! every n publishes instead of every one (what batching alone buys, without fdcast).
//!
//! Roles (this binary runs itself as the other processes):
//! `receiver URL NAME N SIZE SUBSCRIBERS ordered|timed|counted TOPIC[,TOPIC…] [history]`
//! (fdcast), `bystander URL NAME` (fdcast, subscribed to another topic until stdin says stop);
//! and, to profile a publisher alone (`perf record -g broker_bench publish …`, no receivers),
//! `publish URL NAME N SIZE [history]` (fdcast's, any engine; with history, the stream it
//! fills stays on the server) and `publish-bare URL NAME N SIZE` (the bare NATS publisher).

use std::ffi::{CStr, CString, c_char, c_int};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fdcast::{HistoryLimits, Mode, Registry};

/// The topic every benchmark publishes on.
const TOPIC: &str = "bench";
/// The topic the bystander subscribes to (nobody publishes on it).
const OTHER_TOPIC: &str = "other";
/// Publishes an fdcast publisher lets queue (unsent or unconfirmed) before it waits.
const WINDOW: u64 = 16_384;
/// Payload bytes the publishers write, or publish, between two looks at the server's answers.
const PUBLISHED_PER_TURN: u64 = 64 << 10;
/// A receiver that gets nothing for this long gives up: a message was lost.
const STALL: Duration = Duration::from_secs(10);
/// max_messages of the history runs (part 4): the per-topic limit of the Redis stream
/// (`MAXLEN ~`) and of the JetStream stream (`max_msgs_per_subject`). Every run publishes
/// fewer on its topic, so JetStream never discards one a consumer has not delivered yet.
const HISTORY_MESSAGES: usize = 100_000;

/// Turns history on with [`HISTORY_MESSAGES`] (before `broker_enable`: enabling then makes
/// the broker share it).
fn history_on(registry: &Registry) {
    registry.set_history(HistoryLimits {
        max_messages: HISTORY_MESSAGES,
        ..HistoryLimits::default()
    });
}

fn env_url(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.into())
}

fn fail(message: &str) -> ! {
    eprintln!("broker_bench: FAILED: {message}");
    if let Some(dir) = CLUSTER_DIR.lock().ok().and_then(|mut dir| dir.take()) {
        let _ = std::fs::remove_dir_all(dir);
    }
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

/// CPU time of the calling thread in nanoseconds (user and system).
fn thread_cpu_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the pointer it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
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

/// Publish `i` of a run over `topics` topics goes to topic `i % topics`, as that topic's
/// message `i / topics`: each topic's messages are numbered from 0. How many topic `topic`
/// gets of `messages`:
fn messages_on(topic: usize, topics: usize, messages: u64) -> u64 {
    (messages + (topics - 1 - topic) as u64) / topics as u64
}

/// Checks one socket's messages: once, in order (or, from a publisher whose payloads carry no
/// sequence, only their size), and times them when asked.
struct Checker {
    expected: u64,
    size: usize,
    ordered: bool,
    timed: bool,
    /// The start of a record whose end has not been read yet.
    partial: Vec<u8>,
    latencies_us: Vec<f64>,
    first_ns: u64,
    last_ns: u64,
}

impl Checker {
    fn new(messages: u64, size: usize, ordered: bool, timed: bool) -> Checker {
        Checker {
            expected: 0,
            size,
            ordered,
            timed,
            partial: Vec::new(),
            latencies_us: Vec::with_capacity(if timed { messages as usize } else { 0 }),
            first_ns: 0,
            last_ns: 0,
        }
    }

    /// Checks the records in `bytes`, read from the socket at `now`, after what is left of
    /// the last read; returns how many it completed.
    fn feed(&mut self, mut bytes: &[u8], now: u64) -> u64 {
        let before = self.expected;
        if !self.partial.is_empty() {
            let missing = (self.size - self.partial.len()).min(bytes.len());
            self.partial.extend_from_slice(&bytes[..missing]);
            bytes = &bytes[missing..];
            if self.partial.len() < self.size {
                return 0;
            }
            let record = std::mem::take(&mut self.partial);
            self.take(&record, now);
            self.partial = record;
            self.partial.clear();
        }
        let whole = bytes.len() / self.size * self.size;
        for record in bytes[..whole].chunks_exact(self.size) {
            self.take(record, now);
        }
        self.partial.extend_from_slice(&bytes[whole..]);
        self.expected - before
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
        if self.ordered {
            let field = |range: std::ops::Range<usize>| -> u64 {
                payload[range]
                    .iter()
                    .try_fold(0u64, |n, &digit| {
                        digit
                            .is_ascii_digit()
                            .then(|| n * 10 + u64::from(digit - b'0'))
                    })
                    .unwrap_or_else(|| fail("a message is not in the benchmark's format"))
            };
            let seq = field(0..10);
            if seq != self.expected {
                fail(&format!(
                    "expected message {}, got {seq}: lost, duplicated or out of order",
                    self.expected
                ));
            }
            if self.timed {
                let sent = field(11..31);
                self.latencies_us
                    .push(now.saturating_sub(sent) as f64 / 1000.0);
            }
        }
        if self.expected == 0 {
            self.first_ns = now;
        }
        self.last_ns = now;
        self.expected += 1;
    }
}

/// "first_ns last_ns p50_us p99_us max_us" over every socket's checker: the first message
/// read on any socket, the last one, and the latencies of every message on every socket.
fn report(checkers: Vec<Checker>) -> String {
    let first_ns = checkers.iter().map(|c| c.first_ns).min().unwrap_or(0);
    let last_ns = checkers.iter().map(|c| c.last_ns).max().unwrap_or(0);
    let mut latencies_us: Vec<f64> = checkers.into_iter().flat_map(|c| c.latencies_us).collect();
    latencies_us.sort_by(f64::total_cmp);
    let at = |q: f64| {
        latencies_us
            .get(((latencies_us.len().max(1) - 1) as f64 * q) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    format!(
        "{first_ns} {last_ns} {:.1} {:.1} {:.1}",
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

// --- child processes ---------------------------------------------------------------------

/// Reads every socket until socket `i` has `expected[i]` records of `size` bytes, checking
/// them as they come; counts the records read in `progress`.
fn drain(
    sockets: Vec<UnixStream>,
    expected: &[u64],
    size: usize,
    ordered: bool,
    timed: bool,
    progress: &AtomicU64,
) -> Vec<Checker> {
    let mut checkers: Vec<Checker> = expected
        .iter()
        .map(|&messages| Checker::new(messages, size, ordered, timed))
        .collect();
    let mut pollfds: Vec<libc::pollfd> = sockets
        .iter()
        .map(|socket| libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut buf = vec![0u8; 1 << 16];
    let mut done = 0;
    while done < sockets.len() {
        // SAFETY: poll reads and writes `pollfds.len()` pollfd structs in the vector it is
        // given, which outlives the call.
        let ready = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, 100) };
        if ready <= 0 {
            continue;
        }
        for (i, pollfd) in pollfds.iter_mut().enumerate() {
            if pollfd.revents == 0 {
                continue;
            }
            pollfd.revents = 0;
            let checker = &mut checkers[i];
            // One read while the buffer comes back full: poll reports what is left.
            while let Ok(n @ 1..) = (&sockets[i]).read(&mut buf) {
                let records = checker.feed(&buf[..n], monotonic_ns());
                progress.fetch_add(records, Ordering::Relaxed);
                if n < buf.len() {
                    break;
                }
            }
            if checker.expected >= expected[i] {
                if checker.expected > expected[i] || !checker.partial.is_empty() {
                    fail("a socket got more than every message");
                }
                // Done with this one: poll ignores a negative fd.
                pollfd.fd = -1;
                done += 1;
            }
        }
    }
    checkers
}

/// fdcast receiver: `subscribers` socketpairs subscribed (RAW) through its own registry and
/// broker connection, socket `i` to `topics[i % topics.len()]`, their other ends read and
/// checked by a thread; with `history`, history is on and shared through the broker. Prints
/// "ready", then the report over every socket, its broker's `received` and the bytes its
/// broker connection received.
fn receiver(
    url: &str,
    name: &str,
    (messages, size): (u64, usize),
    (subscribers, history): (usize, bool),
    how: &str,
    topics: &[&str],
) {
    let (ordered, timed) = match how {
        "timed" => (true, true),
        "ordered" => (true, false),
        _ => (false, false),
    };
    let registry = Registry::new().unwrap();
    if history {
        history_on(&registry);
    }
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut expected = Vec::new();
    for i in 0..subscribers {
        let topic = i % topics.len();
        let (our, their) = UnixStream::pair().unwrap();
        their.set_nonblocking(true).unwrap();
        expected.push(messages_on(topic, topics.len(), messages));
        ours.push(our);
        theirs.push(their);
    }
    let subscribe = |i: usize, our: &UnixStream| {
        let topic = topics[i % topics.len()].as_bytes();
        if history {
            // After enable, as a tail of 0: it returns once the topic's mirror is filled
            // from the stream, so its subscription on the engine (the id channel, the
            // JetStream consumer) is in effect and what is published after "ready" comes
            // live, not as part of the fill.
            registry.subscribe_tail(topic, our.as_raw_fd(), Mode::Raw, 0)
        } else {
            registry.subscribe(topic, our.as_raw_fd(), Mode::Raw)
        }
        .unwrap_or_else(|e| fail(&format!("receiver: subscribe: {e}")));
    };
    // Without history, subscribed before the broker is enabled: enable returns once the
    // subscriptions are in effect on the engine, so nothing published after "ready" is missed.
    if !history {
        for (i, our) in ours.iter().enumerate() {
            subscribe(i, our);
        }
    }
    registry
        .broker_enable(url, name)
        .unwrap_or_else(|e| fail(&format!("receiver: broker_enable: {e}")));
    if history {
        for (i, our) in ours.iter().enumerate() {
            subscribe(i, our);
        }
    }
    // This process reads everything: a burst must queue, not be dropped at the default
    // outbox limit (1 MiB).
    registry.set_outbox_limit(1 << 30);
    let bytes_before = tcp_bytes_received();
    let progress = Arc::new(AtomicU64::new(0));
    let reader = {
        let progress = Arc::clone(&progress);
        std::thread::spawn(move || drain(theirs, &expected, size, ordered, timed, &progress))
    };
    let total: u64 = (0..subscribers)
        .map(|i| messages_on(i % topics.len(), topics.len(), messages))
        .sum();
    say("ready");
    let mut last = (0, Instant::now());
    while !reader.is_finished() {
        registry.dispatch(Some(Duration::from_millis(2))).unwrap();
        let read = progress.load(Ordering::Relaxed);
        if read != last.0 {
            last = (read, Instant::now());
        } else if last.1.elapsed() > STALL {
            fail(&format!(
                "receiver: {read} of {total} messages read, then nothing for {STALL:?} ({:?})",
                registry.broker_stats()
            ));
        }
    }
    let checkers = reader.join().unwrap();
    let received = registry.broker_stats().received;
    // Saturating: a cluster engine may close a connection meanwhile, its bytes with it.
    let bytes = tcp_bytes_received().saturating_sub(bytes_before);
    drop(ours);
    say(&format!("{} {received} {bytes}", report(checkers)));
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
        last.1.saturating_sub(bytes_before)
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

/// The login a `redis://[user[:password]@]host[:port][/db]` URL asks for, read as fdcast
/// reads it: a password (with or without a user) means AUTH; a bare user part means none.
#[derive(Debug, Default, PartialEq)]
struct RedisLogin {
    user: Option<String>,
    password: Option<String>,
    db: Option<String>,
}

fn redis_login(url: &str) -> RedisLogin {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (user, password) = match authority.rsplit_once('@').map(|(userinfo, _)| userinfo) {
        Some(userinfo) => match userinfo.split_once(':') {
            Some((user, password)) => (
                Some(percent_decoded(user)).filter(|user| !user.is_empty()),
                Some(percent_decoded(password)),
            ),
            None => (Some(percent_decoded(userinfo)), None),
        },
        None => (None, None),
    };
    let db = path
        .split('?')
        .next()
        .filter(|db| !db.is_empty() && *db != "0");
    RedisLogin {
        user: user.filter(|_| password.is_some()),
        password,
        db: db.map(str::to_string),
    }
}

fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let hex = bytes
            .get(at + 1..at + 3)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (bytes[at], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                at += 3;
            }
            (byte, _) => {
                out.push(byte);
                at += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A connection to the server `url` names; for Redis, logged in and on the URL's database
/// as fdcast's connection is.
fn connect(url: &str) -> TcpStream {
    let redis = url.starts_with("redis");
    let port = if redis { 6379 } else { 4222 };
    let mut stream = TcpStream::connect(host_port(url, port))
        .unwrap_or_else(|e| fail(&format!("plain client: connect {url}: {e}")));
    stream.set_nodelay(true).unwrap();
    if redis {
        let login = redis_login(url);
        let mut commands = Vec::new();
        if let Some(password) = &login.password {
            let mut auth: Vec<&[u8]> = vec![b"AUTH"];
            auth.extend(login.user.as_deref().map(str::as_bytes));
            auth.push(password.as_bytes());
            commands.push(resp_command(&auth));
        }
        if let Some(db) = &login.db {
            commands.push(resp_command(&[b"SELECT", db.as_bytes()]));
        }
        let mut input = Vec::new();
        let mut buf = [0u8; 512];
        for command in &commands {
            stream.write_all(command).unwrap();
            let end = loop {
                match line_end(&input) {
                    Some(end) => break end,
                    None => read_more(&mut stream, &mut input, &mut buf),
                }
            };
            if !input.starts_with(b"+OK") {
                fail(&format!(
                    "plain Redis client: {}",
                    String::from_utf8_lossy(&input[..end])
                ));
            }
            input.drain(..end + 2);
        }
    }
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

enum NatsFrame {
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
        return Some((NatsFrame::Other, start + len + 2));
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

/// The JetStream stream fdcast keeps a NATS broker name's shared history in: `fdcast_`, then
/// the name with every byte outside `A-Z a-z 0-9 -` written `_XX` (README, History and resume).
fn jetstream_stream(name: &str) -> String {
    let mut stream = String::from("fdcast_");
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' {
            stream.push(char::from(byte));
        } else {
            stream.push_str(&format!("_{byte:02X}"));
        }
    }
    stream
}

/// Deletes what a history run left on the server: the Redis stream of each topic (`DEL`), or
/// the name's JetStream stream (`$JS.API.STREAM.DELETE`). Fails when there was none: history
/// then did not go through the broker, and the run measured something else.
fn delete_history(engine: &Engine, name: &str, topics: &[&str]) {
    if engine.key == "redis" {
        let mut stream = connect(&engine.url);
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (mut input, mut buf) = (Vec::new(), [0u8; 512]);
        for topic in topics {
            let key = format!("{name}{topic}");
            stream
                .write_all(&resp_command(&[b"DEL", key.as_bytes()]))
                .unwrap();
            let end = loop {
                match line_end(&input) {
                    Some(end) => break end,
                    None => read_more(&mut stream, &mut input, &mut buf),
                }
            };
            if &input[..end] != b":1" {
                fail(&format!(
                    "history run: no Redis stream {key} to delete ({}): history was not shared",
                    String::from_utf8_lossy(&input[..end])
                ));
            }
            input.drain(..end + 2);
        }
        return;
    }
    let stream_name = jetstream_stream(name);
    let answer = nats_request(&engine.url, &format!("$JS.API.STREAM.DELETE.{stream_name}"));
    if !answer.contains("\"success\":true") {
        fail(&format!(
            "history run: JetStream stream {stream_name} not deleted ({answer}): is the NATS \
             server running JetStream (-js)?"
        ));
    }
}

/// A NATS request with an empty body on a connection of its own: the payload of the answer,
/// or a failure after 10 s without one.
fn nats_request(url: &str, subject: &str) -> String {
    let mut stream = connect(url);
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (mut input, mut buf) = (Vec::new(), vec![0u8; 1 << 12]);
    nats_handshake(&mut stream, &mut input, &mut buf);
    let inbox = format!("_INBOX.broker_bench.{}", std::process::id());
    stream
        .write_all(format!("SUB {inbox} 1\r\nPUB {subject} {inbox} 0\r\n\r\n").as_bytes())
        .unwrap();
    loop {
        if let Some(end) = line_end(&input) {
            if let Some(rest) = input[..end].strip_prefix(b"MSG ") {
                let len = number(rest.rsplit(|&b| b == b' ').next().unwrap_or_default());
                let start = end + 2;
                if input.len() >= start + len + 2 {
                    return String::from_utf8_lossy(&input[start..start + len]).into_owned();
                }
            } else {
                // PING, +OK, INFO: anything else before the answer, answered where needed.
                if &input[..end] == b"PING" {
                    stream.write_all(b"PONG\r\n").unwrap();
                } else if input.starts_with(b"-ERR") {
                    fail(&format!(
                        "plain NATS client: {}",
                        String::from_utf8_lossy(&input[..end])
                    ));
                }
                input.drain(..end + 2);
                continue;
            }
        }
        read_more(&mut stream, &mut input, &mut buf);
    }
}

/// One connection of a plain Redis publisher: the commands written and answered on it.
struct Pipe {
    stream: TcpStream,
    out: Vec<u8>,
    sent: u64,
    answered: u64,
}

impl Pipe {
    /// Reads answers until at most `unanswered` commands wait for theirs.
    fn await_answers(&mut self, unanswered: u64, buf: &mut [u8]) {
        while self.sent - self.answered > unanswered {
            let n = self.stream.read(buf).unwrap();
            if n == 0 {
                fail("plain Redis publisher: the server closed the connection");
            }
            if buf[..n].contains(&b'-') {
                fail(&format!(
                    "plain Redis publisher: an error reply: {}",
                    String::from_utf8_lossy(&buf[..n])
                ));
            }
            // Every reply is one `:<receivers>\r\n` line.
            self.answered += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        }
    }
}

/// Plain Redis publisher: `command` (PUBLISH or SPUBLISH) of topic `i` written to the server
/// at `routes[i].0` (a URL, or `host:port`) on channel `routes[i].1`, one connection per server, the messages spread
/// over the topics as fdcast's publisher spreads them ([`messages_on`]). Pipelined in batches
/// of 256 commands, at most two batches unanswered on a connection; returns when every
/// command is answered.
fn plain_redis_publish(
    command: &str,
    routes: &[(String, String)],
    messages: u64,
    size: usize,
) -> Published {
    const BATCH: u64 = 256;
    let mut servers: Vec<&str> = routes.iter().map(|(server, _)| server.as_str()).collect();
    servers.sort_unstable();
    servers.dedup();
    let pipe_of: Vec<usize> = routes
        .iter()
        .map(|(server, _)| servers.iter().position(|s| s == server).unwrap())
        .collect();
    let mut pipes: Vec<Pipe> = servers
        .iter()
        .map(|server| Pipe {
            stream: connect(server),
            out: Vec::new(),
            sent: 0,
            answered: 0,
        })
        .collect();
    let topics = routes.len() as u64;
    let mut buf = vec![0u8; 1 << 16];
    let start_ns = monotonic_ns();
    let mut seq = 0;
    while seq < messages {
        for i in seq..(seq + BATCH).min(messages) {
            let topic = (i % topics) as usize;
            let pipe = &mut pipes[pipe_of[topic]];
            pipe.out.extend_from_slice(&resp_command(&[
                command.as_bytes(),
                routes[topic].1.as_bytes(),
                &message(i / topics, size),
            ]));
            pipe.sent += 1;
        }
        seq = (seq + BATCH).min(messages);
        for pipe in &mut pipes {
            pipe.stream.write_all(&pipe.out).unwrap();
            pipe.out.clear();
            pipe.await_answers(2 * BATCH, &mut buf);
        }
    }
    for pipe in &mut pipes {
        pipe.await_answers(0, &mut buf);
    }
    Published::since(start_ns)
}

/// The `host:port` of the primary owning each channel's slot, asked of the cluster node at
/// `seed`: a key command on the channel's name (EXISTS) is answered by the slot's owner and
/// redirected (`-MOVED <slot> <host:port>`) by every other node.
fn slot_owners(seed: &str, channels: &[String]) -> Vec<String> {
    let mut stream = connect(seed);
    let mut input = Vec::new();
    let mut buf = vec![0u8; 1 << 12];
    channels
        .iter()
        .map(|channel| {
            stream
                .write_all(&resp_command(&[b"EXISTS", channel.as_bytes()]))
                .unwrap();
            let end = loop {
                match line_end(&input) {
                    Some(end) => break end,
                    None => read_more(&mut stream, &mut input, &mut buf),
                }
            };
            let reply = String::from_utf8_lossy(&input[..end]).into_owned();
            input.drain(..end + 2);
            if reply.starts_with(':') {
                seed.to_string()
            } else if let Some(redirect) = reply.strip_prefix("-MOVED ") {
                redirect.split(' ').nth(1).unwrap_or_default().to_string()
            } else {
                fail(&format!("slot owner of {channel}: {reply}"))
            }
        })
        .collect()
}

/// `redis-benchmark -c 1 -P 16 -n messages PUBLISH channel payload`: one connection, 16
/// commands in flight, the same payload every time (so the receivers check only sizes and
/// counts). The publish rate is the one redis-benchmark measures itself.
fn redis_benchmark_publish(url: &str, name: &str, messages: u64, size: usize) -> Published {
    let address = host_port(url, 6379);
    let (host, port) = address.rsplit_once(':').unwrap_or((&address, "6379"));
    // Its CSV output quotes the command line: no newline in it.
    let payload = String::from_utf8(message(0, size))
        .unwrap()
        .replace('\n', "x");
    let login = redis_login(url);
    let mut command = Command::new("redis-benchmark");
    command.args(["-h", host, "-p", port]);
    if let Some(password) = &login.password {
        command.args(["-a", password]);
        if let Some(user) = &login.user {
            command.args(["--user", user]);
        }
    }
    if let Some(db) = &login.db {
        command.args(["--dbnum", db]);
    }
    let start_ns = monotonic_ns();
    let output = command
        .args(["-c", "1", "-P", "16", "-n"])
        .arg(messages.to_string())
        .args(["--csv", "PUBLISH", &subject("redis", name), &payload])
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| fail(&format!("redis-benchmark: {e} (install redis-tools)")));
    let csv = String::from_utf8_lossy(&output.stdout);
    // "test","rps",...: the second line's second field.
    let rps: f64 = csv
        .lines()
        .nth(1)
        .and_then(|line| line.split(',').nth(1))
        .and_then(|field| field.trim_matches('"').parse().ok())
        .filter(|_| output.status.success())
        .unwrap_or_else(|| fail(&format!("redis-benchmark printed {csv:?}")));
    Published {
        start_ns,
        done_ns: start_ns + (messages as f64 / rps * 1e9) as u64,
    }
}

/// Plain NATS publisher: `PUB` commands written in writes of about 64 KiB, then a PING whose
/// PONG says the server has taken them all.
fn plain_nats_publish(url: &str, name: &str, messages: u64, size: usize) -> Published {
    let mut stream = connect(url);
    let mut input = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    nats_handshake(&mut stream, &mut input, &mut buf);
    wait_pong(&mut stream, &mut input, &mut buf);
    let header = format!("PUB {} {size}\r\n", subject("nats", name));
    let mut out = Vec::with_capacity(1 << 17);
    let start_ns = monotonic_ns();
    let cpu_start = thread_cpu_ns();
    for seq in 0..messages {
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&message(seq, size));
        out.extend_from_slice(b"\r\n");
        if out.len() as u64 >= PUBLISHED_PER_TURN {
            stream.write_all(&out).unwrap();
            out.clear();
        }
    }
    stream.write_all(&out).unwrap();
    wait_pong(&mut stream, &mut input, &mut buf);
    if std::env::var_os("BROKER_BENCH_VERBOSE").is_some() {
        eprintln!(
            "bare publisher: {messages} x {size} B published in {:.3} s, {:.3} s on a CPU",
            (monotonic_ns() - start_ns) as f64 / 1e9,
            (thread_cpu_ns() - cpu_start) as f64 / 1e9
        );
    }
    Published::since(start_ns)
}

// --- a Redis Cluster of the bench's own ------------------------------------------------

/// `count` topics (`bench0`, `bench1`, …) whose channels under `name` spread evenly over the
/// primaries of the cluster that the node at `seed` belongs to, listed a primary at a time in
/// turn, so that consecutive publishes go to different shards.
fn spread_topics(seed: &str, name: &str, count: usize) -> Vec<String> {
    let candidates: Vec<String> = (0..64 * count).map(|i| format!("{TOPIC}{i}")).collect();
    let channels: Vec<String> = candidates.iter().map(|t| format!("{name}{t}")).collect();
    let mut by_owner: Vec<(String, Vec<&String>)> = Vec::new();
    for (owner, topic) in slot_owners(seed, &channels).into_iter().zip(&candidates) {
        match by_owner.iter_mut().find(|(o, _)| *o == owner) {
            Some((_, topics)) => topics.push(topic),
            None => by_owner.push((owner, vec![topic])),
        }
    }
    let per_owner = count.div_ceil(by_owner.len());
    let spread: Vec<String> = (0..per_owner)
        .flat_map(|round| by_owner.iter().filter_map(move |(_, t)| t.get(round)))
        .take(count)
        .map(|topic| topic.to_string())
        .collect();
    if spread.len() < count {
        fail(&format!("no {count} topics spread over {by_owner:?}"));
    }
    spread
}

/// The directory of the cluster the bench started, removed by [`fail`] (whose exit skips
/// destructors; the servers die with this process, see [`LocalCluster::start`]).
static CLUSTER_DIR: std::sync::Mutex<Option<std::path::PathBuf>> = std::sync::Mutex::new(None);

/// Three `redis-server` primaries in cluster mode, no replicas, on free ports, in a temporary
/// directory; stopped when dropped, or when this process dies.
struct LocalCluster {
    dir: std::path::PathBuf,
    servers: Vec<Child>,
    ports: Vec<u16>,
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        CLUSTER_DIR.lock().unwrap().take();
    }
}

/// A port free now whose cluster bus port (+10000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .unwrap_or_else(|e| fail(&format!("redis-cli: {e} (install redis-tools)")));
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

impl LocalCluster {
    fn start() -> LocalCluster {
        use std::os::unix::process::CommandExt;
        let dir = std::env::temp_dir().join(format!("fdcast-bench-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| fail(&format!("cluster directory {}: {e}", dir.display())));
        *CLUSTER_DIR.lock().unwrap() = Some(dir.clone());
        let mut cluster = LocalCluster {
            dir,
            servers: Vec::new(),
            ports: Vec::new(),
        };
        for _ in 0..3 {
            let port = free_cluster_port();
            let mut server = Command::new("redis-server");
            server
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(cluster.dir.join(format!("nodes-{port}.conf")))
                .args(["--save", "", "--appendonly", "no", "--dir"])
                .arg(&cluster.dir)
                .arg("--logfile")
                .arg(cluster.dir.join(format!("{port}.log")))
                .stdin(Stdio::null())
                .stdout(Stdio::null());
            // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of
            // the parent; it runs in the forked child before exec.
            unsafe {
                server.pre_exec(|| {
                    // Killed when the bench dies, however it dies.
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                })
            };
            let server = server
                .spawn()
                .unwrap_or_else(|e| fail(&format!("redis-server: {e} (Redis 7 is needed)")));
            cluster.servers.push(server);
            cluster.ports.push(port);
        }
        cluster.wait_for("PING", &["PING"], |reply| reply == "PONG");
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| fail(&format!("redis-cli: {e} (install redis-tools)")));
        if !created.status.success() {
            fail(&format!(
                "redis-cli --cluster create: {}",
                String::from_utf8_lossy(&created.stdout)
            ));
        }
        cluster.wait_for("cluster_state:ok", &["CLUSTER", "INFO"], |reply| {
            reply.contains("cluster_state:ok")
        });
        cluster
    }

    /// Waits (at most 30 s) until every node's answer to `command` satisfies `done`.
    fn wait_for(&self, what: &str, command: &[&str], done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for &port in &self.ports {
            while !done(&redis_cli(port, command)) {
                if Instant::now() > deadline {
                    fail(&format!("cluster node {port}: no {what} in 30 s"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn url(&self) -> String {
        format!("redis+cluster://127.0.0.1:{}", self.ports[0])
    }
}

// --- the old PostgreSQL design, through libpq --------------------------------------------

/// The publisher of fdcast's first PostgreSQL backend: LISTEN on the channel (it was a
/// registry, which hears its own notifications and ignores them), non-blocking pipeline mode,
/// one `SELECT pg_notify($1, $2)` and one pipeline sync (its own transaction) per publish, at
/// most WINDOW unconfirmed. Returns when every sync has come back.
fn old_pg_publish(url: &str, channel: &str, messages: u64, size: usize) -> Published {
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
        let published = Published::since(start_ns);
        PQfinish(conn);
        published
    }
}

// --- fdcast publisher --------------------------------------------------------------------

/// Publishes `messages` over `topics` (see [`messages_on`]) through a fresh registry and
/// broker connection, `rate` per second (0: as fast as the window allows), with history on
/// or off. Returns when the engine has taken every publish and the server has answered
/// everything written.
fn fdcast_publish(
    url: &str,
    name: &str,
    topics: &[&str],
    (messages, size): (u64, usize),
    (rate, history): (u64, bool),
) -> Published {
    let registry = Registry::new().unwrap();
    if history {
        history_on(&registry);
    }
    registry
        .broker_enable(url, name)
        .unwrap_or_else(|e| fail(&format!("publisher: broker_enable: {e}")));
    let per_turn = (PUBLISHED_PER_TURN / size as u64).max(1);
    let start = Instant::now();
    let start_ns = monotonic_ns();
    let cpu_start = thread_cpu_ns();
    let (mut window_waits, mut window_wait) = (0, Duration::ZERO);
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
        let topic = topics[seq as usize % topics.len()];
        registry
            .publish(topic.as_bytes(), &message(seq / topics.len() as u64, size))
            .unwrap();
        // A dispatch turn (which reads the server's answers and writes what they released)
        // per 64 KiB published: the bare NATS publisher's write size.
        if (seq + 1) % per_turn == 0 {
            registry.dispatch(Some(Duration::ZERO)).unwrap();
            if registry.broker_stats().queued > WINDOW {
                let waiting = Instant::now();
                while registry.broker_stats().queued > WINDOW {
                    registry.dispatch(Some(Duration::from_millis(1))).unwrap();
                }
                window_waits += 1;
                window_wait += waiting.elapsed();
            }
        }
    }
    let last_publish = start.elapsed();
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
            "publisher: {messages} x {size} B published in {:.3} s, {:.3} s on a CPU; \
             {window_waits} waits for the window, {:.3} s; the last publish at {:.3} s",
            start.elapsed().as_secs_f64(),
            (thread_cpu_ns() - cpu_start) as f64 / 1e9,
            window_wait.as_secs_f64(),
            last_publish.as_secs_f64(),
        );
    }
    // Disable returns once the server has answered everything written (NATS: the PONG of a
    // last PING), as the bare publishers wait for theirs.
    registry.broker_disable();
    Published::since(start_ns)
}

// --- the runs ----------------------------------------------------------------------------

/// Receiving processes per run, and sockets subscribed in each.
const RECEIVERS: usize = 2;
const SUBSCRIBERS: usize = 100;

/// When a publisher made its first publish, and when the engine had taken its last.
struct Published {
    start_ns: u64,
    done_ns: u64,
}

impl Published {
    fn since(start_ns: u64) -> Published {
        Published {
            start_ns,
            done_ns: monotonic_ns(),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Publisher {
    Fdcast,
    /// fdcast's first PostgreSQL design: one transaction per publish.
    OldPg,
    RedisBenchmark,
    PlainRedis,
    /// SPUBLISH pipelined to the primary owning each channel's slot.
    PlainCluster,
    PlainNats,
}

impl Publisher {
    fn label(self) -> &'static str {
        match self {
            Publisher::Fdcast => "fdcast",
            Publisher::OldPg => "one transaction per publish",
            Publisher::RedisBenchmark => "`redis-benchmark -c 1 -P 16`",
            Publisher::PlainRedis => "pipelined client",
            Publisher::PlainCluster => "pipelined client, SPUBLISH to each slot's primary",
            Publisher::PlainNats => "bare pipelined publisher",
        }
    }

    /// Publishes `messages` of `size` bytes over `topics` (only fdcast's publisher and the
    /// plain cluster client take more than one), with history (fdcast's only) or without.
    fn publish(
        self,
        url: &str,
        name: &str,
        topics: &[&str],
        (messages, size): (u64, usize),
        (rate, history): (u64, bool),
    ) -> Published {
        if topics.len() > 1 && !matches!(self, Publisher::Fdcast | Publisher::PlainCluster) {
            fail(&format!("{} publishes on one topic only", self.label()));
        }
        if history && self != Publisher::Fdcast {
            fail(&format!("{} publishes without history only", self.label()));
        }
        let channels: Vec<String> = topics.iter().map(|t| format!("{name}{t}")).collect();
        match self {
            Publisher::Fdcast => {
                fdcast_publish(url, name, topics, (messages, size), (rate, history))
            }
            Publisher::OldPg => old_pg_publish(url, name, messages, size),
            Publisher::RedisBenchmark => redis_benchmark_publish(url, name, messages, size),
            Publisher::PlainRedis => {
                // The URL itself: the connection logs in as it says.
                let routes = [(url.to_string(), channels[0].clone())];
                plain_redis_publish("PUBLISH", &routes, messages, size)
            }
            Publisher::PlainCluster => {
                let seed = host_port(url, 6379);
                let owners = slot_owners(&seed, &channels);
                let routes: Vec<_> = owners.into_iter().zip(channels).collect();
                plain_redis_publish("SPUBLISH", &routes, messages, size)
            }
            Publisher::PlainNats => plain_nats_publish(url, name, messages, size),
        }
    }
}

struct Engine {
    key: &'static str,
    label: &'static str,
    url: String,
    /// What fdcast's publisher is compared with, and the ratio it should reach.
    baselines: &'static [Publisher],
    target: f64,
    /// Topics published on: 1 (TOPIC), or on a cluster, this many spread evenly over its
    /// primaries ([`spread_topics`]).
    topics: usize,
}

impl Engine {
    /// The Redis channel prefix, NATS subject prefix or PostgreSQL channel of run `run`.
    fn name(&self, run: u64) -> String {
        let pid = std::process::id();
        match self.key {
            "pg" => format!("fdcast_bench_{pid}_{run}"),
            "redis" | "cluster" => format!("fdcast_bench:{pid}:{run}:"),
            _ => format!("fdcast_bench.{pid}.{run}"),
        }
    }

    fn topics(&self, name: &str) -> Vec<String> {
        if self.topics == 1 {
            vec![TOPIC.to_string()]
        } else {
            spread_topics(&host_port(&self.url, 6379), name, self.topics)
        }
    }
}

struct Outcome {
    /// Messages per second from the first publish until the engine had taken the last.
    published: f64,
    /// Messages per second from the first publish until the last receiver read the last one.
    delivered: f64,
    /// The worse receiver's latency percentiles (timed runs only).
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    /// The first receiver's broker connection: bytes received.
    receiver_bytes: u64,
    /// The bystander's broker `received` and bytes, when there was one.
    bystander: Option<(u64, u64)>,
}

type ChildLines = std::io::Lines<BufReader<std::process::ChildStdout>>;

fn spawn(args: &[&str]) -> (Child, ChildLines) {
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

fn finish((mut child, mut lines): (Child, ChildLines)) -> Vec<f64> {
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

static RUN: AtomicU64 = AtomicU64::new(0);

/// One run: RECEIVERS receiving processes of `subscribers` sockets each (and a bystander if
/// asked), `messages` published from here at `rate` per second (0: as fast as they go); with
/// `history`, history is on in the publisher and the receivers, and its stream is deleted
/// after the run.
fn run(
    engine: &Engine,
    publisher: Publisher,
    messages: u64,
    size: usize,
    (rate, subscribers): (u64, usize),
    with_bystander: bool,
    history: bool,
) -> Outcome {
    let name = engine.name(RUN.fetch_add(1, Ordering::Relaxed));
    let topics = engine.topics(&name);
    let topic_list = topics.join(",");
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    let (n, s, subscribers) = (
        messages.to_string(),
        size.to_string(),
        subscribers.to_string(),
    );
    let how = match publisher {
        Publisher::RedisBenchmark => "counted",
        _ if rate > 0 => "timed",
        _ => "ordered",
    };
    let receivers: Vec<_> = (0..RECEIVERS)
        .map(|_| {
            let mut args = vec![
                "receiver",
                &engine.url,
                &name,
                &n,
                &s,
                &subscribers,
                how,
                &topic_list,
            ];
            if history {
                args.push("history");
            }
            spawn(&args)
        })
        .collect();
    let mut bystander = with_bystander.then(|| spawn(&["bystander", &engine.url, &name]));
    let published = publisher.publish(
        &engine.url,
        &name,
        &topics,
        (messages, size),
        (rate, history),
    );
    let reports: Vec<Vec<f64>> = receivers.into_iter().map(finish).collect();
    if history {
        delete_history(engine, &name, &topics);
    }
    let bystander = bystander.take().map(|(mut child, lines)| {
        let mut stdin: ChildStdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(b"stop\n");
        drop(stdin);
        let numbers = finish((child, lines));
        (numbers[0] as u64, numbers[1] as u64)
    });
    let worst = |field: usize| reports.iter().map(|r| r[field]).fold(0.0, f64::max);
    let per_second =
        |end_ns: f64| messages as f64 / ((end_ns - published.start_ns as f64).max(1.0) / 1e9);
    Outcome {
        published: per_second(published.done_ns as f64),
        delivered: per_second(worst(1)),
        p50_us: worst(2),
        p99_us: worst(3),
        max_us: worst(4),
        receiver_bytes: reports[0][6] as u64,
        bystander,
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn reachable(engine: &Engine) -> bool {
    let registry = Registry::new().unwrap();
    match registry.broker_enable(&engine.url, &engine.name(u64::MAX)) {
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

fn mark(ok: bool) -> &'static str {
    if ok { "✓" } else { "✗" }
}

/// Part 4: fdcast's 64-byte publish throughput with history shared through the broker
/// against the same runs without history, alternating.
fn history_part(engines: &[&&Engine], reps: usize, quick: bool) {
    // Below HISTORY_MESSAGES: a run never passes the topic's limit (JetStream would discard
    // messages not delivered yet).
    let messages: u64 = if quick { 8_000 } else { 80_000 };
    let size = 64;
    say(&format!(
        "\n### 7.4 Publish throughput with shared history\n\nfdcast's publisher and \
         receivers of 7.1 ({RECEIVERS} receiving processes of {SUBSCRIBERS} sockets, {size}-byte \
         payloads, {messages} messages a run) with history on in every process \
         (`set_history`, max_messages {HISTORY_MESSAGES}, before `broker_enable`), alternating \
         with the same runs with history off. History on: Redis: a publish is one `EVALSHA` \
         (`XADD` to the topic's stream, `PUBLISH`, `SPUBLISH` of id and payload), the \
         receivers read the id channel; NATS: a publish is an `HPUB` stored in the JetStream \
         stream, the receivers read it through a push consumer each. Every receiver checks \
         every message on every socket (once, in order); the stream is deleted after each \
         run. Median of {reps} run(s) each.\n"
    ));
    say(
        "| engine | payload | messages | history off published/s | history off delivered/s \
         | history on published/s | history on delivered/s | on / off (delivered: sustained) \
         | on / off (published: burst) |",
    );
    say("|---|---|---|---|---|---|---|---|---|");
    for engine in engines {
        let (mut off, mut on) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
        for _ in 0..reps {
            for (history, rates) in [(false, &mut off), (true, &mut on)] {
                let outcome = run(
                    engine,
                    Publisher::Fdcast,
                    messages,
                    size,
                    (0, SUBSCRIBERS),
                    false,
                    history,
                );
                rates.0.push(outcome.published);
                rates.1.push(outcome.delivered);
            }
        }
        let (off_published, off_delivered) = (median(off.0), median(off.1));
        let (on_published, on_delivered) = (median(on.0), median(on.1));
        say(&format!(
            "| {} | {size} B | {messages} | {off_published:.0} | {off_delivered:.0} \
             | {on_published:.0} | {on_delivered:.0} | {:.2} | {:.2} |",
            engine.label,
            on_delivered / off_delivered,
            on_published / off_published,
        ));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or_default();
    match arg(1) {
        "receiver" => {
            let topics: Vec<&str> = arg(8).split(',').collect();
            return receiver(
                arg(2),
                arg(3),
                (arg(4).parse().unwrap(), arg(5).parse().unwrap()),
                (arg(6).parse().unwrap(), arg(9) == "history"),
                arg(7),
                &topics,
            );
        }
        "bystander" => return bystander(arg(2), arg(3)),
        "publish" | "publish-bare" => {
            let messages = arg(4).parse().unwrap();
            let size = arg(5).parse().unwrap();
            let published = if arg(1) == "publish" {
                let history = arg(6) == "history";
                fdcast_publish(arg(2), arg(3), &[TOPIC], (messages, size), (0, history))
            } else {
                plain_nats_publish(arg(2), arg(3), messages, size)
            };
            let seconds = (published.done_ns - published.start_ns) as f64 / 1e9;
            return say(&format!("{:.0} published/s", messages as f64 / seconds));
        }
        "" | "--quick" => {}
        _ => {
            eprintln!("usage: broker_bench [--quick]");
            std::process::exit(2);
        }
    }
    let quick = arg(1) == "--quick";
    // BROKER_BENCH_ENGINES=pg,redis: only those.
    let only = std::env::var("BROKER_BENCH_ENGINES").unwrap_or_default();
    let wanted = |key: &str| only.is_empty() || only.split(',').any(|k| k == key);
    let cluster = wanted("cluster").then(LocalCluster::start);
    let cluster_url = cluster.as_ref().map(LocalCluster::url).unwrap_or_default();
    let engines = [
        Engine {
            key: "pg",
            label: "PostgreSQL",
            url: env_url("FDCAST_PG_URL", "postgresql://127.0.0.1:5432/test"),
            baselines: &[Publisher::OldPg],
            target: 5.0,
            topics: 1,
        },
        Engine {
            key: "redis",
            label: "Redis",
            url: env_url("FDCAST_REDIS_URL", "redis://127.0.0.1:6379"),
            baselines: &[Publisher::RedisBenchmark, Publisher::PlainRedis],
            target: 0.8,
            topics: 1,
        },
        Engine {
            key: "cluster",
            label: "Redis Cluster",
            url: cluster_url.clone(),
            baselines: &[Publisher::PlainCluster],
            target: 0.8,
            topics: 1,
        },
        Engine {
            key: "cluster",
            label: "Redis Cluster, 6 topics",
            url: cluster_url,
            baselines: &[Publisher::PlainCluster],
            target: 0.8,
            topics: 6,
        },
        Engine {
            key: "nats",
            label: "NATS",
            url: env_url("FDCAST_NATS_URL", "nats://127.0.0.1:4222"),
            baselines: &[Publisher::PlainNats],
            target: 0.8,
            topics: 1,
        },
    ];
    let (engines, skipped): (Vec<&Engine>, Vec<&Engine>) = engines
        .iter()
        .filter(|e| wanted(e.key))
        .partition(|e| reachable(e));
    let reps = if quick { 1 } else { 5 };
    let sizes = [64usize, 1024];
    // Messages per run: about a second for the slowest side on a quiet 2-core machine.
    let messages = |engine: &str, publisher: Publisher, size: usize| -> u64 {
        let full: u64 = match (engine, publisher) {
            (_, Publisher::OldPg) => 8_000,
            ("pg", _) if size > 64 => 20_000,
            ("pg", _) => 60_000,
            (_, _) if size > 64 => 20_000,
            _ => 100_000,
        };
        if quick { full / 10 } else { full }
    };

    say(
        "## 7. Cross-process through PostgreSQL, Redis, Redis Cluster and NATS (bench/brokers.rs)\n",
    );
    say(&format!(
        "One publisher process, {RECEIVERS} receiving processes, each with its own connection \
         to the local server and {SUBSCRIBERS} local subscribers (socketpairs, RAW framing) \
         whose other ends a thread reads and checks: every message once, in order, on every \
         socket (the messages of one read from the server reach each socket in one write, \
         fdcast's default). Every publisher, fdcast's and the baselines, feeds the same \
         receivers; fdcast's publisher dispatches once per 64 KiB published, the bare NATS \
         publisher's write size. `published/s`: from the first publish until the server had answered the \
         last (PostgreSQL, Redis: its replies; NATS: the PONG of a PING written after it; \
         fdcast: until `broker_disable` returned; redis-benchmark: its own rate); \
         `delivered/s`: until the last socket of the slower receiver read the last message. \
         The targets are checked on delivered/s, the rate from one process to the two others: \
         published/s only says how fast the server swallows a burst into its buffers for the \
         receivers, which nobody can sustain for longer than those buffers last (a NATS server \
         cuts a subscriber off at 64 MiB pending); its ratio is shown last, as the burst ratio. \
         Redis Cluster: three primaries started by the bench, fdcast on `redis+cluster://` \
         (SPUBLISH, SSUBSCRIBE); with 6 topics, two on each primary, published in turn, \
         each socket subscribed to one of them. Median of {reps} alternating run(s).\n"
    ));
    for engine in &skipped {
        say(&format!(
            "**{} skipped**: its server did not answer (see stderr).\n",
            engine.label
        ));
    }
    say("### 7.1 Publish throughput\n");
    say(
        "| engine | payload | messages | fdcast published/s | fdcast delivered/s | baseline \
         | baseline published/s | baseline delivered/s | fdcast / baseline (delivered: sustained) \
         | target | fdcast / baseline (published: burst) |",
    );
    say("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut routing: Vec<(String, u64, (u64, u64), u64)> = Vec::new();
    for engine in &engines {
        for &size in &sizes {
            let n_fdcast = messages(engine.key, Publisher::Fdcast, size);
            let mut fdcast = (Vec::new(), Vec::new());
            let mut baselines = vec![(Vec::new(), Vec::new()); engine.baselines.len()];
            for rep in 0..reps {
                let outcome = run(
                    engine,
                    Publisher::Fdcast,
                    n_fdcast,
                    size,
                    (0, SUBSCRIBERS),
                    rep == 0 && size == 64,
                    false,
                );
                if let Some(b) = outcome.bystander {
                    routing.push((
                        engine.label.to_string(),
                        n_fdcast,
                        b,
                        outcome.receiver_bytes,
                    ));
                }
                fdcast.0.push(outcome.published);
                fdcast.1.push(outcome.delivered);
                for (&baseline, rates) in engine.baselines.iter().zip(&mut baselines) {
                    let n = messages(engine.key, baseline, size);
                    let outcome = run(engine, baseline, n, size, (0, SUBSCRIBERS), false, false);
                    rates.0.push(outcome.published);
                    rates.1.push(outcome.delivered);
                }
            }
            let (f_published, f_delivered) = (median(fdcast.0), median(fdcast.1));
            for (&baseline, (published, delivered)) in engine.baselines.iter().zip(baselines) {
                let (b_published, b_delivered) = (median(published), median(delivered));
                let sustained = f_delivered / b_delivered;
                let burst = f_published / b_published;
                let n_baseline = messages(engine.key, baseline, size);
                let messages = if n_fdcast == n_baseline {
                    n_fdcast.to_string()
                } else {
                    format!("{n_fdcast} / {n_baseline}")
                };
                say(&format!(
                    "| {} | {size} B | {messages} | {f_published:.0} | {f_delivered:.0} | {} \
                     | {b_published:.0} | {b_delivered:.0} | {sustained:.2} | ≥ {} {} \
                     | {burst:.2} |",
                    engine.label,
                    baseline.label(),
                    engine.target,
                    mark(sustained >= engine.target),
                ));
            }
        }
    }
    say(
        "\nredis-benchmark sends the same payload every time: its receivers check counts and \
         sizes only. Its delivered/s counts from just before it was started.\n",
    );

    let rate = 10_000u64;
    let n_latency = if quick { 5_000 } else { 30_000 };
    say(&format!(
        "### 7.2 Latency at {rate} publishes/s\n\n`publish` in this process to the bytes read \
         from each socket in the {RECEIVERS} receiving processes (64-byte payloads, \
         {n_latency} messages; the worse receiver's percentiles over all of its sockets). With \
         one socket per receiver, what the engine adds; with {SUBSCRIBERS}, also the receivers' \
         fan-out: a write to each socket and a read of it per dispatch turn, on the same 2 \
         cores as the publisher and the server.\n"
    ));
    say("| engine | sockets per receiver | p50 µs | p99 µs | max µs | target p99 |");
    say("|---|---|---|---|---|---|");
    for engine in engines.iter().filter(|e| e.topics == 1) {
        for subscribers in [1, SUBSCRIBERS] {
            let o = run(
                engine,
                Publisher::Fdcast,
                n_latency,
                64,
                (rate, subscribers),
                false,
                false,
            );
            let target = if engine.key == "pg" {
                "–".to_string()
            } else {
                format!("≤ 2000 µs {}", mark(o.p99_us <= 2000.0))
            };
            say(&format!(
                "| {} | {subscribers} | {:.0} | {:.0} | {:.0} | {target} |",
                engine.label, o.p50_us, o.p99_us, o.max_us
            ));
        }
    }

    say(
        "\n### 7.3 Interest routing\n\nDuring the first 64-byte fdcast run, a third process \
         connected to the same broker, subscribed only to another topic: what it received \
         (`broker_stats().received`, and bytes on its broker connection from TCP_INFO), next \
         to a subscribed receiver's bytes.\n",
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
    let history_engines: Vec<&&Engine> = engines
        .iter()
        .filter(|e| matches!(e.key, "redis" | "nats"))
        .collect();
    if !history_engines.is_empty() {
        history_part(&history_engines, reps, quick);
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
