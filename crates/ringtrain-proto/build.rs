//! Compiles `proto/ringtrain/v1/*.proto` with `protox` (pure Rust, no system
//! `protoc`) and generates prost messages plus tonic client and server code
//! into `OUT_DIR`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.join("../../proto");
    let dir = root.join("ringtrain/v1");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    // Stable order so that the generated file does not depend on directory order.
    files.sort();
    println!("cargo:rerun-if-changed={}", dir.display());
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let fds = protox::compile(&files, [&root])?;
    tonic_prost_build::configure()
        // `bytes` fields decode as `bytes::Bytes`: a zero-copy view of the
        // receive buffer instead of a fresh `Vec<u8>` per message.
        .bytes(".")
        // Reserve whole frames instead of growing buffers by doubling.
        .codec_path("crate::codec::FrameCodec")
        .compile_fds(fds)?;
    Ok(())
}
