//! Arbitrary message sequences through the router and the built-in handlers
//! of one session, with no network: every message gets exactly one reply
//! frame, and every reply is a well-formed frame.
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use wsproto::{handlers, opcode, proto::v1, queue::Batch, Frame, Hub, Router, Session};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap())
}

fn router() -> &'static Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER.get_or_init(handlers::builtin)
}

/// Splits the input into messages, each prefixed by a one-byte length.
fn messages(mut data: &[u8]) -> impl Iterator<Item = Bytes> + '_ {
    std::iter::from_fn(move || {
        let (&len, rest) = data.split_first()?;
        let len = (len as usize).min(rest.len());
        let (message, rest) = rest.split_at(len);
        data = rest;
        Some(Bytes::copy_from_slice(message))
    })
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let hub = Hub::new();
        let session = Session::detached(&hub, Default::default(), 64);
        let mut replies = Vec::new();
        for message in messages(data) {
            let request = Frame::decode(message.clone()).ok();
            router().handle_message(&session, message).await;

            assert_eq!(session.queue().len(), 1, "one reply per message");
            replies.clear();
            assert_eq!(session.queue().next_batch(&mut replies, 8).await, Batch::Frames);
            let reply = Frame::decode(replies[0].clone()).expect("replies are valid frames");
            if reply.opcode == opcode::ERROR {
                v1::Error::decode(reply.payload.clone()).expect("error payloads decode");
            }
            if let Some(request) = request {
                assert_eq!(reply.request_id, request.request_id, "replies echo the request id");
            }
        }
    });
});
