//! History shared across processes through Redis streams, between real OS processes: this
//! binary re-runs itself as agents (a registry each, driven by one-line commands on stdin, as
//! tests/broker_cross_process.rs does), and checks what their readers get against the streams
//! themselves, read with plain clients.
//!
//! Needs the shared Redis (FDCAST_REDIS_URL, default redis://127.0.0.1:6379) and the
//! `redis-server` and `redis-cli` binaries; fails without them. The scenarios that kill
//! connections, flush the script cache or pause clients start their own Redis on a free
//! port, so that what they do there disturbs nobody.

mod common;
#[path = "common/history_agent.rs"]
mod history_agent;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use fdcast::{EventId, Mode};
use history_agent::*;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("agent") {
        return agent_main();
    }
    let started = Instant::now();
    with_watchdog(240, scenarios);
    println!(
        "shared_history: ok ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
}

fn scenarios() {
    let filter = std::env::args().skip(1).find(|arg| !arg.starts_with("--"));
    let run = |name: &str, f: &dyn Fn()| {
        if filter
            .as_ref()
            .is_some_and(|filter| !name.contains(filter.as_str()))
        {
            return;
        }
        let started = Instant::now();
        f();
        println!(
            "shared_history: {name}: ok ({:.1} s)",
            started.elapsed().as_secs_f64()
        );
    };
    run(
        "ids are the stream's, in every id mode",
        &ids_are_the_streams,
    );
    run(
        "resume through another process while publishing",
        &resume_through_another_process,
    );
    run("resume from a trimmed id", &resume_from_a_trimmed_id);
    run(
        "tail through another process",
        &tail_through_another_process,
    );
    run("plain clients", &plain_clients);
    run("the sender's fd is skipped", &except_is_honoured);
    run("a refused resume gives its channel back", &refused_resume);
    run("history switched off again", &history_switched_off);
    run("reconnect after CLIENT KILL", &reconnect_after_client_kill);
    run(
        "a reconnect past the stream's limit is a counted gap",
        &a_reconnect_past_the_limit_is_a_counted_gap,
    );
    run("history switched on after enable", &history_after_enable);
    run(
        "the sender's fd is skipped across reconnects",
        &except_across_reconnects,
    );
    run(
        "a publisher's order holds through SCRIPT FLUSH",
        &order_through_script_flush,
    );
    run(
        "history switched off keeps the publishes in flight",
        &switch_off_keeps_publishes_in_flight,
    );
}

fn redis_url() -> String {
    std::env::var("FDCAST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A prefix no other run uses.
fn unique_prefix(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("sh{}{tag}{nanos}:", std::process::id())
}

fn ids(messages: &[(String, String)]) -> Vec<String> {
    messages.iter().map(|(id, _)| id.clone()).collect()
}

// ---------------------------------------------------------------------------------------------
// a plain RESP client
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Resp {
    Text(Vec<u8>),
    Int(i64),
    Nil,
    Error(String),
    Array(Vec<Resp>),
}

impl Resp {
    fn text(&self) -> &[u8] {
        match self {
            Resp::Text(text) => text,
            other => panic!("not a string: {other:?}"),
        }
    }

    fn items(&self) -> &[Resp] {
        match self {
            Resp::Array(items) => items,
            other => panic!("not an array: {other:?}"),
        }
    }
}

/// One RESP2 (or RESP3 push) value at the front of `buf`, and its length.
fn parse_resp(buf: &[u8]) -> Option<(Resp, usize)> {
    let end = buf.windows(2).position(|pair| pair == b"\r\n")?;
    let line = std::str::from_utf8(&buf[1..end]).unwrap();
    let after = end + 2;
    match buf[0] {
        b'+' => Some((Resp::Text(line.as_bytes().to_vec()), after)),
        b'-' => Some((Resp::Error(line.to_string()), after)),
        b':' => Some((Resp::Int(line.parse().unwrap()), after)),
        b'$' => {
            let len: i64 = line.parse().unwrap();
            if len < 0 {
                return Some((Resp::Nil, after));
            }
            let len = len as usize;
            (buf.len() >= after + len + 2).then(|| {
                (
                    Resp::Text(buf[after..after + len].to_vec()),
                    after + len + 2,
                )
            })
        }
        b'*' | b'>' => {
            let n: i64 = line.parse().unwrap();
            if n < 0 {
                return Some((Resp::Nil, after));
            }
            let mut items = Vec::new();
            let mut at = after;
            for _ in 0..n {
                let (item, used) = parse_resp(&buf[at..])?;
                items.push(item);
                at += used;
            }
            Some((Resp::Array(items), at))
        }
        other => panic!("unexpected RESP type {:?}", other as char),
    }
}

struct Plain {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Plain {
    fn connect(url: &str) -> Plain {
        let address = url
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .to_string();
        let stream = TcpStream::connect(&address).expect("the Redis server answers");
        Plain {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, args: &[&[u8]]) {
        let mut command = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            command.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            command.extend_from_slice(arg);
            command.extend_from_slice(b"\r\n");
        }
        self.stream.write_all(&command).unwrap();
    }

    fn next(&mut self, timeout: Duration) -> Option<Resp> {
        let until = Instant::now() + timeout;
        loop {
            if let Some((value, used)) = parse_resp(&self.buf) {
                self.buf.drain(..used);
                return Some(value);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("Redis closed the plain connection"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => return None,
            }
        }
    }

    fn call(&mut self, args: &[&[u8]]) -> Resp {
        self.send(args);
        let reply = self.next(T).expect("a reply");
        if let Resp::Error(message) = &reply {
            panic!("{:?}: {message}", String::from_utf8_lossy(args[0]));
        }
        reply
    }

    /// The stream's (id, payload) pairs, oldest first.
    fn xrange(&mut self, key: &[u8]) -> Vec<(String, String)> {
        self.call(&[b"XRANGE", key, b"-", b"+"])
            .items()
            .iter()
            .map(|entry| {
                let entry = entry.items();
                let fields = entry[1].items();
                assert_eq!(fields[0].text(), b"d");
                (
                    String::from_utf8(entry[0].text().to_vec()).unwrap(),
                    String::from_utf8(fields[1].text().to_vec()).unwrap(),
                )
            })
            .collect()
    }

    /// Waits for a message push on a subscribed channel: (channel, payload).
    fn message(&mut self) -> (Vec<u8>, Vec<u8>) {
        loop {
            let push = self.next(T).expect("a message within the wait");
            let items = push.items();
            let kind = items[0].text();
            if kind == b"message" || kind == b"smessage" {
                return (items[1].text().to_vec(), items[2].text().to_vec());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// scenarios
// ---------------------------------------------------------------------------------------------

/// Process A publishes; process B's readers, in each mode that carries ids, get every message
/// once, in order, with the stream's ids; so does A's own reader.
fn ids_are_the_streams() {
    let url = redis_url();
    let prefix = unique_prefix("ids");
    let topic = b"news";
    let mut a = Agent::start(&url, &prefix, 1000);
    let mut b = Agent::start(&url, &prefix, 1000);
    let modes = [Mode::Sse, Mode::WsTextId, Mode::WsBinaryId];
    for (i, &mode) in modes.iter().enumerate() {
        b.tail(i, topic, mode, 0);
    }
    a.tail(0, topic, Mode::Sse, 0);
    const N: usize = 200;
    a.seq(topic, 0..N);
    // Every publish answered: all are in the stream.
    a.ok("wait_idle");

    let key = [prefix.as_bytes(), topic].concat();
    let stream = Plain::connect(&url).xrange(&key);
    assert_eq!(payloads(&stream), expected(0..N));
    for (i, _) in modes.iter().enumerate() {
        assert_eq!(b.expect(i, N), stream, "B's reader {i}");
    }
    assert_eq!(a.expect(0, N), stream, "A's own reader");
    let ids = ids(&stream);
    assert!(
        ids.windows(2).all(|pair| {
            EventId::parse(pair[0].as_bytes()).unwrap()
                < EventId::parse(pair[1].as_bytes()).unwrap()
        }),
        "increasing"
    );
    b.expect_quiet(0, N);
}

/// A reader of A stops after message k; it resumes through B, which had no reader of the
/// topic, while a thread of A keeps publishing: it gets k+1.., each once, recovered.
fn resume_through_another_process() {
    let url = redis_url();
    let prefix = unique_prefix("resume");
    let topic = b"feed";
    let mut a = Agent::start(&url, &prefix, 1000);
    let mut b = Agent::start(&url, &prefix, 1000);
    a.tail(0, topic, Mode::Sse, 0);
    const K: usize = 50;
    const N: usize = 400;
    a.seq(topic, 0..K);
    let first = a.expect(0, K);
    assert_eq!(payloads(&first), expected(0..K));
    let last = first.last().unwrap().0.clone();

    a.ok(&format!("bg {} {K} {N}", hex(topic)));
    assert!(b.since(0, topic, Mode::Sse, &last), "recovered");
    a.ok("bg_wait");
    let resumed = b.expect(0, N - K);
    assert_eq!(payloads(&resumed), expected(K..N));

    let key = [prefix.as_bytes(), topic].concat();
    let stream = Plain::connect(&url).xrange(&key);
    assert_eq!(stream[K..], resumed[..], "the stream's ids");
    // A resume from the newest id gets nothing but what comes next, live.
    let newest = resumed.last().unwrap().0.clone();
    assert!(b.since(1, topic, Mode::WsTextId, &newest));
    a.seq(topic, N..N + 3);
    assert_eq!(payloads(&b.expect(1, 3)), expected(N..N + 3));
    assert_eq!(
        payloads(&b.expect(0, N - K + 3))[N - K..],
        expected(N..N + 3)
    );
}

/// With history keeping 5 messages, a resume from an id older than that is not recovered and
/// gets the 5 kept; one from a kept id is recovered.
fn resume_from_a_trimmed_id() {
    let url = redis_url();
    let prefix = unique_prefix("trim");
    let topic = b"t";
    let mut a = Agent::start(&url, &prefix, 5);
    let mut b = Agent::start(&url, &prefix, 5);
    a.seq(topic, 0..20);
    a.ok("wait_idle");
    let key = [prefix.as_bytes(), topic].concat();
    let stream = Plain::connect(&url).xrange(&key);
    assert_eq!(payloads(&stream[stream.len() - 5..]), expected(15..20));

    assert!(!b.since(0, topic, Mode::Sse, &stream[stream.len() - 18].0));
    assert_eq!(b.expect(0, 5), stream[stream.len() - 5..]);
    assert!(b.since(1, topic, Mode::Sse, &stream[stream.len() - 3].0));
    assert_eq!(payloads(&b.expect(1, 2)), expected(18..20));
}

/// `subscribe_tail` through a process that never saw the topic gets the stream's last n.
fn tail_through_another_process() {
    let url = redis_url();
    let prefix = unique_prefix("tail");
    let topic = b"log";
    let mut a = Agent::start(&url, &prefix, 100);
    let mut b = Agent::start(&url, &prefix, 100);
    a.seq(topic, 0..30);
    a.ok("wait_idle");
    b.tail(0, topic, Mode::WsBinaryId, 4);
    let tail = b.expect(0, 4);
    assert_eq!(payloads(&tail), expected(26..30));
    let key = [prefix.as_bytes(), topic].concat();
    assert_eq!(Plain::connect(&url).xrange(&key)[26..], tail[..]);
    a.seq(topic, 30..32);
    assert_eq!(payloads(&b.expect(0, 6))[4..], expected(30..32));
}

/// A plain client that publishes with README's script is received with its id; plain
/// subscribers of the raw and id channels see the documented forms.
fn plain_clients() {
    let url = redis_url();
    let prefix = unique_prefix("plain");
    let topic = b"chat";
    let channel = [prefix.as_bytes(), topic].concat();
    let mut b = Agent::start(&url, &prefix, 100);
    b.tail(0, topic, Mode::Sse, 0);
    let mut raw = Plain::connect(&url);
    raw.call(&[b"SUBSCRIBE", &channel]);
    let mut ids_sub = Plain::connect(&url);
    ids_sub.call(&[b"SSUBSCRIBE", &channel]);

    // The one-step publish README gives plain clients.
    let script = "local id = redis.call('XADD', KEYS[1], '*', 'd', ARGV[1]) \
                  redis.call('PUBLISH', KEYS[1], ARGV[1]) \
                  redis.call('SPUBLISH', KEYS[1], id .. ' ' .. ARGV[1]) \
                  return id";
    let mut plain = Plain::connect(&url);
    let id = plain.call(&[b"EVAL", script.as_bytes(), b"1", &channel, b"from plain"]);
    let id = String::from_utf8(id.text().to_vec()).unwrap();
    let announced = format!("{id} from plain");
    assert_eq!(b.expect(0, 1), vec![(id.clone(), "from plain".to_string())]);
    assert_eq!(raw.message(), (channel.clone(), b"from plain".to_vec()));
    assert_eq!(ids_sub.message(), (channel.clone(), announced.into_bytes()));

    // fdcast's publish, seen by the plain subscribers.
    let mut a = Agent::start(&url, &prefix, 100);
    a.ok(&format!("pub {} {}", hex(topic), hex(b"from fdcast")));
    let got = b.expect(0, 2);
    assert_eq!(got[1].1, "from fdcast");
    assert_eq!(raw.message(), (channel.clone(), b"from fdcast".to_vec()));
    let (_, announced) = ids_sub.message();
    assert_eq!(announced, format!("{} from fdcast", got[1].0).into_bytes());
    assert_eq!(ids(&plain.xrange(&channel)), [id, got[1].0.clone()]);
}

/// B stops reading; A publishes, B's connection is killed, and A publishes far more than the
/// stream keeps before B reads again: B's reconnect fetches what the stream still holds, and
/// every message it can no longer get is counted once, in its fd_stats, the registry's stats
/// and the gap callback.
fn a_reconnect_past_the_limit_is_a_counted_gap() {
    let server = OwnRedis::start();
    let url = server.url();
    let prefix = unique_prefix("gap");
    let topic = b"g";
    let (mut a, mut b) = publisher_and_reader(&url, &prefix, 10, topic, 5);
    const N: usize = 3000;
    b.send("sleep 1500");
    a.seq(topic, 5..1000);
    a.ok("wait_idle");
    let mut plain = Plain::connect(&url);
    // B is the only client subscribed to anything.
    let killed = plain.call(&[b"CLIENT", b"KILL", b"TYPE", b"pubsub"]);
    assert_eq!(killed, Resp::Int(1));
    a.seq(topic, 1000..N);
    a.ok("wait_idle");
    b.answer("sleep");

    let got = b.read_until(0, &numbered(N - 1));
    let missing = missing_are_counted(&got, 5..N, b.lost(0));
    assert!(
        missing >= (N - 1000 - 200) as u64,
        "B was down for {} publishes and the stream keeps about 10: {missing} lost",
        N - 1000
    );
    let reconnects: u64 = b.ok("reconnects").parse().unwrap();
    assert!(reconnects >= 1, "B reconnected");
}

/// Kills process B's connection (CLIENT KILL on a Redis of its own) while A publishes: B's
/// reader gets every message once, in order, after B reconnects.
fn reconnect_after_client_kill() {
    let server = OwnRedis::start();
    let url = server.url();
    let prefix = unique_prefix("kill");
    let topic = b"k";
    let (mut a, mut b) = publisher_and_reader(&url, &prefix, 1000, topic, 10);
    let mut plain = Plain::connect(&url);
    // A publishes from another thread, one message a millisecond, through B's reconnect:
    // some while B is down, some while B subscribes again and fetches what it missed.
    const N: usize = 400;
    a.ok(&format!("bg {} 10 {N}", hex(topic)));
    thread::sleep(Duration::from_millis(50));
    // B is the only client subscribed to anything.
    let killed = plain.call(&[b"CLIENT", b"KILL", b"TYPE", b"pubsub"]);
    assert_eq!(killed, Resp::Int(1));
    a.ok("bg_wait");
    a.ok("wait_idle");
    b.ok("wait_idle");
    let got = b.expect(0, N);
    assert_eq!(payloads(&got), expected(0..N));
    let key = [prefix.as_bytes(), topic].concat();
    assert_eq!(plain.xrange(&key), got);
    let reconnects: u64 = b.ok("reconnects").parse().unwrap();
    assert!(reconnects >= 1, "B reconnected");
    b.expect_quiet(0, N);
}

/// History turned on after the broker is enabled: the session starts anew and shares it.
fn history_after_enable() {
    let url = redis_url();
    let prefix = unique_prefix("late");
    let topic = b"late";
    let mut a = Agent::spawn();
    a.ok(&format!("enable {url} {prefix}"));
    a.ok("history 100");
    a.ok("wait_idle");
    let mut b = Agent::start(&url, &prefix, 100);
    b.tail(0, topic, Mode::Sse, 0);
    a.seq(topic, 0..5);
    let got = b.expect(0, 5);
    assert_eq!(payloads(&got), expected(0..5));
    let key = [prefix.as_bytes(), topic].concat();
    assert_eq!(Plain::connect(&url).xrange(&key), got);
}

/// `publish_except` under shared history: the local delivery, one round trip later, skips
/// the sender; the count is the local subscribers at publish time; no id is known yet.
fn except_is_honoured() {
    let url = redis_url();
    let prefix = unique_prefix("except");
    let topic = b"room";
    let mut a = Agent::start(&url, &prefix, 100);
    let mut b = Agent::start(&url, &prefix, 100);
    a.tail(0, topic, Mode::Sse, 0);
    a.tail(1, topic, Mode::Sse, 0);
    b.tail(0, topic, Mode::Sse, 0);
    let reply = a.ok(&format!("pubx {} {} 1", hex(topic), hex(b"hello")));
    assert_eq!(
        reply, "1 -",
        "one local subscriber besides the sender, no id yet"
    );
    let got = a.expect(0, 1);
    assert_eq!(b.expect(0, 1), got);
    a.expect_quiet(1, 0);
    let key = [prefix.as_bytes(), topic].concat();
    assert_eq!(Plain::connect(&url).xrange(&key), got);
}

/// A resume the authorizer refuses still filled the mirror (the channel was subscribed for
/// it): the channel is given back, since no local subscriber needs it.
fn refused_resume() {
    let url = redis_url();
    let prefix = unique_prefix("refused");
    let topic = b"secret";
    let mut a = Agent::start(&url, &prefix, 10);
    a.seq(topic, 0..3);
    let mut b = Agent::start(&url, &prefix, 10);
    b.ok("deny");
    let errno: i32 = b
        .ok(&format!("since_refused {} 0-0", hex(topic)))
        .parse()
        .unwrap();
    assert_eq!(errno, libc::EACCES);
    b.ok("wait_topics 0");
    b.ok("wait_idle");
}

/// History switched off while the broker shares it: the session goes back to raw channels,
/// and publishes reach both processes at once again, without ids.
fn history_switched_off() {
    let url = redis_url();
    let prefix = unique_prefix("off");
    let topic = b"plain";
    let mut a = Agent::start(&url, &prefix, 100);
    let mut b = Agent::start(&url, &prefix, 100);
    for agent in [&mut a, &mut b] {
        agent.ok("history 0");
        agent.ok("wait_idle");
    }
    b.ok(&format!(
        "sub 0 {} {}",
        hex(topic),
        mode_index(Mode::WsTextId)
    ));
    b.got.insert(0, (Mode::WsTextId, Vec::new()));
    b.ok("wait_idle");
    let mut raw = Plain::connect(&url);
    let channel = [prefix.as_bytes(), topic].concat();
    raw.call(&[b"SUBSCRIBE", &channel]);
    // B's subscription may take a moment to be in effect: publish until B has one.
    let start = Instant::now();
    let got = loop {
        a.ok(&format!("pub {} {}", hex(topic), hex(b"x")));
        let bytes = unhex(&b.ok("read 0"));
        let (mode, buffer) = b.got.get_mut(&0).unwrap();
        buffer.extend_from_slice(&bytes);
        let got = parse(*mode, buffer);
        if !got.is_empty() {
            break got;
        }
        assert!(start.elapsed() < T, "B got nothing");
        thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(got[0], (String::new(), "x".to_string()), "no id");
    assert_eq!(raw.message(), (channel.clone(), b"x".to_vec()));
    assert!(
        Plain::connect(&url).xrange(&channel).is_empty(),
        "no stream"
    );
}

/// A's connection is killed (CLIENT KILL, on a Redis of its own) again and again while a
/// thread of A publishes bursts skipping reader 1: publishes whose reply a kill took, and
/// which Redis ran, come back in the fill after the reconnect. Reader 1 gets none of them,
/// reader 0 gets every message of the stream once, in order, and each publish is counted
/// once: published if the stream has it, dropped if not.
fn except_across_reconnects() {
    let server = OwnRedis::start();
    let url = server.url();
    let prefix = unique_prefix("xkill");
    let topic = b"x";
    let mut a = Agent::start(&url, &prefix, 100_000);
    a.tail(0, topic, Mode::Sse, 0);
    a.tail(1, topic, Mode::Sse, 0);
    a.ok("wait_idle");
    const N: usize = 20_000;
    a.ok(&format!("burst {} 0 {N} 1", hex(topic)));
    let mut plain = Plain::connect(&url);
    let key = [prefix.as_bytes(), topic].concat();
    let mut kills = 0;
    for _ in 0..40 {
        thread::sleep(Duration::from_millis(10));
        // A is the only client subscribed to anything.
        if let Resp::Int(1) = plain.call(&[b"CLIENT", b"KILL", b"TYPE", b"pubsub"]) {
            kills += 1;
        }
    }
    a.ok("bg_wait");
    a.ok("wait_idle");
    let stream = plain.xrange(&key);
    let got = a.expect(0, stream.len());
    assert_eq!(got, stream, "reader 0: the stream, once, in order");
    a.expect_quiet(1, 0);
    let stats = a.ok("stats");
    let [published, dropped, _]: [usize; 3] = stats
        .split(' ')
        .map(|n| n.parse().unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    assert_eq!(
        (published, dropped),
        (stream.len(), N - stream.len()),
        "{kills} kills"
    );
    assert!(kills >= 1, "A was connected when killed");
    println!(
        "shared_history: {kills} kills: {published} published, {dropped} dropped, reader 0 \
         got {}",
        got.len()
    );
}

/// The script cache is flushed again and again (SCRIPT FLUSH, on a Redis of its own) while
/// a thread of A publishes bursts: B's reader gets A's messages in A's order, each once,
/// none lost, and so does the stream.
fn order_through_script_flush() {
    let server = OwnRedis::start();
    let url = server.url();
    let prefix = unique_prefix("flush");
    let topic = b"f";
    let mut a = Agent::start(&url, &prefix, 100_000);
    let mut b = Agent::start(&url, &prefix, 100_000);
    b.tail(0, topic, Mode::Sse, 0);
    b.ok("wait_idle");
    const N: usize = 20_000;
    let done = Arc::new(AtomicBool::new(false));
    let flusher = {
        let (url, done) = (url.clone(), Arc::clone(&done));
        thread::spawn(move || {
            let mut plain = Plain::connect(&url);
            let mut flushes = 0;
            while !done.load(Ordering::Relaxed) {
                plain.call(&[b"SCRIPT", b"FLUSH"]);
                flushes += 1;
                thread::sleep(Duration::from_millis(2));
            }
            flushes
        })
    };
    a.ok(&format!("burst {} 0 {N} -", hex(topic)));
    a.ok("bg_wait");
    done.store(true, Ordering::Relaxed);
    let flushes = flusher.join().unwrap();
    assert!(flushes > 10, "{flushes} flushes");
    a.ok("wait_idle");
    let mut plain = Plain::connect(&url);
    let got = b.expect(0, N);
    assert_eq!(payloads(&got), expected(0..N), "in order, once, none lost");
    let key = [prefix.as_bytes(), topic].concat();
    assert_eq!(plain.xrange(&key), got);
    let stats = a.ok("stats");
    assert_eq!(stats.split(' ').nth(1), Some("0"), "none dropped: {stats}");
    println!("shared_history: {flushes} flushes during {N} publishes: in order");
}

/// History is switched off while a thread of A publishes bursts, and while Redis holds them
/// (CLIENT PAUSE, on a Redis of its own): the publishes in flight then are answered before
/// the session starts anew, so A's reader gets every message once and a plain subscriber of
/// the raw channel gets them all in A's order; none is dropped.
fn switch_off_keeps_publishes_in_flight() {
    let server = OwnRedis::start();
    let url = server.url();
    let prefix = unique_prefix("switch");
    let topic = b"s";
    let channel = [prefix.as_bytes(), topic].concat();
    let mut raw = Plain::connect(&url);
    raw.call(&[b"SUBSCRIBE", &channel]);
    let mut a = Agent::start(&url, &prefix, 100_000);
    a.tail(0, topic, Mode::WsTextId, 0);
    a.ok("wait_idle");
    const N: usize = 4_000;
    a.ok(&format!("burst {} 0 {N} -", hex(topic)));
    thread::sleep(Duration::from_millis(20));
    // Scripts wait while writes are paused: A's publishes stay in flight.
    let mut plain = Plain::connect(&url);
    plain.call(&[b"CLIENT", b"PAUSE", b"300", b"WRITE"]);
    thread::sleep(Duration::from_millis(50));
    a.ok("history 0");
    a.ok("bg_wait");
    a.ok("wait_idle");
    let stats = a.ok("stats");
    assert_eq!(stats.split(' ').nth(1), Some("0"), "none dropped: {stats}");
    // Those delivered by their replies may come after those published since, delivered at
    // once: each once, none lost.
    let mut got = payloads(&a.expect(0, N));
    got.sort_by_key(|payload| payload[1..].parse::<usize>().unwrap());
    assert_eq!(got, expected(0..N));
    let raw_got: Vec<String> = (0..N)
        .map(|_| String::from_utf8(raw.message().1).unwrap())
        .collect();
    assert_eq!(raw_got, expected(0..N), "the raw channel, in order");
}

// ---------------------------------------------------------------------------------------------
// a Redis of our own
// ---------------------------------------------------------------------------------------------

struct OwnRedis {
    child: Child,
    port: u16,
}

impl OwnRedis {
    fn start() -> OwnRedis {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < T, "redis-server did not listen");
            thread::sleep(Duration::from_millis(20));
        }
        OwnRedis { child, port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
