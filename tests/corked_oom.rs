//! Out of memory on the corked path: a payload-sized allocation that fails is a counted drop
//! for the fds that miss the frame, never an abort, exactly as for a publish that writes at
//! once. The allocator of this test binary refuses, on the test's own thread and only while
//! armed, every allocation from a given size up, which no real payload buffer escapes.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use common::*;
use fdcast::{Mode, Registry};

thread_local! {
    /// Allocations of at least this many bytes fail on this thread.
    static REFUSED_FROM: Cell<usize> = const { Cell::new(usize::MAX) };
}

struct RefusingAllocator;

impl RefusingAllocator {
    fn refuses(size: usize) -> bool {
        // `try_with`: a thread being torn down has no thread-locals left, and allocates.
        REFUSED_FROM
            .try_with(|limit| size >= limit.get())
            .unwrap_or(false)
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged, or refused with NULL,
// which the GlobalAlloc contract allows for any allocation.
unsafe impl GlobalAlloc for RefusingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if Self::refuses(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract for `alloc` is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from the system allocator, with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() && Self::refuses(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` came from the system allocator, with this layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: RefusingAllocator = RefusingAllocator;

/// Refuses allocations of `from` bytes or more on this thread until dropped.
struct Refusing;

impl Refusing {
    fn from(bytes: usize) -> Refusing {
        REFUSED_FROM.with(|limit| limit.set(bytes));
        Refusing
    }
}

impl Drop for Refusing {
    fn drop(&mut self) {
        REFUSED_FROM.with(|limit| limit.set(usize::MAX));
    }
}

const FRAME_BODY: usize = 48 * 1024;
const REFUSED_FROM_BYTES: usize = 32 * 1024;

/// A length-prefixed frame whose body starts with `tag`, well over the refused size.
fn big_frame(tag: &str) -> Vec<u8> {
    let mut body = tag.as_bytes().to_vec();
    body.resize(FRAME_BODY, b'.');
    lp_encode(&body)
}

/// The tags of the frames the reader got.
fn received_tags(reader: &UnixStream) -> Vec<String> {
    parse_lp_all(&read_quiet(reader.as_raw_fd()))
        .iter()
        .map(|body| {
            assert_eq!(body.len(), FRAME_BODY, "a whole frame");
            String::from_utf8_lossy(body)
                .trim_end_matches('.')
                .to_string()
        })
        .collect()
}

/// A corked registry with three Raw subscribers of topic "t", each the only subscription of
/// its fd, so all three are members of the topic's batch.
fn three_members() -> (Registry, Vec<(UnixStream, UnixStream)>) {
    let reg = Registry::new().unwrap();
    let pairs: Vec<_> = (0..3).map(|_| socketpair_nonblocking()).collect();
    for (writer, _) in &pairs {
        reg.subscribe(b"t", writer.as_raw_fd(), Mode::Raw).unwrap();
    }
    reg.cork();
    (reg, pairs)
}

#[test]
fn a_flush_of_corked_frames_needs_no_new_memory_for_them() {
    let (reg, pairs) = three_members();
    let excepted = pairs[0].0.as_raw_fd();
    reg.publish(b"t", &big_frame("one")).unwrap();
    reg.publish_except(b"t", &big_frame("two"), Some(excepted))
        .unwrap();
    {
        let _refusing = Refusing::from(REFUSED_FROM_BYTES);
        assert_eq!(reg.flush(), 3);
    }
    assert_eq!(received_tags(&pairs[0].1), ["one"]);
    for (_, reader) in &pairs[1..] {
        assert_eq!(received_tags(reader), ["one", "two"]);
    }
    let stats = reg.stats();
    assert_eq!((stats.dropped_messages, stats.queued_bytes), (0, 0));
}

#[test]
fn a_corked_frame_without_memory_is_a_counted_drop_for_the_fd_it_misses() {
    let (reg, pairs) = three_members();
    let excepted = pairs[0].0.as_raw_fd();
    // A first round sizes the batch's buffer for two frames: the next round's shared frames
    // then need no allocation, and only a member's own frames do.
    reg.publish(b"t", &big_frame("one")).unwrap();
    reg.publish(b"t", &big_frame("two")).unwrap();
    assert_eq!(reg.flush(), 3);
    for (_, reader) in &pairs {
        assert_eq!(received_tags(reader), ["one", "two"]);
    }
    let (three, four) = (big_frame("three"), big_frame("four"));
    {
        let _refusing = Refusing::from(REFUSED_FROM_BYTES);
        // The excepted fd gets frames of its own, which the next frame cannot join.
        let matched = reg.publish_except(b"t", &three, Some(excepted)).unwrap();
        assert_eq!(matched, 2);
        assert_eq!(reg.publish(b"t", &four).unwrap(), 3);
    }
    assert_eq!(reg.stats().dropped_messages, 1);
    assert_eq!(
        reg.pending_bytes(excepted).unwrap(),
        0,
        "the dropped frame is not queued"
    );
    assert_eq!(reg.flush(), 2);
    assert_eq!(received_tags(&pairs[0].1), Vec::<String>::new());
    for (_, reader) in &pairs[1..] {
        assert_eq!(received_tags(reader), ["three", "four"]);
    }
    let stats = reg.stats();
    assert_eq!((stats.dropped_messages, stats.queued_bytes), (1, 0));
    let dropped: Vec<u64> = pairs
        .iter()
        .map(|(writer, _)| reg.fd_stats(writer.as_raw_fd()).unwrap().dropped)
        .collect();
    assert_eq!(dropped, [1, 0, 0], "the drop is the excepted fd's own");
}

#[test]
fn a_corked_batch_without_memory_drops_the_frame_for_each_member_and_says_so_per_fd() {
    let (reg, pairs) = three_members();
    let excepted = pairs[2].0.as_raw_fd();
    let lost = big_frame("lost");
    {
        let _refusing = Refusing::from(REFUSED_FROM_BYTES);
        // The batch's buffer has never held a frame: taking this one needs memory.
        let matched = reg.publish_except(b"t", &lost, Some(excepted));
        assert_eq!(matched.unwrap(), 2);
    }
    reg.publish(b"t", &big_frame("kept")).unwrap();
    assert_eq!(reg.flush(), 3);
    for (_, reader) in &pairs {
        assert_eq!(received_tags(reader), ["kept"]);
    }
    assert_eq!(reg.stats().dropped_messages, 2);
    let dropped: Vec<u64> = pairs
        .iter()
        .map(|(writer, _)| reg.fd_stats(writer.as_raw_fd()).unwrap().dropped)
        .collect();
    assert_eq!(dropped, [1, 1, 0], "every member but the excepted one");
}
