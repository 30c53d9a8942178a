//! Encoders for the wire framings (RAW, WebSocket with or without the event id, SSE). Pure
//! functions: no I/O, no locks.
//!
//! A frame is a small header plus a body. RAW frames and large WebSocket frames borrow the
//! caller's payload as their body, so an immediate write costs no copy, and are joined into
//! one shared buffer only when some fd has to queue them (see [`Frame::shared`]). SSE frames,
//! which rewrite line endings, and small WebSocket frames, joined with their header for a
//! one-buffer `send`, are built whole, straight into that shared buffer.
//!
//! A replay encodes a frame per kept message for one fd, which queues it by copy: there the
//! encoder builds nothing shared ([`ReplayEncoder`]): WebSocket frames keep their header
//! apart, SSE events are written into a buffer the replay reuses, and the ids' common epoch
//! is spelled out once.

#![forbid(unsafe_code)]

use std::cell::OnceCell;
use std::sync::Arc;

use crate::history::{EventId, MAX_EVENT_ID_LEN};

/// How a payload is framed for one subscriber.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The payload bytes as they are.
    Raw,
    /// An RFC 6455 server frame: FIN, opcode 0x1 (text), unmasked.
    WsText,
    /// An RFC 6455 server frame: FIN, opcode 0x2 (binary), unmasked.
    WsBinary,
    /// A `text/event-stream` event: one `data: ` line per payload line, then a blank line.
    Sse,
    /// [`Mode::WsText`] whose frame payload is the message's event id, a LF, then the
    /// payload (an empty id when its topic keeps no history), so a client splits at the first
    /// LF and resumes from the id.
    WsTextId,
    /// [`Mode::WsBinary`] whose frame payload is the event id, a LF, then the payload, as
    /// [`Mode::WsTextId`].
    WsBinaryId,
}

impl Mode {
    /// How many modes there are.
    pub const COUNT: usize = 6;

    /// Every mode, in the order of [`Mode::index`] (the C enum's values).
    pub const ALL: [Mode; Mode::COUNT] = [
        Mode::Raw,
        Mode::WsText,
        Mode::WsBinary,
        Mode::Sse,
        Mode::WsTextId,
        Mode::WsBinaryId,
    ];

    /// Whether payloads for this mode must be valid UTF-8.
    pub fn requires_utf8(self) -> bool {
        matches!(self, Mode::WsText | Mode::WsTextId | Mode::Sse)
    }

    /// Whether this mode's frames are WebSocket frames (which get pings as keep-alive).
    pub fn is_websocket(self) -> bool {
        matches!(
            self,
            Mode::WsText | Mode::WsBinary | Mode::WsTextId | Mode::WsBinaryId
        )
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

const WS_OPCODE_TEXT: u8 = 0x1;
const WS_OPCODE_BINARY: u8 = 0x2;
/// The longest WebSocket header a server writes: 2 bytes + a 64-bit extended length.
const MAX_WS_HEADER_LEN: usize = crate::ws::MAX_SERVER_HEADER_LEN;
/// The longest header a frame keeps apart from its body: a WebSocket header, then, in the id
/// modes, the longest id and its LF.
const MAX_HEADER_LEN: usize = MAX_WS_HEADER_LEN + MAX_EVENT_ID_LEN + 1;
/// WebSocket frames up to this size are joined with their header into one buffer when
/// encoded: one copy per publish buys every subscriber a one-buffer `send` instead of a
/// two-iovec `sendmsg`. Larger frames keep the payload borrowed, since copying them would
/// cost more than the iovec saves.
const WS_JOIN_MAX: usize = 16 * 1024;

/// A frame's leading bytes, held inline so building one allocates nothing.
#[derive(Clone, Copy)]
pub(crate) struct Header {
    bytes: [u8; MAX_HEADER_LEN],
    len: u8,
}

impl Default for Header {
    fn default() -> Header {
        Header {
            bytes: [0; MAX_HEADER_LEN],
            len: 0,
        }
    }
}

impl Header {
    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// RFC 6455 §5.2 base framing for an unmasked server frame whose payload starts with
    /// `prefix` (an id line, or nothing) and goes on with `payload_len` more bytes; the
    /// prefix is part of the header.
    fn websocket(opcode: u8, prefix: &[u8], payload_len: usize) -> Header {
        let mut header = Header::default();
        let ws_len =
            crate::ws::write_server_header(opcode, prefix.len() + payload_len, &mut header.bytes);
        header.bytes[ws_len..ws_len + prefix.len()].copy_from_slice(prefix);
        header.len = (ws_len + prefix.len()) as u8;
        header
    }
}

/// The text of an event id (`<epoch>-<offset>`), written without the formatting machinery: a
/// replay writes one per frame.
#[derive(Clone, Copy)]
struct IdText {
    bytes: [u8; MAX_EVENT_ID_LEN + 1],
    len: u8,
}

impl IdText {
    /// `id`'s text followed by a LF; a LF alone for no id.
    fn line(id: Option<EventId>) -> IdText {
        match id {
            Some(id) => IdText::epoch(id.epoch).line_at(id.offset),
            None => {
                let mut text = IdText::empty();
                text.push(b'\n');
                text
            }
        }
    }

    fn empty() -> IdText {
        IdText {
            bytes: [0; MAX_EVENT_ID_LEN + 1],
            len: 0,
        }
    }

    /// The epoch part alone, which [`IdText::line_at`] completes.
    fn epoch(epoch: u64) -> IdText {
        let mut text = IdText::empty();
        text.push_decimal(epoch);
        text
    }

    /// This epoch's id line for `offset`: `<epoch>-<offset>\n`.
    fn line_at(mut self, offset: u64) -> IdText {
        self.push(b'-');
        self.push_decimal(offset);
        self.push(b'\n');
        self
    }

    fn push(&mut self, byte: u8) {
        self.bytes[usize::from(self.len)] = byte;
        self.len += 1;
    }

    fn push_decimal(&mut self, mut value: u64) {
        let mut digits = [0u8; 20];
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        let at = usize::from(self.len);
        let count = digits.len() - start;
        self.bytes[at..at + count].copy_from_slice(&digits[start..]);
        self.len += count as u8;
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

enum Body<'a> {
    /// The caller's payload, behind the header.
    Borrowed(&'a [u8]),
    /// The whole frame, built by the encoder (no separate header), already in the buffer
    /// that queued copies share: queueing it costs a reference, not a second copy.
    Whole(Arc<Vec<u8>>),
}

/// One encoded frame, built once per publish per mode and written to every subscriber of
/// that mode.
pub(crate) struct Frame<'a> {
    header: Header,
    body: Body<'a>,
    /// Header and body, taken once: every delivery asks, several times.
    len: usize,
    shared: OnceCell<Arc<Vec<u8>>>,
}

impl<'a> Frame<'a> {
    /// Encodes `payload` for `mode`; `None` if the memory for an SSE body cannot be had (a
    /// huge payload under a memory limit), which the caller reports instead of aborting.
    pub(crate) fn encode(mode: Mode, payload: &'a [u8]) -> Option<Frame<'a>> {
        Frame::encode_with_id(mode, payload, None)
    }

    /// [`Frame::encode`] for a message its topic's history numbered: an SSE event then starts
    /// with `id: <epoch>-<offset>\n`, and a WebSocket id mode's payload with `<epoch>-<offset>\n`
    /// (with no id, a LF alone); RAW and the plain WebSocket modes do not carry the id.
    pub(crate) fn encode_with_id(
        mode: Mode,
        payload: &'a [u8],
        id: Option<EventId>,
    ) -> Option<Frame<'a>> {
        let (header, body) = match mode {
            Mode::Raw => (Header::default(), Body::Borrowed(payload)),
            Mode::WsText => websocket(WS_OPCODE_TEXT, b"", payload),
            Mode::WsBinary => websocket(WS_OPCODE_BINARY, b"", payload),
            Mode::WsTextId => websocket(WS_OPCODE_TEXT, IdText::line(id).as_slice(), payload),
            Mode::WsBinaryId => websocket(WS_OPCODE_BINARY, IdText::line(id).as_slice(), payload),
            Mode::Sse => {
                let id_line = id.map(|id| IdText::line(Some(id)));
                let mut event = Vec::new();
                write_sse_event(payload, id_line.as_ref().map(IdText::as_slice), &mut event)?;
                (Header::default(), Body::Whole(Arc::new(event)))
            }
        };
        Some(Frame::new(header, body))
    }

    fn new(header: Header, body: Body<'a>) -> Frame<'a> {
        let len = header.as_slice().len()
            + match &body {
                Body::Borrowed(bytes) => bytes.len(),
                Body::Whole(bytes) => bytes.len(),
            };
        Frame {
            header,
            body,
            len,
            shared: OnceCell::new(),
        }
    }

    /// The frame's leading bytes when they are kept apart from the body (empty otherwise).
    pub(crate) fn header(&self) -> &[u8] {
        self.header.as_slice()
    }

    pub(crate) fn body(&self) -> &[u8] {
        match &self.body {
            Body::Borrowed(bytes) => bytes,
            Body::Whole(bytes) => bytes,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Appends the frame's bytes from offset `skip` on to `out`.
    pub(crate) fn copy_from(&self, skip: usize, out: &mut Vec<u8>) {
        let header = self.header();
        if skip < header.len() {
            out.extend_from_slice(&header[skip..]);
            out.extend_from_slice(self.body());
        } else {
            out.extend_from_slice(&self.body()[skip - header.len()..]);
        }
    }

    /// The whole frame in one reference-counted buffer, so every fd that queues this frame
    /// shares one copy (a frame queued for many fds is held once, never copied per fd): the
    /// encoder's own for a frame built whole, else built on first use. `None` if the memory cannot be had: the buffer is the
    /// payload's size, so it is reserved fallibly.
    pub(crate) fn shared(&self) -> Option<Arc<Vec<u8>>> {
        if let Body::Whole(bytes) = &self.body {
            return Some(Arc::clone(bytes));
        }
        if let Some(shared) = self.shared.get() {
            return Some(Arc::clone(shared));
        }
        let mut bytes = Vec::new();
        bytes.try_reserve_exact(self.len()).ok()?;
        bytes.extend_from_slice(self.header());
        bytes.extend_from_slice(self.body());
        Some(Arc::clone(self.shared.get_or_init(|| Arc::new(bytes))))
    }
}

/// Encodes a replay's frames, one kept message after another, for one fd that queues each by
/// copy, so nothing is built to be shared: RAW and WebSocket frames borrow the payload behind
/// an inline header (id line included), and SSE events are written, one at a time, into a
/// buffer the encoder keeps. The bytes are [`Frame::encode_with_id`]'s.
pub(crate) struct ReplayEncoder {
    mode: Mode,
    scratch: Vec<u8>,
    /// The last id's epoch and its decimal text: a replay's ids share one epoch, whose 20 or
    /// so digits are then written out once rather than per frame.
    epoch: Option<(u64, IdText)>,
}

impl ReplayEncoder {
    pub(crate) fn new(mode: Mode) -> ReplayEncoder {
        ReplayEncoder {
            mode,
            scratch: Vec::new(),
            epoch: None,
        }
    }

    /// The frame of the kept message `payload` numbered `id`; `None` if the memory for an
    /// SSE event cannot be had.
    pub(crate) fn encode<'a>(&'a mut self, payload: &'a [u8], id: EventId) -> Option<Frame<'a>> {
        let header = match self.mode {
            Mode::Raw => Header::default(),
            Mode::WsText => Header::websocket(WS_OPCODE_TEXT, b"", payload.len()),
            Mode::WsBinary => Header::websocket(WS_OPCODE_BINARY, b"", payload.len()),
            Mode::WsTextId => {
                let line = self.id_line(id);
                Header::websocket(WS_OPCODE_TEXT, line.as_slice(), payload.len())
            }
            Mode::WsBinaryId => {
                let line = self.id_line(id);
                Header::websocket(WS_OPCODE_BINARY, line.as_slice(), payload.len())
            }
            Mode::Sse => {
                let line = self.id_line(id);
                self.scratch.clear();
                write_sse_event(payload, Some(line.as_slice()), &mut self.scratch)?;
                return Some(Frame::new(Header::default(), Body::Borrowed(&self.scratch)));
            }
        };
        Some(Frame::new(header, Body::Borrowed(payload)))
    }

    fn id_line(&mut self, id: EventId) -> IdText {
        let epoch = match self.epoch {
            Some((epoch, text)) if epoch == id.epoch => text,
            _ => {
                let text = IdText::epoch(id.epoch);
                self.epoch = Some((id.epoch, text));
                text
            }
        };
        epoch.line_at(id.offset)
    }
}

/// A WebSocket frame's header and body, the frame payload being `prefix` (an id line, or
/// nothing) then `payload`: joined into one buffer when small (see [`WS_JOIN_MAX`]) and the
/// memory is there, else the header (prefix included) apart and the payload borrowed.
fn websocket<'a>(opcode: u8, prefix: &[u8], payload: &'a [u8]) -> (Header, Body<'a>) {
    let header = Header::websocket(opcode, prefix, payload.len());
    if payload.len() <= WS_JOIN_MAX {
        let mut joined = Vec::new();
        if joined
            .try_reserve_exact(header.as_slice().len() + payload.len())
            .is_ok()
        {
            joined.extend_from_slice(header.as_slice());
            joined.extend_from_slice(payload);
            return (Header::default(), Body::Whole(Arc::new(joined)));
        }
    }
    (header, Body::Borrowed(payload))
}

/// The frames of one publish, one slot per mode, each encoded the first time a subscriber of
/// that mode needs it.
pub(crate) struct FrameSet<'a> {
    payload: &'a [u8],
    id: Option<EventId>,
    frames: [OnceCell<Option<Frame<'a>>>; Mode::COUNT],
}

impl<'a> FrameSet<'a> {
    /// The frames of one publish; `id` is the position its topic's history gave it, if any.
    pub(crate) fn with_id(payload: &'a [u8], id: Option<EventId>) -> FrameSet<'a> {
        FrameSet {
            payload,
            id,
            frames: Default::default(),
        }
    }

    /// The frame for `mode`, or `None` if it could not be encoded for lack of memory.
    pub(crate) fn get(&self, mode: Mode) -> Option<&Frame<'a>> {
        self.frames[mode.index()]
            .get_or_init(|| Frame::encode_with_id(mode, self.payload, self.id))
            .as_ref()
    }
}

/// Splits `payload` into lines on CRLF, LF and CR (the line breaks the EventSource parser
/// recognises), so that a browser reassembles exactly the payload, with CRLF and CR as LF.
/// A trailing line break yields a final empty line, which `data: ` carries as an empty line.
fn sse_lines(payload: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(payload);
    std::iter::from_fn(move || {
        let current = rest?;
        match current.iter().position(|&b| b == b'\n' || b == b'\r') {
            None => {
                rest = None;
                Some(current)
            }
            Some(at) => {
                let break_len = if current[at] == b'\r' && current.get(at + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = Some(&current[at + break_len..]);
                Some(&current[..at])
            }
        }
    })
}

const SSE_DATA_PREFIX: &[u8] = b"data: ";
const SSE_ID_PREFIX: &[u8] = b"id: ";

/// How many CR and LF bytes `payload` holds (a CRLF counts twice: this bounds the lines).
/// Counted in u8 lanes over 255-byte chunks, wrapping (a chunk cannot overflow its count), so
/// the loop vectorizes: a plain `filter().count()` compiles, with overflow checks on, to a
/// byte-at-a-time loop that was a third of an SSE replay's CPU.
fn count_line_breaks(payload: &[u8]) -> usize {
    payload
        .chunks(usize::from(u8::MAX))
        .map(|chunk| {
            let breaks = chunk.iter().fold(0u8, |count, &byte| {
                count.wrapping_add(u8::from(byte == b'\n' || byte == b'\r'))
            });
            usize::from(breaks)
        })
        .sum()
}

/// Appends the SSE event of `payload` to `event`, after an `id: ` line when `id_line` (an
/// id and its LF) is given; `None`, with `event` unchanged, if the memory for it cannot be had.
fn write_sse_event(payload: &[u8], id_line: Option<&[u8]>, event: &mut Vec<u8>) -> Option<()> {
    let line_breaks = count_line_breaks(payload);
    let id_line_len = id_line.map_or(0, |line| SSE_ID_PREFIX.len() + line.len());
    event
        .try_reserve(
            id_line_len + payload.len() + (line_breaks + 1) * (SSE_DATA_PREFIX.len() + 1) + 1,
        )
        .ok()?;
    if let Some(line) = id_line {
        event.extend_from_slice(SSE_ID_PREFIX);
        event.extend_from_slice(line);
    }
    if line_breaks == 0 {
        event.extend_from_slice(SSE_DATA_PREFIX);
        event.extend_from_slice(payload);
        event.push(b'\n');
    } else {
        for line in sse_lines(payload) {
            event.extend_from_slice(SSE_DATA_PREFIX);
            event.extend_from_slice(line);
            event.push(b'\n');
        }
    }
    event.push(b'\n');
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(mode: Mode, payload: &[u8]) -> Vec<u8> {
        Frame::encode(mode, payload)
            .unwrap()
            .shared()
            .unwrap()
            .to_vec()
    }

    #[test]
    fn sse_event_with_an_id_starts_with_its_id_line() {
        let id = EventId {
            epoch: 42,
            offset: 7,
        };
        let frame = Frame::encode_with_id(Mode::Sse, b"a\nb", Some(id)).unwrap();
        assert_eq!(frame.body(), b"id: 42-7\ndata: a\ndata: b\n\n");
        let raw = Frame::encode_with_id(Mode::Raw, b"a\nb", Some(id)).unwrap();
        assert_eq!(raw.body(), b"a\nb");
    }

    #[test]
    fn websocket_id_modes_put_the_id_and_a_lf_before_the_payload() {
        let id = EventId {
            epoch: 42,
            offset: 7,
        };
        let text = Frame::encode_with_id(Mode::WsTextId, b"hi", Some(id)).unwrap();
        assert_eq!(text.shared().unwrap()[..], *b"\x81\x0742-7\nhi");
        let binary = Frame::encode_with_id(Mode::WsBinaryId, b"hi", Some(id)).unwrap();
        assert_eq!(binary.shared().unwrap()[..], *b"\x82\x0742-7\nhi");
        let plain = Frame::encode_with_id(Mode::WsText, b"hi", Some(id)).unwrap();
        assert_eq!(
            plain.shared().unwrap()[..],
            *b"\x81\x02hi",
            "WS_TEXT carries no id"
        );
    }

    #[test]
    fn websocket_id_modes_without_an_id_start_with_a_lf() {
        assert_eq!(bytes(Mode::WsTextId, b"hi"), b"\x81\x03\nhi");
        assert_eq!(bytes(Mode::WsBinaryId, b""), b"\x82\x01\n");
        assert_eq!(bytes(Mode::WsTextId, b"a\nb"), b"\x81\x04\na\nb");
    }

    #[test]
    fn websocket_id_length_counts_the_id_line() {
        let id = EventId {
            epoch: u64::MAX,
            offset: u64::MAX,
        };
        let id_line = b"18446744073709551615-18446744073709551615\n";
        assert_eq!(id_line.len(), MAX_EVENT_ID_LEN + 1);
        for payload_len in [0, 125 - id_line.len(), 126 - id_line.len(), 70_000] {
            let payload = vec![b'x'; payload_len];
            let frame = Frame::encode_with_id(Mode::WsBinaryId, &payload, Some(id)).unwrap();
            let bytes = frame.shared().unwrap();
            let length = id_line.len() + payload_len;
            let header_len = crate::ws::encoded_len(length) - length;
            let mut expected = vec![0u8; header_len];
            crate::ws::write_server_header(WS_OPCODE_BINARY, length, &mut expected);
            expected.extend_from_slice(id_line);
            expected.extend_from_slice(&payload);
            assert_eq!(bytes[..], expected[..], "payload of {payload_len} bytes");
        }
    }

    #[test]
    fn id_text_is_the_display_form() {
        for (epoch, offset) in [(0, 0), (9, 10), (8149602338162316459, 7), (u64::MAX, 1)] {
            let id = EventId { epoch, offset };
            let line = IdText::line(Some(id));
            assert_eq!(line.as_slice(), format!("{id}\n").as_bytes());
            assert_eq!(
                EventId::parse(&line.as_slice()[..line.as_slice().len() - 1]),
                Some(id)
            );
        }
        assert_eq!(IdText::line(None).as_slice(), b"\n");
    }

    #[test]
    fn replay_frames_are_byte_for_byte_the_published_ones() {
        let long = vec![b'y'; WS_JOIN_MAX + 3];
        let payloads: [&[u8]; 6] = [
            b"",
            b"hello",
            b"a\r\nb\rc\n",
            &[b'z'; 126],
            &[0xff; 3],
            &long,
        ];
        // The epoch changes midway: the encoder's epoch text must follow.
        let ids = [
            (8149602338162316459, 12),
            (8149602338162316459, 13),
            (7, 1),
            (7, 100),
        ];
        for mode in Mode::ALL {
            let mut encoder = ReplayEncoder::new(mode);
            for (epoch, offset) in ids {
                let id = EventId { epoch, offset };
                for payload in payloads {
                    let published = Frame::encode_with_id(mode, payload, Some(id)).unwrap();
                    let published = published.shared().unwrap().to_vec();
                    let replayed = encoder.encode(payload, id).unwrap();
                    let mut bytes = Vec::new();
                    replayed.copy_from(0, &mut bytes);
                    assert_eq!(bytes.len(), replayed.len());
                    assert_eq!(
                        bytes,
                        published,
                        "{mode:?}, {} bytes, id {id}",
                        payload.len()
                    );
                }
            }
        }
    }

    #[test]
    fn raw_frame_is_the_payload() {
        assert_eq!(bytes(Mode::Raw, b"log line\n"), b"log line\n");
        assert_eq!(bytes(Mode::Raw, b""), b"");
    }

    #[test]
    fn websocket_short_lengths_fit_in_seven_bits() {
        assert_eq!(bytes(Mode::WsText, b"hello"), b"\x81\x05hello");
        assert_eq!(bytes(Mode::WsBinary, b""), b"\x82\x00");
        let frame = bytes(Mode::WsBinary, &[7u8; 125]);
        assert_eq!(&frame[..2], &[0x82, 125]);
        assert_eq!(frame.len(), 127);
    }

    #[test]
    fn websocket_medium_lengths_use_sixteen_bits() {
        let frame = bytes(Mode::WsText, &[b'a'; 126]);
        assert_eq!(&frame[..4], &[0x81, 126, 0, 126]);
        assert_eq!(frame.len(), 4 + 126);
        let frame = bytes(Mode::WsBinary, &[0; 65535]);
        assert_eq!(&frame[..4], &[0x82, 126, 0xff, 0xff]);
        assert_eq!(frame.len(), 4 + 65535);
    }

    #[test]
    fn websocket_long_lengths_use_sixty_four_bits() {
        let frame = bytes(Mode::WsBinary, &[0; 65536]);
        assert_eq!(&frame[..10], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(frame.len(), 10 + 65536);
    }

    #[test]
    fn line_breaks_are_counted_across_chunks() {
        assert_eq!(count_line_breaks(b""), 0);
        assert_eq!(count_line_breaks(b"a\r\nb\rc\n"), 4);
        let mut long = vec![b'\n'; 1000];
        long.extend_from_slice(&[b'x'; 300]);
        long.extend_from_slice(&[b'\r'; 255]);
        assert_eq!(count_line_breaks(&long), 1255);
    }

    #[test]
    fn sse_single_line() {
        assert_eq!(bytes(Mode::Sse, b"hello"), b"data: hello\n\n");
    }

    #[test]
    fn sse_empty_payload_is_one_empty_data_line() {
        assert_eq!(bytes(Mode::Sse, b""), b"data: \n\n");
    }

    #[test]
    fn sse_splits_on_crlf_lf_and_cr() {
        assert_eq!(
            bytes(Mode::Sse, b"a\r\nb\nc\rd"),
            b"data: a\ndata: b\ndata: c\ndata: d\n\n"
        );
    }

    #[test]
    fn sse_keeps_empty_lines_and_trailing_breaks() {
        assert_eq!(bytes(Mode::Sse, b"a\n\nb"), b"data: a\ndata: \ndata: b\n\n");
        assert_eq!(bytes(Mode::Sse, b"a\n"), b"data: a\ndata: \n\n");
        assert_eq!(bytes(Mode::Sse, b"\r\r\n"), b"data: \ndata: \ndata: \n\n");
    }

    #[test]
    fn frame_parts_join_to_the_shared_buffer() {
        let frame = Frame::encode(Mode::WsText, b"abc").unwrap();
        assert_eq!(frame.header(), b"", "a small frame is one buffer");
        assert_eq!(frame.body(), b"\x81\x03abc");
        assert_eq!(frame.len(), 5);
        let large = vec![b'x'; WS_JOIN_MAX + 1];
        let frame = Frame::encode(Mode::WsBinary, &large).unwrap();
        assert_eq!(
            frame.header(),
            [0x82, 126, 0x40, 0x01],
            "a large one borrows its payload"
        );
        assert_eq!(frame.body().as_ptr(), large.as_ptr());
        assert_eq!(frame.len(), 4 + large.len());
        let first = frame.shared().unwrap();
        assert!(
            Arc::ptr_eq(&first, &frame.shared().unwrap()),
            "built once, then shared"
        );
        let sse = Frame::encode(Mode::Sse, b"x").unwrap();
        assert_eq!(
            sse.shared().unwrap().as_ptr(),
            sse.body().as_ptr(),
            "a frame built whole is queued without a second copy"
        );
        let raw = Frame::encode(Mode::Raw, b"abc").unwrap();
        let shared = raw.shared().unwrap();
        assert!(Arc::ptr_eq(&shared, &raw.shared().unwrap()));
        assert_eq!(&shared[..], b"abc");
    }

    #[test]
    fn copy_from_skips_what_was_written() {
        let frame = Frame::encode(Mode::WsText, b"abc").unwrap();
        for skip in 0..=frame.len() {
            let mut out = b"x".to_vec();
            frame.copy_from(skip, &mut out);
            assert_eq!(&out[1..], &frame.shared().unwrap()[skip..], "skip {skip}");
        }
    }

    #[test]
    fn frame_set_encodes_each_mode_once() {
        let set = FrameSet::with_id(b"x", None);
        let first: *const Frame = set.get(Mode::Sse).unwrap();
        let again: *const Frame = set.get(Mode::Sse).unwrap();
        assert_eq!(first, again);
        assert_eq!(set.get(Mode::WsBinary).unwrap().len(), 3);
        assert_eq!(set.get(Mode::WsBinaryId).unwrap().len(), 4);
    }
}
