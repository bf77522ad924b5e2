//! The client against a real CNCF distribution registry (docker-registry 2.8) on loopback:
//! anonymous, htpasswd and token auth, Range, digest checks on corrupted storage, 404s.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use facade_oci::media_types as mt;
use facade_oci::{Digest, Reference, RepoName};
use facade_upstream::{Client, Config, DockerAuth, Error, ErrorKind};
use futures::StreamExt;
use test_support::registry::{Auth, Registry};
use test_support::token_server::TokenServer;

struct Pushed {
    config: Vec<u8>,
    config_digest: Digest,
    layer: Vec<u8>,
    layer_digest: Digest,
    manifest: Vec<u8>,
    manifest_digest: Digest,
}

/// Pseudo-random bytes, so ranges at any offset are distinguishable.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn push_image(reg: &Registry, repo: &str, tag: &str) -> Pushed {
    let layer = noise(300_000, tag.len() as u64 + repo.len() as u64);
    let layer_digest = reg.push_blob(repo, &layer).unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_digest.as_str()]},
        "config": {"Env": ["PATH=/usr/bin"]}
    }))
    .unwrap();
    let config_digest = reg.push_blob(repo, &config).unwrap();
    // The padding annotation lets a test corrupt the stored manifest without breaking its JSON.
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": mt::OCI_MANIFEST,
        "config": {"mediaType": mt::OCI_CONFIG, "digest": config_digest.as_str(), "size": config.len()},
        "layers": [{"mediaType": mt::OCI_LAYER_GZIP, "digest": layer_digest.as_str(), "size": layer.len()}],
        "annotations": {"org.example.pad": "aaaaaaaaaaaaaaaa"}
    }))
    .unwrap();
    let manifest_digest = reg.push_manifest(repo, tag, mt::OCI_MANIFEST, &manifest).unwrap();
    Pushed { config, config_digest, layer, layer_digest, manifest, manifest_digest }
}

fn repo(s: &str) -> RepoName {
    RepoName::parse(s).unwrap()
}

fn tag(s: &str) -> Reference {
    Reference::Tag(s.to_string())
}

fn client(auth: DockerAuth) -> Client {
    Client::new(Config::default(), auth).unwrap()
}

async fn collect(mut body: futures::stream::BoxStream<'static, facade_upstream::Result<Bytes>>) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

/// resolve, manifest, blob_bytes and blob_stream (whole and from an offset) all work.
async fn pull_everything(c: &Client, host: &str, name: &str, p: &Pushed) {
    let r = repo(name);
    let resolved = c.resolve(host, &r, &tag("v1")).await.unwrap();
    assert_eq!(resolved.digest, p.manifest_digest);
    assert_eq!(resolved.media_type, mt::OCI_MANIFEST);
    assert_eq!(resolved.size, p.manifest.len() as u64);

    let m = c.manifest(host, &r, &tag("v1")).await.unwrap();
    assert_eq!(
        (&m.bytes[..], m.media_type.as_str(), &m.digest),
        (&p.manifest[..], mt::OCI_MANIFEST, &p.manifest_digest)
    );
    let m = c.manifest(host, &r, &Reference::Digest(p.manifest_digest.clone())).await.unwrap();
    assert_eq!(&m.bytes[..], &p.manifest[..]);

    assert_eq!(&c.blob_bytes(host, &r, &p.config_digest).await.unwrap()[..], &p.config[..]);

    let s = c.blob_stream(host, &r, &p.layer_digest, 0).await.unwrap();
    assert_eq!((s.offset, s.total_size), (0, Some(p.layer.len() as u64)));
    assert!(collect(s.body).await == p.layer);

    let off = 123_457;
    let s = c.blob_stream(host, &r, &p.layer_digest, off).await.unwrap();
    assert_eq!((s.offset, s.total_size), (off, Some(p.layer.len() as u64)));
    assert!(collect(s.body).await == p.layer[off as usize..]);
}

#[tokio::test]
async fn pulls_anonymously_with_ranges() {
    let reg = Registry::start().unwrap();
    let p = push_image(&reg, "demo/base", "v1");
    let c = client(DockerAuth::empty());
    pull_everything(&c, &reg.host(), "demo/base", &p).await;

    // An index resolves to its own media type.
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": mt::OCI_INDEX,
        "manifests": [{"mediaType": mt::OCI_MANIFEST, "digest": p.manifest_digest.as_str(), "size": p.manifest.len(),
                       "platform": {"architecture": "amd64", "os": "linux"}}]
    }))
    .unwrap();
    let index_digest = reg.push_manifest("demo/base", "multi", mt::OCI_INDEX, &index).unwrap();
    let r = c.resolve(&reg.host(), &repo("demo/base"), &tag("multi")).await.unwrap();
    assert_eq!((r.digest, r.media_type.as_str(), r.size), (index_digest, mt::OCI_INDEX, index.len() as u64));
    let localhost = format!("localhost:{}", reg.addr.port());
    let m = c.manifest(&localhost, &repo("demo/base"), &tag("multi")).await.unwrap();
    assert_eq!(m.media_type, mt::OCI_INDEX);
}

#[tokio::test]
async fn upstream_404_is_not_found() {
    let reg = Registry::start().unwrap();
    let p = push_image(&reg, "demo/base", "v1");
    let c = client(DockerAuth::empty());
    let host = reg.host();
    let missing = Digest::sha256_of(b"nothing here");
    let errs = [
        c.resolve(&host, &repo("demo/base"), &tag("nope")).await.unwrap_err(),
        c.manifest(&host, &repo("demo/base"), &tag("nope")).await.unwrap_err(),
        c.manifest(&host, &repo("demo/base"), &Reference::Digest(missing.clone())).await.unwrap_err(),
        c.manifest(&host, &repo("other/repo"), &tag("v1")).await.unwrap_err(),
        c.blob_bytes(&host, &repo("demo/base"), &missing).await.unwrap_err(),
        c.blob_stream(&host, &repo("demo/base"), &missing, 0).await.unwrap_err(),
        c.blob_stream(&host, &repo("other/repo"), &p.layer_digest, 0).await.unwrap_err(),
    ];
    for e in errs {
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e:?}");
        assert!(!e.is_retryable());
        assert_eq!(e.detail().status, Some(404));
        assert_eq!(e.detail().upstream.as_deref(), Some(host.as_str()));
    }
}

#[tokio::test]
async fn detects_corrupted_content() {
    let reg = Registry::start().unwrap();
    let p = push_image(&reg, "demo/base", "v1");
    let c = client(DockerAuth::empty());
    let (host, r) = (reg.host(), repo("demo/base"));

    let mut bad_config = p.config.clone();
    let at = bad_config.iter().position(|&b| b == b'a').unwrap();
    bad_config[at] = b'b';
    std::fs::write(reg.blob_path(&p.config_digest), &bad_config).unwrap();
    match c.blob_bytes(&host, &r, &p.config_digest).await.unwrap_err() {
        Error::DigestMismatch { expected, actual, .. } => {
            assert_eq!(expected, p.config_digest);
            assert_eq!(actual, Digest::sha256_of(&bad_config));
        }
        e => panic!("expected a digest mismatch, got {e:?}"),
    }

    let bad_manifest = String::from_utf8(p.manifest.clone()).unwrap().replace("aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb");
    std::fs::write(reg.blob_path(&p.manifest_digest), &bad_manifest).unwrap();
    let by_digest = c.manifest(&host, &r, &Reference::Digest(p.manifest_digest.clone())).await.unwrap_err();
    assert!(
        matches!(&by_digest, Error::DigestMismatch { expected, .. } if *expected == p.manifest_digest),
        "{by_digest:?}"
    );
    assert_eq!(by_digest.kind(), ErrorKind::Protocol);
    assert!(!by_digest.is_retryable());
    // By tag, the registry still announces the pushed digest, which the bytes no longer match.
    let by_tag = c.manifest(&host, &r, &tag("v1")).await.unwrap_err();
    assert!(matches!(by_tag, Error::DigestMismatch { .. }), "{by_tag:?}");
}

#[tokio::test]
async fn htpasswd_auth_uses_docker_credentials() {
    let auth = Auth::htpasswd("alice", "s3cret-pw");
    let reg = Registry::start_with(auth.clone(), &[]).unwrap();
    let host = reg.host();
    let p = push_image(&reg, "private/app", "v1");

    let good = DockerAuth::parse(&auth.docker_config_json(&host)).unwrap();
    pull_everything(&client(good.clone()), &host, "private/app", &p).await;

    let anon = client(DockerAuth::empty()).resolve(&host, &repo("private/app"), &tag("v1")).await.unwrap_err();
    assert_eq!(anon.kind(), ErrorKind::Unauthorized, "{anon:?}");

    let wrong = DockerAuth::parse(&Auth::htpasswd("alice", "wrong-pw").docker_config_json(&host)).unwrap();
    let c = client(wrong);
    let e = c.manifest(&host, &repo("private/app"), &tag("v1")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e:?}");
    assert!(!e.is_retryable());
    assert!(!format!("{e} {e:?}").contains("wrong-pw"));

    // Hot swap of credentials.
    c.set_auth(good);
    assert_eq!(c.resolve(&host, &repo("private/app"), &tag("v1")).await.unwrap().digest, p.manifest_digest);
}

#[tokio::test]
async fn token_auth_caches_one_token_per_repository() {
    let ts = TokenServer::start("bob", "t0ken-pw").unwrap();
    let auth = ts.auth();
    let reg = Registry::start_with(auth.clone(), &[]).unwrap();
    let host = reg.host();
    let p = push_image(&reg, "private/app", "v1");
    let q = push_image(&reg, "private/other", "v1");

    let c = client(DockerAuth::parse(&auth.docker_config_json(&host)).unwrap());
    let before = ts.token_requests();
    pull_everything(&c, &host, "private/app", &p).await;
    assert_eq!(ts.token_requests() - before, 1, "one token for seven calls on one repository");
    assert_eq!(ts.scopes().last().map(String::as_str), Some("repository:private/app:pull"));

    // Another repository needs its own scope, once.
    pull_everything(&c, &host, "private/other", &q).await;
    assert_eq!(ts.token_requests() - before, 2);

    // A clone shares the cache.
    let c2 = c.clone();
    c2.resolve(&host, &repo("private/app"), &tag("v1")).await.unwrap();
    assert_eq!(ts.token_requests() - before, 2);

    // set_auth drops cached tokens.
    c.set_auth(DockerAuth::parse(&auth.docker_config_json(&host)).unwrap());
    c.resolve(&host, &repo("private/app"), &tag("v1")).await.unwrap();
    assert_eq!(ts.token_requests() - before, 3);
}

#[tokio::test]
async fn token_server_refusals_are_unauthorized() {
    let ts = TokenServer::start("bob", "t0ken-pw").unwrap();
    let reg = Registry::start_with(ts.auth(), &[]).unwrap();
    let host = reg.host();
    push_image(&reg, "private/app", "v1");

    let wrong = Auth::Token {
        realm: ts.realm(),
        service: String::new(),
        issuer: String::new(),
        cert_pem: String::new(),
        user: "bob".into(),
        password: "not-the-pw".into(),
    };
    let c = client(DockerAuth::parse(&wrong.docker_config_json(&host)).unwrap());
    let refused_before = ts.refused();
    let e = c.resolve(&host, &repo("private/app"), &tag("v1")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e:?}");
    assert!(!e.is_retryable());
    assert!(!format!("{e} {e:?}").contains("not-the-pw"));
    assert_eq!(ts.refused() - refused_before, 1);

    let anon = client(DockerAuth::empty());
    let e = anon.blob_stream(&host, &repo("private/app"), &Digest::sha256_of(b"x"), 0).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e:?}");

    // Docker Hub style: anonymous pull tokens.
    ts.set_anonymous_pull(true);
    let r = anon.resolve(&host, &repo("private/app"), &tag("v1")).await.unwrap();
    assert_eq!(r.media_type, mt::OCI_MANIFEST);
}
