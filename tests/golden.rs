//! The golden frames in `proto/golden/frames.json`: this implementation
//! decodes, encodes and answers each exactly as the file says.

mod common;

use bytes::Bytes;
use common::{config, TestServer};
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use wsproto::{ErrorCode, Frame};

fn vectors() -> Vec<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/golden/frames.json");
    let file: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    file["frames"].as_array().unwrap().clone()
}

fn unhex(hex: &str) -> Bytes {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect::<Vec<u8>>()
        .into()
}

fn message_json(type_name: &str, payload: &Bytes) -> Value {
    let pool = DescriptorPool::decode(wsproto::proto::FILE_DESCRIPTOR_SET).unwrap();
    let descriptor = pool.get_message_by_name(type_name).unwrap();
    let message = DynamicMessage::decode(descriptor, payload.clone()).unwrap();
    let options = SerializeOptions::new()
        .skip_default_fields(false)
        .use_proto_field_name(true);
    message
        .serialize_with_options(serde_json::value::Serializer, &options)
        .unwrap()
}

#[test]
fn every_golden_frame_decodes_and_encodes_as_specified() {
    let vectors = vectors();
    assert!(vectors.len() >= 15);
    for vector in vectors {
        let name = vector["name"].as_str().unwrap();
        let bytes = unhex(vector["hex"].as_str().unwrap());
        match vector.get("error") {
            Some(error) => {
                let err = Frame::decode(bytes).expect_err(name);
                assert_eq!(err.error_code().name(), error.as_str().unwrap(), "{name}");
                assert_eq!(
                    u64::from(err.opcode()),
                    vector["error_opcode"].as_u64().unwrap(),
                    "{name}"
                );
                assert_eq!(
                    err.request_id().map(u64::from),
                    vector["request_id"].as_u64(),
                    "{name}"
                );
            }
            None => {
                let frame = Frame::decode(bytes.clone()).expect(name);
                assert_eq!(
                    u64::from(frame.opcode),
                    vector["opcode"].as_u64().unwrap(),
                    "{name}"
                );
                assert_eq!(
                    frame.request_id.map(u64::from),
                    vector["request_id"].as_u64(),
                    "{name}"
                );
                assert_eq!(
                    frame.payload,
                    unhex(vector["payload_hex"].as_str().unwrap()),
                    "{name}"
                );
                if let Some(text) = vector.get("payload_text") {
                    assert_eq!(
                        std::str::from_utf8(&frame.payload).unwrap(),
                        text.as_str().unwrap(),
                        "{name}"
                    );
                }
                if let Some(message) = vector.get("message") {
                    let json = message_json(message["type"].as_str().unwrap(), &frame.payload);
                    assert_eq!(json, message["json"], "{name}");
                }
                assert_eq!(frame.encode(), bytes, "{name}: re-encoding");
            }
        }
    }
}

/// A live server answers every invalid golden frame with the listed error.
#[tokio::test]
async fn a_live_server_answers_invalid_golden_frames_with_their_error() {
    let server = TestServer::start(config()).await;
    let mut client = server.client().await;
    for vector in vectors().iter().filter(|v| v.get("error").is_some()) {
        let name = vector["name"].as_str().unwrap();
        client
            .send_raw(Message::Binary(unhex(vector["hex"].as_str().unwrap())))
            .await
            .unwrap();
        let reply = client.recv().await.unwrap();
        let error = common::error_of(&reply).expect(name);
        let code = ErrorCode::from_u32(error.code).expect(name);
        assert_eq!(code.name(), vector["error"].as_str().unwrap(), "{name}");
        assert_eq!(
            u64::from(error.opcode),
            vector["error_opcode"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            reply.request_id.map(u64::from),
            vector["request_id"].as_u64(),
            "{name}"
        );
    }
}
