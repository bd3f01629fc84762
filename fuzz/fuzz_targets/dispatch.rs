//! Arbitrary message sequences through the router, the built-in handlers
//! and the hub, from one session that may subscribe and publish anywhere,
//! with no network: every frame queued is well formed, a request with an id
//! always gets an answer echoing it, and the session leaves nothing behind.
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use wsproto::{
    handlers, identity::Identity, opcode, proto::v1, queue::Batch, topic::Topic, Frame, Node,
    Router, Session,
};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

fn router() -> &'static Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER.get_or_init(|| handlers::with_protocol(handlers::builtin()))
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
        let node = Node::new();
        let hub = node.hub();
        let everything: Topic = "#".parse().unwrap();
        let identity = Identity::insecure(Some("fuzz".into()), vec![everything]);
        let session = Session::detached(&node, identity, 256);
        let mut frames = Vec::new();
        for message in messages(data) {
            let request = Frame::decode(message.clone()).ok();
            router().handle_message(&session, message).await;

            frames.clear();
            while !session.queue().is_empty() {
                assert_eq!(
                    session.queue().next_batch(&mut frames, 256).await,
                    Batch::Frames
                );
            }
            for frame in &frames {
                let frame =
                    Frame::decode(frame.clone().into_bytes()).expect("queued frames are valid");
                if frame.opcode == opcode::ERROR {
                    v1::Error::decode(frame.payload.clone()).expect("error payloads decode");
                }
            }
            // A request with an id always gets an answer (a reply, an ACK or
            // an ERROR), queued last; one without may get none (e.g. LEAVE).
            if let Some(id) = request.and_then(|r| r.request_id) {
                let answer = frames.last().expect("a request with an id gets an answer");
                assert_eq!(
                    Frame::decode(answer.clone().into_bytes())
                        .unwrap()
                        .request_id,
                    Some(id)
                );
            }
        }
        drop(session);
        assert!(hub.is_empty());
        assert_eq!(
            hub.index_sizes(),
            (0, 0, true),
            "the session left nothing behind"
        );
    });
});
