// Generates the tonic service from proto/expert.proto with a vendored protoc, so nobody
// has to install protoc by hand.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    // Activations decode without a copy.
    config.bytes(["."]);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/expert.proto"],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto/expert.proto");
    Ok(())
}
