//! `facade.upstreamCA`: the file is read and checked when the config loads (a missing file or
//! one without a certificate refuses the start with one line), and the CA it holds is what
//! lets the upstream client pull from a registry whose certificate a private CA issued (a real
//! docker-registry serving TLS).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;
use std::path::Path;

use facade_oci::media_types as mt;
use facade_oci::{Reference, RepoName};
use registry_facade::config::{Config, ConfigError, MapEnv, parse};
use test_support::registry::Registry;
use test_support::tls_registry::{PrivateCa, TlsRegistry};

fn load(dir: &Path, upstream_ca: &str) -> Result<Config, ConfigError> {
    std::fs::write(dir.join("specs.json"), "{}").unwrap();
    let text = serde_json::json!({
        "registry": {"fixedSpecFN": "specs.json"},
        "facade": {"upstreamCA": upstream_ca}
    })
    .to_string();
    parse(&text, dir, &MapEnv::default())
}

#[test]
fn bad_upstream_ca_files_are_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("not-pem.crt"), "just text\n").unwrap();
    for (value, needle) in [
        ("missing.crt", "facade.upstreamCA: cannot read"),
        ("not-pem.crt", "holds no PEM certificate"),
        ("", "facade.upstreamCA: empty"),
    ] {
        let e = load(dir.path(), value).unwrap_err().to_string();
        assert!(e.contains(needle), "{value:?}: {e}");
        assert!(e.contains("facade.upstreamCA"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_ca_lets_the_client_pull_from_a_private_ca_registry() {
    let plain = Registry::start().unwrap();
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = plain.push_blob("private/base", config).unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": mt::OCI_MANIFEST,
        "config": {"mediaType": mt::OCI_CONFIG, "digest": config_digest.as_str(), "size": config.len()},
        "layers": []
    }))
    .unwrap();
    let manifest_digest = plain.push_manifest("private/base", "1", mt::OCI_MANIFEST, &manifest).unwrap();
    let ca = PrivateCa::new("private registry CA").unwrap();
    let (cert, key) = ca.issue(&["registry.internal"]).unwrap();
    let tls = TlsRegistry::start(&plain.storage(), &cert, &key).unwrap();

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).unwrap();
    let with_ca = load(dir.path(), "ca.crt").unwrap();
    assert!(with_ca.upstream.extra_ca_pem.is_some());
    let client = |ca_pem: Option<String>| {
        facade_upstream::Client::new(
            facade_upstream::Config {
                extra_ca_pem: ca_pem,
                proxy: facade_upstream::ProxyConfig::none(),
                // registry.internal stands for a registry on the node's network; the test's is
                // on loopback, whose names are always spoken to over plain HTTP.
                resolve: vec![("registry.internal".into(), IpAddr::from([127, 0, 0, 1]))],
                ..facade_upstream::Config::default()
            },
            facade_upstream::DockerAuth::empty(),
        )
        .unwrap()
    };
    let host = format!("registry.internal:{}", tls.port());
    let repo = RepoName::parse("private/base").unwrap();
    let tag = Reference::Tag("1".into());

    let e = client(None).resolve(&host, &repo, &tag).await.unwrap_err();
    assert!(matches!(e, facade_upstream::Error::Tls { .. }), "{e:?}");

    let c = client(with_ca.upstream.extra_ca_pem.clone());
    assert_eq!(c.resolve(&host, &repo, &tag).await.unwrap().digest, manifest_digest);
    c.blob_bytes(&host, &repo, &config_digest).await.unwrap();
}
