//! The C face of `crate::ws`.
//! WebSocket helpers for hosts that speak the protocol themselves: the handshake's accept
//! key, and an incremental decoder for client frames (RFC 6455).
//!
//! These functions take no handle and touch no fd: they only read and write the buffers
//! they are given, so they may be called from any thread, concurrently.

use std::ffi::{c_char, c_int, c_void};

use super::boundary::{bytes, bytes_mut, out_param, returning_i64, returning_status};
use crate::error::Error;
use crate::ws;

/// The size of the buffer fdcast_ws_accept_key() writes: 28 characters and a NUL.
pub const FDCAST_WS_ACCEPT_KEY_SIZE: usize = 29;

/// The largest payload, in bytes, fdcast_ws_decode() accepts in one frame and
/// fdcast_ws_read() in one message (its fragments summed): 16 MiB. A larger one is -EMSGSIZE
/// (close the connection with status 1009).
pub const FDCAST_WS_MAX_FRAME: usize = 16777216;

/// The longest header of a server frame: a buffer of `len + FDCAST_WS_MAX_HEADER` bytes
/// always holds what fdcast_ws_encode() writes for a `len`-byte payload.
pub const FDCAST_WS_MAX_HEADER: usize = 10;

// The header's constants are literals (cbindgen cannot follow paths into the core); these
// keep them equal to the core's.
const _: () = assert!(FDCAST_WS_ACCEPT_KEY_SIZE == ws::ACCEPT_KEY_LEN + 1);
const _: () = assert!(FDCAST_WS_MAX_FRAME == ws::MAX_PAYLOAD);
const _: () = assert!(FDCAST_WS_MAX_HEADER == ws::MAX_SERVER_HEADER_LEN);

/// The opcodes of RFC 6455 §5.2, as found in fdcast_ws_frame.opcode and passed to
/// fdcast_ws_encode() (both plain ints).
// Never constructed in Rust: opcodes cross the boundary as ints; this is the header's enum.
#[allow(non_camel_case_types, dead_code)]
#[repr(C)]
pub enum fdcast_ws_opcode {
    /// The next fragment of a fragmented text or binary message.
    FDCAST_WS_OP_CONTINUATION = 0,
    /// A UTF-8 text message (or its first fragment).
    FDCAST_WS_OP_TEXT = 1,
    /// A binary message (or its first fragment).
    FDCAST_WS_OP_BINARY = 2,
    /// Close: payload empty, or a big-endian status code and a UTF-8 reason.
    FDCAST_WS_OP_CLOSE = 8,
    /// Ping: answer with a pong carrying the same payload.
    FDCAST_WS_OP_PING = 9,
    /// Pong: the answer to a ping (or an unsolicited heartbeat): ignore it.
    FDCAST_WS_OP_PONG = 10,
}

const _: () = {
    use fdcast_ws_opcode::*;
    assert!(FDCAST_WS_OP_CONTINUATION as u8 == ws::Opcode::Continuation as u8);
    assert!(FDCAST_WS_OP_TEXT as u8 == ws::Opcode::Text as u8);
    assert!(FDCAST_WS_OP_BINARY as u8 == ws::Opcode::Binary as u8);
    assert!(FDCAST_WS_OP_CLOSE as u8 == ws::Opcode::Close as u8);
    assert!(FDCAST_WS_OP_PING as u8 == ws::Opcode::Ping as u8);
    assert!(FDCAST_WS_OP_PONG as u8 == ws::Opcode::Pong as u8);
};

/// One client frame, filled by fdcast_ws_decode() and fdcast_ws_read().
#[allow(non_camel_case_types)]
#[repr(C)]
pub struct fdcast_ws_frame {
    /// An fdcast_ws_opcode value.
    pub opcode: c_int,
    /// Whether this is the last frame of its message (always true for control frames).
    pub fin: bool,
    /// The payload, unmasked, inside the caller's buffer (valid as long as that buffer is);
    /// not NUL-terminated. When payload_len is 0 it points just past the frame's header.
    /// For a close frame: the 2-byte big-endian status code, then the UTF-8 reason, which
    /// is therefore `payload + 2`, `payload_len - 2` bytes (when payload_len >= 2).
    pub payload: *mut u8,
    /// Payload bytes, at most FDCAST_WS_MAX_FRAME (125 for control frames).
    pub payload_len: usize,
    /// For a close frame with a payload, its status code (already checked to be one a peer
    /// may send: 1000-1003, 1007-1011 or 3000-4999); 0 otherwise (a close frame without a
    /// payload means "no status", which RFC 6455 reports as 1005).
    pub close_code: u16,
}

/// The state fdcast_ws_read() keeps between frames of one connection (the message in
/// progress, its length so far, an incomplete UTF-8 sequence). Plain data, no heap: embed
/// one per connection and zero it (`= {0}`, memset, calloc) to start. Its fields are
/// private: never write them (a reader that fdcast could not have produced gives -EINVAL).
#[allow(non_camel_case_types)]
#[repr(C)]
pub struct fdcast_ws_reader {
    /// Private: payload bytes of the fragmented message in progress.
    pub message_len: u64,
    /// Private: the opcode of the fragmented message in progress, 0 when none.
    pub message_opcode: u8,
    /// Private: how many bytes of utf8_tail are in use.
    pub utf8_tail_len: u8,
    /// Private: an incomplete UTF-8 sequence at the end of the text so far.
    pub utf8_tail: [u8; 3],
}

/// The reader behind the C struct, or `None` if fdcast could not have written it.
fn reader_from_c(raw: &fdcast_ws_reader) -> Option<ws::Reader> {
    if raw.message_opcode == 0 {
        let zeroed = raw.message_len == 0 && raw.utf8_tail_len == 0;
        return zeroed.then(ws::Reader::default);
    }
    let opcode = ws::Opcode::from_u8(raw.message_opcode)?;
    let utf8_tail = raw.utf8_tail.get(..usize::from(raw.utf8_tail_len))?;
    ws::Reader::in_message(opcode, raw.message_len, utf8_tail)
}

fn reader_to_c(reader: &ws::Reader) -> fdcast_ws_reader {
    let mut raw = fdcast_ws_reader {
        message_len: 0,
        message_opcode: 0,
        utf8_tail_len: 0,
        utf8_tail: [0; 3],
    };
    if let Some((opcode, message_len, utf8_tail)) = reader.message_in_progress() {
        raw.message_len = message_len;
        raw.message_opcode = opcode as u8;
        raw.utf8_tail_len = utf8_tail.len() as u8; // at most 3
        raw.utf8_tail[..utf8_tail.len()].copy_from_slice(utf8_tail);
    }
    raw
}

fn frame_to_c(frame: ws::Frame<'_>) -> fdcast_ws_frame {
    fdcast_ws_frame {
        opcode: c_int::from(frame.opcode as u8),
        fin: frame.fin,
        payload: frame.payload.as_mut_ptr(),
        payload_len: frame.payload.len(),
        close_code: frame.close_code.unwrap_or(0),
    }
}

/// Writes the Sec-WebSocket-Accept value answering a handshake whose Sec-WebSocket-Key is
/// `client_key[0..len)`: base64(SHA-1(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11")), RFC
/// 6455 §4.2.2, as 28 characters and a NUL in `out`.
///
/// `client_key` is the header's value without surrounding whitespace (need not be
/// NUL-terminated); it must be 24 base64 characters that decode to 16 bytes (§4.2.1).
/// `out` must have room for FDCAST_WS_ACCEPT_KEY_SIZE (29) bytes; it is written only on
/// success.
///
/// Returns 0, or -EINVAL (NULL `client_key` with `len` > 0; NULL `out`; a key that is not
/// 24 base64 characters encoding 16 bytes: answer the handshake with 400 Bad Request).
///
/// Thread: any.
#[must_use]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_ws_accept_key(
    client_key: *const c_char,
    len: usize,
    out: *mut c_char,
) -> c_int {
    returning_status(|| {
        // SAFETY: the header requires `len` readable key bytes.
        let key = unsafe { bytes(client_key.cast(), len, "client_key is NULL")? };
        let out = out_param(out.cast::<[u8; FDCAST_WS_ACCEPT_KEY_SIZE]>(), "out is NULL")?;
        let accept = ws::accept_key(key)?;
        let mut text = [0u8; FDCAST_WS_ACCEPT_KEY_SIZE];
        text[..ws::ACCEPT_KEY_LEN].copy_from_slice(&accept);
        // SAFETY: the header requires room for FDCAST_WS_ACCEPT_KEY_SIZE bytes at `out`; a
        // byte array has no alignment requirement.
        unsafe { out.write(text) };
        Ok(())
    })
}

/// Decodes the client frame at the front of `buf[0..len)`, checking the rules of RFC 6455
/// that a single frame can break, and unmasks its payload in place.
///
/// Checked, each as soon as the bytes it depends on are in `buf` (a broken header fails
/// without waiting for the payload): the frame is masked (clients must mask); RSV1-3 are 0
/// (fdcast negotiates no extension); the opcode is one of fdcast_ws_opcode; a control frame
/// (close, ping, pong) has FIN set and at most 125 bytes of payload; a 64-bit length has its
/// most significant bit clear; a close payload is empty, or a status code a peer may send
/// (1000-1003, 1007-1011, 3000-4999) followed by a UTF-8 reason; the payload is at most
/// FDCAST_WS_MAX_FRAME bytes. Lengths need not use their minimal encoding.
///
/// Not checked, because they span frames: that a continuation frame continues a message,
/// that a text or binary frame does not start inside a fragmented one, and that a text
/// message is UTF-8. fdcast_ws_read() checks those; a caller of fdcast_ws_decode must.
///
/// Usage: append what recv(2) returns to a per-connection buffer, call this until it
/// returns 0, and move the unconsumed bytes to the front (the frame's payload is valid
/// until then). Answer a ping with fdcast_ws_encode(FDCAST_WS_OP_PONG, same payload) and a
/// close with a close frame, then close the connection; after a close, decode nothing more.
///
/// `out` is written only when a frame is returned; it must not point into `buf`.
///
/// Returns the frame's length in bytes (> 0: the next frame starts at `buf + that`), 0 when
/// `buf` holds no whole frame yet (nothing is changed), or, with nothing changed:
/// -EPROTO (a rule above is broken; fdcast_last_error() names it: close the connection with
/// status 1002), -EILSEQ (a close reason that is not UTF-8: status 1007), -EMSGSIZE (a
/// payload over FDCAST_WS_MAX_FRAME: status 1009), -EINVAL (NULL `buf` with `len` > 0; NULL
/// `out`).
///
/// Thread: any.
#[must_use]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_ws_decode(
    buf: *mut u8,
    len: usize,
    out: *mut fdcast_ws_frame,
) -> i64 {
    returning_i64(|| {
        let out = out_param(out, "out is NULL")?;
        // SAFETY: the header requires `len` writable bytes at `buf`, not aliasing `out`.
        let buf = unsafe { bytes_mut(buf, len, "buf is NULL with a non-zero len")? };
        let Some((frame, used)) = ws::decode(buf)? else {
            return Ok(0);
        };
        let frame = frame_to_c(frame);
        // SAFETY: the header requires `out` to point to a writable fdcast_ws_frame.
        unsafe { out.write(frame) };
        Ok(used as i64)
    })
}

/// fdcast_ws_decode(), plus the rules that span frames, with their state in `*r`: a
/// continuation frame needs a fragmented message in progress, and a text or binary frame
/// needs none (-EPROTO); a text message, its fragments joined, is UTF-8 (checked as each
/// fragment arrives, so invalid bytes fail at once: -EILSEQ, close with 1007); a message's
/// payload, its fragments summed, is at most FDCAST_WS_MAX_FRAME bytes (-EMSGSIZE, close
/// with 1009). Control frames may come between fragments.
///
/// Fragments are returned one by one, as they arrive: the first with opcode TEXT or BINARY
/// and `fin` false, the next ones with opcode CONTINUATION, the last with `fin` true. A
/// caller that wants whole messages joins them (and remembers the first opcode). What is
/// left to the caller: answering pings and closes, and reading nothing after a close.
///
/// `r` holds one connection's state: zero it before the connection's first frame, and keep
/// it with the connection. After an error, neither `*r` nor `buf` has changed, but the
/// connection must be closed.
///
/// Returns as fdcast_ws_decode(), and -EINVAL for a NULL `r`, or an `*r` that was not
/// zeroed or was written by the caller.
///
/// Thread: any; one reader must not be used by two threads at once.
#[must_use]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_ws_read(
    r: *mut fdcast_ws_reader,
    buf: *mut u8,
    len: usize,
    out: *mut fdcast_ws_frame,
) -> i64 {
    returning_i64(|| {
        let state = out_param(r, "the reader is NULL")?;
        let out = out_param(out, "out is NULL")?;
        // SAFETY: the header requires `r` to point to a readable fdcast_ws_reader; every bit
        // pattern of its integer fields is a valid value, and `reader_from_c` checks them.
        let raw = unsafe { state.read() };
        let mut reader = reader_from_c(&raw).ok_or(Error::InvalidArgument(
            "the reader was not zero-initialised, or was modified",
        ))?;
        // SAFETY: the header requires `len` writable bytes at `buf`, not aliasing `r` or `out`.
        let buf = unsafe { bytes_mut(buf, len, "buf is NULL with a non-zero len")? };
        let Some((frame, used)) = reader.read(buf)? else {
            return Ok(0);
        };
        let frame = frame_to_c(frame);
        // SAFETY: as above, `r` and `out` point to writable structs of their types.
        unsafe {
            state.write(reader_to_c(&reader));
            out.write(frame);
        }
        Ok(used as i64)
    })
}

/// Writes one unmasked server frame, FIN set, with `opcode` (an fdcast_ws_opcode) and the
/// payload `payload[0..len)` to `out[0..cap)`. For pongs and close replies (and any frame
/// the broadcast modes do not cover); send the result with
/// fdcast_send(fc, fd, FDCAST_RAW, out, n) so it goes through the fd's outbox behind any
/// queued frames.
///
/// The frame takes `len + 2` bytes when `len` < 126, `len + 4` when `len` < 65536, else
/// `len + 10`: a buffer of `len + FDCAST_WS_MAX_HEADER` bytes always suffices. A control
/// frame's payload is at most 125 bytes; a close payload is empty or a 2-byte big-endian
/// status code (1000-1003, 1007-1011, 3000-4999) followed by a UTF-8 reason; a text payload
/// is UTF-8. `payload` and `out` must not overlap.
///
/// Returns the frame's length (> 0), or -ENOBUFS (`cap` is too small: nothing was written,
/// and fdcast_last_error() gives the size needed), -EINVAL (`opcode` not an
/// fdcast_ws_opcode; a control payload over 125 bytes; a close payload of 1 byte or with a
/// status code that may not be sent; NULL `payload` with `len` > 0; NULL `out` with `cap` >
/// 0; overlapping buffers), -EILSEQ (a text payload or close reason that is not UTF-8).
///
/// Thread: any.
#[must_use]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdcast_ws_encode(
    opcode: c_int,
    payload: *const c_void,
    len: usize,
    out: *mut u8,
    cap: usize,
) -> i64 {
    returning_i64(|| {
        let opcode = u8::try_from(opcode)
            .ok()
            .and_then(ws::Opcode::from_u8)
            .ok_or(Error::InvalidArgument(
                "opcode is not an fdcast_ws_opcode value",
            ))?;
        let (start, end) = (payload as usize, (payload as usize).wrapping_add(len));
        let (out_start, out_end) = (out as usize, (out as usize).wrapping_add(cap));
        if len > 0 && cap > 0 && start < out_end && out_start < end {
            return Err(Error::InvalidArgument("payload and out overlap"));
        }
        // SAFETY: the header requires `len` readable bytes at `payload` and `cap` writable
        // bytes at `out`, and the two ranges were just checked to be disjoint.
        let (payload, out) = unsafe {
            (
                bytes(payload.cast(), len, "payload is NULL with a non-zero len")?,
                bytes_mut(out, cap, "out is NULL with a non-zero cap")?,
            )
        };
        Ok(ws::encode(opcode, payload, out)? as i64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;
    use std::mem::MaybeUninit;
    use std::ptr;

    fn last_error() -> String {
        // SAFETY: the thread-local message is a valid C string until this thread's next
        // failing call.
        unsafe { CStr::from_ptr(super::super::boundary::last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    fn masked(b0: u8, payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() < 126);
        let mask = [0xA1, 0x02, 0xF3, 0x44];
        let mut frame = vec![b0, 0x80 | payload.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }

    fn decode(buf: &mut [u8], out: &mut MaybeUninit<fdcast_ws_frame>) -> i64 {
        // SAFETY: `buf` and `out` are valid, distinct buffers.
        unsafe { fdcast_ws_decode(buf.as_mut_ptr(), buf.len(), out.as_mut_ptr()) }
    }

    #[test]
    fn accept_key_writes_a_nul_terminated_value() {
        let key = b"dGhlIHNhbXBsZSBub25jZQ==";
        let mut out = [0x55 as c_char; FDCAST_WS_ACCEPT_KEY_SIZE];
        // SAFETY: `key` is 24 readable bytes and `out` 29 writable ones.
        let rc = unsafe { fdcast_ws_accept_key(key.as_ptr().cast(), key.len(), out.as_mut_ptr()) };
        assert_eq!(rc, 0);
        // SAFETY: the function NUL-terminated `out`.
        let text = unsafe { CStr::from_ptr(out.as_ptr()) };
        assert_eq!(text.to_bytes(), b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn accept_key_refuses_null_and_bad_keys_without_writing() {
        let mut out = [0x55 as c_char; FDCAST_WS_ACCEPT_KEY_SIZE];
        let key = b"dGhlIHNhbXBsZSBub25jZQ==";
        // SAFETY: NULL pointers are what is tested; the others are valid.
        unsafe {
            assert_eq!(
                fdcast_ws_accept_key(ptr::null(), 24, out.as_mut_ptr()),
                -libc::EINVAL
            );
            assert_eq!(
                fdcast_ws_accept_key(key.as_ptr().cast(), 24, ptr::null_mut()),
                -libc::EINVAL
            );
            assert_eq!(
                fdcast_ws_accept_key(key.as_ptr().cast(), 23, out.as_mut_ptr()),
                -libc::EINVAL
            );
            assert_eq!(
                fdcast_ws_accept_key(ptr::null(), 0, out.as_mut_ptr()),
                -libc::EINVAL
            );
        }
        assert!(
            last_error().contains("Sec-WebSocket-Key"),
            "{}",
            last_error()
        );
        assert!(
            out.iter().all(|&c| c == 0x55),
            "out is untouched on failure"
        );
    }

    #[test]
    fn decode_fills_the_frame_with_a_pointer_into_the_buffer() {
        let mut buf = masked(0x81, b"hi there");
        buf.extend(masked(0x88, b"\x03\xe9gone"));
        let mut out = MaybeUninit::uninit();
        let used = decode(&mut buf, &mut out);
        assert_eq!(used, 14);
        // SAFETY: a positive return means `out` was written.
        let frame = unsafe { out.assume_init_ref() };
        assert_eq!((frame.opcode, frame.fin, frame.close_code), (1, true, 0));
        assert_eq!(frame.payload, buf[6..].as_mut_ptr());
        assert_eq!(&buf[6..14], b"hi there");
        let used2 = decode(&mut buf[14..], &mut out);
        // SAFETY: as above.
        let frame = unsafe { out.assume_init_ref() };
        assert_eq!(
            (used2, frame.opcode, frame.close_code, frame.payload_len),
            (12, 8, 1001, 6)
        );
        assert_eq!(&buf[20..26], b"\x03\xe9gone");
    }

    #[test]
    fn decode_returns_zero_for_a_partial_frame_and_errors_name_the_rule() {
        let whole = masked(0x82, b"abc");
        let mut out = MaybeUninit::uninit();
        for cut in 0..whole.len() {
            assert_eq!(decode(&mut whole[..cut].to_vec(), &mut out), 0);
        }
        assert_eq!(
            decode(&mut [0x81, 0x01, b'x'], &mut out),
            -i64::from(libc::EPROTO)
        );
        assert!(last_error().contains("not masked"), "{}", last_error());
        assert_eq!(
            decode(&mut masked(0x83, b""), &mut out),
            -i64::from(libc::EPROTO)
        );
        assert!(last_error().contains("opcode 0x3"), "{}", last_error());
        assert_eq!(
            decode(&mut masked(0x88, b"\x03\xe8\xc3"), &mut out),
            -i64::from(libc::EILSEQ)
        );
        let mut huge = vec![0x82, 0xFF, 0, 0, 0, 0, 1, 0, 0, 1];
        huge.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(decode(&mut huge, &mut out), -i64::from(libc::EMSGSIZE));
        assert!(last_error().contains("16777216"), "{}", last_error());
    }

    #[test]
    fn decode_refuses_null_arguments() {
        let mut buf = masked(0x81, b"x");
        let mut out = MaybeUninit::uninit();
        // SAFETY: NULL pointers are what is tested; the others are valid.
        unsafe {
            assert_eq!(
                fdcast_ws_decode(ptr::null_mut(), 7, out.as_mut_ptr()),
                -i64::from(libc::EINVAL)
            );
            assert_eq!(
                fdcast_ws_decode(buf.as_mut_ptr(), buf.len(), ptr::null_mut()),
                -i64::from(libc::EINVAL)
            );
            // No bytes yet is "need more", NULL or not.
            assert_eq!(fdcast_ws_decode(ptr::null_mut(), 0, out.as_mut_ptr()), 0);
        }
    }

    #[test]
    fn read_keeps_message_state_in_a_zeroed_struct() {
        // SAFETY: all-zero is a valid fdcast_ws_reader (integers only), and the ready state.
        let mut reader: fdcast_ws_reader = unsafe { std::mem::zeroed() };
        let mut out = MaybeUninit::uninit();
        let mut read = |buf: &mut [u8]| {
            // SAFETY: valid, distinct buffers.
            unsafe { fdcast_ws_read(&mut reader, buf.as_mut_ptr(), buf.len(), out.as_mut_ptr()) }
        };
        assert_eq!(read(&mut masked(0x01, b"caf\xc3")), 10);
        assert_eq!(read(&mut masked(0x89, b"")), 6, "a ping between fragments");
        assert_eq!(read(&mut masked(0x80, b"\xa9!")), 8);
        assert_eq!(read(&mut masked(0x80, b"again")), -i64::from(libc::EPROTO));
        assert!(last_error().contains("continuation"), "{}", last_error());
        assert_eq!(read(&mut masked(0x01, b"\xe2\x82")), 8);
        assert_eq!(read(&mut masked(0x80, b"(")), -i64::from(libc::EILSEQ));
        assert_eq!(read(&mut masked(0x81, b"x")), -i64::from(libc::EPROTO));
        assert_eq!(
            read(&mut masked(0x80, b"\xac")),
            7,
            "the message can still end well"
        );
    }

    #[test]
    fn read_refuses_a_reader_it_could_not_have_written() {
        let mut reader = fdcast_ws_reader {
            message_len: 0,
            message_opcode: 7,
            utf8_tail_len: 0,
            utf8_tail: [0; 3],
        };
        let mut buf = masked(0x81, b"x");
        let mut out = MaybeUninit::uninit();
        // SAFETY: valid buffers, and a NULL reader in the second call.
        unsafe {
            assert_eq!(
                fdcast_ws_read(&mut reader, buf.as_mut_ptr(), buf.len(), out.as_mut_ptr()),
                -i64::from(libc::EINVAL)
            );
            assert!(last_error().contains("zero-initialised"));
            assert_eq!(
                fdcast_ws_read(
                    ptr::null_mut(),
                    buf.as_mut_ptr(),
                    buf.len(),
                    out.as_mut_ptr()
                ),
                -i64::from(libc::EINVAL)
            );
        }
    }

    fn raw_reader(opcode: u8, len: u64, tail: [u8; 3], tail_len: u8) -> fdcast_ws_reader {
        fdcast_ws_reader {
            message_len: len,
            message_opcode: opcode,
            utf8_tail_len: tail_len,
            utf8_tail: tail,
        }
    }

    #[test]
    fn reader_struct_round_trips_and_rejects_garbage() {
        let mut reader = ws::Reader::default();
        let mut first = masked(0x01, b"ab\xf0\x9f");
        reader.read(&mut first).unwrap().unwrap();
        let raw = reader_to_c(&reader);
        assert_eq!(
            (raw.message_opcode, raw.message_len, raw.utf8_tail_len),
            (1, 4, 2)
        );
        assert_eq!(reader_from_c(&raw), Some(reader));
        let zeroed = raw_reader(0, 0, [0; 3], 0);
        assert_eq!(reader_from_c(&zeroed), Some(ws::Reader::default()));
        let default = reader_to_c(&ws::Reader::default());
        assert_eq!(
            (
                default.message_opcode,
                default.message_len,
                default.utf8_tail_len
            ),
            (0, 0, 0)
        );
        for raw in [
            raw_reader(3, 0, [0; 3], 0),             // not a message opcode
            raw_reader(9, 0, [0; 3], 0),             // a control opcode
            raw_reader(0, 5, [0; 3], 0),             // length without a message
            raw_reader(0, 0, [0xe2, 0, 0], 1),       // UTF-8 tail without a message
            raw_reader(2, 1, [0xe2, 0, 0], 1),       // UTF-8 tail in a binary message
            raw_reader(1, 1, [b'a', 0, 0], 1),       // a complete character is no tail
            raw_reader(1, 1, [0xe2, 0x82, 0xac], 4), // tail longer than 3
            raw_reader(1, ws::MAX_PAYLOAD as u64 + 1, [0; 3], 0), // over the limit
        ] {
            assert!(reader_from_c(&raw).is_none());
        }
    }

    #[test]
    fn encode_writes_frames_and_reports_the_size_it_needs() {
        let mut out = [0u8; 16];
        let encode = |op: c_int, payload: &[u8], out: &mut [u8]| {
            // SAFETY: valid, distinct buffers.
            unsafe {
                fdcast_ws_encode(
                    op,
                    payload.as_ptr().cast(),
                    payload.len(),
                    out.as_mut_ptr(),
                    out.len(),
                )
            }
        };
        assert_eq!(encode(10, b"Hello", &mut out), 7);
        assert_eq!(&out[..7], b"\x8a\x05Hello");
        assert_eq!(encode(8, b"\x03\xea", &mut out), 4);
        assert_eq!(&out[..4], b"\x88\x02\x03\xea");
        assert_eq!(encode(2, &[0; 15], &mut out), -i64::from(libc::ENOBUFS));
        assert!(last_error().contains("17 bytes"), "{}", last_error());
        for bad_opcode in [-1, 3, 7, 11, 256 + 1] {
            assert_eq!(encode(bad_opcode, b"", &mut out), -i64::from(libc::EINVAL));
        }
        assert_eq!(encode(1, b"\xff", &mut out), -i64::from(libc::EILSEQ));
        assert_eq!(
            encode(9, &[0; 126], &mut [0; 200]),
            -i64::from(libc::EINVAL)
        );
        // SAFETY: NULL and overlapping pointers are what is tested.
        unsafe {
            assert_eq!(
                fdcast_ws_encode(2, ptr::null(), 3, out.as_mut_ptr(), 16),
                -i64::from(libc::EINVAL)
            );
            assert_eq!(
                fdcast_ws_encode(2, ptr::null(), 0, ptr::null_mut(), 0),
                -i64::from(libc::ENOBUFS)
            );
            assert!(last_error().contains("2 bytes"));
            let p = out.as_mut_ptr();
            assert_eq!(
                fdcast_ws_encode(2, p.add(2).cast(), 4, p, 16),
                -i64::from(libc::EINVAL)
            );
            assert!(last_error().contains("overlap"));
        }
    }
}
