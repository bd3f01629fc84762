//! Any bytes as each built-in payload message: decoding never panics, and
//! what decodes survives an encode/decode round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use wsproto::proto::v1;

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(message) = M::decode(data) {
        let again =
            M::decode(message.encode_to_vec().as_slice()).expect("re-encoded message decodes");
        assert_eq!(again, message);
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<v1::Error>(data);
    round_trip::<v1::Welcome>(data);
    round_trip::<v1::FriendAdded>(data);
    round_trip::<v1::InfoRequest>(data);
    round_trip::<v1::Info>(data);
    round_trip::<v1::SessionInfo>(data);
    round_trip::<v1::Subscribe>(data);
    round_trip::<v1::Publish>(data);
    round_trip::<v1::Published>(data);
    round_trip::<v1::Delivery>(data);
    round_trip::<v1::Join>(data);
    round_trip::<v1::Say>(data);
    round_trip::<v1::Send>(data);
    round_trip::<v1::Presence>(data);
    round_trip::<v1::PresenceEvent>(data);
});
