//! A private containerd pulls images straight from a real docker-registry and unpacks them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use facade_oci::{Digest, Platform};
use test_support::containerd::{Containerd, chain_id};
use test_support::image::{
    BuiltImage, FileEntry, ImageBuilder, LayerCompression, PushFormat, build_layer, push_image, push_index,
};
use test_support::registry::Registry;

fn containerd() -> Option<Containerd> {
    // `make test` installs containerd and CI runs as root: fail loudly instead of skipping.
    assert!(Containerd::available(), "containerd/ctr missing or not root: run `make deps` as root");
    Some(Containerd::start().unwrap())
}

fn image() -> BuiltImage {
    let base = build_layer(
        &[
            FileEntry::file("etc/motd", "base\n"),
            FileEntry::file("etc/gone", "deleted by the next layer\n"),
            FileEntry::exec("usr/bin/tool", "#!/bin/sh\n"),
        ],
        LayerCompression::Gzip,
    );
    let top = build_layer(
        &[
            FileEntry::file("etc/motd", "top\n"),
            FileEntry::file("etc/.wh.gone", ""),
            FileEntry::file("workspace/a/b.txt", vec![9u8; 5000]),
        ],
        LayerCompression::None,
    );
    ImageBuilder::new().layer(base).layer(top).env(["A=1"]).build()
}

fn expected_rootfs() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("etc/motd", b"top\n".to_vec()),
        ("usr/bin/tool", b"#!/bin/sh\n".to_vec()),
        ("workspace/a/b.txt", vec![9u8; 5000]),
    ]
}

#[test]
fn pulls_and_unpacks_oci_and_docker_images() {
    let Some(ctrd) = containerd() else { return };
    let reg = Registry::start().unwrap();
    let image = image();
    let diff_ids: Vec<Digest> = image.layers.iter().map(|l| Digest::parse(&l.diff_id).unwrap()).collect();
    let expected: std::collections::BTreeMap<String, Vec<u8>> =
        expected_rootfs().into_iter().map(|(p, c)| (p.to_string(), c)).collect();

    for (repo, format) in [("remote/oci:latest", PushFormat::Oci), ("remote/docker:latest", PushFormat::DockerV2S2)] {
        let stored = push_image(&reg, repo, &image, format).unwrap();
        let r = format!("{}/{repo}", reg.host());
        let chain = ctrd.pull(&r).unwrap();
        assert_eq!(chain, chain_id(&diff_ids).unwrap(), "{repo}");
        assert_eq!(ctrd.chain_id(&r).unwrap(), chain);
        assert_eq!(ctrd.manifest_digest(&r).unwrap(), stored);
        assert_eq!(ctrd.rootfs_files(&r).unwrap(), expected, "{repo}");
    }
}

#[test]
fn picks_the_host_platform_past_an_attestation_entry() {
    let Some(ctrd) = containerd() else { return };
    let host = Platform::host();
    let reg = Registry::start().unwrap();
    let mine = ImageBuilder::new()
        .platform(&host.os, &host.architecture, host.variant.as_deref())
        .layer(build_layer(&[FileEntry::file("arch", "mine")], LayerCompression::Gzip))
        .build();
    let other = ImageBuilder::new()
        .platform("linux", "s390x", None)
        .layer(build_layer(&[FileEntry::file("arch", "other")], LayerCompression::Gzip))
        .build();
    let plats = [(Platform::parse("linux/s390x").unwrap(), &other), (host, &mine)];
    push_index(&reg, "remote/multi:latest", &plats, true, PushFormat::Oci).unwrap();
    let r = format!("{}/remote/multi:latest", reg.host());
    ctrd.pull(&r).unwrap();
    assert_eq!(ctrd.manifest_digest(&r).unwrap(), mine.manifest_digest);
    let files = ctrd.rootfs_files(&r).unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(files["arch"], b"mine");
}
