//! Protobuf payload types of the wsproto protocol.
//!
//! Generated at build time from `proto/wsproto/v1/*.proto` by prost, with
//! `bytes` fields as [`bytes::Bytes`] so decoding can borrow from the frame.

/// Version 1 of the payload schemas (protobuf package `wsproto.v1`).
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/wsproto.v1.rs"));
}

/// The encoded `FileDescriptorSet` of every schema in this crate, for tools
/// that print or parse payloads by message name (e.g. `prost-reflect`).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/descriptor_set.bin"));
