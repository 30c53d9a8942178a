//! WebSocket helpers for hosts that speak the protocol themselves: the handshake's accept
//! key, and an incremental decoder for client frames (RFC 6455).
//!
//! - [`accept_key`] computes the `Sec-WebSocket-Accept` value of a handshake.
//! - [`decode`] reads one client frame from the front of a buffer, checks every rule of
//!   RFC 6455 that a single frame can break, and unmasks its payload in place.
//! - [`Reader`] adds the rules that span frames: fragmentation order, UTF-8 of text messages
//!   split across fragments, and the size of a whole message.
//! - [`encode`] writes one unmasked server frame (a pong, a close reply).
//!
//! Pure functions over byte slices: no I/O, no allocation. The host reads its sockets, and
//! sends what `encode` wrote through the fd's outbox.

#![forbid(unsafe_code)]

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha1::{Digest, Sha1};

/// Length of a `Sec-WebSocket-Accept` value: the base64 of a 20-byte SHA-1 digest.
pub const ACCEPT_KEY_LEN: usize = 28;

/// The largest payload, in bytes, that [`decode`] accepts in one frame and [`Reader`] in one
/// message (the sum of its fragments): 16 MiB. Larger is [`Error::TooLarge`].
pub const MAX_PAYLOAD: usize = 16 << 20;

/// The longest header of a server frame: 2 bytes and a 64-bit extended length. A buffer of
/// `payload.len() + MAX_SERVER_HEADER_LEN` bytes always holds what [`encode`] writes.
pub const MAX_SERVER_HEADER_LEN: usize = 10;

/// RFC 6455 §1.3: the GUID the server appends to the client's key.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The largest payload of a control frame (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

const FIN: u8 = 0x80;
const RSV: u8 = 0x70;
const OPCODE: u8 = 0x0F;
const MASK: u8 = 0x80;
const LEN7: u8 = 0x7F;

/// The opcodes of RFC 6455 §5.2. Every other value is reserved and fails a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Opcode {
    /// The next fragment of a text or binary message.
    Continuation = 0x0,
    /// The first (or only) frame of a UTF-8 text message.
    Text = 0x1,
    /// The first (or only) frame of a binary message.
    Binary = 0x2,
    /// Close: an optional status code and UTF-8 reason.
    Close = 0x8,
    /// Ping: the peer expects a pong with the same payload.
    Ping = 0x9,
    /// Pong: the answer to a ping, or an unsolicited heartbeat.
    Pong = 0xA,
}

impl Opcode {
    /// The opcode with this value, or `None` for a reserved one.
    pub fn from_u8(value: u8) -> Option<Opcode> {
        match value {
            0x0 => Some(Opcode::Continuation),
            0x1 => Some(Opcode::Text),
            0x2 => Some(Opcode::Binary),
            0x8 => Some(Opcode::Close),
            0x9 => Some(Opcode::Ping),
            0xA => Some(Opcode::Pong),
            _ => None,
        }
    }

    /// Close, ping and pong: never fragmented, at most 125 bytes of payload, and allowed
    /// between the fragments of a message.
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// A rule of RFC 6455 that the peer broke. The connection must be failed: send a close frame
/// with [`Error::close_code`] and close it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// §5.1: a client must mask every frame it sends.
    Unmasked,
    /// §5.2: RSV1-3 must be 0 when no extension was negotiated.
    ReservedBits,
    /// §5.2: the opcode is reserved (the value is kept).
    UnknownOpcode(u8),
    /// §5.5: control frames must not be fragmented.
    FragmentedControl,
    /// §5.5: control frames carry at most 125 bytes.
    ControlTooLong,
    /// §5.2: the most significant bit of a 64-bit length must be 0.
    LengthMsbSet,
    /// §5.5.1: a close payload is empty or starts with a 2-byte status code.
    CloseCodeMissing,
    /// §7.4: this close status code may not be sent (the value is kept).
    InvalidCloseCode(u16),
    /// §5.5.1: a close reason must be UTF-8.
    CloseReasonNotUtf8,
    /// §5.6, §8.1: a text message must be UTF-8.
    TextNotUtf8,
    /// §5.4: a continuation frame came with no fragmented message in progress.
    ContinuationWithoutStart,
    /// §5.4: a new text or binary frame came before the fragmented message in progress ended.
    MessageInsideMessage,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Unmasked => f.write_str("client frame is not masked (RFC 6455 5.1)"),
            Rule::ReservedBits => {
                f.write_str("RSV1-3 set but no extension was negotiated (RFC 6455 5.2)")
            }
            Rule::UnknownOpcode(op) => write!(f, "reserved opcode {op:#x} (RFC 6455 5.2)"),
            Rule::FragmentedControl => f.write_str(
                "control frame without FIN: control frames are never fragmented (RFC 6455 5.5)",
            ),
            Rule::ControlTooLong => {
                f.write_str("control frame payload over 125 bytes (RFC 6455 5.5)")
            }
            Rule::LengthMsbSet => f.write_str(
                "64-bit payload length with its most significant bit set (RFC 6455 5.2)",
            ),
            Rule::CloseCodeMissing => {
                f.write_str("close payload of 1 byte: a status code takes 2 (RFC 6455 5.5.1)")
            }
            Rule::InvalidCloseCode(code) => {
                write!(f, "close status code {code} may not be sent (RFC 6455 7.4)")
            }
            Rule::CloseReasonNotUtf8 => {
                f.write_str("close reason is not valid UTF-8 (RFC 6455 5.5.1)")
            }
            Rule::TextNotUtf8 => f.write_str("text message is not valid UTF-8 (RFC 6455 8.1)"),
            Rule::ContinuationWithoutStart => f.write_str(
                "continuation frame with no fragmented message in progress (RFC 6455 5.4)",
            ),
            Rule::MessageInsideMessage => f.write_str(
                "new data frame before the fragmented message in progress ended (RFC 6455 5.4)",
            ),
        }
    }
}

/// Why a WebSocket helper failed. The crate's [`crate::Error`] carries it as
/// [`crate::Error::WebSocket`], which gives its errno (named below).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The `Sec-WebSocket-Key` is not 24 base64 characters encoding 16 bytes. `EINVAL`.
    InvalidKey,
    /// [`encode`] was asked for a frame RFC 6455 forbids (a control payload over 125 bytes, a
    /// close payload of 1 byte or with an unsendable code). `EINVAL`.
    InvalidFrame(&'static str),
    /// [`encode`] was given a text payload or close reason that is not UTF-8. `EILSEQ`.
    InvalidUtf8,
    /// The output buffer of [`encode`] is too small; `needed` bytes would do. `ENOBUFS`.
    BufferTooSmall {
        /// The frame's length.
        needed: usize,
    },
    /// The peer broke a rule of RFC 6455. `EPROTO`, or `EILSEQ` for the UTF-8 rules.
    Protocol(Rule),
    /// A frame or message payload of `len` bytes is over [`MAX_PAYLOAD`]. `EMSGSIZE`.
    TooLarge {
        /// The payload length the frame announced (for a message: so far, this frame included).
        len: u64,
    },
}

impl Error {
    /// For an error of the peer, the status code a server closes the connection with
    /// (RFC 6455 §7.4.1): 1002 for a protocol error, 1007 for invalid UTF-8, 1009 for a
    /// payload too large. `None` for the caller's own errors.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            Error::Protocol(Rule::TextNotUtf8 | Rule::CloseReasonNotUtf8) => Some(1007),
            Error::Protocol(_) => Some(1002),
            Error::TooLarge { .. } => Some(1009),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidKey => f.write_str(
                "Sec-WebSocket-Key must be 24 base64 characters encoding 16 bytes (RFC 6455 4.2.1)",
            ),
            Error::InvalidFrame(what) => write!(f, "invalid frame: {what}"),
            Error::InvalidUtf8 => f.write_str("a text payload or close reason must be valid UTF-8"),
            Error::BufferTooSmall { needed } => {
                write!(
                    f,
                    "the output buffer is too small: the frame needs {needed} bytes"
                )
            }
            Error::Protocol(rule) => write!(f, "WebSocket protocol error: {rule}"),
            Error::TooLarge { len } => write!(
                f,
                "payload of {len} bytes is over the limit of {MAX_PAYLOAD} bytes"
            ),
        }
    }
}

impl std::error::Error for Error {}

impl From<Rule> for Error {
    fn from(rule: Rule) -> Error {
        Error::Protocol(rule)
    }
}

/// The `Sec-WebSocket-Accept` value answering the client's `Sec-WebSocket-Key` (RFC 6455
/// §4.2.2): base64(SHA-1(key + GUID)). `client_key` is the header's value without
/// surrounding whitespace; it must be 24 base64 characters that decode to 16 bytes
/// (§4.2.1), else [`Error::InvalidKey`].
pub fn accept_key(client_key: &[u8]) -> Result<[u8; ACCEPT_KEY_LEN], Error> {
    let mut nonce = [0u8; 18];
    let valid =
        client_key.len() == 24 && matches!(BASE64.decode_slice(client_key, &mut nonce), Ok(16));
    if !valid {
        return Err(Error::InvalidKey);
    }
    let digest = Sha1::new()
        .chain_update(client_key)
        .chain_update(ACCEPT_GUID)
        .finalize();
    let mut out = [0u8; ACCEPT_KEY_LEN];
    let written = BASE64
        .encode_slice(digest, &mut out)
        .expect("28 bytes hold the base64 of 20");
    debug_assert_eq!(written, ACCEPT_KEY_LEN);
    Ok(out)
}

/// One decoded client frame; its payload is unmasked, in the caller's buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// What the frame carries.
    pub opcode: Opcode,
    /// Whether this is the last frame of its message (always true for control frames).
    pub fin: bool,
    /// The unmasked payload. For a close frame with a status code, the code's 2 bytes and
    /// then the UTF-8 reason.
    pub payload: &'a mut [u8],
    /// For a close frame with a payload, its status code (already checked to be one a peer
    /// may send); `None` otherwise.
    pub close_code: Option<u16>,
}

impl Frame<'_> {
    /// For a close frame, the reason after the status code ("" when none).
    pub fn close_reason(&self) -> &str {
        match (self.opcode, self.close_code) {
            (Opcode::Close, Some(_)) => std::str::from_utf8(&self.payload[2..]).unwrap_or(""),
            _ => "",
        }
    }
}

/// A frame's header, once all of it is in the buffer.
#[derive(Clone, Copy, Debug)]
struct Header {
    fin: bool,
    opcode: Opcode,
    mask: [u8; 4],
    /// Bytes of header: 2, plus 2 or 8 of extended length, plus 4 of mask.
    len: usize,
    payload_len: usize,
}

/// Reads the header at the front of `buf`, checking each rule as soon as the bytes it needs
/// are there, so a broken frame fails without waiting for the rest of it. `Ok(None)` when
/// more bytes are needed.
fn parse_header(buf: &[u8]) -> Result<Option<Header>, Error> {
    let Some(&b0) = buf.first() else {
        return Ok(None);
    };
    if b0 & RSV != 0 {
        return Err(Rule::ReservedBits.into());
    }
    let opcode = Opcode::from_u8(b0 & OPCODE).ok_or(Rule::UnknownOpcode(b0 & OPCODE))?;
    let fin = b0 & FIN != 0;
    if opcode.is_control() && !fin {
        return Err(Rule::FragmentedControl.into());
    }
    let Some(&b1) = buf.get(1) else {
        return Ok(None);
    };
    if b1 & MASK == 0 {
        return Err(Rule::Unmasked.into());
    }
    let len7 = b1 & LEN7;
    if opcode.is_control() && usize::from(len7) > MAX_CONTROL_PAYLOAD {
        return Err(Rule::ControlTooLong.into());
    }
    let (payload_len, at) = match len7 {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => {
            if buf.get(2).is_some_and(|&b| b & 0x80 != 0) {
                return Err(Rule::LengthMsbSet.into());
            }
            match buf.get(2..10) {
                Some(b) => (u64::from_be_bytes(b.try_into().expect("8 bytes")), 10),
                None => return Ok(None),
            }
        }
        n => (u64::from(n), 2),
    };
    if opcode == Opcode::Close && payload_len == 1 {
        return Err(Rule::CloseCodeMissing.into());
    }
    if payload_len > MAX_PAYLOAD as u64 {
        return Err(Error::TooLarge { len: payload_len });
    }
    let Some(mask) = buf.get(at..at + 4) else {
        return Ok(None);
    };
    Ok(Some(Header {
        fin,
        opcode,
        mask: mask.try_into().expect("4 bytes"),
        len: at + 4,
        payload_len: payload_len as usize, // at most MAX_PAYLOAD
    }))
}

/// XORs `payload` with the masking key (RFC 6455 §5.3). Its own inverse.
fn apply_mask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = payload.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let value = u32::from_ne_bytes(chunk.try_into().expect("4 bytes")) ^ word;
        chunk.copy_from_slice(&value.to_ne_bytes());
    }
    for (byte, key) in chunks.into_remainder().iter_mut().zip(mask) {
        *byte ^= key;
    }
}

/// The close status codes a peer may send (RFC 6455 §7.4.1-7.4.2): the defined ones except
/// 1004 (reserved), 1005, 1006 and 1015 (never sent), plus 3000-4999 for libraries,
/// frameworks and applications.
fn close_code_is_sendable(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// Checks an (unmasked) close payload: empty, or a sendable status code and a UTF-8
/// reason. Returns the code.
fn check_close_payload(payload: &[u8]) -> Result<Option<u16>, Rule> {
    match payload {
        [] => Ok(None),
        [_] => Err(Rule::CloseCodeMissing),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close_code_is_sendable(code) {
                return Err(Rule::InvalidCloseCode(code));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(Rule::CloseReasonNotUtf8);
            }
            Ok(Some(code))
        }
    }
}

/// Decodes the frame at the front of `buf` and unmasks its payload in place; on an error the
/// buffer is left as it was. Returns the header and the frame's length.
fn decode_in_place(buf: &mut [u8]) -> Result<Option<(Header, usize)>, Error> {
    let Some(header) = parse_header(buf)? else {
        return Ok(None);
    };
    let end = header.len + header.payload_len;
    let Some(payload) = buf.get_mut(header.len..end) else {
        return Ok(None);
    };
    apply_mask(payload, header.mask);
    if header.opcode == Opcode::Close {
        if let Err(rule) = check_close_payload(payload) {
            apply_mask(payload, header.mask);
            return Err(rule.into());
        }
    }
    Ok(Some((header, end)))
}

fn frame_at(buf: &mut [u8], header: Header, end: usize) -> Frame<'_> {
    let payload = &mut buf[header.len..end];
    let close_code = match header.opcode {
        Opcode::Close if payload.len() >= 2 => Some(u16::from_be_bytes([payload[0], payload[1]])),
        _ => None,
    };
    Frame {
        opcode: header.opcode,
        fin: header.fin,
        payload,
        close_code,
    }
}

/// Decodes one client frame from the front of `buf`.
///
/// Returns `Ok(Some((frame, consumed)))` when a whole frame is there: its payload is
/// unmasked in place, and the next frame starts at `buf[consumed..]`. `Ok(None)` when more
/// bytes are needed (the buffer is untouched). An error when the frame breaks a rule of
/// RFC 6455 that one frame can break (the buffer is untouched): a client frame must be
/// masked; RSV1-3 must be 0 (no extension is negotiated); the opcode must be defined;
/// control frames have FIN set and at most 125 bytes; a 64-bit length has its top bit
/// clear; a close payload is empty or a sendable status code and a UTF-8 reason; and the
/// payload is at most [`MAX_PAYLOAD`] bytes. Each rule is checked as soon as the bytes it
/// depends on are in `buf`, so a broken header fails at once.
///
/// Not checked, because they span frames: fragmentation order and the UTF-8 of text
/// messages. [`Reader::read`] checks those.
pub fn decode(buf: &mut [u8]) -> Result<Option<(Frame<'_>, usize)>, Error> {
    Ok(decode_in_place(buf)?.map(|(header, end)| (frame_at(buf, header, end), end)))
}

/// The incomplete UTF-8 sequence (at most 3 bytes) at the end of the fragments of a text
/// message received so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Utf8Tail {
    bytes: [u8; 3],
    len: u8,
}

impl Utf8Tail {
    fn new(bytes: &[u8]) -> Utf8Tail {
        let mut tail = Utf8Tail::default();
        tail.bytes[..bytes.len()].copy_from_slice(bytes);
        tail.len = bytes.len() as u8;
        tail
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// Whether these bytes are a valid start of one UTF-8 sequence that needs more bytes.
    fn is_valid_prefix(bytes: &[u8]) -> bool {
        matches!(std::str::from_utf8(bytes), Err(e) if e.valid_up_to() == 0 && e.error_len().is_none())
    }

    /// Checks that `chunk` continues valid UTF-8 after this tail and returns the new tail;
    /// when `last`, nothing may stay incomplete.
    fn feed(self, chunk: &[u8], last: bool) -> Result<Utf8Tail, Rule> {
        let mut rest = chunk;
        if self.len > 0 {
            // Complete the pending sequence with the first bytes of the chunk.
            let have = usize::from(self.len);
            let width: usize = match self.bytes[0] {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                _ => 4,
            };
            let take = width.saturating_sub(have).min(rest.len());
            let mut seq = [0u8; 4];
            seq[..have].copy_from_slice(self.as_slice());
            seq[have..have + take].copy_from_slice(&rest[..take]);
            rest = &rest[take..];
            match std::str::from_utf8(&seq[..have + take]) {
                Ok(_) => {}
                Err(e) if e.error_len().is_none() && !last => {
                    return Ok(Utf8Tail::new(&seq[..have + take]));
                }
                Err(_) => return Err(Rule::TextNotUtf8),
            }
        }
        match std::str::from_utf8(rest) {
            Ok(_) => Ok(Utf8Tail::default()),
            Err(e) if e.error_len().is_none() && !last => {
                Ok(Utf8Tail::new(&rest[e.valid_up_to()..]))
            }
            Err(_) => Err(Rule::TextNotUtf8),
        }
    }
}

/// The state of one connection's incoming messages, for the rules that span frames. Create
/// one per connection with `Reader::default()`; it is a few plain bytes and never allocates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reader {
    /// `Text` or `Binary` while a fragmented message is in progress.
    message: Option<Opcode>,
    /// Payload bytes of that message so far.
    message_len: u64,
    /// For a text message, its incomplete last UTF-8 sequence so far.
    utf8: Utf8Tail,
}

impl Reader {
    /// Decodes the frame at the front of `buf` like [`decode`], and also checks the rules
    /// that span frames: a continuation frame needs a fragmented message in progress, and a
    /// text or binary frame needs none; a text message, fragments joined, is valid UTF-8
    /// (checked fragment by fragment, so invalid bytes fail at once); a message's payload,
    /// fragments summed, is at most [`MAX_PAYLOAD`] bytes. Control frames may come between
    /// fragments. On an error neither the buffer nor the reader changes.
    ///
    /// Fragments are returned one by one (a continuation frame has opcode `Continuation`);
    /// the caller joins them if it needs the whole message.
    pub fn read<'a>(&mut self, buf: &'a mut [u8]) -> Result<Option<(Frame<'a>, usize)>, Error> {
        // Fragmentation order depends on the first byte only: check it before waiting for
        // more. (A reserved opcode is reported by parse_header.)
        if let Some(opcode) = buf.first().and_then(|&b0| Opcode::from_u8(b0 & OPCODE)) {
            match (opcode, self.message) {
                (Opcode::Continuation, None) => return Err(Rule::ContinuationWithoutStart.into()),
                (Opcode::Text | Opcode::Binary, Some(_)) => {
                    return Err(Rule::MessageInsideMessage.into());
                }
                _ => {}
            }
        }
        let Some(header) = parse_header(buf)? else {
            return Ok(None);
        };
        let kind = match header.opcode {
            Opcode::Continuation => self.message,
            Opcode::Text | Opcode::Binary => Some(header.opcode),
            _ => None, // a control frame: no message state involved
        };
        let message_len = match header.opcode {
            Opcode::Continuation => self.message_len + header.payload_len as u64,
            _ => header.payload_len as u64,
        };
        if kind.is_some() && message_len > MAX_PAYLOAD as u64 {
            return Err(Error::TooLarge { len: message_len });
        }
        let Some((header, end)) = decode_in_place(buf)? else {
            return Ok(None);
        };
        let mut next = *self;
        if let Some(kind) = kind {
            let utf8 = if kind == Opcode::Text {
                match self.utf8.feed(&buf[header.len..end], header.fin) {
                    Ok(tail) => tail,
                    Err(rule) => {
                        apply_mask(&mut buf[header.len..end], header.mask);
                        return Err(rule.into());
                    }
                }
            } else {
                Utf8Tail::default()
            };
            next = if header.fin {
                Reader::default()
            } else {
                Reader {
                    message: Some(kind),
                    message_len,
                    utf8,
                }
            };
        }
        *self = next;
        Ok(Some((frame_at(buf, header, end), end)))
    }

    /// The fragmented message in progress, `None` between messages: its opcode (`Text` or
    /// `Binary`), its payload bytes so far, and for text the incomplete UTF-8 sequence (at
    /// most 3 bytes) its fragments end with so far.
    pub(crate) fn message_in_progress(&self) -> Option<(Opcode, u64, &[u8])> {
        self.message
            .map(|opcode| (opcode, self.message_len, self.utf8.as_slice()))
    }

    /// A reader in the middle of a message, as [`Reader::message_in_progress`] reports it,
    /// or `None` if no reader could be in that state (a control opcode, a length over
    /// [`MAX_PAYLOAD`], a UTF-8 tail that is not the start of one incomplete sequence, or
    /// one in a binary message).
    pub(crate) fn in_message(opcode: Opcode, message_len: u64, utf8_tail: &[u8]) -> Option<Reader> {
        let consistent = message_len <= MAX_PAYLOAD as u64
            && match opcode {
                Opcode::Text => utf8_tail.is_empty() || Utf8Tail::is_valid_prefix(utf8_tail),
                Opcode::Binary => utf8_tail.is_empty(),
                _ => false,
            };
        consistent.then(|| Reader {
            message: Some(opcode),
            message_len,
            utf8: Utf8Tail::new(utf8_tail),
        })
    }
}

/// The length of the server frame [`encode`] writes for a payload of `payload_len` bytes.
pub fn encoded_len(payload_len: usize) -> usize {
    let header = match payload_len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => MAX_SERVER_HEADER_LEN,
    };
    header + payload_len
}

/// Writes one unmasked server frame, FIN set, carrying `payload` under `opcode`, to the
/// front of `out`, and returns its length ([`encoded_len`]).
///
/// Errors: [`Error::InvalidFrame`] for a control frame over 125 bytes, or a close payload of
/// 1 byte or whose status code may not be sent; [`Error::InvalidUtf8`] for a text payload or
/// close reason that is not UTF-8; [`Error::BufferTooSmall`] when `out` is shorter than the
/// frame (nothing is written).
pub fn encode(opcode: Opcode, payload: &[u8], out: &mut [u8]) -> Result<usize, Error> {
    if opcode.is_control() && payload.len() > MAX_CONTROL_PAYLOAD {
        return Err(Error::InvalidFrame(
            "a control frame carries at most 125 bytes",
        ));
    }
    match opcode {
        Opcode::Text if std::str::from_utf8(payload).is_err() => return Err(Error::InvalidUtf8),
        Opcode::Close => match check_close_payload(payload) {
            Ok(_) => {}
            Err(Rule::CloseReasonNotUtf8) => return Err(Error::InvalidUtf8),
            Err(Rule::CloseCodeMissing) => {
                return Err(Error::InvalidFrame(
                    "a close payload is empty or starts with a 2-byte status code",
                ));
            }
            Err(_) => {
                return Err(Error::InvalidFrame(
                    "a close status code must be 1000-1003, 1007-1011 or 3000-4999",
                ));
            }
        },
        _ => {}
    }
    let needed = encoded_len(payload.len());
    if out.len() < needed {
        return Err(Error::BufferTooSmall { needed });
    }
    let body = write_server_header(opcode as u8, payload.len(), out);
    out[body..needed].copy_from_slice(payload);
    Ok(needed)
}

/// Writes an unmasked server frame header (FIN set, `opcode`, and the 7-bit, 16-bit or 64-bit
/// length of RFC 6455 §5.2) to the start of `out`, which holds at least
/// [`MAX_SERVER_HEADER_LEN`] bytes or `encoded_len(payload_len) - payload_len`; returns its
/// length. The broadcast encoder (frame.rs) and [`encode`] share it.
pub(crate) fn write_server_header(opcode: u8, payload_len: usize, out: &mut [u8]) -> usize {
    out[0] = FIN | opcode;
    match payload_len {
        len @ 0..=125 => {
            out[1] = len as u8;
            2
        }
        len @ 126..=0xFFFF => {
            out[1] = 126;
            out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        }
        len => {
            out[1] = 127;
            out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn errno(err: Error) -> i32 {
        crate::Error::from(err).errno()
    }

    /// A client frame: first byte `b0`, masked with `mask`, minimal length encoding.
    fn client_frame(b0: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut frame = vec![b0];
        match payload.len() {
            len @ 0..=125 => frame.push(MASK | len as u8),
            len @ 126..=0xFFFF => {
                frame.push(MASK | 126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                frame.push(MASK | 127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }

    fn text(payload: &[u8], fin: bool) -> Vec<u8> {
        client_frame(if fin { 0x81 } else { 0x01 }, payload, KEY)
    }

    fn cont(payload: &[u8], fin: bool) -> Vec<u8> {
        client_frame(if fin { 0x80 } else { 0x00 }, payload, KEY)
    }

    fn decode_err(mut bytes: Vec<u8>) -> Error {
        let before = bytes.clone();
        let err = decode(&mut bytes).expect_err("the frame must be refused");
        assert_eq!(bytes, before, "a refused frame leaves the buffer untouched");
        err
    }

    /// Decodes `bytes` and returns (opcode, fin, payload, close code, consumed).
    fn decoded(bytes: &mut [u8]) -> (Opcode, bool, Vec<u8>, Option<u16>, usize) {
        let (frame, used) = decode(bytes).unwrap().expect("a whole frame");
        (
            frame.opcode,
            frame.fin,
            frame.payload.to_vec(),
            frame.close_code,
            used,
        )
    }

    // --- accept key ---------------------------------------------------------

    #[test]
    fn accept_key_matches_rfc_6455_example() {
        let key = accept_key(b"dGhlIHNhbXBsZSBub25jZQ==").unwrap();
        // RFC 6455 §1.3 (and §4.2.2's worked example).
        assert_eq!(&key[..], b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn accept_key_rejects_keys_that_are_not_16_bytes_of_base64() {
        for bad in [
            &b""[..],
            b"dGhlIHNhbXBsZSBub25jZQ=",   // 23 characters
            b"dGhlIHNhbXBsZSBub25jZQ== ", // trailing space
            b" dGhlIHNhbXBsZSBub25jZQ==", // leading space
            b"dGhlIHNhbXBsZSBub25jZQ!=",  // not base64
            b"AAAAAAAAAAAAAAAAAAAAAAAA",  // 24 characters, but 18 bytes
            b"dGhlIHNhbXBsZSBub25jZR==",  // non-canonical trailing bits
            b"dGhlIHNhbXBsZSBub25jZQ==dGhlIHNhbXBsZSBub25jZQ==",
        ] {
            assert_eq!(accept_key(bad), Err(Error::InvalidKey), "{bad:?}");
        }
        assert_eq!(errno(Error::InvalidKey), libc::EINVAL);
    }

    // --- single frames ------------------------------------------------------

    #[test]
    fn decodes_rfc_masked_hello_and_unmasks_in_place() {
        // RFC 6455 §5.7: a single-frame masked text message "Hello".
        let mut bytes = vec![
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(
            decoded(&mut bytes),
            (Opcode::Text, true, b"Hello".to_vec(), None, 11)
        );
        assert_eq!(
            &bytes[6..],
            b"Hello",
            "the payload is unmasked in the buffer"
        );
    }

    #[test]
    fn decodes_all_three_length_encodings() {
        for len in [0, 1, 125, 126, 127, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut bytes = client_frame(0x82, &payload, [1, 2, 3, 4]);
            let header = match len {
                0..=125 => 6,
                126..=65535 => 8,
                _ => 14,
            };
            assert_eq!(bytes.len(), header + len);
            let (opcode, fin, got, _, used) = decoded(&mut bytes);
            assert_eq!((opcode, fin, used), (Opcode::Binary, true, header + len));
            assert_eq!(got, payload, "len {len}");
        }
    }

    #[test]
    fn accepts_non_minimal_length_encodings() {
        // 5 bytes announced with a 16-bit length: RFC 6455 asks senders to be minimal, and
        // receivers lose nothing by accepting it.
        let mut bytes = vec![0x82, MASK | 126, 0, 5, 0, 0, 0, 0];
        bytes.extend_from_slice(b"abcde");
        assert_eq!(decoded(&mut bytes).2, b"abcde");
    }

    #[test]
    fn needs_more_bytes_until_the_whole_frame_is_there() {
        for len in [3usize, 200, 66000] {
            let payload = vec![b'x'; len];
            let whole = client_frame(0x82, &payload, KEY);
            for cut in 0..whole.len() {
                // Every prefix needs more; checking all of a big frame's is slow, so skip
                // most of its payload.
                if cut > 20 && cut < whole.len() - 3 && cut % 997 != 0 {
                    continue;
                }
                let mut prefix = whole[..cut].to_vec();
                assert!(
                    decode(&mut prefix).unwrap().is_none(),
                    "len {len} cut {cut}"
                );
                assert_eq!(
                    prefix,
                    whole[..cut],
                    "need-more leaves the buffer untouched"
                );
            }
        }
    }

    #[test]
    fn consumes_one_frame_and_leaves_the_next() {
        let mut bytes = text(b"one", true);
        bytes.extend(text(b"two", true));
        let (frame, used) = decode(&mut bytes).unwrap().unwrap();
        assert_eq!(&*frame.payload, b"one");
        let total = bytes.len();
        let (frame, rest) = decode(&mut bytes[used..]).unwrap().unwrap();
        assert_eq!((&*frame.payload, used + rest), (&b"two"[..], total));
    }

    #[test]
    fn decodes_control_frames() {
        let mut ping = client_frame(0x89, b"are you there", KEY);
        assert_eq!(decoded(&mut ping).0, Opcode::Ping);
        let mut pong = client_frame(0x8A, &[7; 125], KEY);
        assert_eq!(decoded(&mut pong).2, vec![7; 125]);
        let mut close = client_frame(0x88, b"", KEY);
        assert_eq!(decoded(&mut close).3, None);
        let mut close = client_frame(0x88, b"\x03\xe8bye \xe2\x82\xac", KEY);
        let (frame, _) = decode(&mut close).unwrap().unwrap();
        assert_eq!(frame.close_code, Some(1000));
        assert_eq!(frame.close_reason(), "bye €");
    }

    #[test]
    fn accepts_every_sendable_close_code() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
        ] {
            let mut bytes = client_frame(0x88, &u16::to_be_bytes(code), KEY);
            assert_eq!(decoded(&mut bytes).3, Some(code));
        }
    }

    // --- single-frame protocol errors ---------------------------------------

    #[test]
    fn refuses_unmasked_client_frames() {
        let err = decode_err(vec![0x81, 0x02, b'h', b'i']);
        assert_eq!(err, Error::Protocol(Rule::Unmasked));
        assert_eq!((errno(err), err.close_code()), (libc::EPROTO, Some(1002)));
        // Known from the first two bytes: no need to wait for the payload.
        assert_eq!(decode(&mut [0x82, 0x7E]), Err(Rule::Unmasked.into()));
    }

    #[test]
    fn refuses_reserved_bits() {
        for rsv in [0x40, 0x20, 0x10] {
            let mut frame = text(b"x", true);
            frame[0] |= rsv;
            assert_eq!(decode_err(frame), Rule::ReservedBits.into());
            // Known from the first byte.
            assert_eq!(decode(&mut [0x81 | rsv]), Err(Rule::ReservedBits.into()));
        }
    }

    #[test]
    fn refuses_reserved_opcodes() {
        for op in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            assert_eq!(
                decode_err(client_frame(0x80 | op, b"", KEY)),
                Rule::UnknownOpcode(op).into()
            );
        }
    }

    #[test]
    fn refuses_fragmented_and_long_control_frames() {
        for op in [0x8, 0x9, 0xA] {
            assert_eq!(
                decode_err(client_frame(op, b"", KEY)),
                Rule::FragmentedControl.into()
            );
            assert_eq!(
                decode_err(client_frame(0x80 | op, &[0x03; 126], KEY)),
                Rule::ControlTooLong.into()
            );
        }
        // A control frame with a 64-bit length, caught before its length bytes arrive.
        assert_eq!(
            decode(&mut [0x89, MASK | 127]),
            Err(Rule::ControlTooLong.into())
        );
    }

    #[test]
    fn refuses_64_bit_length_with_msb_set() {
        let mut bytes = vec![0x82, MASK | 127, 0x80, 0, 0, 0, 0, 0, 0, 1];
        bytes.extend_from_slice(&KEY);
        assert_eq!(decode_err(bytes), Rule::LengthMsbSet.into());
        assert_eq!(
            decode(&mut [0x82, MASK | 127, 0x80]),
            Err(Rule::LengthMsbSet.into())
        );
    }

    #[test]
    fn refuses_frames_over_the_size_limit_from_the_header_alone() {
        let mut bytes = vec![0x82, MASK | 127];
        bytes.extend_from_slice(&(MAX_PAYLOAD as u64 + 1).to_be_bytes());
        bytes.extend_from_slice(&KEY);
        let err = decode_err(bytes);
        assert_eq!(
            err,
            Error::TooLarge {
                len: MAX_PAYLOAD as u64 + 1
            }
        );
        assert_eq!((errno(err), err.close_code()), (libc::EMSGSIZE, Some(1009)));
        // Exactly the limit is fine: the header parses and asks for the payload.
        let mut bytes = vec![0x82, MASK | 127];
        bytes.extend_from_slice(&(MAX_PAYLOAD as u64).to_be_bytes());
        bytes.extend_from_slice(&KEY);
        assert!(decode(&mut bytes).unwrap().is_none());
    }

    #[test]
    fn refuses_bad_close_payloads() {
        assert_eq!(
            decode_err(client_frame(0x88, b"\x03", KEY)),
            Rule::CloseCodeMissing.into()
        );
        for code in [
            0u16, 999, 1004, 1005, 1006, 1012, 1015, 1016, 2000, 2999, 5000, 65535,
        ] {
            assert_eq!(
                decode_err(client_frame(0x88, &code.to_be_bytes(), KEY)),
                Rule::InvalidCloseCode(code).into(),
                "code {code}"
            );
        }
        let err = decode_err(client_frame(0x88, b"\x03\xe8\xff", KEY));
        assert_eq!(err, Rule::CloseReasonNotUtf8.into());
        assert_eq!((errno(err), err.close_code()), (libc::EILSEQ, Some(1007)));
    }

    // --- messages across frames (Reader) -------------------------------------

    /// Feeds `stream` to `reader` frame by frame; returns each frame's (opcode, fin, payload)
    /// or the first error.
    fn read_all(
        reader: &mut Reader,
        mut stream: Vec<u8>,
    ) -> Result<Vec<(Opcode, bool, Vec<u8>)>, Error> {
        let mut frames = Vec::new();
        let mut at = 0;
        while at < stream.len() {
            let (frame, used) = reader.read(&mut stream[at..])?.expect("whole frames only");
            frames.push((frame.opcode, frame.fin, frame.payload.to_vec()));
            at += used;
        }
        Ok(frames)
    }

    #[test]
    fn reads_fragmented_message_with_interleaved_control_frames() {
        let mut stream = text(b"Hel", false);
        stream.extend(client_frame(0x89, b"ping!", KEY));
        stream.extend(cont(b"lo, ", false));
        stream.extend(client_frame(0x8A, b"", KEY));
        stream.extend(cont(b"world", true));
        stream.extend(client_frame(0x82, &[0, 1, 2], KEY));
        let mut reader = Reader::default();
        let frames = read_all(&mut reader, stream).unwrap();
        let summary: Vec<_> = frames.iter().map(|(op, fin, _)| (*op, *fin)).collect();
        assert_eq!(
            summary,
            [
                (Opcode::Text, false),
                (Opcode::Ping, true),
                (Opcode::Continuation, false),
                (Opcode::Pong, true),
                (Opcode::Continuation, true),
                (Opcode::Binary, true),
            ]
        );
        let message: Vec<u8> = [0, 2, 4]
            .iter()
            .flat_map(|&i| frames[i].2.clone())
            .collect();
        assert_eq!(message, b"Hello, world");
        assert_eq!(frames[1].2, b"ping!");
        assert_eq!(reader, Reader::default(), "ready for the next message");
    }

    #[test]
    fn reads_utf8_split_inside_code_points_across_fragments() {
        // "€" is E2 82 AC and "😀" F0 9F 98 80: split after every byte.
        let message = "a€b😀c".as_bytes();
        let mut stream = text(&message[..2], false);
        for i in 2..message.len() - 1 {
            stream.extend(cont(&message[i..i + 1], false));
        }
        stream.extend(cont(&message[message.len() - 1..], true));
        let mut reader = Reader::default();
        let frames = read_all(&mut reader, stream).unwrap();
        let joined: Vec<u8> = frames.into_iter().flat_map(|f| f.2).collect();
        assert_eq!(joined, message);
        // Empty fragments in the middle of a code point are fine too.
        let mut stream = text(b"\xe2", false);
        stream.extend(cont(b"", false));
        stream.extend(cont(b"\x82", false));
        stream.extend(cont(b"\xac", true));
        assert!(read_all(&mut Reader::default(), stream).is_ok());
    }

    #[test]
    fn refuses_invalid_utf8_in_text_messages() {
        let cases: Vec<Vec<u8>> = vec![
            text(b"\xff", true),                                        // never valid
            text(b"ok\xe2\x82", true),                                  // truncated at the end
            [text(b"\xe2", false), cont(b"\x28", true)].concat(),       // bad continuation byte
            [text(b"ok", false), cont(b"\xed\xa0\x80", true)].concat(), // a surrogate
            [text(b"\xe2\x82", false), cont(b"", true)].concat(),       // ends mid code point
            [text(b"\xc0", false)].concat(),                            // overlong lead, not FIN
        ];
        for stream in cases {
            let err = read_all(&mut Reader::default(), stream.clone()).unwrap_err();
            assert_eq!(err, Rule::TextNotUtf8.into(), "{stream:x?}");
            assert_eq!((errno(err), err.close_code()), (libc::EILSEQ, Some(1007)));
        }
        // Binary messages are not UTF-8 checked, and decode alone does not check text.
        assert!(read_all(&mut Reader::default(), client_frame(0x82, b"\xff", KEY)).is_ok());
        assert!(decode(&mut text(b"\xff", true)).is_ok());
    }

    #[test]
    fn refuses_bad_fragmentation_order() {
        let err = read_all(&mut Reader::default(), cont(b"x", true)).unwrap_err();
        assert_eq!(err, Rule::ContinuationWithoutStart.into());
        assert_eq!(errno(err), libc::EPROTO);
        for second in [text(b"y", true), client_frame(0x02, b"y", KEY)] {
            let stream = [text(b"x", false), second].concat();
            let err = read_all(&mut Reader::default(), stream).unwrap_err();
            assert_eq!(err, Rule::MessageInsideMessage.into());
        }
        // Known from the first byte.
        let mut reader = Reader::default();
        assert_eq!(
            reader.read(&mut [0x80]),
            Err(Rule::ContinuationWithoutStart.into())
        );
    }

    #[test]
    fn a_refused_frame_changes_neither_reader_nor_buffer() {
        let mut reader = Reader::default();
        let mut first = text(b"\xe2\x82", false);
        reader.read(&mut first).unwrap().unwrap();
        let saved = reader;
        let mut bad = cont(b"\x28", true);
        let before = bad.clone();
        assert!(reader.read(&mut bad).is_err());
        assert_eq!((reader, &bad), (saved, &before));
        // The message can still be completed.
        let mut last = cont(b"\xac", true);
        let (frame, _) = reader.read(&mut last).unwrap().unwrap();
        assert_eq!(&*frame.payload, b"\xac");
        assert_eq!(reader, Reader::default());
    }

    #[test]
    fn refuses_messages_over_the_size_limit_summed_over_fragments() {
        let mut reader = Reader::default();
        let half = vec![0u8; MAX_PAYLOAD / 2];
        reader
            .read(&mut client_frame(0x02, &half, KEY))
            .unwrap()
            .unwrap();
        reader
            .read(&mut client_frame(0x00, &half, KEY))
            .unwrap()
            .unwrap();
        // One more byte, announced in the header: refused before the payload arrives.
        let header = &client_frame(0x80, b"z", KEY)[..6];
        let err = reader.read(&mut header.to_vec()).unwrap_err();
        assert_eq!(
            err,
            Error::TooLarge {
                len: MAX_PAYLOAD as u64 + 1
            }
        );
        // An empty final fragment ends the message at exactly the limit.
        let mut last = cont(b"", true);
        let (frame, _) = reader.read(&mut last).unwrap().unwrap();
        assert!(frame.fin);
    }

    #[test]
    fn reader_state_round_trips_and_rejects_states_no_reader_reaches() {
        let mut reader = Reader::default();
        assert_eq!(reader.message_in_progress(), None);
        reader
            .read(&mut text(b"ab\xf0\x9f", false))
            .unwrap()
            .unwrap();
        let (opcode, len, tail) = reader.message_in_progress().unwrap();
        assert_eq!((opcode, len, tail), (Opcode::Text, 4, &b"\xf0\x9f"[..]));
        assert_eq!(Reader::in_message(opcode, len, tail), Some(reader));
        for (opcode, len, tail) in [
            (Opcode::Ping, 0, &b""[..]),                 // not a message opcode
            (Opcode::Continuation, 0, b""),              // not a message opcode
            (Opcode::Binary, 1, b"\xe2"),                // UTF-8 tail in a binary message
            (Opcode::Text, 1, b"a"),                     // a complete character is no tail
            (Opcode::Text, 1, b"\xe2\x82\xac"),          // nor is a complete sequence
            (Opcode::Text, 1, b"\xe2\x82\xac\x00"),      // tail longer than 3
            (Opcode::Text, MAX_PAYLOAD as u64 + 1, b""), // over the limit
        ] {
            assert_eq!(Reader::in_message(opcode, len, tail), None, "{tail:x?}");
        }
    }

    // --- encoding -----------------------------------------------------------

    #[test]
    fn encodes_unmasked_server_frames_in_all_three_lengths() {
        let mut out = vec![0u8; 70_010];
        // RFC 6455 §5.7 examples.
        let n = encode(Opcode::Text, b"Hello", &mut out).unwrap();
        assert_eq!(&out[..n], b"\x81\x05Hello");
        let n = encode(Opcode::Pong, b"Hello", &mut out).unwrap();
        assert_eq!(&out[..n], b"\x8a\x05Hello");
        let n = encode(Opcode::Binary, &[9; 256], &mut out).unwrap();
        assert_eq!((&out[..4], n), (&[0x82, 0x7E, 0x01, 0x00][..], 260));
        let n = encode(Opcode::Binary, &[9; 65536], &mut out).unwrap();
        assert_eq!(&out[..10], [0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!((n, encoded_len(65536)), (65546, 65546));
        for len in [0, 125, 126, 65535, 65536] {
            assert_eq!(
                encode(Opcode::Binary, &vec![1; len], &mut out).unwrap(),
                encoded_len(len)
            );
        }
        let n = encode(Opcode::Close, b"\x03\xe8", &mut out).unwrap();
        assert_eq!(&out[..n], b"\x88\x02\x03\xe8");
        let n = encode(Opcode::Close, b"", &mut out).unwrap();
        assert_eq!(&out[..n], b"\x88\x00");
    }

    #[test]
    fn encode_refuses_what_a_peer_would_refuse() {
        let mut out = [0u8; 300];
        assert!(matches!(
            encode(Opcode::Ping, &[0; 126], &mut out),
            Err(Error::InvalidFrame(_))
        ));
        assert!(matches!(
            encode(Opcode::Close, b"\x03", &mut out),
            Err(Error::InvalidFrame(_))
        ));
        assert!(matches!(
            encode(Opcode::Close, b"\x03\xed", &mut out),
            Err(Error::InvalidFrame(_))
        ));
        assert_eq!(
            encode(Opcode::Close, b"\x03\xe8\xff", &mut out),
            Err(Error::InvalidUtf8)
        );
        assert_eq!(
            encode(Opcode::Text, b"\xff", &mut out),
            Err(Error::InvalidUtf8)
        );
        assert_eq!(errno(Error::InvalidUtf8), libc::EILSEQ);
        // Binary is any bytes.
        assert_eq!(encode(Opcode::Binary, b"\xff", &mut out), Ok(3));
    }

    #[test]
    fn encode_reports_the_size_it_needs_and_writes_nothing() {
        let mut out = [0xAAu8; 129];
        let err = encode(Opcode::Binary, &[0; 126], &mut out).unwrap_err();
        assert_eq!(err, Error::BufferTooSmall { needed: 130 });
        assert_eq!(errno(err), libc::ENOBUFS);
        assert!(out.iter().all(|&b| b == 0xAA));
        assert_eq!(encode(Opcode::Binary, &[0; 126], &mut [0; 130]), Ok(130));
    }

    #[test]
    fn server_frames_decode_back_once_masked() {
        // What encode writes is what a client masks: round trip through the decoder.
        let mut out = vec![0u8; 70_010];
        for len in [0, 5, 125, 126, 65535, 65536] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 256) as u8).collect();
            let n = encode(Opcode::Binary, &payload, &mut out).unwrap();
            let header = n - len;
            let mut masked = out[..header].to_vec();
            masked[1] |= MASK;
            masked.extend_from_slice(&KEY);
            masked.extend(payload.iter().enumerate().map(|(i, b)| b ^ KEY[i % 4]));
            assert_eq!(decoded(&mut masked).2, payload);
        }
    }
}
