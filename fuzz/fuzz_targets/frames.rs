//! The SSE and WebSocket encoders, through the public API: the payload is published to one
//! socketpair per mode, each reader's bytes are parsed back with a strict parser written here
//! (not fdcast's), and must be exactly one well-formed frame carrying the payload. WebSocket
//! frames must also equal what `fdcast::ws::encode` writes, and decode back through
//! `fdcast::ws::decode` once masked as a client would. A payload that is not UTF-8 must be
//! refused with EILSEQ for text and SSE subscribers, with nothing written to anyone.
//!
//! Input: byte 0 picks a size multiplier (so payloads reach the 16- and 64-bit WebSocket
//! lengths), the rest is the payload.
#![no_main]

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;

use fdcast::ws::{self, Opcode};
use fdcast::{Mode, Registry};
use libfuzzer_sys::fuzz_target;

struct Setup {
    reg: Registry,
    /// Writer and reader per mode, in `Mode::ALL` order.
    pairs: Vec<(UnixStream, UnixStream)>,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let reg = Registry::new().expect("registry");
        let mut pairs = Vec::new();
        for mode in Mode::ALL {
            let (w, r) = UnixStream::pair().expect("socketpair");
            r.set_nonblocking(true).unwrap();
            // Room for the largest frame this target builds, so every publish writes it whole.
            set_sndbuf(&w, 4 << 20);
            reg.subscribe(b"all", w.as_raw_fd(), mode).unwrap();
            if !mode.requires_utf8() {
                reg.subscribe(b"bytes", w.as_raw_fd(), mode).unwrap();
            }
            pairs.push((w, r));
        }
        Setup { reg, pairs }
    })
}

fn set_sndbuf(socket: &UnixStream, bytes: libc::c_int) {
    // SAFETY: SO_SNDBUF takes an int, passed by pointer with its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        // Not root: the ordinary option, capped by wmem_max.
        // SAFETY: as above.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&bytes as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
}

fn read_all(mut reader: &UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => panic!("EOF on a subscriber socket"),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return out,
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Parses one unmasked server frame that must fill `bytes` exactly: FIN set, no RSV bits,
/// the expected opcode, the shortest length encoding (RFC 6455 5.2).
fn parse_server_frame(bytes: &[u8], opcode: u8) -> &[u8] {
    assert!(bytes.len() >= 2, "WebSocket frame of {} bytes", bytes.len());
    assert_eq!(bytes[0], 0x80 | opcode, "first byte");
    assert_eq!(bytes[1] & 0x80, 0, "a server frame must not be masked");
    let (len, header) = match bytes[1] & 0x7f {
        126 => {
            let len = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
            assert!(len >= 126, "16-bit length {len} should have used 7 bits");
            (len, 4)
        }
        127 => {
            let len = u64::from_be_bytes(bytes[2..10].try_into().unwrap());
            assert!(len > 0xffff, "64-bit length {len} should have used 16 bits");
            assert_eq!(len >> 63, 0, "64-bit length with its top bit set");
            (len as usize, 10)
        }
        len => (usize::from(len), 2),
    };
    assert_eq!(bytes.len(), header + len, "frame length vs. bytes received");
    &bytes[header..]
}

/// Parses one SSE event that must fill `bytes` exactly: `data: <line>\n` lines with no CR or
/// LF inside, then one empty line. Returns the lines joined with LF, as EventSource does.
fn parse_sse_event(bytes: &[u8]) -> Vec<u8> {
    let body = bytes
        .strip_suffix(b"\n\n")
        .expect("an SSE event ends with a blank line");
    let mut data = Vec::new();
    for (i, line) in body.split(|&b| b == b'\n').enumerate() {
        let value = line
            .strip_prefix(b"data: ")
            .expect("every SSE line is a data line");
        assert!(!value.contains(&b'\r'), "CR inside an SSE line");
        if i > 0 {
            data.push(b'\n');
        }
        data.extend_from_slice(value);
    }
    data
}

/// The payload with CRLF and CR turned into LF: what an EventSource hands to the page.
fn normalise_newlines(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len());
    let mut i = 0;
    while i < payload.len() {
        if payload[i] == b'\r' {
            out.push(b'\n');
            if payload.get(i + 1) == Some(&b'\n') {
                i += 1;
            }
        } else {
            out.push(payload[i]);
        }
        i += 1;
    }
    out
}

/// Masks a server frame as a client would send it, then decodes it with fdcast's decoder.
fn client_round_trip(server_frame: &[u8], payload: &[u8], opcode: Opcode) {
    if payload.len() > ws::MAX_PAYLOAD {
        return;
    }
    let header = server_frame.len() - payload.len();
    let key = [0x12, 0x9a, 0x00, 0xff];
    let mut client = server_frame[..header].to_vec();
    client[1] |= 0x80;
    client.extend_from_slice(&key);
    client.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    let len = client.len();
    let (frame, used) = ws::decode(&mut client)
        .expect("a frame fdcast encoded decodes")
        .expect("a whole frame");
    assert_eq!(used, len);
    assert_eq!(frame.opcode, opcode);
    assert!(frame.fin);
    assert_eq!(&*frame.payload, payload);
}

fuzz_target!(|data: &[u8]| {
    let Some((&shape, rest)) = data.split_first() else {
        return;
    };
    let payload: Vec<u8> = match shape % 8 {
        // Stretch to just past the 16-bit length boundary, or to it exactly.
        6 if !rest.is_empty() => rest
            .iter()
            .copied()
            .cycle()
            .take(65_536 + rest.len())
            .collect(),
        7 if !rest.is_empty() => rest.iter().copied().cycle().take(65_535).collect(),
        _ => rest.to_vec(),
    };
    let setup = setup();
    let utf8 = std::str::from_utf8(&payload).is_ok();

    let topic: &[u8] = if shape & 0x80 != 0 { b"bytes" } else { b"all" };
    let result = setup.reg.publish(topic, &payload);
    let received: Vec<Vec<u8>> = setup.pairs.iter().map(|(_, r)| read_all(r)).collect();
    if topic == b"all" && !utf8 {
        assert_eq!(result.unwrap_err().errno(), libc::EILSEQ);
        assert!(
            received.iter().all(Vec::is_empty),
            "bytes written after EILSEQ"
        );
        return;
    }
    let matched = result.expect("publish");
    let expected_matches = Mode::ALL
        .iter()
        .filter(|mode| topic == b"all" || !mode.requires_utf8())
        .count();
    assert_eq!(matched, expected_matches);
    assert_eq!(
        setup.reg.stats().queued_bytes,
        0,
        "every frame written whole"
    );

    for (mode, bytes) in Mode::ALL.into_iter().zip(&received) {
        if topic == b"bytes" && mode.requires_utf8() {
            assert!(
                bytes.is_empty(),
                "{mode:?} subscriber got a frame of another topic"
            );
            continue;
        }
        match mode {
            Mode::Raw => assert_eq!(bytes, &payload, "RAW frame"),
            Mode::WsText | Mode::WsBinary => {
                let (opcode, op) = if mode == Mode::WsText {
                    (1, Opcode::Text)
                } else {
                    (2, Opcode::Binary)
                };
                assert_eq!(parse_server_frame(bytes, opcode), &payload[..]);
                let mut encoded = vec![0u8; ws::encoded_len(payload.len())];
                let n = ws::encode(op, &payload, &mut encoded).expect("ws::encode");
                assert_eq!(
                    &encoded[..n],
                    &bytes[..],
                    "ws::encode vs. the broadcast frame"
                );
                client_round_trip(bytes, &payload, op);
            }
            Mode::WsTextId | Mode::WsBinaryId => {
                // No history here: the frame payload is an empty id, its LF, the payload.
                let opcode = if mode == Mode::WsTextId { 1 } else { 2 };
                let framed = parse_server_frame(bytes, opcode);
                assert_eq!(framed.first(), Some(&b'\n'), "{mode:?}: an empty id first");
                assert_eq!(&framed[1..], &payload[..], "{mode:?} payload");
            }
            Mode::Sse => {
                assert_eq!(
                    parse_sse_event(bytes),
                    normalise_newlines(&payload),
                    "SSE data"
                );
            }
        }
    }

    // Control frames from ws::encode: refused exactly when RFC 6455 forbids them, else
    // well-formed.
    let control = &payload[..payload.len().min(130)];
    for op in [Opcode::Ping, Opcode::Pong, Opcode::Close] {
        let mut out = [0u8; 140];
        match ws::encode(op, control, &mut out) {
            Ok(n) => {
                assert!(control.len() <= 125);
                assert_eq!(parse_server_frame(&out[..n], op as u8), control);
                client_round_trip(&out[..n], control, op);
            }
            Err(err) => assert!(
                control.len() > 125 || op == Opcode::Close,
                "{op:?} of {} bytes refused: {err}",
                control.len()
            ),
        }
    }
});
