//! Any bytes: decoding never panics, and what decodes re-encodes to the
//! same bytes.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use wsproto::{frame::Preview, Frame};

fuzz_target!(|data: &[u8]| {
    match Frame::decode(Bytes::copy_from_slice(data)) {
        Ok(frame) => {
            assert_eq!(&frame.encode()[..], data);
            assert_eq!(frame.encoded_len(), data.len());
            let _ = Preview::new(&frame.payload, 32).to_string();
        }
        Err(err) => {
            let _ = (
                err.error_code(),
                err.opcode(),
                err.request_id(),
                err.to_string(),
            );
        }
    }
});
