//! Micro-benchmarks of the per-frame path, in process, with no network.
//!
//! - `decode`: [`Frame::decode`] of a received message with a 0, 32 and
//!   4096-byte payload, and of one with a request id. It runs for every
//!   binary message of every connection; the payload is borrowed, not
//!   copied, so the time should not grow with the payload.
//! - `encode`: [`Frame::encode`] (a fresh buffer per frame, as every reply
//!   and delivery is encoded) against [`Frame::encode_into`] a reused
//!   buffer, at the same sizes: the difference is the allocation.
//! - `dispatch`: [`Router::handle_message`] through the built-in handlers
//!   for ECHO (32 B and 4 KiB) and for PING with a request id, from a
//!   detached session whose queue is drained as its writer would: decode,
//!   handler lookup, the boxed handler future, reply encoding and queuing.
//! - `fanout`: one PUBLISH of 256 bytes to a topic with 100 and 1000
//!   subscribed sessions on this node, every queue then drained: the cost
//!   of a delivery, which is encoded once and pushed to each queue.
//!
//! Async work runs on one current-thread runtime with `block_on` per
//! iteration, so `dispatch` and `fanout` include its small fixed cost.
//! Run one group with `cargo bench --bench codec -- fanout`.

use std::{hint::black_box, sync::OnceLock};

use bytes::{Bytes, BytesMut};
use criterion::{
    criterion_group, criterion_main, measurement::WallTime, BenchmarkGroup, BenchmarkId, Criterion,
    Throughput,
};
use prost::Message as _;
use tokio::runtime::Runtime;
use wsproto::{
    handlers, identity::Identity, opcode, proto::v1, session::Registration, topic::Topic, Frame,
    Node, Outgoing, Router, Session,
};

/// Payload sizes of the codec benchmarks: empty, a small command, a page.
const PAYLOAD_SIZES: [usize; 3] = [0, 32, 4096];
/// Queue capacity of every detached session; each iteration drains what it
/// queued, so this only has to exceed one iteration's frames.
const QUEUE_CAPACITY: usize = 256;
/// The topic of the fan-out benchmark.
const FANOUT_TOPIC: &str = "bench.t";

/// The runtime every async benchmark runs on, built once.
fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds")
    })
}

fn payload(len: usize) -> Bytes {
    Bytes::from(vec![0xA5u8; len])
}

/// `frame` encoded as the WebSocket reader hands a message over: a frozen
/// slice of a read buffer, already shared, so cloning it per iteration is a
/// reference-count bump, not an allocation.
fn received(frame: &Frame) -> Bytes {
    let mut buffer = BytesMut::with_capacity(frame.encoded_len());
    frame.encode_into(&mut buffer);
    buffer.split().freeze()
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for size in PAYLOAD_SIZES {
        bench_decode(&mut group, "plain", Frame::new(opcode::ECHO, payload(size)));
    }
    let with_id = Frame::new(opcode::ECHO, payload(32)).with_request_id(Some(7));
    bench_decode(&mut group, "request_id", with_id);
    group.finish();
}

/// Adds to `group` the decoding of `frame` as received, named `name` and
/// its payload size.
fn bench_decode(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, frame: Frame) {
    let message = received(&frame);
    group.throughput(Throughput::Bytes(message.len() as u64));
    let id = BenchmarkId::new(name, frame.payload.len());
    group.bench_with_input(id, &message, |b, message| {
        b.iter(|| Frame::decode(black_box(message.clone())))
    });
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for size in PAYLOAD_SIZES {
        let frame = Frame::new(opcode::ECHO, payload(size));
        group.throughput(Throughput::Bytes(frame.encoded_len() as u64));
        group.bench_with_input(BenchmarkId::new("encode", size), &frame, |b, frame| {
            b.iter(|| black_box(frame).encode())
        });
        group.bench_with_input(BenchmarkId::new("encode_into", size), &frame, |b, frame| {
            let mut buffer = BytesMut::with_capacity(frame.encoded_len());
            b.iter(|| {
                buffer.clear();
                black_box(frame).encode_into(&mut buffer);
                black_box(buffer.len())
            })
        });
    }
    group.finish();
}

/// Moves every frame queued for `session` into `out` (emptied first), as
/// the session's writer would; returns how many there were.
async fn drain(session: &Session, out: &mut Vec<Outgoing>) -> usize {
    out.clear();
    // Only this thread queues, so a non-empty queue never makes this wait.
    while !session.queue().is_empty() {
        session.queue().next_batch(out, usize::MAX).await;
    }
    out.len()
}

/// Dispatches `message` from `session` and drains what it queued into
/// `out`; returns how many frames that was.
async fn dispatch_one(
    router: &Router,
    session: &Session,
    message: Bytes,
    out: &mut Vec<Outgoing>,
) -> usize {
    router.handle_message(session, message).await;
    drain(session, out).await
}

/// Dispatches `message` once and returns its only answer, so each benchmark
/// is checked to measure the path it is named for, not an error reply.
fn only_reply(router: &Router, session: &Session, message: &Bytes) -> Frame {
    let mut out = Vec::new();
    let queued = runtime().block_on(dispatch_one(router, session, message.clone(), &mut out));
    assert_eq!(queued, 1, "one answer to one request");
    Frame::decode(out[0].clone().into_bytes()).expect("queued frames are valid")
}

fn dispatch(c: &mut Criterion) {
    let router = handlers::with_protocol(handlers::builtin());
    let node = Node::new();
    let identity = Identity::insecure(Some("bench".into()), Vec::new());
    let session = Session::detached(&node, identity, QUEUE_CAPACITY);
    let mut frames = Vec::new();

    let mut group = c.benchmark_group("dispatch");
    for size in [32, 4096] {
        let message = received(&Frame::new(opcode::ECHO, payload(size)));
        assert_eq!(only_reply(&router, &session, &message).opcode, opcode::ECHO);
        group.throughput(Throughput::Bytes(message.len() as u64));
        group.bench_with_input(BenchmarkId::new("echo", size), &message, |b, message| {
            b.iter(|| {
                let echo = dispatch_one(&router, &session, message.clone(), &mut frames);
                runtime().block_on(echo)
            })
        });
    }

    let ping = received(&Frame::new(opcode::PING, payload(8)).with_request_id(Some(7)));
    let pong = only_reply(&router, &session, &ping);
    assert_eq!((pong.opcode, pong.request_id), (opcode::PONG, Some(7)));
    group.throughput(Throughput::Bytes(ping.len() as u64));
    group.bench_with_input("ping_request_id", &ping, |b, ping| {
        b.iter(|| runtime().block_on(dispatch_one(&router, &session, ping.clone(), &mut frames)))
    });
    group.finish();
}

/// One publisher and `count` sessions subscribed to [`FANOUT_TOPIC`], on a
/// hub of their own.
struct Fanout {
    publisher: Registration,
    subscribers: Vec<Registration>,
}

impl Fanout {
    fn new(count: usize) -> Fanout {
        let node = Node::new();
        let topic = Topic::parse(FANOUT_TOPIC).expect("a valid topic name");
        let may_publish = Identity::insecure(Some("bench".into()), vec![topic.clone()]);
        let publisher = Session::detached(&node, may_publish, QUEUE_CAPACITY);
        let subscribers = (0..count)
            .map(|_| {
                let identity = Identity::insecure(None, Vec::new());
                let session = Session::detached(&node, identity, QUEUE_CAPACITY);
                node.hub()
                    .subscribe(session.id(), &topic)
                    .expect("a new session may subscribe");
                session
            })
            .collect();
        Fanout {
            publisher,
            subscribers,
        }
    }

    /// Dispatches `message` (a PUBLISH frame) from the publisher, then
    /// drains its reply and every subscriber's queue; returns the deliveries.
    async fn publish(&self, router: &Router, message: Bytes, out: &mut Vec<Outgoing>) -> usize {
        dispatch_one(router, &self.publisher, message, out).await;
        let mut delivered = 0;
        for subscriber in &self.subscribers {
            delivered += drain(subscriber, out).await;
        }
        delivered
    }
}

fn fanout(c: &mut Criterion) {
    let router = handlers::with_protocol(handlers::builtin());
    let request = v1::Publish {
        topic: FANOUT_TOPIC.to_owned(),
        data: payload(256),
        opcode: 0,
    };
    let message = received(&Frame::new(opcode::PUBLISH, request.encode_to_vec()));
    let mut frames = Vec::new();

    let mut group = c.benchmark_group("fanout");
    for count in [100, 1000] {
        let sessions = Fanout::new(count);
        // A refused PUBLISH (no permission, say) would deliver nothing.
        let delivered = runtime().block_on(sessions.publish(&router, message.clone(), &mut frames));
        assert_eq!(delivered, count, "one delivery per subscriber");

        group.throughput(Throughput::Elements(count as u64));
        let id = BenchmarkId::new("publish_256B", count);
        group.bench_with_input(id, &message, |b, message| {
            b.iter(|| {
                let round = sessions.publish(&router, message.clone(), &mut frames);
                runtime().block_on(round)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decode, encode, dispatch, fanout);
criterion_main!(benches);
