//! The client frame decoder, `fdcast::ws::decode`, `fdcast::ws::Reader` and their C faces
//! `fdcast_ws_decode` / `fdcast_ws_read`, on arbitrary bytes. Properties:
//! - never panics (libfuzzer-sys aborts on any panic, even one the C boundary would catch);
//! - never reads or writes past the buffer: the C functions get an exactly sized heap
//!   allocation, which AddressSanitizer guards;
//! - consumed <= len, and the payload lies inside the consumed bytes, unmasked with the
//!   frame's own key (checked against the input here);
//! - `Ok(None)` and errors leave the buffer (and a Reader) untouched;
//! - every proper prefix of a frame that decodes is "need more bytes", never an error;
//! - a Reader that fails changes nothing, and the C reader round-trips its state.
#![no_main]

use std::ffi::c_int;

use fdcast::ws::{self, Opcode, Reader};
use libfuzzer_sys::fuzz_target;

#[repr(C)]
#[derive(Clone, Copy)]
struct WsFrame {
    opcode: c_int,
    fin: bool,
    payload: *mut u8,
    payload_len: usize,
    close_code: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
struct WsReader {
    message_len: u64,
    message_opcode: u8,
    utf8_tail_len: u8,
    utf8_tail: [u8; 3],
}

unsafe extern "C" {
    fn fdcast_ws_decode(buf: *mut u8, len: usize, out: *mut WsFrame) -> i64;
    fn fdcast_ws_read(r: *mut WsReader, buf: *mut u8, len: usize, out: *mut WsFrame) -> i64;
}

/// Checks a decoded frame against the raw input it came from.
fn check_frame(input: &[u8], opcode: Opcode, payload: &[u8], used: usize) {
    assert!(
        used <= input.len(),
        "consumed {used} of {} bytes",
        input.len()
    );
    assert!(payload.len() <= used);
    let header = used - payload.len();
    assert!((6..=14).contains(&header), "header of {header} bytes");
    assert_eq!(input[0] & 0x0f, opcode as u8);
    assert_ne!(input[1] & 0x80, 0, "decoded an unmasked client frame");
    let key = &input[header - 4..header];
    for (i, &b) in payload.iter().enumerate() {
        assert_eq!(
            b,
            input[header + i] ^ key[i % 4],
            "payload byte {i} not unmasked"
        );
    }
    if opcode.is_control() {
        assert!(payload.len() <= 125);
    }
    assert!(payload.len() <= ws::MAX_PAYLOAD);
}

fn safe_decode(input: &[u8]) {
    let mut buf = input.to_vec();
    match ws::decode(&mut buf) {
        Ok(Some((frame, used))) => {
            let (opcode, payload) = (frame.opcode, frame.payload.to_vec());
            if opcode == Opcode::Close {
                assert_eq!(frame.close_code.is_some(), payload.len() >= 2);
                assert!(std::str::from_utf8(&payload[payload.len().min(2)..]).is_ok());
            }
            check_frame(input, opcode, &payload, used);
            assert_eq!(
                &buf[used..],
                &input[used..],
                "bytes after the frame changed"
            );
            // Every proper prefix needs more bytes.
            let step = (used / 64).max(1);
            for cut in (0..used).step_by(step).chain([used - 1]) {
                let mut prefix = input[..cut].to_vec();
                match ws::decode(&mut prefix) {
                    Ok(None) => assert_eq!(prefix, &input[..cut], "prefix changed"),
                    Ok(Some(_)) => panic!("a {cut}-byte prefix of a {used}-byte frame decoded"),
                    Err(err) => panic!("a {cut}-byte prefix of a valid frame failed: {err}"),
                }
            }
        }
        Ok(None) => assert_eq!(buf, input, "Ok(None) changed the buffer"),
        Err(err) => {
            assert_eq!(buf, input, "an error changed the buffer");
            assert!(fdcast::Error::from(err).errno() > 0);
            assert!(
                err.close_code().is_some(),
                "a peer's error without a close code"
            );
        }
    }
}

fn safe_reader(input: &[u8]) {
    let mut reader = Reader::default();
    let mut buf = input.to_vec();
    let mut at = 0;
    loop {
        let before_reader = reader;
        let before = buf[at..].to_vec();
        match reader.read(&mut buf[at..]) {
            Ok(Some((frame, used))) => {
                assert!(used > 0 && at + used <= input.len());
                let (opcode, payload) = (frame.opcode, frame.payload.to_vec());
                check_frame(&input[at..], opcode, &payload, used);
                at += used;
            }
            Ok(None) => {
                assert_eq!(buf[at..], before[..], "Ok(None) changed the buffer");
                assert_eq!(reader, before_reader);
                return;
            }
            Err(_) => {
                assert_eq!(buf[at..], before[..], "an error changed the buffer");
                assert_eq!(reader, before_reader, "an error changed the reader");
                return;
            }
        }
    }
}

/// An exactly sized heap copy, so AddressSanitizer catches a read one byte past the end.
fn exact_copy(input: &[u8]) -> Box<[u8]> {
    input.to_vec().into_boxed_slice()
}

fn c_decode(input: &[u8]) {
    let mut buf = exact_copy(input);
    let base = buf.as_mut_ptr() as usize;
    let mut out = std::mem::MaybeUninit::<WsFrame>::uninit();
    // SAFETY: `buf` is `len` writable bytes and `out` a separate writable frame.
    let rc = unsafe { fdcast_ws_decode(buf.as_mut_ptr(), buf.len(), out.as_mut_ptr()) };
    if rc > 0 {
        // SAFETY: a positive return means `out` was written.
        let frame = unsafe { out.assume_init() };
        let used = rc as usize;
        assert!(used <= input.len());
        let start = frame.payload as usize;
        assert!(start >= base && start + frame.payload_len <= base + used);
    } else {
        assert!(
            [0, -libc::EPROTO, -libc::EILSEQ, -libc::EMSGSIZE].contains(&(rc as i32)) && rc > -4096,
            "fdcast_ws_decode returned {rc}"
        );
        assert_eq!(
            &buf[..],
            input,
            "a failed or incomplete decode changed the buffer"
        );
    }
    // NULL with a length is EINVAL, NULL with 0 is "need more".
    // SAFETY: NULL pointers are part of the contract.
    unsafe {
        assert_eq!(
            fdcast_ws_decode(std::ptr::null_mut(), input.len().max(1), out.as_mut_ptr()),
            -i64::from(libc::EINVAL)
        );
        assert_eq!(
            fdcast_ws_decode(std::ptr::null_mut(), 0, out.as_mut_ptr()),
            0
        );
        assert_eq!(
            fdcast_ws_decode(buf.as_mut_ptr(), buf.len(), std::ptr::null_mut()),
            -i64::from(libc::EINVAL)
        );
    }
}

fn c_read(input: &[u8], garbage_state: Option<WsReader>) {
    let mut buf = exact_copy(input);
    let mut reader = garbage_state.unwrap_or_default();
    let mut at = 0;
    let mut out = std::mem::MaybeUninit::<WsFrame>::uninit();
    loop {
        let before = reader;
        let rest = &mut buf[at..];
        // SAFETY: `rest` is `len` writable bytes; `reader` and `out` are separate structs.
        let rc =
            unsafe { fdcast_ws_read(&mut reader, rest.as_mut_ptr(), rest.len(), out.as_mut_ptr()) };
        if rc <= 0 {
            assert_eq!(
                reader, before,
                "a failed or incomplete read changed the reader"
            );
            if garbage_state.is_none() {
                assert_ne!(rc, -i64::from(libc::EINVAL), "a zeroed reader was refused");
            }
            return;
        }
        assert!(at + rc as usize <= input.len());
        at += rc as usize;
    }
}

fuzz_target!(|data: &[u8]| {
    safe_decode(data);
    safe_reader(data);
    c_decode(data);
    c_read(data, None);
    if data.len() >= 13 {
        let state = WsReader {
            message_len: u64::from_le_bytes(data[..8].try_into().unwrap()) % (1 << 25),
            message_opcode: data[8] % 4,
            utf8_tail_len: data[9] % 5,
            utf8_tail: [data[10], data[11], data[12]],
        };
        c_read(&data[13..], Some(state));
    }
});
