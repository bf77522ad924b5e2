//! A real containerd pulls a composed image from the facade and unpacks it; the rootfs
//! holds files from the base and from every added layer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine as _;
use e2e::Facade;
use serde_json::json;
use test_support::containerd::Containerd;
use test_support::image::{FileEntry, ImageBuilder, LayerCompression, PushFormat, build_layer, build_tar, push_image};
use test_support::registry::Registry;

#[test]
fn containerd_pulls_and_unpacks_a_composed_image() {
    // `make test` installs containerd and CI runs as root; a machine without either fails here
    // loudly rather than skipping.
    assert!(Containerd::available(), "containerd/ctr missing or not root: run `make deps` as root");
    let reg = Registry::start().unwrap();
    e2e::upstream::push_base_and_ide(&reg);
    let sup = ImageBuilder::new()
        .layer(build_layer(&[FileEntry::exec(".supervisor/supervisor", "#!/bin/sh\n")], LayerCompression::Zstd))
        .build();
    push_image(&reg, "supervisor:1", &sup, PushFormat::Oci).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let content = build_tar(&[FileEntry::file("workspace/hello.txt", "workspace content")]);
    std::fs::write(
        dir.path().join("specs.json"),
        json!({"ws": {
            "baseRef": format!("{}/base:1", reg.host()),
            "ideRef": format!("{}/ide:1", reg.host()),
            "supervisorRef": format!("{}/supervisor:1", reg.host()),
            "contentLayer": [{"direct": {"content": base64::engine::general_purpose::STANDARD.encode(&content)}}]
        }})
        .to_string(),
    )
    .unwrap();
    let cfg = json!({"registry": {"port": 0, "fixedSpecFN": "specs.json", "store": "store"}, "facade": {"listenHost": "127.0.0.1"}});
    let facade = Facade::start(&cfg, dir.path()).unwrap();

    let ctr = Containerd::start().unwrap();
    let image = format!("{}/fixed/ws:latest", facade.host());
    ctr.pull(&image).unwrap();
    let files = ctr.rootfs_files(&image).unwrap();
    assert_eq!(files["etc/base-file"], b"from the base");
    assert_eq!(files["ide/bin/ide"], b"#!/bin/sh\necho ide\n");
    assert_eq!(files[".supervisor/supervisor"], b"#!/bin/sh\n");
    assert_eq!(files["workspace/hello.txt"], b"workspace content");
}
