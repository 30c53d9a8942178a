//! Resource limits (`make resource-limits-test`): each scenario runs in a child process (this
//! same binary, re-executed with the scenario's name), so its rlimits cannot disturb the
//! others, and a crash or an abort is seen from outside as what it is.
//!
//! - `emfile`: the process at its fd limit: subscribe, publish, send, dispatch and the fd-reuse
//!   guard go on working with the fds they have; `Registry::new()` fails with EMFILE and
//!   `fdcast_new()` returns NULL with a message, without crashing.
//! - `one_copy`: a 1 GiB payload published to 8 subscribers that do not read, under an
//!   address-space limit that leaves room for the payload's shared copy but not for one copy
//!   per subscriber (README, Guarantees: a frame queued for many fds is held once): delivered (queued), held once.
//! - `enomem_raw`, `enomem_ws`, `enomem_sse`: the same payload under a limit that leaves no
//!   room for a copy: the publish must fail with a clear error (ENOMEM) or complete, and the
//!   process must not abort. A reader then sees only whole frames up to EOF.
//! - `million`: 1,000,000 subscriptions (1,000 fds x 1,000 topics) made, published to, and
//!   removed again by unsubscribe and unsubscribe_fd; memory reported.

mod common;

use std::ffi::{CStr, c_char, c_void};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{read_available, set_rcvbuf, set_sndbuf};
use fdcast::{Mode, Registry};

unsafe extern "C" {
    fn fdcast_new() -> *mut c_void;
    fn fdcast_free(fc: *mut c_void);
    fn fdcast_last_error() -> *const c_char;
}

const GIB: usize = 1 << 30;

fn main() {
    let mut args = std::env::args().skip(1);
    if let Some(flag) = args.next() {
        if flag == "--scenario" {
            let name = args.next().expect("a scenario name");
            match name.as_str() {
                "emfile" => emfile(),
                "one_copy" => one_copy(),
                "enomem_raw" => enomem(Mode::Raw),
                "enomem_ws" => enomem(Mode::WsBinary),
                "enomem_sse" => enomem(Mode::Sse),
                "million" => million(),
                other => panic!("unknown scenario {other}"),
            }
            return;
        }
        // cargo test passes harness flags (e.g. --nocapture): ignore them.
    }
    let only = std::env::var("FDCAST_LIMITS_ONLY").ok();
    let scenarios = [
        "emfile",
        "million",
        "one_copy",
        "enomem_raw",
        "enomem_ws",
        "enomem_sse",
    ];
    let (mut passed, mut failed) = (0, 0);
    for name in scenarios {
        if only
            .as_deref()
            .is_some_and(|only| !only.split(',').any(|o| o == name))
        {
            continue;
        }
        let start = Instant::now();
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--scenario", name])
            .output()
            .expect("spawn the scenario");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            passed += 1;
            print!("{stdout}");
            println!(
                "resource_limits {name}: ok ({:.1} s)",
                start.elapsed().as_secs_f64()
            );
        } else {
            failed += 1;
            println!(
                "resource_limits {name}: FAILED ({}):\n{stdout}{stderr}",
                describe(out.status)
            );
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(libc::SIGABRT) => "killed by SIGABRT: the process aborted".into(),
        Some(sig) => format!("killed by signal {sig}"),
        None => format!("exit status {:?}", status.code()),
    }
}

fn set_limit(resource: libc::__rlimit_resource_t, soft: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit struct.
    unsafe {
        assert_eq!(libc::getrlimit(resource, &mut lim), 0);
        lim.rlim_cur = soft.min(lim.rlim_max);
        assert_eq!(
            libc::setrlimit(resource, &lim),
            0,
            "setrlimit: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

fn slow_pair() -> (UnixStream, UnixStream) {
    let (w, r) = UnixStream::pair().unwrap();
    set_sndbuf(w.as_raw_fd(), 4096);
    set_rcvbuf(r.as_raw_fd(), 4096);
    r.set_nonblocking(true).unwrap();
    (w, r)
}

// -------------------------------------------------------------------------------------------

fn emfile() {
    let reg = Registry::new().unwrap();
    let (w, r) = UnixStream::pair().unwrap();
    r.set_nonblocking(true).unwrap();
    let (w2, r2) = slow_pair();
    let fd = w.as_raw_fd();
    // From here on, no new fd can be opened (read_dir itself needs one: hence the +0 after
    // it is closed).
    let open = open_fds() - 1;
    set_limit(libc::RLIMIT_NOFILE, open);
    assert_eq!(
        UnixStream::pair().unwrap_err().raw_os_error(),
        Some(libc::EMFILE),
        "the process is not at its fd limit"
    );

    // Everything that needs no new fd works.
    let id = reg
        .subscribe(b"news", fd, Mode::WsText)
        .expect("subscribe at EMFILE");
    reg.subscribe(b"news", w2.as_raw_fd(), Mode::Raw).unwrap();
    assert_eq!(reg.publish(b"news", b"hello").unwrap(), 2);
    reg.send(fd, Mode::Raw, b"!").unwrap();
    // A slow fd: frames queue, epoll watches it (epoll_ctl needs no new fd), dispatch flushes.
    for _ in 0..50 {
        reg.publish(b"news", &[b'x'; 1000]).unwrap();
    }
    assert!(reg.pending_bytes(w2.as_raw_fd()).unwrap() > 0);
    let drained = read_available(
        r2.as_raw_fd(),
        Duration::from_millis(50),
        Duration::from_secs(5),
    );
    assert!(!drained.0.is_empty());
    reg.dispatch(Some(Duration::from_millis(100))).unwrap();
    let (bytes, _) = read_available(
        r.as_raw_fd(),
        Duration::from_millis(50),
        Duration::from_secs(2),
    );
    assert_eq!(&bytes[..7], b"\x81\x05hello");
    // fd reuse at the limit: close a subscribed fd and reuse its number (dup2 needs no new
    // number); the guard drops the old subscription.
    let (w3, _r3) = (w2, r2);
    // SAFETY: both fds are ours; dup2 replaces the file at `fd` with w3's.
    assert_eq!(unsafe { libc::dup2(w3.as_raw_fd(), fd) }, fd);
    reg.subscribe(b"other", fd, Mode::Raw).unwrap();
    assert!(
        reg.unsubscribe(id).is_err(),
        "the old subscription survived fd reuse"
    );
    assert_eq!(reg.subscribers_for(b"news"), vec![w3.as_raw_fd()]);

    // A new registry needs an epoll fd: a clean error, no crash.
    let err = Registry::new().err().expect("Registry::new at EMFILE");
    assert_eq!(err.raw_os_error(), Some(libc::EMFILE), "{err}");
    // SAFETY: plain C calls; the message is a C string valid until the next failing call.
    unsafe {
        let fc = fdcast_new();
        assert!(fc.is_null(), "fdcast_new succeeded at the fd limit");
        let message = CStr::from_ptr(fdcast_last_error())
            .to_string_lossy()
            .into_owned();
        assert!(
            message.contains("Too many open files"),
            "fdcast_new's message: {message:?}"
        );
        println!("resource_limits emfile: fdcast_new() = NULL, \"{message}\"");
        fdcast_free(fc);
    }
    drop(reg);
    // The registry's own fds are back: a new one can be made.
    Registry::new().expect("a registry once fds are free again");
    drop(w);
}

/// A 1 GiB payload to 8 slow subscribers, with room for one shared copy (plus Rust's
/// Vec-to-Arc copy) but not for one per subscriber.
fn one_copy() {
    let reg = Registry::new().unwrap();
    let pairs: Vec<_> = (0..8).map(|_| slow_pair()).collect();
    for (w, _) in &pairs {
        reg.subscribe(b"big", w.as_raw_fd(), Mode::Raw).unwrap();
    }
    let payload = vec![b'x'; GIB];
    let vm_kib = status_kib("VmSize:");
    set_limit(
        libc::RLIMIT_AS,
        vm_kib * 1024 + 2 * GIB as u64 + (512 << 20),
    );
    let matched = reg
        .publish(b"big", &payload)
        .expect("publish 1 GiB to 8 fds");
    assert_eq!(matched, 8);
    let st = reg.stats();
    assert_eq!(st.dropped_messages, 0);
    assert_eq!(st.evicted_fds, 0);
    let queued: usize = pairs
        .iter()
        .map(|(w, _)| reg.pending_bytes(w.as_raw_fd()).unwrap())
        .sum();
    assert!(
        queued > 7 * GIB,
        "each fd's share counts: {queued} bytes queued"
    );
    let rss_mib = status_kib("VmRSS:") / 1024;
    // The payload (1 GiB) and one shared copy (1 GiB), never 8.
    assert!(
        rss_mib < 3 * 1024,
        "RSS {rss_mib} MiB: copied per subscriber?"
    );
    println!(
        "resource_limits one_copy: 1 GiB to 8 slow fds: {queued} bytes queued, RSS {rss_mib} MiB \
         (payload + one shared copy)"
    );
    reg.clear();
}

/// A 1 GiB payload with no room for a copy: a clear error or delivery, never an abort.
fn enomem(mode: Mode) {
    let reg = Registry::new().unwrap();
    let evicted = Arc::new(Mutex::new(Vec::new()));
    {
        let evicted = evicted.clone();
        reg.set_evict_callback(Some(Box::new(move |fd, reason| {
            evicted.lock().unwrap().push((fd, reason));
        })));
    }
    let (w, r) = slow_pair();
    let fd: RawFd = w.as_raw_fd();
    reg.subscribe(b"big", fd, mode).unwrap();
    reg.publish(b"big", b"before").unwrap();
    let payload = vec![b'x'; GIB];
    let vm_kib = status_kib("VmSize:");
    set_limit(libc::RLIMIT_AS, vm_kib * 1024 + (256 << 20));
    let result = reg.publish(b"big", &payload);
    // Room again, to check what the reader got.
    drop(payload);
    set_limit(libc::RLIMIT_AS, u64::MAX);
    let evictions = evicted.lock().unwrap().clone();
    let outcome = match &result {
        Ok(matched) => {
            assert_eq!(*matched, 1);
            match evictions.as_slice() {
                [] => "delivered or queued".to_string(),
                [(efd, reason)] => {
                    assert_eq!(*efd, fd);
                    assert_eq!(*reason, libc::ENOMEM, "eviction reason");
                    "the fd was evicted with ENOMEM".to_string()
                }
                more => panic!("evictions {more:?}"),
            }
        }
        Err(err) => {
            assert_eq!(err.errno(), libc::ENOMEM, "publish failed with {err}");
            assert!(evictions.is_empty());
            format!("publish failed: {err}")
        }
    };
    println!("resource_limits enomem {mode:?}: {outcome}");
    // The reader sees whole frames only: "before", then either nothing more, or (evicted)
    // a prefix of the big frame and EOF, or the whole big frame.
    let before = match mode {
        Mode::Raw => b"before".to_vec(),
        Mode::WsBinary => common::ws_encode(2, b"before"),
        _ => common::sse_encode(b"before"),
    };
    let (bytes, _) = read_available(
        r.as_raw_fd(),
        Duration::from_millis(100),
        Duration::from_secs(5),
    );
    assert!(
        bytes.starts_with(&before),
        "the frame before the big one is whole"
    );
    if result.is_err() {
        assert_eq!(
            bytes.len(),
            before.len(),
            "bytes written by a publish that failed"
        );
    }
}

fn million() {
    const FDS: usize = 1000;
    const TOPICS: usize = 1000;
    let reg = Registry::new().unwrap();
    let pairs: Vec<_> = (0..FDS).map(|_| UnixStream::pair().unwrap()).collect();
    let topics: Vec<Vec<u8>> = (0..TOPICS)
        .map(|t| format!("topic/{t:04}").into_bytes())
        .collect();
    let rss_before = status_kib("VmRSS:");
    let start = Instant::now();
    let mut ids = Vec::with_capacity(FDS * TOPICS);
    for topic in &topics {
        for (w, _) in &pairs {
            ids.push(reg.subscribe(topic, w.as_raw_fd(), Mode::Raw).unwrap());
        }
    }
    let subscribe_secs = start.elapsed().as_secs_f64();
    let rss_full = status_kib("VmRSS:");
    let st = reg.stats();
    assert_eq!(st.subscriptions, (FDS * TOPICS) as u64);
    assert_eq!(st.topics, TOPICS as u64);
    assert_eq!(st.fds, FDS as u64);
    assert_eq!(reg.subscriber_count(), FDS * TOPICS);
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "subscription ids are not unique");
    assert_eq!(reg.subscribers_for(&topics[500]).len(), FDS);
    // Publishing to one topic reaches its 1,000 fds.
    assert_eq!(reg.publish(&topics[7], b"ping").unwrap(), FDS);
    for (_, r) in pairs.iter().take(10) {
        r.set_nonblocking(true).unwrap();
        let (bytes, _) = read_available(
            r.as_raw_fd(),
            Duration::from_millis(20),
            Duration::from_secs(2),
        );
        assert_eq!(bytes, b"ping");
    }
    // Half go by id, the rest with their fd.
    let start = Instant::now();
    for (k, id) in ids.iter().enumerate() {
        let (topic, fd) = (k / FDS, k % FDS);
        if (topic + fd) % 2 == 0 {
            reg.unsubscribe(*id).unwrap();
        }
    }
    assert_eq!(reg.subscriber_count(), FDS * TOPICS / 2);
    for (w, _) in &pairs {
        assert_eq!(reg.unsubscribe_fd(w.as_raw_fd()).unwrap(), TOPICS / 2);
    }
    let unsubscribe_secs = start.elapsed().as_secs_f64();
    let st = reg.stats();
    assert_eq!(
        (st.subscriptions, st.topics, st.fds, st.queued_bytes),
        (0, 0, 0, 0)
    );
    let per_subscription = (rss_full.saturating_sub(rss_before)) * 1024 / (FDS * TOPICS) as u64;
    println!(
        "resource_limits million: 1,000,000 subscriptions ({FDS} fds x {TOPICS} topics) in \
         {subscribe_secs:.2} s, removed in {unsubscribe_secs:.2} s; RSS {} -> {} MiB \
         (~{per_subscription} B per subscription)",
        rss_before / 1024,
        rss_full / 1024
    );
}
