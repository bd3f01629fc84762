//! Decoding a frame allocates nothing.
//!
//! [`Frame::decode`] runs for every binary message of every connection, so
//! an allocation there would be paid at the full message rate; the payload
//! is meant to be a slice of the received buffer. These tests install an
//! allocator that counts the allocations of the current thread (the test
//! harness's other threads allocate too) and check that decoding, valid or
//! malformed, and reading the result make none; likewise encoding into a
//! buffer that already has room.
//!
//! Messages are built as the WebSocket reader hands them over: a frozen
//! slice of its read buffer, already shared, so a clone is a reference-count
//! bump. A `Bytes` that still owns a unique `Vec` (as a reassembled
//! fragmented message may) is made shared by `bytes` on its first clone,
//! which allocates once; that is not the decoder's doing.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    hint::black_box,
};

use bytes::{Bytes, BytesMut};
use wsproto::{Frame, FrameError};

/// The system allocator, counting the allocations of each thread.
struct CountingAllocator;

thread_local! {
    /// Allocations and reallocations made by this thread. Initialised by a
    /// `const` and without a destructor, so using it never allocates.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count_allocation() {
    // `try_with`: nothing inside the allocator may panic.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

// SAFETY: every call is handed unchanged to `System`, which meets the
// `GlobalAlloc` contract.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_allocation();
        // SAFETY: the caller's guarantees are those `System.alloc` needs.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_allocation();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_allocation();
        // SAFETY: `ptr` was allocated by this allocator, that is by `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `realloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Runs `f`; returns its result and the allocations it made on this thread.
fn allocations_during<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = ALLOCATIONS.get();
    let result = f();
    (result, ALLOCATIONS.get() - before)
}

/// `bytes` as the WebSocket reader hands a message over: a frozen slice of
/// its read buffer.
fn received(bytes: &[u8]) -> Bytes {
    BytesMut::from(bytes).split().freeze()
}

/// A decoded message as plain values: opcode, request id, payload length.
type Decoded = Result<(u32, Option<u32>, usize), FrameError>;

/// Decodes a clone of `message`, reads every part of the outcome as a
/// handler or the error path would, and drops the frame.
fn decode(message: &Bytes) -> Decoded {
    match Frame::decode(black_box(message.clone())) {
        Ok(frame) => {
            let payload = black_box(&frame.payload[..]);
            Ok((frame.opcode, frame.request_id, payload.len()))
        }
        Err(err) => {
            black_box((err.opcode(), err.request_id(), err.error_code()));
            Err(err)
        }
    }
}

#[track_caller]
fn assert_decodes_without_allocating(what: &str, message: &[u8], expected: Decoded) {
    let message = received(message);
    let (decoded, allocations) = allocations_during(|| decode(&message));
    assert_eq!(decoded, expected, "{what}");
    assert_eq!(allocations, 0, "decoding {what} allocated");
}

#[test]
fn the_allocator_counts_this_threads_allocations() {
    let (_, allocations) = allocations_during(|| black_box(Vec::<u8>::with_capacity(64)));
    assert_eq!(allocations, 1);
}

#[test]
fn decoding_valid_frames_allocates_nothing() {
    let mut page: Vec<u8> = vec![0, 0, 0, 100];
    page.resize(4 + 4096, 0xA5);

    assert_decodes_without_allocating(
        "a plain frame",
        &[0, 0, 0, 100, b'h', b'i'],
        Ok((100, None, 2)),
    );
    assert_decodes_without_allocating("an empty payload", &[0, 0, 0, 100], Ok((100, None, 0)));
    assert_decodes_without_allocating(
        "a frame with a request id",
        &[0x80, 0, 0, 111, 0, 0, 0, 7, b'h', b'i'],
        Ok((111, Some(7), 2)),
    );
    assert_decodes_without_allocating("a 4 KiB payload", &page, Ok((100, None, 4096)));
}

#[test]
fn rejecting_malformed_frames_allocates_nothing() {
    assert_decodes_without_allocating(
        "an empty message",
        &[],
        Err(FrameError::TooShort { len: 0 }),
    );
    assert_decodes_without_allocating(
        "a truncated opcode",
        &[0, 0, 100],
        Err(FrameError::TooShort { len: 3 }),
    );
    assert_decodes_without_allocating(
        "a truncated request id",
        &[0x80, 0, 0, 111, 1],
        Err(FrameError::MissingRequestId {
            opcode: 111,
            len: 5,
        }),
    );
    assert_decodes_without_allocating(
        "reserved bits",
        &[0x81, 0, 0, 100, 0, 0, 0, 9],
        Err(FrameError::ReservedFlags {
            opcode: 100,
            request_id: Some(9),
            bits: 0x0100_0000,
        }),
    );
}

#[test]
fn encoding_into_a_buffer_with_room_allocates_nothing() {
    let frames = [
        Frame::new(100, Bytes::from_static(b"hi")),
        Frame::new(111, Bytes::from_static(b"hi")).with_request_id(Some(7)),
        Frame::new(100, vec![0xA5u8; 4096]).with_request_id(Some(8)),
    ];
    let room = frames.iter().map(Frame::encoded_len).max().unwrap_or(0);
    let mut buffer = BytesMut::with_capacity(room);
    for frame in &frames {
        buffer.clear();
        let ((), allocations) = allocations_during(|| frame.encode_into(&mut buffer));
        assert_eq!(allocations, 0, "encoding {frame:?} allocated");
        assert_eq!(&buffer[..], &frame.encode()[..]);
    }
}
