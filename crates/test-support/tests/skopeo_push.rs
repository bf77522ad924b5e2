//! Images built from local bytes, pushed to a real docker-registry with skopeo and pulled back
//! with skopeo: the round trip the facade's end-to-end tests stand on, and what skopeo 1.9.3
//! changes on the way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use facade_oci::Platform;
use facade_oci::media_types as mt;
use serde_json::{Value, json};
use test_support::image::{
    BuiltImage, FileEntry, ImageBuilder, LayerCompression, PushFormat, build_layer, push, push_image, push_index,
    sha256_digest, write_index_layout, write_layout,
};
use test_support::registry::Registry;
use test_support::skopeo::{
    copy_to_oci, copy_to_oci_preserving_digests, inspect_config, inspect_config_raw, inspect_raw, read_oci_layout,
};

fn two_layer_image() -> BuiltImage {
    let gz = build_layer(
        &[FileEntry::file("etc/motd", "hello from layer 0\n"), FileEntry::exec("usr/bin/tool", "#!/bin/sh\necho hi\n")],
        LayerCompression::Gzip,
    );
    let plain = build_layer(
        &[
            FileEntry::file("etc/motd", "overridden\n"),
            FileEntry::file("workspace/deep/dir/file.txt", vec![42u8; 3000]),
        ],
        LayerCompression::None,
    );
    ImageBuilder::new()
        .layer(gz)
        .layer(plain)
        .env(["PATH=/usr/local/bin:/usr/bin:/bin", "FOO=bar"])
        .label("org.example.kind", "test")
        .run_config_extra("Healthcheck", json!({ "Test": ["CMD", "true"], "Interval": 1_000_000_000u64 }))
        .config_extra("docker_version", json!("24.0.7"))
        .build()
}

fn manifest(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

fn check_files(pulled: &test_support::skopeo::PulledImage) {
    assert_eq!(pulled.layer_files.len(), 2);
    assert_eq!(pulled.layer_files[0]["etc/motd"], b"hello from layer 0\n");
    assert_eq!(pulled.layer_files[0]["usr/bin/tool"], b"#!/bin/sh\necho hi\n");
    assert_eq!(pulled.layer_files[1]["workspace/deep/dir/file.txt"], vec![42u8; 3000]);
    let rootfs = pulled.rootfs();
    assert_eq!(rootfs["etc/motd"], b"overridden\n");
    assert_eq!(rootfs.len(), 3);
}

fn check_config(cfg: &Value) {
    assert_eq!(cfg["config"]["Env"], json!(["PATH=/usr/local/bin:/usr/bin:/bin", "FOO=bar"]));
    assert_eq!(cfg["config"]["Labels"]["org.example.kind"], "test");
    assert_eq!(cfg["config"]["Healthcheck"]["Test"], json!(["CMD", "true"]));
    assert_eq!(cfg["docker_version"], "24.0.7");
    assert_eq!(cfg["rootfs"]["diff_ids"].as_array().unwrap().len(), 2);
}

#[test]
fn oci_push_keeps_every_byte_and_pulls_back() {
    let reg = Registry::start().unwrap();
    let image = two_layer_image();
    let digest = push_image(&reg, "base/oci:latest", &image, PushFormat::Oci).unwrap();
    assert_eq!(digest, image.manifest_digest);
    let src = format!("{}/base/oci:latest", reg.host());
    assert_eq!(inspect_raw(&src).unwrap(), image.manifest);
    assert_eq!(inspect_config_raw(&src).unwrap(), image.config);
    check_config(&inspect_config(&src).unwrap());

    let out = tempfile::tempdir().unwrap();
    copy_to_oci(&src, out.path(), "pulled").unwrap();
    let pulled = read_oci_layout(out.path(), "pulled").unwrap();
    check_files(&pulled);
    check_config(&pulled.config);
    // The OCI layout destination gzips the uncompressed layer; everything else is kept.
    assert_eq!(pulled.manifest["layers"][0], manifest(&image.manifest)["layers"][0]);
    assert_eq!(pulled.manifest["layers"][1]["mediaType"], mt::OCI_LAYER_GZIP);
    assert_eq!(pulled.manifest["config"]["digest"], image.config_digest.as_str());

    copy_to_oci_preserving_digests(&src, out.path(), "exact").unwrap();
    let exact = read_oci_layout(out.path(), "exact").unwrap();
    assert_eq!(exact.manifest_bytes, image.manifest);
    check_files(&exact);
}

#[test]
fn v2s2_push_converts_types_and_compresses_plain_layers() {
    let reg = Registry::start().unwrap();
    let image = two_layer_image();
    let digest = push_image(&reg, "base/docker:latest", &image, PushFormat::DockerV2S2).unwrap();
    let src = format!("{}/base/docker:latest", reg.host());
    let raw = inspect_raw(&src).unwrap();
    assert_eq!(digest, sha256_digest(&raw));
    assert_ne!(digest, image.manifest_digest);
    let m = manifest(&raw);
    assert_eq!(m["mediaType"], mt::DOCKER_MANIFEST);
    assert_eq!(m["config"]["mediaType"], mt::DOCKER_CONFIG);
    // The config bytes are kept, only the descriptor's media type changes.
    assert_eq!(m["config"]["digest"], image.config_digest.as_str());
    assert_eq!(inspect_config_raw(&src).unwrap(), image.config);
    // gzip layer: same blob, Docker media type.
    assert_eq!(m["layers"][0]["mediaType"], mt::DOCKER_LAYER_GZIP);
    assert_eq!(m["layers"][0]["digest"], image.layers[0].digest.as_str());
    // Uncompressed layer: skopeo gzips it on the way to a registry, so its digest changes
    // (its diff_id of course does not).
    assert_eq!(m["layers"][1]["mediaType"], mt::DOCKER_LAYER_GZIP);
    assert_ne!(m["layers"][1]["digest"], image.layers[1].digest.as_str());

    let out = tempfile::tempdir().unwrap();
    copy_to_oci(&src, out.path(), "pulled").unwrap();
    let pulled = read_oci_layout(out.path(), "pulled").unwrap();
    // An OCI layout only holds OCI manifests: skopeo converts back on the way down.
    assert_eq!(pulled.manifest["mediaType"], mt::OCI_MANIFEST);
    assert_eq!(pulled.manifest["layers"][1]["mediaType"], mt::OCI_LAYER_GZIP);
    assert_eq!(pulled.manifest["layers"][1]["digest"], m["layers"][1]["digest"]);
    check_files(&pulled);
    // The Docker → OCI conversion re-serializes the config through the OCI config type.
    assert_eq!(pulled.config["config"]["Env"], image.config_json()["config"]["Env"]);
    assert_eq!(pulled.config["config"]["Labels"], image.config_json()["config"]["Labels"]);
    assert_eq!(pulled.config["rootfs"], image.config_json()["rootfs"]);
    assert!(pulled.config["config"].get("Healthcheck").is_none());
    assert!(pulled.config.get("docker_version").is_none());

    let out = tempfile::tempdir().unwrap();
    copy_to_oci_preserving_digests(&src, out.path(), "exact").unwrap();
    let exact = read_oci_layout(out.path(), "exact").unwrap();
    assert_eq!(exact.manifest_bytes, raw);
    check_files(&exact);
    check_config(&exact.config);
}

#[test]
fn plain_oci_push_compresses_uncompressed_layers() {
    let reg = Registry::start().unwrap();
    let image = two_layer_image();
    let dir = tempfile::tempdir().unwrap();
    write_layout(dir.path(), "v1", &image).unwrap();
    push(dir.path(), "v1", &reg.host(), "base/plain:v1", PushFormat::Oci, false).unwrap();
    let m = manifest(&inspect_raw(&format!("{}/base/plain:v1", reg.host())).unwrap());
    assert_eq!(m["mediaType"], mt::OCI_MANIFEST);
    assert_eq!(m["layers"][0]["digest"], image.layers[0].digest.as_str());
    assert_eq!(m["layers"][1]["mediaType"], mt::OCI_LAYER_GZIP);
    assert_ne!(m["layers"][1]["digest"], image.layers[1].digest.as_str());
    assert_eq!(m["config"]["digest"], image.config_digest.as_str());
}

#[test]
fn zstd_layers_stay_oci() {
    let reg = Registry::start().unwrap();
    let image = ImageBuilder::new()
        .layer(build_layer(&[FileEntry::file("z/data", vec![1u8; 50_000])], LayerCompression::Zstd))
        .build();
    let err = push_image(&reg, "base/zstd:docker", &image, PushFormat::DockerV2S2).unwrap_err();
    assert!(err.to_string().contains("zstd compression is not supported for docker images"), "{err}");

    assert_eq!(push_image(&reg, "base/zstd:oci", &image, PushFormat::Oci).unwrap(), image.manifest_digest);
    let out = tempfile::tempdir().unwrap();
    copy_to_oci(&format!("{}/base/zstd:oci", reg.host()), out.path(), "z").unwrap();
    let pulled = read_oci_layout(out.path(), "z").unwrap();
    assert_eq!(pulled.manifest_bytes, image.manifest);
    assert_eq!(pulled.layer_files[0]["z/data"], vec![1u8; 50_000]);
}

#[test]
fn multi_arch_index_with_attestation_first() {
    let reg = Registry::start().unwrap();
    let amd =
        ImageBuilder::new().layer(build_layer(&[FileEntry::file("arch", "amd64")], LayerCompression::Gzip)).build();
    let arm = ImageBuilder::new()
        .platform("linux", "arm64", Some("v8"))
        .layer(build_layer(&[FileEntry::file("arch", "arm64")], LayerCompression::Gzip))
        .build();
    let plats = [(Platform::parse("linux/amd64").unwrap(), &amd), (Platform::parse("linux/arm64/v8").unwrap(), &arm)];
    let digest = push_index(&reg, "base/multi:latest", &plats, true, PushFormat::Oci).unwrap();
    let layout = tempfile::tempdir().unwrap();
    assert_eq!(write_index_layout(layout.path(), "t", &plats, true).unwrap(), digest);
    let src = format!("{}/base/multi:latest", reg.host());
    let raw = inspect_raw(&src).unwrap();
    assert_eq!(sha256_digest(&raw), digest);
    let index = manifest(&raw);
    assert_eq!(index["mediaType"], mt::OCI_INDEX);
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[0]["platform"], json!({ "architecture": "unknown", "os": "unknown" }));
    assert_eq!(entries[1]["digest"], amd.manifest_digest.as_str());
    assert_eq!(entries[2]["platform"]["variant"], "v8");
    // Every child is stored too, by digest.
    for e in entries {
        let child = inspect_raw(&format!("{}/base/multi@{}", reg.host(), e["digest"].as_str().unwrap())).unwrap();
        assert_eq!(sha256_digest(&child), e["digest"].as_str().unwrap());
    }

    if Platform::host().architecture == "amd64" {
        let out = tempfile::tempdir().unwrap();
        copy_to_oci(&src, out.path(), "m").unwrap();
        let pulled = read_oci_layout(out.path(), "m").unwrap();
        assert_eq!(pulled.manifest_bytes, amd.manifest);
        assert_eq!(pulled.layer_files[0]["arch"], b"amd64");
    }
}

#[test]
fn v2s2_index_becomes_manifest_list_unless_it_has_attestations() {
    let reg = Registry::start().unwrap();
    let amd =
        ImageBuilder::new().layer(build_layer(&[FileEntry::file("arch", "amd64")], LayerCompression::Gzip)).build();
    let arm = ImageBuilder::new()
        .platform("linux", "arm64", Some("v8"))
        .layer(build_layer(&[FileEntry::file("arch", "arm64")], LayerCompression::Gzip))
        .build();
    let plats = [(Platform::parse("linux/amd64").unwrap(), &amd), (Platform::parse("linux/arm64/v8").unwrap(), &arm)];
    let err = push_index(&reg, "base/list:att", &plats, true, PushFormat::DockerV2S2).unwrap_err();
    assert!(err.to_string().contains("application/vnd.in-toto+json"), "{err}");

    let digest = push_index(&reg, "base/list:latest", &plats, false, PushFormat::DockerV2S2).unwrap();
    let raw = inspect_raw(&format!("{}/base/list:latest", reg.host())).unwrap();
    assert_eq!(sha256_digest(&raw), digest);
    let list = manifest(&raw);
    assert_eq!(list["mediaType"], mt::DOCKER_MANIFEST_LIST);
    let entries = list["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert!(entries.iter().all(|e| e["mediaType"] == mt::DOCKER_MANIFEST));
    assert_eq!(entries[1]["platform"]["variant"], "v8");
}
