//! Registry and contention benchmarks (benchmark parts 3 and 4), through the Rust API, which
//! the C API wraps one to one. Run by `bench/run.sh`; alone:
//! `cargo run --release --example registry_bench [--quick] [--memory | --heartbeat]` (only
//! the memory per subscription, or only subscribe latency during heartbeat ticks).
//!
//! Subscribers are fds of /dev/null (each opened separately, so each is its own open file):
//! subscribing needs open fds, and a publish to them costs a cheap `writev`, no reader.
//! Prints `RESULT part=... key=value ...` lines that `bench/report.py` turns into tables.

use fdcast::{Mode, Registry};
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

fn open_fds(n: usize) -> Vec<File> {
    (0..n)
        .map(|_| {
            File::options()
                .write(true)
                .open("/dev/null")
                .expect("open /dev/null")
        })
        .collect()
}

fn topic(i: usize) -> Vec<u8> {
    format!("topic/{i:08}").into_bytes()
}

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

/// subscribe and unsubscribe (by id) per second, over `fds` fds x `topics` topics.
fn sub_unsub(fds: &[File], topics: usize) {
    let reg = Registry::new().unwrap();
    let names: Vec<Vec<u8>> = (0..topics).map(topic).collect();
    let start = Instant::now();
    let mut ids = Vec::with_capacity(fds.len() * topics);
    for name in &names {
        for fd in fds {
            ids.push(reg.subscribe(name, fd.as_raw_fd(), Mode::Raw).unwrap());
        }
    }
    let sub = ids.len() as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    for id in ids.iter().copied() {
        reg.unsubscribe(id).unwrap();
    }
    let unsub = ids.len() as f64 / start.elapsed().as_secs_f64();
    assert_eq!(reg.subscriber_count(), 0);
    println!(
        "RESULT part=registry metric=subscribe_per_s value={sub:.0} ops={}",
        ids.len()
    );
    println!(
        "RESULT part=registry metric=unsubscribe_per_s value={unsub:.0} ops={}",
        ids.len()
    );
}

/// Median time of `unsubscribe_fd` for an fd with `k` topics, in a registry of `t` topics
/// (each with one subscriber from `fillers`).
fn unsubscribe_fd_cost(fillers: &[File], probe: RawFd, t: usize, k: usize, rounds: usize) -> f64 {
    let reg = Registry::new().unwrap();
    for i in 0..t {
        reg.subscribe(&topic(i), fillers[i % fillers.len()].as_raw_fd(), Mode::Raw)
            .unwrap();
    }
    let mine: Vec<Vec<u8>> = (0..k).map(|j| topic(j * t / k)).collect();
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        for name in &mine {
            reg.subscribe(name, probe, Mode::Raw).unwrap();
        }
        let start = Instant::now();
        let dropped = reg.unsubscribe_fd(probe).unwrap();
        times.push(start.elapsed().as_nanos() as f64);
        assert_eq!(dropped, k);
    }
    median(&mut times)
}

/// RSS growth per subscription for `topics` topics with `per_topic` subscribers each (spread
/// over `fds`), minus the topic bytes.
fn memory_per_subscription(fds: &[File], topics: usize, per_topic: usize) {
    let names: Vec<Vec<u8>> = (0..topics).map(topic).collect();
    let topic_bytes: usize = names.iter().map(Vec::len).sum();
    let reg = Registry::new().unwrap();
    // Hand memory freed by earlier steps back to the kernel, so that it is not reused
    // unseen by RSS. SAFETY: malloc_trim only releases free heap memory.
    unsafe { libc::malloc_trim(0) };
    // Fixed, glibc's mmap threshold no longer rises each time a large block is freed, which
    // would move later mid-sized blocks into the heap, where the old buffers of growing
    // tables stay counted in RSS or not depending on the order of allocations. SAFETY:
    // mallopt only changes the allocator's tuning.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) };
    let before = rss_bytes();
    for (i, name) in names.iter().enumerate() {
        for j in 0..per_topic {
            let fd = fds[(i * per_topic + j) % fds.len()].as_raw_fd();
            reg.subscribe(name, fd, Mode::Raw).unwrap();
        }
    }
    let after = rss_bytes();
    let subs = reg.subscriber_count();
    assert_eq!(subs, topics * per_topic);
    let per_sub = (after.saturating_sub(before) as f64 - topic_bytes as f64) / subs as f64;
    println!(
        "RESULT part=memory subscriptions={subs} topics={topics} per_topic={per_topic} fds={} \
         rss_delta={} topic_bytes={topic_bytes} bytes_per_sub={per_sub:.1}",
        fds.len(),
        after.saturating_sub(before)
    );
}

/// Subscribe + unsubscribe latency on one more fd while another thread dispatches heartbeat
/// ticks every millisecond over `topics` x `fds.len()` RAW subscriptions and one WebSocket
/// fd: a tick that walked every subscription under the index lock would stall them.
fn subscribe_during_heartbeats(fds: &[File], topics: usize, samples: usize) {
    let reg = Arc::new(Registry::new().unwrap());
    for i in 0..topics {
        for fd in fds {
            reg.subscribe(&topic(i), fd.as_raw_fd(), Mode::Raw).unwrap();
        }
    }
    let websocket = File::options().write(true).open("/dev/null").unwrap();
    reg.subscribe(b"ws", websocket.as_raw_fd(), Mode::WsBinary)
        .unwrap();
    reg.set_heartbeat(Some(Duration::from_millis(1)));
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = {
        let reg = Arc::clone(&reg);
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                reg.dispatch(Some(Duration::from_millis(5))).unwrap();
            }
        })
    };
    let probe = File::options().write(true).open("/dev/null").unwrap();
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = Instant::now();
        let id = reg
            .subscribe(b"probe", probe.as_raw_fd(), Mode::Raw)
            .unwrap();
        reg.unsubscribe(id).unwrap();
        times.push(start.elapsed().as_nanos() as u64);
    }
    stop.store(true, Ordering::Relaxed);
    reg.wake();
    ticker.join().unwrap();
    times.sort_unstable();
    println!(
        "RESULT part=heartbeat subscriptions={} p50_ns={} p99_ns={} max_ns={}",
        reg.subscriber_count(),
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times[times.len() - 1]
    );
}

/// Publishes per second from `threads` threads, each to its own topic with `subs` subscribers.
/// With `control`, each thread instead writes the payload to its `subs` fds itself, no
/// fdcast: how well the machine runs two threads at all.
fn publish_rate(threads: usize, subs: usize, duration: Duration, control: bool) -> f64 {
    let reg = Arc::new(Registry::new().unwrap());
    let fds = open_fds(threads * subs);
    for (i, fd) in fds.iter().enumerate() {
        reg.subscribe(&topic(i % threads), fd.as_raw_fd(), Mode::Raw)
            .unwrap();
    }
    let payload = [b'x'; 64];
    let raw: Arc<Vec<RawFd>> = Arc::new(fds.iter().map(AsRawFd::as_raw_fd).collect());
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let reg = Arc::clone(&reg);
            let raw = Arc::clone(&raw);
            thread::spawn(move || {
                let name = topic(t);
                let mine: Vec<RawFd> = (0..subs).map(|j| raw[j * threads + t]).collect();
                let start = Instant::now();
                let mut n = 0u64;
                while start.elapsed() < duration {
                    for _ in 0..64 {
                        if control {
                            for &fd in &mine {
                                // SAFETY: writes 64 bytes from a live buffer to an open fd.
                                let w = unsafe { libc::write(fd, payload.as_ptr().cast(), 64) };
                                assert_eq!(w, 64);
                            }
                        } else {
                            assert_eq!(reg.publish(&name, &payload).unwrap(), subs);
                        }
                    }
                    n += 64;
                }
                n as f64 / start.elapsed().as_secs_f64()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).sum()
}

/// Publish latency percentiles (ns) on a topic with 10 subscribers, while another thread
/// subscribes and unsubscribes (`churn`: None, on other topics, or on the same topic).
fn publish_latency(churn: Option<bool>, samples: usize) -> (u64, u64) {
    let reg = Arc::new(Registry::new().unwrap());
    let fds = open_fds(10);
    for fd in &fds {
        reg.subscribe(b"lat", fd.as_raw_fd(), Mode::Raw).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let churner = churn.map(|same_topic| {
        let (reg, stop) = (Arc::clone(&reg), Arc::clone(&stop));
        thread::spawn(move || {
            let fds = open_fds(16);
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let name = if same_topic {
                    b"lat".to_vec()
                } else {
                    topic(i % 1000)
                };
                let id = reg
                    .subscribe(&name, fds[i % fds.len()].as_raw_fd(), Mode::Raw)
                    .unwrap();
                reg.unsubscribe(id).unwrap();
                i += 1;
            }
        })
    });
    let payload = [b'x'; 64];
    let mut lat = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = Instant::now();
        reg.publish(b"lat", &payload).unwrap();
        lat.push(start.elapsed().as_nanos() as u64);
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(h) = churner {
        h.join().unwrap();
    }
    lat.sort_unstable();
    (percentile(&lat, 0.5), percentile(&lat, 0.99))
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 10 } else { 1 };
    let million = 1_000_000 / scale;
    if std::env::args().any(|a| a == "--heartbeat") {
        subscribe_during_heartbeats(&open_fds(1000), million / 1000, 200_000 / scale);
        return;
    }
    if std::env::args().any(|a| a == "--memory") {
        let fds = open_fds(1000);
        memory_per_subscription(&fds, million / 1000, 1000);
        memory_per_subscription(&fds, million, 1);
        return;
    }

    // 3. registry costs
    let fds = open_fds(1000);
    sub_unsub(&fds[..100], 2000 / scale);
    let probe = File::options().write(true).open("/dev/null").unwrap();
    let ts: &[usize] = if quick {
        &[10, 10_000, 100_000]
    } else {
        &[10, 10_000, 1_000_000]
    };
    for &k in &[1usize, 10, 100] {
        for &t in ts {
            let ns = unsubscribe_fd_cost(&fds, probe.as_raw_fd(), t.max(k), k, 2000 / scale);
            println!("RESULT part=unsubscribe_fd k={k} t={t} ns={ns:.0}");
        }
    }
    memory_per_subscription(&fds, million / 1000, 1000);
    memory_per_subscription(&fds, million, 1);
    subscribe_during_heartbeats(&fds, million / 1000, 200_000 / scale);

    // 4. contention
    let duration = Duration::from_millis(if quick { 100 } else { 500 });
    for (subs, control) in [(0usize, false), (10, false), (10, true)] {
        for threads in [1usize, 2] {
            let mut rates: Vec<f64> = (0..3)
                .map(|_| publish_rate(threads, subs, duration, control))
                .collect();
            let rate = median(&mut rates);
            println!(
                "RESULT part=contention threads={threads} subscribers={subs} control={control} \
                 rate={rate:.0}"
            );
        }
    }
    let samples = 200_000 / scale;
    for (name, churn) in [
        ("none", None),
        ("other_topics", Some(false)),
        ("same_topic", Some(true)),
    ] {
        let (p50, p99) = publish_latency(churn, samples);
        println!("RESULT part=latency churn={name} p50_ns={p50} p99_ns={p99}");
    }
}
