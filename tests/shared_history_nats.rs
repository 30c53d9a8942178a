//! History shared across processes through NATS JetStream, between real OS processes: this
//! binary re-runs itself as agents (a registry each, driven by one-line commands on stdin, as
//! tests/shared_history.rs does), and checks what their readers get against the stream
//! itself, read with a plain client (`$JS.API.STREAM.MSG.GET`).
//!
//! Needs the shared NATS server with JetStream (FDCAST_NATS_URL, default
//! nats://127.0.0.1:4222, started with `-js`) and the `nats-server` binary; fails without
//! them. The reconnect and JetStream-less scenarios start their own server on a free port.

mod common;
#[path = "common/history_agent.rs"]
mod history_agent;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use fdcast::{EventId, Mode};
use history_agent::*;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("agent") {
        return agent_main();
    }
    let started = Instant::now();
    with_watchdog(300, scenarios);
    println!(
        "shared_history_nats: ok ({:.1} s)",
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
            "shared_history_nats: {name}: ok ({:.1} s)",
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
        "a burst the topic's limit discards is a counted gap",
        &a_discarded_burst_is_a_counted_gap,
    );
    run(
        "tail through another process",
        &tail_through_another_process,
    );
    run("plain clients", &plain_clients);
    run("the sender's fd is skipped", &except_is_honoured);
    run("reconnect after kill -9", &reconnect_after_kill);
    run(
        "a consumer deleted on the server",
        &consumer_deleted_on_the_server,
    );
    run("a server without JetStream", &without_jetstream);
    run("history switched on after enable", &history_after_enable);
    run("history switched off again", &history_switched_off);
}

fn nats_url() -> String {
    std::env::var("FDCAST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A prefix no other run uses (plain, so the stream's name is `fdcast_<prefix>`).
fn unique_prefix(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("shn{}{tag}{nanos}", std::process::id())
}

fn stream_of(prefix: &str) -> String {
    format!("fdcast_{prefix}")
}

// ---------------------------------------------------------------------------------------------
// a plain NATS client
// ---------------------------------------------------------------------------------------------

/// A message as a plain client gets it.
#[derive(Debug)]
struct Msg {
    subject: String,
    sid: u64,
    headers: Vec<u8>,
    payload: Vec<u8>,
}

struct Plain {
    stream: TcpStream,
    buf: Vec<u8>,
    inbox: String,
    next: u64,
}

impl Plain {
    fn connect(url: &str) -> Plain {
        Plain::connect_with(url, true)
    }

    /// A client that asks for headers or not (HMSG, or the payload alone).
    fn connect_with(url: &str, headers: bool) -> Plain {
        let address = url.trim_start_matches("nats://").to_string();
        let stream = TcpStream::connect(&address).expect("the NATS server answers");
        let inbox = format!("_INBOX.plain{}", unique_prefix("p"));
        let mut plain = Plain {
            stream,
            buf: Vec::new(),
            inbox,
            next: 0,
        };
        let command = format!(
            "CONNECT {{\"verbose\":false,\"headers\":{headers},\"no_responders\":{headers}}}\r\n\
             SUB {}.* 1\r\nPING\r\n",
            plain.inbox
        );
        plain.stream.write_all(command.as_bytes()).unwrap();
        plain.pong();
        plain
    }

    /// Reads until a PONG.
    fn pong(&mut self) {
        let deadline = Instant::now() + T;
        loop {
            if let Some(at) = self.buf.windows(6).position(|w| w == b"PONG\r\n") {
                // Messages before it are not expected on a fresh subscription.
                self.buf.drain(..at + 6);
                return;
            }
            self.fill(deadline);
        }
    }

    fn fill(&mut self, deadline: Instant) {
        let now = Instant::now();
        assert!(now < deadline, "plain NATS client: nothing within {T:?}");
        self.stream
            .set_read_timeout(Some((deadline - now).min(Duration::from_millis(200))))
            .unwrap();
        let mut chunk = [0u8; 65536];
        match self.stream.read(&mut chunk) {
            Ok(0) => panic!("the NATS server closed the plain connection"),
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            Err(_) => {}
        }
    }

    /// The next MSG or HMSG.
    fn message(&mut self) -> Msg {
        let deadline = Instant::now() + T;
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8(self.buf[..end].to_vec()).unwrap();
                let words: Vec<&str> = line.split_whitespace().collect();
                match words[0] {
                    "MSG" | "HMSG" => {
                        let total: usize = words[words.len() - 1].parse().unwrap();
                        let header_len: usize = if words[0] == "HMSG" {
                            words[words.len() - 2].parse().unwrap()
                        } else {
                            0
                        };
                        if self.buf.len() >= end + 2 + total + 2 {
                            let body = self.buf[end + 2..end + 2 + total].to_vec();
                            self.buf.drain(..end + 2 + total + 2);
                            return Msg {
                                subject: words[1].to_string(),
                                sid: words[2].parse().unwrap(),
                                headers: body[..header_len].to_vec(),
                                payload: body[header_len..].to_vec(),
                            };
                        }
                    }
                    "PING" => {
                        self.buf.drain(..end + 2);
                        self.stream.write_all(b"PONG\r\n").unwrap();
                        continue;
                    }
                    _ => {
                        self.buf.drain(..end + 2);
                        continue;
                    }
                }
            }
            self.fill(deadline);
        }
    }

    fn publish(&mut self, subject: &str, payload: &[u8]) {
        let mut command = format!("PUB {subject} {}\r\n", payload.len()).into_bytes();
        command.extend_from_slice(payload);
        command.extend_from_slice(b"\r\n");
        self.stream.write_all(&command).unwrap();
    }

    /// Subscribes `subject` as `sid`, in effect when this returns.
    fn subscribe(&mut self, subject: &str, sid: u64) {
        let command = format!("SUB {subject} {sid}\r\nPING\r\n");
        self.stream.write_all(command.as_bytes()).unwrap();
        self.pong();
    }

    /// A JetStream API request's answer.
    fn request(&mut self, api: &str, body: &str) -> String {
        self.next += 1;
        let reply = format!("{}.{}", self.inbox, self.next);
        let command = format!("PUB $JS.API.{api} {reply} {}\r\n{body}\r\n", body.len());
        self.stream.write_all(command.as_bytes()).unwrap();
        loop {
            let msg = self.message();
            if msg.subject == reply {
                assert!(
                    msg.headers.is_empty(),
                    "{:?}",
                    String::from_utf8_lossy(&msg.headers)
                );
                return String::from_utf8(msg.payload).unwrap();
            }
        }
    }

    /// The stream's messages on `subject`: (sequence, payload), oldest first.
    fn stream_messages(&mut self, stream: &str, subject: &str) -> Vec<(u64, String)> {
        let mut messages = Vec::new();
        let mut seq = 1;
        loop {
            let answer = self.request(
                &format!("STREAM.MSG.GET.{stream}"),
                &format!("{{\"seq\":{seq},\"next_by_subj\":\"{subject}\"}}"),
            );
            if answer.contains("\"error\"") {
                assert!(answer.contains("10037"), "{answer}");
                return messages;
            }
            let found: u64 = json_number(&answer, "seq");
            let data = json_string(&answer, "data");
            let data = base64::engine::general_purpose::STANDARD
                .decode(data)
                .unwrap();
            messages.push((found, String::from_utf8(data).unwrap()));
            seq = found + 1;
        }
    }

    fn delete_stream(&mut self, stream: &str) {
        let answer = self.request(&format!("STREAM.DELETE.{stream}"), "");
        assert!(answer.contains("\"success\":true"), "{answer}");
    }
}

fn json_number(json: &str, key: &str) -> u64 {
    let at = json.find(&format!("\"{key}\":")).expect(key) + key.len() + 3;
    let digits: String = json[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap()
}

fn json_string(json: &str, key: &str) -> String {
    let at = json.find(&format!("\"{key}\":\"")).expect(key) + key.len() + 4;
    json[at..].chars().take_while(|&c| c != '"').collect()
}

/// The stream's messages as readers should see them: (`<epoch>-<seq>`, payload).
fn as_read(epoch: &str, stream: &[(u64, String)]) -> Vec<(String, String)> {
    stream
        .iter()
        .map(|(seq, payload)| (format!("{epoch}-{seq}"), payload.clone()))
        .collect()
}

fn epoch_of(id: &str) -> String {
    id.split_once('-').expect("<epoch>-<seq>").0.to_string()
}

/// The stream's `created` time, in nanoseconds since 1970, as a plain client reads it.
fn created_nanos(plain: &mut Plain, stream: &str) -> String {
    let info = plain.request(&format!("STREAM.INFO.{stream}"), "");
    let created = json_string(&info, "created");
    // 2026-12-06T17:50:30.840370237Z
    let number = |range: std::ops::Range<usize>| created[range].parse::<i64>().unwrap();
    let (year, month, day) = (number(0..4), number(5..7), number(8..10));
    let seconds_of_day = number(11..13) * 3600 + number(14..16) * 60 + number(17..19);
    let fraction = created[20..created.len() - 1].to_string();
    let nanos: i64 = format!("{fraction:0<9}").parse().unwrap();
    // Days from 1970-01-01, counted the long way round.
    let is_leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let mut days: i64 = (1970..year)
        .map(|y| if is_leap(y) { 366 } else { 365 })
        .sum();
    let month_days = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    for m in 1..month {
        days += month_days[(m - 1) as usize] + i64::from(m == 2 && is_leap(year));
    }
    days += day - 1;
    ((days * 86_400 + seconds_of_day) * 1_000_000_000 + nanos).to_string()
}

// ---------------------------------------------------------------------------------------------
// scenarios
// ---------------------------------------------------------------------------------------------

/// Process A publishes; process B's readers, in each mode that carries ids, get every message
/// once, in order, with `<stream created ns>-<stream seq>` ids; so does A's own reader.
fn ids_are_the_streams() {
    let url = nats_url();
    let prefix = unique_prefix("ids");
    let stream = stream_of(&prefix);
    let topic = b"news";
    let mut a = Agent::start(&url, &prefix, 1000);
    let mut b = Agent::start(&url, &prefix, 1000);
    let modes = [Mode::Sse, Mode::WsTextId, Mode::WsBinaryId];
    for (i, &mode) in modes.iter().enumerate() {
        b.tail(i, topic, mode, 0);
    }
    a.tail(0, topic, Mode::Sse, 0);
    // Another topic in between: the stream's sequences are sparse per topic.
    let other = b"other";
    const N: usize = 200;
    for n in 0..N {
        a.ok(&format!(
            "pub {} {}",
            hex(topic),
            hex(numbered(n).as_bytes())
        ));
        if n % 10 == 0 {
            a.ok(&format!("pub {} {}", hex(other), hex(b"x")));
        }
    }
    let got = a.expect(0, N);
    let mut plain = Plain::connect(&url);
    let kept = plain.stream_messages(&stream, &format!("{prefix}.news"));
    let epoch = created_nanos(&mut plain, &stream);
    let kept = as_read(&epoch, &kept);
    assert_eq!(payloads(&kept), expected(0..N));
    assert_eq!(got, kept, "A's own reader");
    for (i, _) in modes.iter().enumerate() {
        assert_eq!(b.expect(i, N), kept, "B's reader {i}");
    }
    let seqs: Vec<u64> = kept
        .iter()
        .map(|(id, _)| EventId::parse(id.as_bytes()).unwrap().offset)
        .collect();
    assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]), "increasing");
    assert!(
        seqs.last().unwrap() - seqs[0] >= N as u64,
        "sparse: {seqs:?}"
    );
    b.expect_quiet(0, N);
    plain.delete_stream(&stream);
}

/// A reader of A stops after message k; it resumes through B, which had no reader of the
/// topic, while a thread of A keeps publishing: it gets k+1.., each once, recovered.
fn resume_through_another_process() {
    let url = nats_url();
    let prefix = unique_prefix("resume");
    let stream = stream_of(&prefix);
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

    let mut plain = Plain::connect(&url);
    let kept = plain.stream_messages(&stream, &format!("{prefix}.feed"));
    let kept = as_read(&epoch_of(&last), &kept);
    assert_eq!(kept[K..], resumed[..], "the stream's ids");
    // A resume from the newest id gets nothing but what comes next, live.
    let newest = resumed.last().unwrap().0.clone();
    assert!(b.since(1, topic, Mode::WsTextId, &newest));
    a.seq(topic, N..N + 3);
    assert_eq!(payloads(&b.expect(1, 3)), expected(N..N + 3));
    assert_eq!(
        payloads(&b.expect(0, N - K + 3))[N - K..],
        expected(N..N + 3)
    );
    plain.delete_stream(&stream);
}

/// With history keeping 5 messages a topic, a resume from an id older than that is not
/// recovered and gets the 5 kept; one from a kept id is recovered. (A burst of more than 5
/// published faster than a consumer delivers them may reach a reader incomplete: the stream
/// discards a topic's oldest whether or not it was delivered; so no reader is checked here.)
fn resume_from_a_trimmed_id() {
    let url = nats_url();
    let prefix = unique_prefix("trim");
    let stream = stream_of(&prefix);
    let topic = b"t";
    let mut a = Agent::start(&url, &prefix, 5);
    let mut b = Agent::start(&url, &prefix, 5);
    a.seq(topic, 0..20);
    a.ok("wait_idle");
    let mut plain = Plain::connect(&url);
    let subject = format!("{prefix}.t");
    let start = Instant::now();
    let kept = loop {
        let kept = plain.stream_messages(&stream, &subject);
        if kept
            .last()
            .is_some_and(|(_, payload)| *payload == numbered(19))
        {
            break kept;
        }
        assert!(start.elapsed() < T, "the stream never got the last publish");
        thread::sleep(Duration::from_millis(10));
    };
    let epoch = created_nanos(&mut plain, &stream);
    let kept = as_read(&epoch, &kept);
    assert_eq!(payloads(&kept), expected(15..20), "the stream keeps 5");

    let trimmed = format!(
        "{epoch}-{}",
        kept[0].0.split_once('-').unwrap().1.parse::<u64>().unwrap() - 2
    );
    assert!(!b.since(0, topic, Mode::Sse, &trimmed));
    assert_eq!(b.expect(0, 5), kept);
    assert!(b.since(1, topic, Mode::Sse, &kept[2].0));
    assert_eq!(b.expect(1, 2), kept[3..]);
    // Through the publisher too, which had no reader of the topic.
    assert!(!a.since(0, topic, Mode::WsTextId, &trimmed));
    assert_eq!(a.expect(0, 5), kept);
    plain.delete_stream(&stream);
}

/// B stops reading while A publishes a burst far over the topic's limit: the stream discards
/// what B's consumer had not delivered. B's reader gets the rest in order, and every message
/// it misses is counted, once, in its fd_stats, the registry's stats and the gap callback.
fn a_discarded_burst_is_a_counted_gap() {
    let url = nats_url();
    let prefix = unique_prefix("burst");
    let stream = stream_of(&prefix);
    let topic = b"burst";
    const N: usize = 20_000;
    // B's consumer exists once a first message reaches it.
    let (mut a, mut b) = publisher_and_reader(&url, &prefix, 10, topic, 1);

    b.send("sleep 1500");
    a.seq(topic, 1..N);
    a.ok("wait_idle");
    b.answer("sleep");

    let got = b.read_until(0, &numbered(N - 1));
    let missing = missing_are_counted(&got, 1..N, b.lost(0));
    assert!(
        missing > 0,
        "a 1.5 s stall over a {N}-message burst lost nothing: the test no longer stalls B's consumer"
    );
    println!("  {missing} of {} lost, all counted", N - 1);
    Plain::connect(&url).delete_stream(&stream);
}

/// `subscribe_tail` through a process that never saw the topic gets the stream's last n.
fn tail_through_another_process() {
    let url = nats_url();
    let prefix = unique_prefix("tail");
    let stream = stream_of(&prefix);
    let topic = b"log";
    let mut a = Agent::start(&url, &prefix, 100);
    let mut b = Agent::start(&url, &prefix, 100);
    a.seq(topic, 0..30);
    a.ok("wait_idle");
    let mut plain = Plain::connect(&url);
    let subject = format!("{prefix}.log");
    let start = Instant::now();
    while plain.stream_messages(&stream, &subject).len() < 30 {
        assert!(start.elapsed() < T, "the stream never held 30");
        thread::sleep(Duration::from_millis(10));
    }
    b.tail(0, topic, Mode::WsBinaryId, 4);
    let tail = b.expect(0, 4);
    assert_eq!(payloads(&tail), expected(26..30));
    let kept = plain.stream_messages(&stream, &subject);
    assert_eq!(as_read(&epoch_of(&tail[0].0), &kept)[26..], tail[..]);
    a.seq(topic, 30..32);
    assert_eq!(payloads(&b.expect(0, 6))[4..], expected(30..32));
    plain.delete_stream(&stream);
}

/// A plain client's PUB on the subject is stored and delivered with its id; a plain core
/// subscriber sees fdcast's publishes as raw payloads.
fn plain_clients() {
    let url = nats_url();
    let prefix = unique_prefix("plain");
    let stream = stream_of(&prefix);
    let topic = b"chat";
    let subject = format!("{prefix}.chat");
    let mut b = Agent::start(&url, &prefix, 100);
    b.tail(0, topic, Mode::Sse, 0);
    b.ok("wait_idle");
    let mut raw = Plain::connect(&url);
    raw.subscribe(&subject, 7);
    let mut old = Plain::connect_with(&url, false);
    old.subscribe(&subject, 8);

    let mut plain = Plain::connect(&url);
    plain.publish(&subject, b"from plain");
    let got = b.expect(0, 1);
    assert_eq!(got[0].1, "from plain");
    let kept = plain.stream_messages(&stream, &subject);
    assert_eq!(as_read(&epoch_of(&got[0].0), &kept), got);
    let msg = raw.message();
    assert_eq!((msg.sid, &msg.payload[..]), (7, &b"from plain"[..]));
    assert_eq!(old.message().payload, b"from plain");

    // fdcast's publish, seen by the plain subscriber as its payload alone (its header is
    // fdcast's own, and a client without headers would not get it).
    let mut a = Agent::start(&url, &prefix, 100);
    a.ok(&format!("pub {} {}", hex(topic), hex(b"from fdcast")));
    let got = b.expect(0, 2);
    assert_eq!(got[1].1, "from fdcast");
    let msg = raw.message();
    assert_eq!((msg.sid, &msg.payload[..]), (7, &b"from fdcast"[..]));
    assert!(
        String::from_utf8_lossy(&msg.headers).contains("Fdcast-Origin: "),
        "{msg:?}"
    );
    // A client without headers gets a plain MSG with the payload alone.
    let msg = old.message();
    assert_eq!(
        (msg.sid, &msg.payload[..], msg.headers.len()),
        (8, &b"from fdcast"[..], 0)
    );
    let kept = plain.stream_messages(&stream, &subject);
    assert_eq!(as_read(&epoch_of(&got[0].0), &kept), got);
    plain.delete_stream(&stream);
}

/// `publish_except` under shared history: the local delivery, one round trip later, skips
/// the sender; the count is the local subscribers at publish time; no id is known yet.
fn except_is_honoured() {
    let url = nats_url();
    let prefix = unique_prefix("except");
    let stream = stream_of(&prefix);
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
    let mut plain = Plain::connect(&url);
    let kept = plain.stream_messages(&stream, &format!("{prefix}.room"));
    assert_eq!(as_read(&epoch_of(&got[0].0), &kept), got);
    plain.delete_stream(&stream);
}

/// kill -9 of the NATS server (its own, with a store directory) while A publishes, then a
/// restart on the same port and store: B's reader gets what the stream holds, each once, in
/// order, and what A publishes after.
/// A consumer deleted on the server (by an operator, say) while the connection stays up:
/// its heartbeats stop, and after three missed ones the process replaces it, resuming after
/// the last message it delivered.
fn consumer_deleted_on_the_server() {
    let url = nats_url();
    let prefix = unique_prefix("del");
    let stream = stream_of(&prefix);
    let topic = b"d";
    let (mut a, mut b) = publisher_and_reader(&url, &prefix, 1000, topic, 3);
    let mut plain = Plain::connect(&url);
    let answer = plain.request(&format!("CONSUMER.NAMES.{stream}"), "");
    let names: Vec<String> = answer
        .split("\"consumers\":[")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .unwrap_or_else(|| panic!("{answer}"))
        .split(',')
        .map(|name| name.trim_matches('"').to_string())
        .filter(|name| !name.is_empty())
        .collect();
    assert_eq!(names.len(), 1, "B's consumer alone: {answer}");
    let deleted = plain.request(&format!("CONSUMER.DELETE.{stream}.{}", names[0]), "");
    assert!(deleted.contains("\"success\":true"), "{deleted}");
    a.seq(topic, 3..6);
    let got = b.expect(0, 6);
    assert_eq!(payloads(&got), expected(0..6));
    b.expect_quiet(0, 6);
}

fn reconnect_after_kill() {
    let mut server = OwnNats::start(true);
    let url = server.url();
    let prefix = unique_prefix("kill");
    let stream = stream_of(&prefix);
    let topic = b"k";
    let (mut a, mut b) = publisher_and_reader(&url, &prefix, 1000, topic, 10);
    const N: usize = 300;
    a.ok(&format!("bg {} 10 {N}", hex(topic)));
    thread::sleep(Duration::from_millis(50));
    server.kill();
    thread::sleep(Duration::from_millis(200));
    server.restart();
    a.ok("bg_wait");
    a.ok("wait_idle");
    b.ok("wait_idle");
    // Publishes after both are back: the consumers resumed.
    a.seq(topic, N..N + 5);
    let mut plain = Plain::connect(&url);
    let subject = format!("{prefix}.k");
    let start = Instant::now();
    let kept = loop {
        let kept = plain.stream_messages(&stream, &subject);
        if kept
            .last()
            .is_some_and(|(_, payload)| *payload == numbered(N + 4))
        {
            break kept;
        }
        assert!(start.elapsed() < T, "the stream never got the last publish");
        thread::sleep(Duration::from_millis(20));
    };
    let got = b.expect(0, kept.len());
    assert_eq!(as_read(&epoch_of(&got[0].0), &kept), got);
    // Lost only what the kill took from A's socket: the rest in order, once.
    let numbers: Vec<usize> = payloads(&got)
        .iter()
        .map(|payload| payload[1..].parse().unwrap())
        .collect();
    assert!(
        numbers.windows(2).all(|pair| pair[0] < pair[1]),
        "{numbers:?}"
    );
    assert_eq!(&numbers[..10], &(0..10).collect::<Vec<_>>()[..]);
    assert!(
        numbers.ends_with(&(N..N + 5).collect::<Vec<_>>()),
        "{numbers:?}"
    );
    let reconnects: u64 = b.ok("reconnects").parse().unwrap();
    assert!(reconnects >= 1, "B reconnected");
    b.expect_quiet(0, kept.len());
}

/// A server without JetStream: history stays per process (ids at publish time, each
/// process's own), and messages still cross.
fn without_jetstream() {
    let server = OwnNats::start(false);
    let url = server.url();
    let prefix = unique_prefix("nojs");
    let topic = b"plain";
    let mut a = Agent::start(&url, &prefix, 100);
    let mut b = Agent::start(&url, &prefix, 100);
    b.tail(0, topic, Mode::Sse, 0);
    b.ok("wait_idle");
    // B's subscription may take a moment to be in effect: publish until B has one.
    let start = Instant::now();
    let (got, ids) = {
        let mut ids = Vec::new();
        loop {
            let reply = a.ok(&format!("pubid {} {}", hex(topic), hex(b"x")));
            let id = reply.split_once(' ').unwrap().1.to_string();
            assert!(
                EventId::parse(id.as_bytes()).is_some(),
                "a local id: {reply}"
            );
            ids.push(id);
            let bytes = unhex(&b.ok("read 0"));
            let (mode, buffer) = b.got.get_mut(&0).unwrap();
            buffer.extend_from_slice(&bytes);
            let got = parse(*mode, buffer);
            if !got.is_empty() {
                break (got, ids);
            }
            assert!(start.elapsed() < T, "B got nothing");
            thread::sleep(Duration::from_millis(20));
        }
    };
    assert_eq!(got[0].1, "x");
    assert_ne!(epoch_of(&got[0].0), epoch_of(&ids[0]), "B's own ids");
}

/// History turned on after the broker is enabled: the session starts anew and shares it.
fn history_after_enable() {
    let url = nats_url();
    let prefix = unique_prefix("late");
    let stream = stream_of(&prefix);
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
    let mut plain = Plain::connect(&url);
    let kept = plain.stream_messages(&stream, &format!("{prefix}.late"));
    assert_eq!(as_read(&epoch_of(&got[0].0), &kept), got);
    plain.delete_stream(&stream);
}

/// History switched off while the broker shares it: the session goes back to plain
/// subjects, and publishes reach both processes at once again, without ids, unstored.
fn history_switched_off() {
    let url = nats_url();
    let prefix = unique_prefix("off");
    let stream = stream_of(&prefix);
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
    let subject = format!("{prefix}.plain");
    raw.subscribe(&subject, 3);
    let mut plain = Plain::connect(&url);
    let before = plain.stream_messages(&stream, &subject).len();
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
    let msg = raw.message();
    assert_eq!(
        (msg.sid, &msg.payload[..], msg.headers.len()),
        (3, &b"x"[..], 0)
    );
    // The stream still captures the subject (plain NATS publishes land in it), but fdcast no
    // longer reads it.
    let start = Instant::now();
    while plain.stream_messages(&stream, &subject).len() <= before {
        assert!(
            start.elapsed() < T,
            "the stream never stored the plain publish"
        );
        thread::sleep(Duration::from_millis(10));
    }
    plain.delete_stream(&stream);
}

// ---------------------------------------------------------------------------------------------
// a NATS server of our own
// ---------------------------------------------------------------------------------------------

struct OwnNats {
    child: Option<Child>,
    port: u16,
    jetstream: bool,
    dir: std::path::PathBuf,
}

impl OwnNats {
    fn start(jetstream: bool) -> OwnNats {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(unique_prefix("store"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = OwnNats {
            child: None,
            port,
            jetstream,
            dir,
        };
        server.restart();
        server
    }

    fn restart(&mut self) {
        let mut command = Command::new("nats-server");
        command.args(["-a", "127.0.0.1", "-p", &self.port.to_string()]);
        if self.jetstream {
            command.arg("-js").arg("-sd").arg(&self.dir);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(start.elapsed() < T, "nats-server did not listen");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, and waits for it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
