//! Compiles `yeongye/v1/*.proto` into Rust with prost (and proto3-JSON serde impls with pbjson).
//! Uses `protox`, a pure-Rust protobuf compiler, so no system `protoc` is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "yeongye/v1/envelope.proto",
        "yeongye/v1/referral.proto",
        "yeongye/v1/consent.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out.join("yeongye_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;

    prost_build::Config::new()
        .file_descriptor_set_path(&descriptor_path)
        .compile_fds(fds)?;

    let descriptors = std::fs::read(&descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .build(&[".yeongye.v1"])?;
    Ok(())
}
