//! The brokers over TLS, against real servers this test starts: Redis with `--tls-port`
//! (client certificates required) and NATS with a `tls {}` block, both with a certificate
//! from a CA the test makes. Checks that messages cross between two registries over TLS,
//! that the certificate is verified (unknown CA, wrong host name: refused), that a client
//! certificate is presented when the URL names one, and the errors of a TLS URL that
//! cannot work. Needs `redis-server` and `nats-server` on the PATH; fails without them.

mod common;

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fdcast::{Error, Mode, Registry};
use openssl::asn1::Asn1Time;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
};
use openssl::x509::{X509, X509NameBuilder};

const T: Duration = Duration::from_secs(20);

fn key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

/// A certificate for `name`, signed by `issuer` (self-signed when `None`).
fn certificate(
    name: &str,
    key: &PKey<Private>,
    issuer: Option<(&X509, &PKey<Private>)>,
    dns_names: &[&str],
    client: bool,
) -> X509 {
    let mut subject = X509NameBuilder::new().unwrap();
    subject.append_entry_by_text("CN", name).unwrap();
    let subject = subject.build();
    let mut builder = X509::builder().unwrap();
    builder.set_version(2).unwrap();
    let serial = BigNum::from_u32(rand_u32())
        .unwrap()
        .to_asn1_integer()
        .unwrap();
    builder.set_serial_number(&serial).unwrap();
    builder.set_subject_name(&subject).unwrap();
    builder
        .set_issuer_name(issuer.map_or(&subject, |(ca, _)| ca.subject_name()))
        .unwrap();
    builder.set_pubkey(key).unwrap();
    builder
        .set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    builder
        .set_not_after(&Asn1Time::days_from_now(2).unwrap())
        .unwrap();
    if issuer.is_none() {
        builder
            .append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
        builder
            .append_extension(
                KeyUsage::new()
                    .critical()
                    .key_cert_sign()
                    .crl_sign()
                    .build()
                    .unwrap(),
            )
            .unwrap();
    } else {
        let mut usage = ExtendedKeyUsage::new();
        if client {
            usage.client_auth();
        } else {
            usage.server_auth();
        }
        builder.append_extension(usage.build().unwrap()).unwrap();
        if !dns_names.is_empty() {
            let mut names = SubjectAlternativeName::new();
            for dns in dns_names {
                names.dns(dns);
            }
            let context = builder.x509v3_context(issuer.map(|(ca, _)| &**ca), None);
            let names = names.build(&context).unwrap();
            builder.append_extension(names).unwrap();
        }
    }
    builder
        .sign(
            issuer.map_or(key, |(_, ca_key)| ca_key),
            MessageDigest::sha256(),
        )
        .unwrap();
    builder.build()
}

fn rand_u32() -> u32 {
    let mut bytes = [0u8; 4];
    openssl::rand::rand_bytes(&mut bytes).unwrap();
    u32::from_ne_bytes(bytes) >> 1
}

/// The files a test run uses, removed at the end.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A CA, a server certificate for `localhost` (no IP address: connecting to 127.0.0.1
    /// must fail the name check), a client certificate, and an unrelated CA.
    fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!("fdcast-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, pem: Vec<u8>| std::fs::write(dir.join(name), pem).unwrap();
        let ca_key = key();
        let ca = certificate("fdcast test CA", &ca_key, None, &[], false);
        let server_key = key();
        let server = certificate(
            "localhost",
            &server_key,
            Some((&ca, &ca_key)),
            &["localhost"],
            false,
        );
        let client_key = key();
        let client = certificate(
            "fdcast client",
            &client_key,
            Some((&ca, &ca_key)),
            &[],
            true,
        );
        let other_key = key();
        let other = certificate("another CA", &other_key, None, &[], false);
        write("ca.pem", ca.to_pem().unwrap());
        write("server.pem", server.to_pem().unwrap());
        write("server.key", server_key.private_key_to_pem_pkcs8().unwrap());
        write("client.pem", client.to_pem().unwrap());
        write("client.key", client_key.private_key_to_pem_pkcs8().unwrap());
        write("other-ca.pem", other.to_pem().unwrap());
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A server process, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, server: &mut Server) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = server.0.try_wait() {
            panic!("the server on port {port} exited: {status}");
        }
        assert!(start.elapsed() < T, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_redis(pki: &Pki) -> (Server, u16) {
    let port = free_port();
    let mut server = Server(
        Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--tls-cert-file", &pki.path("server.pem")])
            .args(["--tls-key-file", &pki.path("server.key")])
            .args(["--tls-ca-cert-file", &pki.path("ca.pem")])
            .args(["--tls-auth-clients", "yes"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)"),
    );
    wait_for_port(port, &mut server);
    (server, port)
}

fn start_nats(pki: &Pki) -> (Server, u16) {
    let port = free_port();
    let config = pki.dir.join("nats.conf");
    std::fs::write(
        &config,
        format!(
            "listen: \"127.0.0.1:{port}\"\ntls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\n",
            pki.path("server.pem"),
            pki.path("server.key")
        ),
    )
    .unwrap();
    let mut server = Server(
        Command::new("nats-server")
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (scripts/test-deps.sh installs it)"),
    );
    wait_for_port(port, &mut server);
    (server, port)
}

/// Two registries on `url` exchange a message each way, framed for their subscribers.
fn round_trip(url: &str, name: &str) {
    let (a, b) = (Registry::new().unwrap(), Registry::new().unwrap());
    let (a_sub, a_peer) = socketpair();
    let (b_sub, b_peer) = socketpair();
    a.subscribe(b"t", a_sub.as_raw_fd(), Mode::Sse).unwrap();
    b.subscribe(b"t", b_sub.as_raw_fd(), Mode::WsText).unwrap();
    a.broker_enable(url, name)
        .unwrap_or_else(|err| panic!("{url}: {err}"));
    b.broker_enable(url, name)
        .unwrap_or_else(|err| panic!("{url}: {err}"));
    assert_eq!(a.broker_stats().connected, 1);

    a.publish(b"t", b"over TLS").unwrap();
    assert_eq!(
        read_exact_timeout(a_peer.as_raw_fd(), 16, T),
        b"data: over TLS\n\n"
    );
    wait_bytes(&b, &b_peer, b"\x81\x08over TLS");
    b.publish(b"t", b"back").unwrap();
    assert_eq!(
        read_exact_timeout(b_peer.as_raw_fd(), 6, T),
        b"\x81\x04back"
    );
    wait_bytes(&a, &a_peer, b"data: back\n\n");
    assert_eq!(a.broker_stats().received, 1);
    assert_eq!(b.broker_stats().received, 1);
}

/// Polls `registry`'s broker until `peer` has received `want`, and nothing else.
fn wait_bytes(registry: &Registry, peer: &UnixStream, want: &[u8]) {
    let start = Instant::now();
    let mut got = Vec::new();
    while got.len() < want.len() {
        registry
            .broker_poll_once(Some(Duration::from_millis(50)))
            .unwrap();
        got.extend(read_now(peer.as_raw_fd()).0);
        assert!(start.elapsed() < T, "{want:?} did not arrive");
    }
    assert_eq!(got, want);
}

fn refused(url: &str) -> Error {
    let registry = Registry::new().unwrap();
    let err = registry
        .broker_enable(url, "p")
        .expect_err("the enable should fail");
    assert_eq!(registry.broker_stats().connected, 0);
    err
}

fn with_files(url: &str, pki: &Pki, files: &[(&str, &str)]) -> String {
    let options: Vec<String> = files
        .iter()
        .map(|(key, file)| format!("{key}={}", pki.path(file)))
        .collect();
    format!("{url}?{}", options.join("&"))
}

#[test]
fn redis_over_tls() {
    let pki = Pki::new();
    let (_server, port) = start_redis(&pki);
    let base = format!("rediss://localhost:{port}");
    let trusted = [
        ("ca", "ca.pem"),
        ("cert", "client.pem"),
        ("key", "client.key"),
    ];
    round_trip(&with_files(&base, &pki, &trusted), "tls:");

    // The server asks for a client certificate: none, no session.
    let err = refused(&with_files(&base, &pki, &[("ca", "ca.pem")]));
    assert_eq!(err.errno(), libc::ECONNREFUSED, "{err}");

    let err = refused(&with_files(
        &base,
        &pki,
        &[
            ("ca", "other-ca.pem"),
            ("cert", "client.pem"),
            ("key", "client.key"),
        ],
    ));
    assert_eq!(err.errno(), libc::ECONNREFUSED);
    assert!(err.to_string().contains("certificate"), "{err}");

    // The certificate names localhost, not 127.0.0.1.
    let by_address = format!("rediss://127.0.0.1:{port}");
    let err = refused(&with_files(&by_address, &pki, &trusted));
    assert!(err.to_string().contains("certificate"), "{err}");

    // Plain Redis on the TLS port: the server drops the connection.
    let err = refused(&format!("redis://localhost:{port}"));
    assert_eq!(err.errno(), libc::ECONNREFUSED, "{err}");
}

#[test]
fn nats_over_tls() {
    let pki = Pki::new();
    let (_server, port) = start_nats(&pki);
    let base = format!("tls://localhost:{port}");
    round_trip(&with_files(&base, &pki, &[("ca", "ca.pem")]), "tls");

    let err = refused(&format!("nats://localhost:{port}"));
    assert_eq!(err.errno(), libc::ECONNREFUSED);
    assert!(err.to_string().contains("requires TLS"), "{err}");

    let err = refused(&with_files(&base, &pki, &[("ca", "other-ca.pem")]));
    assert!(err.to_string().contains("certificate"), "{err}");

    // No ca=: the system's trust store, which does not know the test CA.
    let err = refused(&base);
    assert!(err.to_string().contains("certificate"), "{err}");
}

#[test]
fn tls_options_are_checked_before_connecting() {
    for (url, why) in [
        ("redis://localhost?ca=/x.pem", "TLS option on a plain URL"),
        (
            "rediss://localhost?ca=/nonexistent.pem",
            "a CA file that is not there",
        ),
        (
            "rediss://localhost?cert=/c.pem",
            "a certificate without its key",
        ),
        ("tls://localhost?verify=none", "an unknown option"),
    ] {
        let err = refused(url);
        assert_eq!(err.errno(), libc::EINVAL, "{why}: {err}");
    }
    assert!(Path::new("/nonexistent.pem").metadata().is_err());
}

#[test]
fn a_server_that_never_answers_the_handshake_is_given_up() {
    // Accepts, then says nothing: the connect succeeds and the handshake waits.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let err = refused(&format!("rediss://127.0.0.1:{port}"));
    assert_eq!(err.errno(), libc::ECONNREFUSED, "{err}");
    // Given up by the session deadline (5 s), not by enable's own (10 s), whose message is
    // "no session within the connect timeout".
    assert!(err.to_string().contains("TLS handshake"), "{err}");
    drop(listener);
}
