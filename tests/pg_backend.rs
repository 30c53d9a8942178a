//! The PostgreSQL backend against the real server (FDCAST_PG_URL, default
//! postgresql://127.0.0.1:5432/test). A missing server fails these tests; they never skip.

mod common;

use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;
use fdcast::{Mode, Registry};

const T: Duration = Duration::from_secs(20);

fn pg_url() -> String {
    std::env::var("FDCAST_PG_URL").unwrap_or_else(|_| "postgresql://127.0.0.1:5432/test".into())
}

/// A channel of its own for each test, so tests running in parallel never see each other.
fn channel(name: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "fdcast_{name}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn enabled(channel: &str) -> Registry {
    let registry = Registry::new().unwrap();
    registry
        .pg_enable(&pg_url(), channel)
        .unwrap_or_else(|err| panic!("pg_enable({}): {err}", pg_url()));
    registry
}

/// Runs `registry.dispatch` until `want` bytes arrived on `reader`, or panics after T.
fn receive(registry: &Registry, reader: i32, want: usize) -> Vec<u8> {
    let start = Instant::now();
    let mut got = Vec::new();
    while got.len() < want {
        assert!(
            start.elapsed() < T,
            "only {} of {want} bytes arrived: {:?}",
            got.len(),
            String::from_utf8_lossy(&got)
        );
        registry.dispatch(Some(Duration::from_millis(20))).unwrap();
        got.extend(read_now(reader).0);
    }
    got
}

fn psql(sql: &str, vars: &[(&str, &str)]) -> String {
    let mut command = Command::new("psql");
    command
        .arg(pg_url())
        .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"]);
    for (name, value) in vars {
        command.arg("-v").arg(format!("{name}={value}"));
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql runs");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(sql.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn a_publish_reaches_another_registry_in_every_mode() {
    with_watchdog(60, || {
        let channel = channel("modes");
        let sender = enabled(&channel);
        let receiver = enabled(&channel);
        let pairs: Vec<_> = Mode::ALL.iter().map(|_| socketpair_nonblocking()).collect();
        for (mode, (ours, _)) in Mode::ALL.iter().zip(&pairs) {
            receiver
                .subscribe(b"news", ours.as_raw_fd(), *mode)
                .unwrap();
        }
        assert_eq!(
            sender.publish(b"news", b"hello\nworld").unwrap(),
            0,
            "no local subscriber"
        );
        let expected: [&[u8]; 4] = [
            b"hello\nworld",
            b"\x81\x0bhello\nworld",
            b"\x82\x0bhello\nworld",
            b"data: hello\ndata: world\n\n",
        ];
        for ((_, theirs), want) in pairs.iter().zip(expected) {
            assert_eq!(receive(&receiver, theirs.as_raw_fd(), want.len()), want);
        }
        assert_eq!(receiver.pg_stats().received, 1);
        // The sender learns the server took it when it reads the confirmation.
        let start = Instant::now();
        while sender.pg_stats().sent < 1 {
            assert!(
                start.elapsed() < T,
                "never confirmed: {:?}",
                sender.pg_stats()
            );
            sender.dispatch(Some(Duration::from_millis(20))).unwrap();
        }
        assert_eq!(sender.pg_stats().queued, 0);
    });
}

/// Dispatches `registry` until `done` holds for its PostgreSQL counters.
fn dispatch_until(registry: &Registry, what: &str, done: impl Fn(&fdcast::PgStats) -> bool) {
    let start = Instant::now();
    while !done(&registry.pg_stats()) {
        assert!(start.elapsed() < T, "{what}: {:?}", registry.pg_stats());
        registry.dispatch(Some(Duration::from_millis(20))).unwrap();
    }
}

fn url_with(params: &str) -> String {
    let url = pg_url();
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{params}")
}

#[test]
fn own_notifications_come_back_and_are_ignored() {
    with_watchdog(60, || {
        let channel = channel("self");
        let registry = enabled(&channel);
        let (ours, theirs) = socketpair_nonblocking();
        registry
            .subscribe(b"t", ours.as_raw_fd(), Mode::Raw)
            .unwrap();
        assert_eq!(registry.publish(b"t", b"once").unwrap(), 1);
        dispatch_until(&registry, "own notification never came back", |s| {
            s.ignored_self == 1
        });
        assert_eq!(read_quiet(theirs.as_raw_fd()), b"once");
        assert_eq!(registry.pg_stats().received, 0);
    });
}

#[test]
fn identical_publishes_are_delivered_twice() {
    with_watchdog(60, || {
        let channel = channel("twice");
        let sender = enabled(&channel);
        let receiver = enabled(&channel);
        let (ours, theirs) = socketpair_nonblocking();
        receiver
            .subscribe(b"t", ours.as_raw_fd(), Mode::Raw)
            .unwrap();
        sender.publish(b"t", b"same;").unwrap();
        sender.publish(b"t", b"same;").unwrap();
        assert_eq!(receive(&receiver, theirs.as_raw_fd(), 10), b"same;same;");
        assert_eq!(receiver.pg_stats().received, 2);
    });
}

#[test]
fn awkward_topics_round_trip_between_registries() {
    with_watchdog(60, || {
        let channel = channel("topics");
        let sender = enabled(&channel);
        let receiver = enabled(&channel);
        let topics: [&str; 5] = ["12:34", "it's \"quoted\"", "two\nlines", "日本語:7", "9"];
        let pairs: Vec<_> = topics.iter().map(|_| socketpair_nonblocking()).collect();
        for (topic, (ours, _)) in topics.iter().zip(&pairs) {
            receiver
                .subscribe(topic.as_bytes(), ours.as_raw_fd(), Mode::Raw)
                .unwrap();
        }
        for topic in topics {
            sender
                .publish(topic.as_bytes(), format!("<{topic}>").as_bytes())
                .unwrap();
        }
        for (topic, (_, theirs)) in topics.iter().zip(&pairs) {
            let want = format!("<{topic}>");
            assert_eq!(
                receive(&receiver, theirs.as_raw_fd(), want.len()),
                want.as_bytes()
            );
            assert!(
                read_quiet(theirs.as_raw_fd()).is_empty(),
                "{topic}: more than one"
            );
        }
    });
}

#[test]
fn a_plain_sql_notify_in_teps_format_reaches_local_subscribers() {
    with_watchdog(60, || {
        let channel = channel("sql");
        let receiver = enabled(&channel);
        let topic = "room:42 'é'\n";
        let (ours, theirs) = socketpair_nonblocking();
        receiver
            .subscribe(topic.as_bytes(), ours.as_raw_fd(), Mode::Sse)
            .unwrap();
        let notification = format!("{}:{topic}hi there", topic.len());
        psql(
            "SELECT pg_notify(:'channel', :'notification');",
            &[("channel", &channel), ("notification", &notification)],
        );
        let want = b"data: hi there\n\n";
        assert_eq!(receive(&receiver, theirs.as_raw_fd(), want.len()), want);
    });
}

#[test]
fn malformed_notifications_are_counted_and_ignored() {
    with_watchdog(60, || {
        let channel = channel("malformed");
        let receiver = enabled(&channel);
        let (ours, theirs) = socketpair_nonblocking();
        receiver
            .subscribe(b"ab", ours.as_raw_fd(), Mode::Raw)
            .unwrap();
        psql(
            "SELECT pg_notify(:'channel', 'garbage'); SELECT pg_notify(:'channel', '5:ab'); \
             SELECT pg_notify(:'channel', ''); SELECT pg_notify(:'channel', '2:abfine');",
            &[("channel", &channel)],
        );
        assert_eq!(receive(&receiver, theirs.as_raw_fd(), 4), b"fine");
        dispatch_until(&receiver, "malformed not counted", |s| s.malformed == 3);
        assert_eq!(receiver.pg_stats().received, 1);
    });
}

#[test]
fn payloads_notify_cannot_carry_are_refused_before_any_delivery() {
    with_watchdog(60, || {
        let channel = channel("refused");
        let sender = enabled(&channel);
        let receiver = enabled(&channel);
        let (local, local_peer) = socketpair_nonblocking();
        let (remote, remote_peer) = socketpair_nonblocking();
        sender
            .subscribe(b"t", local.as_raw_fd(), Mode::Raw)
            .unwrap();
        receiver
            .subscribe(b"t", remote.as_raw_fd(), Mode::Raw)
            .unwrap();
        let largest = vec![b'x'; 7999 - "1:t".len()];
        let too_large = vec![b'x'; largest.len() + 1];
        for (payload, errno) in [
            (&too_large[..], libc::EMSGSIZE),
            (b"a\0b", libc::EILSEQ),
            (b"\xff\xfe", libc::EILSEQ),
        ] {
            let err = sender.publish(b"t", payload).unwrap_err();
            assert_eq!(err.errno(), errno, "{err}");
        }
        assert_eq!(
            sender.publish(b"t\0", b"x").unwrap_err().errno(),
            libc::EILSEQ
        );
        assert_eq!(
            sender.stats().publishes,
            0,
            "refused publishes are not counted"
        );
        // The largest that fits goes everywhere, proving the pipes work.
        sender.publish(b"t", &largest).unwrap();
        assert_eq!(
            receive(&receiver, remote_peer.as_raw_fd(), largest.len()),
            largest
        );
        assert_eq!(read_quiet(local_peer.as_raw_fd()), largest);
        // Once disabled, NOTIFY's limits no longer apply.
        sender.pg_disable();
        assert_eq!(sender.publish(b"t", b"a\0b").unwrap(), 1);
    });
}

#[test]
fn delivery_resumes_after_the_listening_connection_is_terminated() {
    with_watchdog(90, || {
        let channel = channel("terminated");
        let name = channel.clone();
        let sender = enabled(&channel);
        let receiver = Registry::new().unwrap();
        receiver
            .pg_enable(&url_with(&format!("application_name={name}")), &channel)
            .unwrap();
        let (ours, theirs) = socketpair_nonblocking();
        receiver
            .subscribe(b"t", ours.as_raw_fd(), Mode::Raw)
            .unwrap();
        sender.publish(b"t", b"before;").unwrap();
        assert_eq!(receive(&receiver, theirs.as_raw_fd(), 7), b"before;");

        let killed = psql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = :'name';",
            &[("name", &name)],
        );
        assert_eq!(killed.trim(), "1");
        dispatch_until(&receiver, "never reconnected", |s| {
            s.reconnects == 1 && s.connected == 1
        });
        sender.publish(b"t", b"after").unwrap();
        assert_eq!(receive(&receiver, theirs.as_raw_fd(), 5), b"after");
    });
}

#[test]
fn publishes_made_while_the_connection_is_down_go_out_after_the_reconnect() {
    with_watchdog(90, || {
        let channel = channel("queued");
        let name = channel.clone();
        let receiver = enabled(&channel);
        let sender = Registry::new().unwrap();
        sender
            .pg_enable(&url_with(&format!("application_name={name}")), &channel)
            .unwrap();
        let (ours, theirs) = socketpair_nonblocking();
        receiver
            .subscribe(b"t", ours.as_raw_fd(), Mode::Raw)
            .unwrap();

        psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :'name';",
            &[("name", &name)],
        );
        dispatch_until(&sender, "loss never noticed", |s| s.connected == 0);
        // No dispatch on the sender now, so no reconnect can happen yet.
        for part in [&b"one;"[..], b"two;", b"three"] {
            sender.publish(b"t", part).unwrap();
        }
        assert_eq!(sender.pg_stats().queued, 3);
        dispatch_until(&sender, "queue never sent", |s| {
            s.connected == 1 && s.queued == 0
        });
        assert_eq!(sender.pg_stats().reconnects, 1);
        assert_eq!(receive(&receiver, theirs.as_raw_fd(), 13), b"one;two;three");
    });
}

#[test]
fn sslmode_require_uses_tls() {
    with_watchdog(60, || {
        let channel = channel("tls");
        let name = channel.clone();
        let receiver = Registry::new().unwrap();
        receiver
            .pg_enable(
                &url_with(&format!("sslmode=require&application_name={name}")),
                &channel,
            )
            .unwrap();
        let ssl = psql(
            "SELECT ssl FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE application_name = :'name';",
            &[("name", &name)],
        );
        assert_eq!(ssl.trim(), "t", "the connection is not encrypted");
        let sender = enabled(&channel);
        let (ours, theirs) = socketpair_nonblocking();
        receiver
            .subscribe(b"t", ours.as_raw_fd(), Mode::WsText)
            .unwrap();
        sender.publish(b"t", b"secret").unwrap();
        assert_eq!(receive(&receiver, theirs.as_raw_fd(), 8), b"\x81\x06secret");
    });
}

#[test]
fn poll_once_delivers_without_dispatch() {
    with_watchdog(60, || {
        let channel = channel("poll");
        let sender = enabled(&channel);
        let receiver = enabled(&channel);
        let (ours, theirs) = socketpair_nonblocking();
        receiver
            .subscribe(b"t", ours.as_raw_fd(), Mode::Raw)
            .unwrap();
        assert_eq!(receiver.pg_poll_once(Some(Duration::ZERO)).unwrap(), 0);
        sender.publish(b"t", b"polled").unwrap();
        let start = Instant::now();
        let mut delivered = 0;
        while delivered == 0 {
            assert!(start.elapsed() < T, "pg_poll_once never delivered");
            delivered = receiver.pg_poll_once(Some(Duration::from_secs(5))).unwrap();
        }
        assert_eq!(delivered, 1);
        assert_eq!(read_quiet(theirs.as_raw_fd()), b"polled");
    });
}

#[test]
fn enable_reports_bad_arguments_and_unreachable_servers() {
    with_watchdog(60, || {
        let registry = Registry::new().unwrap();
        let errno = |conninfo: &str, channel: &str| {
            registry.pg_enable(conninfo, channel).unwrap_err().errno()
        };
        assert_eq!(errno("this is = not = a conninfo", "c"), libc::EINVAL);
        assert_eq!(errno("postgresql://[::1", "c"), libc::EINVAL);
        assert_eq!(errno(&pg_url(), ""), libc::EINVAL);
        assert_eq!(errno(&pg_url(), &"x".repeat(64)), libc::EINVAL);
        assert_eq!(
            errno("postgresql://127.0.0.1:1/test?connect_timeout=2", "c"),
            libc::ECONNREFUSED
        );
        let err = registry
            .pg_enable(&url_with("dbname=fdcast_no_such_database"), "c")
            .unwrap_err();
        assert_eq!(err.errno(), libc::ECONNREFUSED);
        assert!(err.to_string().contains("fdcast_no_such_database"), "{err}");
        assert_eq!(
            registry
                .pg_poll_once(Some(Duration::ZERO))
                .unwrap_err()
                .errno(),
            libc::ENOTCONN
        );
        // A failed enable leaves the registry local-only: NOTIFY's limits do not apply.
        assert_eq!(registry.publish(b"t", &vec![b'x'; 9000]).unwrap(), 0);

        registry.pg_enable(&pg_url(), &channel("twice")).unwrap();
        assert_eq!(errno(&pg_url(), "other"), libc::EALREADY);
        registry.pg_disable();
        registry.pg_disable();
        assert_eq!(registry.pg_stats(), fdcast::PgStats::default());
    });
}
