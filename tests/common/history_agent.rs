//! The agent of the shared-history tests (tests/shared_history.rs, Redis streams;
//! tests/shared_history_nats.rs, NATS JetStream): a child process that owns a registry with
//! history on and a broker, and obeys one-line commands on its stdin; and [`Agent`], the test's
//! handle on one. Both tests include this file with `#[path]`, so the two engines are driven
//! by the same commands and read back the same way.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use fdcast::{EventId, HistoryLimits, Mode, Registry};

use super::common::*;

/// Any single wait, at most.
pub const T: Duration = Duration::from_secs(30);

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

pub fn numbered(n: usize) -> String {
    format!("m{n}")
}

pub fn mode_index(mode: Mode) -> usize {
    Mode::ALL.iter().position(|&m| m == mode).unwrap()
}

// ---------------------------------------------------------------------------------------------
// the agent
// ---------------------------------------------------------------------------------------------

pub struct AgentSub {
    /// The registry's end, kept open while it is subscribed.
    pub _ours: UnixStream,
    pub peer: UnixStream,
    pub got: Vec<u8>,
}

pub fn agent_main() {
    let registry = Arc::new(Registry::new().unwrap());
    registry.set_outbox_limit(64 << 20);
    let told_lost = Arc::new(AtomicU64::new(0));
    let tell = Arc::clone(&told_lost);
    registry.set_gap_callback(Some(Box::new(move |_, _, lost| {
        tell.fetch_add(lost, Ordering::Relaxed);
    })));
    let (tx, rx) = mpsc::channel::<String>();
    thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut subs: HashMap<String, AgentSub> = HashMap::new();
    let mut background: Option<thread::JoinHandle<()>> = None;
    let mut out = std::io::stdout().lock();
    let new_sub = |subs: &mut HashMap<String, AgentSub>, id: &str| {
        let (ours, peer) = socketpair_nonblocking();
        let fd = ours.as_raw_fd();
        let sub = AgentSub {
            _ours: ours,
            peer,
            got: Vec::new(),
        };
        assert!(subs.insert(id.to_string(), sub).is_none(), "sub {id} twice");
        fd
    };
    loop {
        agent_turn(&registry, &mut subs);
        let line = match rx.try_recv() {
            Ok(line) => line,
            Err(mpsc::TryRecvError::Empty) => continue,
            Err(mpsc::TryRecvError::Disconnected) => break,
        };
        let words: Vec<&str> = line.split(' ').collect();
        let reply = match words.as_slice() {
            ["history", max_messages] => {
                registry.set_history(HistoryLimits {
                    max_messages: max_messages.parse().unwrap(),
                    ..HistoryLimits::default()
                });
                "ok".to_string()
            }
            ["enable", url, name] => match registry.broker_enable(url, name) {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("err {} {e}", e.errno()),
            },
            ["sub", id, topic, mode] => {
                let fd = new_sub(&mut subs, id);
                let mode = Mode::ALL[mode.parse::<usize>().unwrap()];
                registry.subscribe(&unhex(topic), fd, mode).unwrap();
                "ok".to_string()
            }
            ["deny"] => {
                registry.set_authorizer(Some(Box::new(|_, _, _| false)));
                "ok".to_string()
            }
            ["since_refused", topic, last] => {
                let (ours, _peer) = socketpair_nonblocking();
                let last = EventId::parse(last.as_bytes()).unwrap();
                let err = registry
                    .subscribe_since(&unhex(topic), ours.as_raw_fd(), Mode::Sse, last)
                    .unwrap_err();
                format!("ok {}", err.errno())
            }
            ["wait_topics", n] => {
                let n: u64 = n.parse().unwrap();
                let start = Instant::now();
                while registry.broker_stats().topics != n {
                    assert!(start.elapsed() < T, "agent: not {n} topics");
                    agent_turn(&registry, &mut subs);
                }
                "ok".to_string()
            }
            ["since", id, topic, mode, last] => {
                let fd = new_sub(&mut subs, id);
                let mode = Mode::ALL[mode.parse::<usize>().unwrap()];
                let last = EventId::parse(last.as_bytes()).unwrap();
                let (_, recovered) = registry
                    .subscribe_since(&unhex(topic), fd, mode, last)
                    .unwrap();
                format!("ok {}", u8::from(recovered))
            }
            ["tail", id, topic, mode, n] => {
                let fd = new_sub(&mut subs, id);
                let mode = Mode::ALL[mode.parse::<usize>().unwrap()];
                registry
                    .subscribe_tail(&unhex(topic), fd, mode, n.parse().unwrap())
                    .unwrap();
                "ok".to_string()
            }
            // publish_with_id: "ok <matched> <id or ->".
            ["pubid", topic, payload] => {
                let (matched, id) = registry
                    .publish_with_id(&unhex(topic), &unhex(payload), None)
                    .unwrap();
                let id = id.map_or("-".to_string(), |id| id.to_string());
                format!("ok {matched} {id}")
            }
            ["pub", topic, payload] => match registry.publish(&unhex(topic), &unhex(payload)) {
                Ok(n) => format!("ok {n}"),
                Err(e) => format!("err {} {e}", e.errno()),
            },
            // publish_with_id, skipping reader `except`'s fd: "ok <matched> <id or ->".
            ["pubx", topic, payload, except] => {
                let fd = subs[*except]._ours.as_raw_fd();
                let (matched, id) = registry
                    .publish_with_id(&unhex(topic), &unhex(payload), Some(fd))
                    .unwrap();
                let id = id.map_or("-".to_string(), |id| id.to_string());
                format!("ok {matched} {id}")
            }
            ["seq", topic, from, to] => {
                let topic = unhex(topic);
                for n in from.parse().unwrap()..to.parse().unwrap() {
                    registry.publish(&topic, numbered(n).as_bytes()).unwrap();
                }
                "ok".to_string()
            }
            // Publishes from another thread, one message every millisecond, while this one
            // goes on taking commands and dispatching.
            ["bg", topic, from, to] => {
                let topic = unhex(topic);
                let (from, to): (usize, usize) = (from.parse().unwrap(), to.parse().unwrap());
                let registry = Arc::clone(&registry);
                background = Some(thread::spawn(move || {
                    for n in from..to {
                        registry.publish(&topic, numbered(n).as_bytes()).unwrap();
                        thread::sleep(Duration::from_millis(1));
                    }
                }));
                "ok".to_string()
            }
            // Publishes from another thread in bursts of 50 (a pipeline of publishes in
            // flight), 1 ms apart, skipping reader `except`'s fd (`-`: none).
            ["burst", topic, from, to, except] => {
                let topic = unhex(topic);
                let (from, to): (usize, usize) = (from.parse().unwrap(), to.parse().unwrap());
                let except = (*except != "-").then(|| subs[*except]._ours.as_raw_fd());
                let registry = Arc::clone(&registry);
                background = Some(thread::spawn(move || {
                    for n in from..to {
                        registry
                            .publish_with_id(&topic, numbered(n).as_bytes(), except)
                            .unwrap();
                        if n % 50 == 49 {
                            thread::sleep(Duration::from_millis(1));
                        }
                    }
                }));
                "ok".to_string()
            }
            ["bg_wait"] => {
                let handle = background.take().expect("a background publisher");
                while !handle.is_finished() {
                    agent_turn(&registry, &mut subs);
                }
                handle.join().unwrap();
                "ok".to_string()
            }
            ["read", id] => {
                agent_turn(&registry, &mut subs);
                let sub = subs.get_mut(*id).expect("a known sub");
                format!("ok {}", hex(&std::mem::take(&mut sub.got)))
            }
            ["reconnects"] => format!("ok {}", registry.broker_stats().reconnects),
            // Stops reading anything (the broker's socket included) for a while.
            ["sleep", ms] => {
                thread::sleep(Duration::from_millis(ms.parse().unwrap()));
                "ok".to_string()
            }
            // Messages lost to gaps: "ok <reader's fd_stats> <registry's stats> <callback's sum>".
            ["lost", id] => {
                let fd = subs[*id]._ours.as_raw_fd();
                format!(
                    "ok {} {} {}",
                    registry.fd_stats(fd).unwrap().lost_to_gaps,
                    registry.stats().lost_to_gaps,
                    told_lost.load(Ordering::Relaxed)
                )
            }
            ["stats"] => {
                let stats = registry.broker_stats();
                format!(
                    "ok {} {} {}",
                    stats.published, stats.dropped, stats.received
                )
            }
            ["wait_idle"] => {
                let start = Instant::now();
                loop {
                    let stats = registry.broker_stats();
                    if stats.connected == 1 && stats.queued == 0 {
                        break;
                    }
                    assert!(start.elapsed() < T, "agent: not idle: {stats:?}");
                    agent_turn(&registry, &mut subs);
                }
                "ok".to_string()
            }
            _ => panic!("agent: unknown command {line:?}"),
        };
        writeln!(out, "{reply}").unwrap();
        out.flush().unwrap();
    }
    registry.broker_disable();
}

pub fn agent_turn(registry: &Registry, subs: &mut HashMap<String, AgentSub>) {
    registry.dispatch(Some(Duration::from_millis(2))).unwrap();
    for sub in subs.values_mut() {
        let (bytes, eof) = read_now(sub.peer.as_raw_fd());
        assert!(!eof, "agent: a subscriber was closed");
        sub.got.extend(bytes);
    }
}

pub struct Agent {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub stdout: BufReader<ChildStdout>,
    /// What each reader got so far, parsed as (id, payload) per its mode.
    pub got: HashMap<usize, (Mode, Vec<u8>)>,
}

/// Agents A and B on `prefix` (history keeping `max_messages`), B's SSE reader 0 tailing
/// `topic` from now on and checked to hold A's first `first` messages (so B's subscription is
/// in effect on the broker).
pub fn publisher_and_reader(
    url: &str,
    prefix: &str,
    max_messages: usize,
    topic: &[u8],
    first: usize,
) -> (Agent, Agent) {
    let mut a = Agent::start(url, prefix, max_messages);
    let mut b = Agent::start(url, prefix, max_messages);
    b.tail(0, topic, Mode::Sse, 0);
    a.seq(topic, 0..first);
    assert_eq!(payloads(&b.expect(0, first)), expected(0..first));
    (a, b)
}

impl Agent {
    /// An agent with history on (`max_messages`) and the broker enabled.
    pub fn start(url: &str, prefix: &str, max_messages: usize) -> Agent {
        let mut agent = Agent::spawn();
        agent.ok(&format!("history {max_messages}"));
        agent.ok(&format!("enable {url} {prefix}"));
        agent
    }

    pub fn spawn() -> Agent {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .arg("agent")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        // SAFETY: runs in the forked child before exec; prctl is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().expect("the agent process starts");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Agent {
            child,
            stdin,
            stdout,
            got: HashMap::new(),
        }
    }

    pub fn ok(&mut self, command: &str) -> String {
        self.send(command);
        self.answer(command)
    }

    /// Gives a command without waiting for its answer (`answer` reads it).
    pub fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").expect("the agent takes a command");
        stdin.flush().unwrap();
    }

    pub fn answer(&mut self, command: &str) -> String {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).unwrap();
        assert!(n > 0, "the agent exited during `{command}`");
        match line.trim_end().strip_prefix("ok") {
            Some(rest) => rest.trim().to_string(),
            None => panic!("agent: `{command}` answered {line:?}"),
        }
    }

    /// Reads SSE reader `id` until it got `last` (the newest message, which no history
    /// limit drops); returns what it got from the previous `read` on.
    pub fn read_until(&mut self, id: usize, last: &str) -> Vec<(String, String)> {
        let start = Instant::now();
        let mut buffer = Vec::new();
        loop {
            buffer.extend_from_slice(&unhex(&self.ok(&format!("read {id}"))));
            let got = parse(Mode::Sse, &buffer);
            if got.last().is_some_and(|(_, payload)| payload == last) {
                return got;
            }
            assert!(start.elapsed() < T, "reader {id} never got {last}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Messages reader `id` lost to gaps: as its fd_stats, the registry's stats and the gap
    /// callback's sum count them.
    pub fn lost(&mut self, id: usize) -> [u64; 3] {
        let counts: Vec<u64> = self
            .ok(&format!("lost {id}"))
            .split(' ')
            .map(|count| count.parse().unwrap())
            .collect();
        counts.try_into().unwrap()
    }

    pub fn tail(&mut self, id: usize, topic: &[u8], mode: Mode, n: usize) {
        self.ok(&format!(
            "tail {id} {} {} {n}",
            hex(topic),
            mode_index(mode)
        ));
        self.got.insert(id, (mode, Vec::new()));
    }

    pub fn since(&mut self, id: usize, topic: &[u8], mode: Mode, last: &str) -> bool {
        let recovered = self.ok(&format!(
            "since {id} {} {} {last}",
            hex(topic),
            mode_index(mode)
        ));
        self.got.insert(id, (mode, Vec::new()));
        recovered == "1"
    }

    pub fn seq(&mut self, topic: &[u8], range: std::ops::Range<usize>) {
        self.ok(&format!("seq {} {} {}", hex(topic), range.start, range.end));
    }

    /// Reads reader `id` until it holds `n` whole messages; returns them, and checks that
    /// no more come within a short while.
    pub fn expect(&mut self, id: usize, n: usize) -> Vec<(String, String)> {
        let start = Instant::now();
        loop {
            let bytes = unhex(&self.ok(&format!("read {id}")));
            let (mode, buffer) = self.got.get_mut(&id).expect("a known reader");
            buffer.extend_from_slice(&bytes);
            let messages = parse(*mode, buffer);
            if messages.len() >= n {
                assert_eq!(
                    messages.len(),
                    n,
                    "reader {id}: more than {n}: {messages:?}"
                );
                return messages;
            }
            assert!(
                start.elapsed() < T,
                "reader {id}: {} of {n} messages within {T:?}: {messages:?}",
                messages.len()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Checks that reader `id` got nothing more for a while.
    pub fn expect_quiet(&mut self, id: usize, had: usize) {
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until {
            let bytes = unhex(&self.ok(&format!("read {id}")));
            let (mode, buffer) = self.got.get_mut(&id).expect("a known reader");
            buffer.extend_from_slice(&bytes);
            let messages = parse(*mode, buffer);
            assert_eq!(messages.len(), had, "reader {id}: more came: {messages:?}");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (id, payload) of every whole message in `buffer`, framed per `mode` (single-line payloads).
pub fn parse(mode: Mode, buffer: &[u8]) -> Vec<(String, String)> {
    match mode {
        Mode::Sse => {
            let text = std::str::from_utf8(buffer).unwrap();
            let mut messages = Vec::new();
            for frame in text.split("\n\n") {
                if frame.is_empty() || !text.contains(&format!("{frame}\n\n")) {
                    continue;
                }
                let mut lines = frame.lines();
                let id = lines
                    .next()
                    .unwrap()
                    .strip_prefix("id: ")
                    .expect("an id line");
                let data = lines.next().unwrap().strip_prefix("data: ").expect("data");
                assert!(lines.next().is_none(), "{frame:?}");
                messages.push((id.to_string(), data.to_string()));
            }
            messages
        }
        Mode::WsTextId | Mode::WsBinaryId => {
            let (frames, _) = parse_ws_frames(buffer);
            frames
                .iter()
                .map(|frame| {
                    let opcode = if mode == Mode::WsTextId { 1 } else { 2 };
                    assert_eq!(frame.opcode, opcode);
                    let text = std::str::from_utf8(&frame.payload).unwrap();
                    let (id, data) = text.split_once('\n').expect("<id>\\n<payload>");
                    (id.to_string(), data.to_string())
                })
                .collect()
        }
        other => panic!("no ids in {other:?}"),
    }
}

pub fn payloads(messages: &[(String, String)]) -> Vec<String> {
    messages
        .iter()
        .map(|(_, payload)| payload.clone())
        .collect()
}

pub fn expected(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(numbered).collect()
}

/// Checks that `got` (from `Agent::read_until`) holds messages `range` in order but for some
/// missing, and that the reader's three loss counters each say how many: returns that.
pub fn missing_are_counted(
    got: &[(String, String)],
    range: std::ops::Range<usize>,
    lost: [u64; 3],
) -> u64 {
    let numbers: Vec<usize> = payloads(got)
        .iter()
        .map(|payload| payload[1..].parse().unwrap())
        .collect();
    assert!(numbers.windows(2).all(|pair| pair[0] < pair[1]), "in order");
    assert!(numbers.iter().all(|n| range.contains(n)), "{numbers:?}");
    let missing = (range.len() - numbers.len()) as u64;
    assert_eq!(lost, [missing; 3], "fd_stats, stats, callback");
    missing
}
