// Generates the CRI image-service client (proto/cri_image.proto) with a vendored protoc, as
// crates/facade-spec does, so building needs no system protobuf compiler.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().build_server(false).build_client(true).compile_with_config(
        config,
        &["proto/cri_image.proto"],
        &["proto"],
    )?;
    Ok(())
}
