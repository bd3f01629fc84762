//! Compiles `wsproto/v1/*.proto` with protox (a pure-Rust protobuf compiler),
//! so building needs no system `protoc`. Also writes the encoded descriptor
//! set, which clients use to print and parse payloads generically.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "wsproto/v1/protocol.proto",
        "wsproto/v1/pubsub.proto",
        "wsproto/v1/app.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("descriptor_set.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
