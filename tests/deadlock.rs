//! Deadlock detection under stress (`make deadlock-test`; needs the `deadlock-detection`
//! feature, which turns on parking_lot's detector for every lock in fdcast).
//!
//! Every fdcast lock is a parking_lot lock, so parking_lot can see a cycle of threads waiting
//! on each other's locks. This test first proves the detector works here (a deliberate
//! two-lock deadlock must be found), then hammers one registry from every angle at once:
//! publishers, senders, subscribe/unsubscribe churn with fds closed and reused, a dispatch
//! thread, cork/flush/uncork, limit and policy changes, clear, heartbeats, history on and off
//! with resumes, peers that stop reading or vanish, readers that fall behind on topics with
//! history and catch up as they drain (the ring, index, batches and peer locks all taken
//! while others publish, resume, unsubscribe and evict), and callbacks (evict, authorize, gap)
//! that call back into the registry. A checker thread calls `parking_lot::deadlock::check_deadlock()` every 10 ms and
//! fails the test with the threads' backtraces if it finds a cycle; a watchdog fails it if the
//! threads stop finishing (a hang the detector cannot see).
//!
//! Duration: FDCAST_DEADLOCK_SECS (default 5).

mod common;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Weak};
use std::thread;
use std::time::{Duration, Instant};

use common::{make_slow, read_now};
use fdcast::{EventId, HistoryLimits, Mode, Overflow, Registry, SubscriptionId};

fn main() {
    detector_finds_a_deliberate_deadlock();
    let secs = std::env::var("FDCAST_DEADLOCK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5u64);
    let checks = stress_with_detector(Duration::from_secs(secs));
    println!("deadlock: {secs} s of stress, {checks} detector passes, no deadlock");
    println!("1 passed, 0 failed");
}

/// Two threads take two locks in opposite orders; the detector must report the cycle.
fn detector_finds_a_deliberate_deadlock() {
    let a = Arc::new(parking_lot::Mutex::new(()));
    let b = Arc::new(parking_lot::Mutex::new(()));
    let both = Arc::new(Barrier::new(2));
    for (first, second) in [(a.clone(), b.clone()), (b, a)] {
        let both = both.clone();
        // These threads stay blocked for the rest of the process: that is the point.
        thread::spawn(move || {
            let _one = first.lock();
            both.wait();
            let _two = second.lock();
        });
    }
    let start = Instant::now();
    loop {
        let found = parking_lot::deadlock::check_deadlock();
        if !found.is_empty() {
            assert_eq!(found[0].len(), 2, "the cycle has both threads");
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "parking_lot's detector did not find a deliberate deadlock: is the \
             deadlock-detection feature on?"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

struct Counts {
    publishes: AtomicU64,
    sends: AtomicU64,
    churn: AtomicU64,
    dispatches: AtomicU64,
    controls: AtomicU64,
    evictions: AtomicU64,
    callbacks_reentered: AtomicU64,
    catching_up_seen: AtomicU64,
    gaps: AtomicU64,
    resumes: AtomicU64,
}

fn stress_with_detector(duration: Duration) -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    let checker = {
        let finished = finished.clone();
        thread::spawn(move || {
            let mut passes = 0u64;
            while !finished.load(Ordering::SeqCst) {
                let deadlocks = parking_lot::deadlock::check_deadlock();
                if !deadlocks.is_empty() {
                    eprintln!("DEADLOCK: {} cycle(s)", deadlocks.len());
                    for (i, cycle) in deadlocks.iter().enumerate() {
                        for t in cycle {
                            eprintln!(
                                "cycle {i}, thread {:?}:\n{:?}",
                                t.thread_id(),
                                t.backtrace()
                            );
                        }
                    }
                    std::process::exit(1);
                }
                passes += 1;
                thread::sleep(Duration::from_millis(10));
            }
            passes
        })
    };
    let watchdog_stop = finished.clone();
    let limit = duration + Duration::from_secs(60);
    thread::spawn(move || {
        let start = Instant::now();
        while !watchdog_stop.load(Ordering::SeqCst) {
            if start.elapsed() > limit {
                eprintln!("watchdog: the stress threads did not finish within {limit:?} (hang)");
                std::process::exit(1);
            }
            thread::sleep(Duration::from_millis(100));
        }
    });

    let counts = Arc::new(Counts {
        publishes: AtomicU64::new(0),
        sends: AtomicU64::new(0),
        churn: AtomicU64::new(0),
        dispatches: AtomicU64::new(0),
        controls: AtomicU64::new(0),
        evictions: AtomicU64::new(0),
        callbacks_reentered: AtomicU64::new(0),
        catching_up_seen: AtomicU64::new(0),
        gaps: AtomicU64::new(0),
        resumes: AtomicU64::new(0),
    });
    let reg = Arc::new(Registry::new().unwrap());
    install_reentrant_callbacks(&reg, &counts);

    // Long-lived subscribers: slow ones (small buffers, read now and then) and fast ones.
    let mut pairs: Vec<(UnixStream, UnixStream)> = Vec::new();
    for i in 0..8 {
        let (w, r) = UnixStream::pair().unwrap();
        r.set_nonblocking(true).unwrap();
        if i % 2 == 0 {
            make_slow(w.as_raw_fd(), r.as_raw_fd());
        }
        for t in 0..4 {
            let topic = format!("t{t}");
            let mode = Mode::ALL[(i + t) % 4];
            reg.subscribe(topic.as_bytes(), w.as_raw_fd(), mode)
                .unwrap();
        }
        pairs.push((w, r));
    }
    let fixed_fds: Arc<Vec<RawFd>> = Arc::new(pairs.iter().map(|(w, _)| w.as_raw_fd()).collect());
    let readers: Vec<UnixStream> = pairs.iter().map(|(_, r)| r.try_clone().unwrap()).collect();

    let mut threads = Vec::new();
    for p in 0..3 {
        let (reg, stop, counts, fds) =
            (reg.clone(), stop.clone(), counts.clone(), fixed_fds.clone());
        threads.push(thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let topic = format!("t{}", n % 4);
                let payload = format!("publisher {p} message {n}\n");
                let _ = reg.publish_except(topic.as_bytes(), payload.as_bytes(), Some(fds[p]));
                // The topics the lagging readers fall behind on.
                let _ = reg.publish(format!("h{}", n % 3).as_bytes(), payload.as_bytes());
                if n % 5 == 0 {
                    let _ = reg.send(
                        fds[(n as usize) % fds.len()],
                        Mode::WsText,
                        payload.as_bytes(),
                    );
                    counts.sends.fetch_add(1, Ordering::Relaxed);
                }
                counts.publishes.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
        }));
    }
    {
        // Churn: short-lived connections, some closed without unsubscribe_fd (the fd-reuse
        // guard then meets their numbers again), some whose reader vanishes first.
        let (reg, stop, counts) = (reg.clone(), stop.clone(), counts.clone());
        threads.push(thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (w, r) = UnixStream::pair().unwrap();
                let fd = w.as_raw_fd();
                // Resumes take the topic's history lock around the subscribe (when history
                // is on: the control thread turns it on and off).
                let id = match n % 3 {
                    0 => reg.subscribe(b"t0", fd, Mode::Sse).unwrap(),
                    1 => reg.subscribe_tail(b"t0", fd, Mode::Sse, 5).unwrap(),
                    _ => {
                        let start = EventId {
                            epoch: n,
                            offset: 0,
                        };
                        reg.subscribe_since(b"t0", fd, Mode::Sse, start).unwrap().0
                    }
                };
                let _ = reg.subscribe(format!("c{}", n % 7).as_bytes(), fd, Mode::Raw);
                let _ = reg.publish(format!("c{}", n % 7).as_bytes(), b"churn");
                let _ = reg.subscribers_for(b"t0");
                match n % 4 {
                    0 => {
                        // NotFound when clear() or an eviction got there first.
                        let _ = reg.unsubscribe(id);
                        reg.unsubscribe_fd(fd).unwrap();
                    }
                    1 => drop(r), // the reader vanishes; a later write evicts the fd
                    2 => {
                        let _ = reg.send(fd, Mode::Raw, b"bye");
                        reg.unsubscribe_fd(fd).unwrap();
                    }
                    _ => {} // closed without unsubscribe_fd
                }
                if n % 4 == 1 {
                    let _ = reg.publish(b"t0", b"to a vanished reader");
                    reg.unsubscribe_fd(fd).unwrap();
                }
                drop(w);
                counts.churn.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
        }));
    }
    {
        let (reg, stop, counts) = (reg.clone(), stop.clone(), counts.clone());
        threads.push(thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                reg.dispatch(Some(Duration::from_millis(10))).unwrap();
                counts.dispatches.fetch_add(1, Ordering::Relaxed);
            }
            reg.wake();
        }));
    }
    {
        let (reg, stop, counts, fds) =
            (reg.clone(), stop.clone(), counts.clone(), fixed_fds.clone());
        threads.push(thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match n % 9 {
                    0 => reg.cork(),
                    1 => {
                        reg.flush();
                    }
                    2 => {
                        reg.uncork();
                    }
                    3 => reg.set_outbox_limit([256, 4096, 1 << 20][(n / 9 % 3) as usize]),
                    4 => reg.set_overflow(if n % 2 == 0 {
                        Overflow::Evict
                    } else {
                        Overflow::DropMessage
                    }),
                    5 => {
                        let _ = reg.stats();
                        let _ = reg.pending_bytes(fds[(n as usize) % fds.len()]);
                    }
                    6 => reg.set_heartbeat(if n % 2 == 0 {
                        Some(Duration::from_millis(3))
                    } else {
                        None
                    }),
                    7 if n % 63 == 7 => {
                        // Everything goes, then the fixed subscribers come back.
                        reg.clear();
                        for (i, &fd) in fds.iter().enumerate() {
                            for t in 0..4 {
                                let topic = format!("t{t}");
                                let _ = reg.subscribe(topic.as_bytes(), fd, Mode::ALL[(i + t) % 4]);
                            }
                        }
                    }
                    // Long enough a history for lagging readers to catch up from, one so short
                    // that they fall off it, and none.
                    8 => reg.set_history(match n / 9 % 4 {
                        0 | 1 => HistoryLimits {
                            max_messages: 5000,
                            max_bytes: 1 << 20,
                            max_age: None,
                        },
                        2 => HistoryLimits {
                            max_messages: 50,
                            max_bytes: 0,
                            max_age: Some(Duration::from_millis(5)),
                        },
                        _ => HistoryLimits::default(),
                    }),
                    _ => thread::sleep(Duration::from_micros(200)),
                }
                counts.controls.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
            reg.uncork();
        }));
    }
    {
        let (reg, stop, counts) = (reg.clone(), stop.clone(), counts.clone());
        threads.push(thread::spawn(move || {
            lag_and_catch_up(&reg, &stop, &counts)
        }));
    }
    {
        // Readers: the fast ones drain all the time, the slow ones now and then.
        let stop = stop.clone();
        threads.push(thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for (i, r) in readers.iter().enumerate() {
                    if i % 2 == 1 || n % 20 == 0 {
                        let _ = read_now(r.as_raw_fd());
                    }
                }
                thread::sleep(Duration::from_millis(1));
                n += 1;
            }
        }));
    }

    let start = Instant::now();
    while start.elapsed() < duration {
        thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::SeqCst);
    reg.wake();
    for t in threads {
        t.join().expect("a stress thread panicked");
    }
    finished.store(true, Ordering::SeqCst);
    let passes = checker.join().unwrap();

    let c = &counts;
    let figures = [
        ("publishes", c.publishes.load(Ordering::Relaxed)),
        ("sends", c.sends.load(Ordering::Relaxed)),
        ("churned connections", c.churn.load(Ordering::Relaxed)),
        ("dispatch calls", c.dispatches.load(Ordering::Relaxed)),
        ("control calls", c.controls.load(Ordering::Relaxed)),
        ("evictions", c.evictions.load(Ordering::Relaxed)),
        (
            "callbacks that re-entered",
            c.callbacks_reentered.load(Ordering::Relaxed),
        ),
        (
            "fds seen catching up",
            c.catching_up_seen.load(Ordering::Relaxed),
        ),
        ("gaps", c.gaps.load(Ordering::Relaxed)),
        ("resumes from a known id", c.resumes.load(Ordering::Relaxed)),
    ];
    for (what, n) in figures {
        println!("deadlock: {what}: {n}");
        assert!(n > 0, "the stress never exercised: {what}");
    }
    let min_passes = duration.as_millis() as u64 / 10 / 4;
    assert!(passes >= min_passes, "the detector ran only {passes} times");
    drop(pairs);
    passes
}

/// Readers on topics with history (`h0`..`h2`, which the publishers feed too) that stop
/// reading, fall behind, and drain so that dispatch refills them from the history while the
/// other threads publish; meanwhile this thread bursts publishes, resumes from ids it was
/// given, unsubscribes topics and whole fds mid-catch-up, and replaces its connections
/// (evictions under `Overflow::Evict` shut them down).
fn lag_and_catch_up(reg: &Registry, stop: &AtomicBool, counts: &Counts) {
    const LAGGING: usize = 4;
    let slow_pair = || {
        let (w, r) = UnixStream::pair().unwrap();
        r.set_nonblocking(true).unwrap();
        make_slow(w.as_raw_fd(), r.as_raw_fd());
        (w, r)
    };
    let mut lagging: Vec<(UnixStream, UnixStream)> = (0..LAGGING).map(|_| slow_pair()).collect();
    let mut subscriptions: HashMap<(usize, u64), SubscriptionId> = HashMap::new();
    let mut last_ids: HashMap<u64, EventId> = HashMap::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let i = (n / 9) as usize % LAGGING;
        // Coprime with the 9 steps: every step meets every topic.
        let t = n / 7 % 3;
        let topic = format!("h{t}");
        let fd = lagging[i].0.as_raw_fd();
        let mode = [Mode::Sse, Mode::WsTextId, Mode::WsBinaryId, Mode::Raw][i];
        match n % 9 {
            0 | 1 => {
                if let Ok(id) = reg.subscribe(topic.as_bytes(), fd, mode) {
                    subscriptions.insert((i, t), id);
                }
            }
            2 => {
                // A burst, more than a slow fd's outbox and socket hold.
                for k in 0..300 {
                    let payload = format!("burst {n} message {k}");
                    if let Ok((_, Some(id))) =
                        reg.publish_with_id(topic.as_bytes(), payload.as_bytes(), None)
                    {
                        last_ids.insert(t, id);
                    }
                }
            }
            3 => {
                if let Ok(stats) = reg.fd_stats(fd) {
                    if stats.catching_up > 0 {
                        counts.catching_up_seen.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            4 | 5 => {
                // Drains: the dispatch thread refills it from the history.
                let _ = read_now(lagging[i].1.as_raw_fd());
            }
            6 => {
                if let Some(&last) = last_ids.get(&t) {
                    let resumed = EventId {
                        offset: last.offset.saturating_sub(100 + n % 200),
                        ..last
                    };
                    if let Ok((id, _)) = reg.subscribe_since(topic.as_bytes(), fd, mode, resumed) {
                        subscriptions.insert((i, t), id);
                        counts.resumes.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            7 => {
                // NotFound when an eviction or clear() got there first.
                if let Some(id) = subscriptions.remove(&(i, t)) {
                    let _ = reg.unsubscribe(id);
                }
            }
            _ => {
                if n % 5 == 0 {
                    // Forgotten mid-catch-up, then a fresh connection in its place.
                    reg.unsubscribe_fd(fd).unwrap();
                    subscriptions.retain(|&(fd_index, _), _| fd_index != i);
                    lagging[i] = slow_pair();
                } else {
                    let _ = reg.subscribe_tail(topic.as_bytes(), fd, mode, 20);
                }
            }
        }
        n += 1;
    }
    for (w, _) in &lagging {
        reg.unsubscribe_fd(w.as_raw_fd()).unwrap();
    }
}

/// Callbacks that call back into the registry, as the header allows (no lock is held while one runs).
fn install_reentrant_callbacks(reg: &Arc<Registry>, counts: &Arc<Counts>) {
    let weak: Weak<Registry> = Arc::downgrade(reg);
    let c = counts.clone();
    reg.set_evict_callback(Some(Box::new(move |fd, _reason| {
        c.evictions.fetch_add(1, Ordering::Relaxed);
        if let Some(reg) = weak.upgrade() {
            let _ = reg.unsubscribe_fd(fd);
            let _ = reg.stats();
            let _ = reg.publish(b"evictions", b"one more");
            c.callbacks_reentered.fetch_add(1, Ordering::Relaxed);
        }
    })));
    let weak: Weak<Registry> = Arc::downgrade(reg);
    let c = counts.clone();
    reg.set_authorizer(Some(Box::new(move |_topic, _fd, _mode| {
        if let Some(reg) = weak.upgrade() {
            let _ = reg.subscriber_count();
            let _ = reg.subscribers_for(b"t1");
            c.callbacks_reentered.fetch_add(1, Ordering::Relaxed);
        }
        true
    })));
    let weak: Weak<Registry> = Arc::downgrade(reg);
    let c = counts.clone();
    reg.set_gap_callback(Some(Box::new(move |fd, topic: &[u8], _lost| {
        c.gaps.fetch_add(1, Ordering::Relaxed);
        if let Some(reg) = weak.upgrade() {
            let _ = reg.fd_stats(fd);
            let _ = reg.subscribe_tail(topic, fd, Mode::Sse, 3);
            let _ = reg.publish(b"gaps", b"one more");
            c.callbacks_reentered.fetch_add(1, Ordering::Relaxed);
        }
    })));
}
