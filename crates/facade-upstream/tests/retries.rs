//! Retries against a real CNCF distribution registry behind the fault-injecting TCP proxy: the
//! first manifest, config or tag answer is cut or reset, and one client call still succeeds;
//! a 404 is asked once; a registry that keeps failing is given up on within the retry budget.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use facade_oci::media_types as mt;
use facade_oci::{Digest, Reference, RepoName};
use facade_upstream::{Client, Config, DEFAULT_RETRY_BUDGET, DockerAuth, ErrorKind, ProxyConfig, UpstreamMetrics};
use test_support::fault_proxy::{FaultProxy, Faults};
use test_support::registry::Registry;

struct World {
    // The proxy goes before the registry it points at.
    proxy: FaultProxy,
    _reg: Registry,
    config: Vec<u8>,
    config_digest: Digest,
    manifest_digest: Digest,
}

const REPO: &str = "retry/img";

fn world() -> World {
    let reg = Registry::start().unwrap();
    let layer = b"not really a layer".to_vec();
    let layer_digest = reg.push_blob(REPO, &layer).unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_digest.as_str()]},
        "config": {"Env": ["PATH=/usr/bin"]},
        // Long enough that a cut inside the body leaves the headers whole.
        "history": [{"created_by": "x".repeat(2000)}]
    }))
    .unwrap();
    let config_digest = reg.push_blob(REPO, &config).unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": mt::OCI_MANIFEST,
        "config": {"mediaType": mt::OCI_CONFIG, "digest": config_digest.as_str(), "size": config.len()},
        "layers": [{"mediaType": mt::OCI_LAYER_GZIP, "digest": layer_digest.as_str(), "size": layer.len()}],
        "annotations": {"org.example.pad": "p".repeat(1000)}
    }))
    .unwrap();
    let manifest_digest = reg.push_manifest(REPO, "v1", mt::OCI_MANIFEST, &manifest).unwrap();
    let proxy = FaultProxy::start(reg.addr).unwrap();
    World { proxy, _reg: reg, config, config_digest, manifest_digest }
}

fn repo() -> RepoName {
    RepoName::parse(REPO).unwrap()
}

fn tag(t: &str) -> Reference {
    Reference::Tag(t.into())
}

/// A fresh client (its own pool, so its first request opens the first connection), retrying
/// within the production budget.
fn client() -> (Client, UpstreamMetrics) {
    let metrics = UpstreamMetrics::register(&prometheus::Registry::new()).unwrap();
    let config = Config { retry_budget: DEFAULT_RETRY_BUDGET, proxy: ProxyConfig::none(), ..Config::default() };
    (Client::with_metrics(config, DockerAuth::empty(), Some(metrics.clone())).unwrap(), metrics)
}

/// Bytes the proxy sends back for one clean exchange made by `f` on a fresh connection.
async fn answer_size<F, Fut>(w: &World, f: F) -> u64
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    w.proxy.clear_faults();
    w.proxy.reset_counters();
    f(client().0).await;
    let n = w.proxy.bytes_to_client();
    w.proxy.reset_counters();
    n
}

#[tokio::test(flavor = "multi_thread")]
async fn first_manifest_answer_cut_mid_body_is_retried() {
    let w = world();
    let host = w.proxy.host();
    let size = answer_size(&w, |c| {
        let host = host.clone();
        async move {
            c.manifest(&host, &repo(), &tag("v1")).await.unwrap();
        }
    })
    .await;
    // The first connection ends (FIN) 100 bytes before the end of its body.
    w.proxy.set_faults(Faults { cut_after: Some(size - 100), connections: Some(1), ..Faults::default() });
    let (c, metrics) = client();
    let m = c.manifest(&host, &repo(), &tag("v1")).await.unwrap();
    assert_eq!(m.digest, w.manifest_digest);
    assert_eq!(w.proxy.count_requests("GET", "/manifests/v1"), 2);
    assert_eq!(metrics.retries("manifest", "body"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn first_config_answer_reset_is_retried() {
    let w = world();
    let host = w.proxy.host();
    let digest = w.config_digest.clone();
    let size = answer_size(&w, |c| {
        let (host, digest) = (host.clone(), digest.clone());
        async move {
            c.blob_bytes(&host, &repo(), &digest).await.unwrap();
        }
    })
    .await;
    // The first connection is reset in the middle of the config's body.
    w.proxy.set_faults(Faults { cut_after: Some(size / 2), reset: true, connections: Some(1), ..Faults::default() });
    let (c, metrics) = client();
    let bytes = c.blob_bytes(&host, &repo(), &w.config_digest).await.unwrap();
    assert_eq!(&bytes[..], &w.config[..]);
    let path = format!("/blobs/{}", w.config_digest);
    assert_eq!(w.proxy.count_requests("GET", &path), 2);
    let retried = metrics.retries("config", "reset") + metrics.retries("config", "body");
    assert_eq!(retried, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn first_tag_head_answer_reset_is_retried() {
    let w = world();
    let host = w.proxy.host();
    // Reset inside the response head: nothing usable arrived.
    w.proxy.set_faults(Faults { cut_after: Some(20), reset: true, connections: Some(1), ..Faults::default() });
    let (c, metrics) = client();
    let r = c.resolve(&host, &repo(), &tag("v1")).await.unwrap();
    assert_eq!(r.digest, w.manifest_digest);
    assert_eq!(w.proxy.count_requests("HEAD", "/manifests/v1"), 2);
    assert_eq!(w.proxy.count_requests("GET", "/manifests/"), 0, "HEAD answered; no GET fallback");
    assert_eq!(metrics.retries("tag", "reset"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_404_is_asked_once() {
    let w = world();
    let host = w.proxy.host();
    let (c, metrics) = client();
    let e = c.manifest(&host, &repo(), &tag("missing")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(w.proxy.count_requests("GET", "/manifests/missing"), 1);
    let e = c.resolve(&host, &repo(), &tag("missing")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(w.proxy.count_requests("HEAD", "/manifests/missing"), 1);
    let absent = Digest::sha256_of(b"absent");
    let e = c.blob_bytes(&host, &repo(), &absent).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(w.proxy.count_requests("GET", &format!("/blobs/{absent}")), 1);
    let total: u64 = ["reset", "body", "connect", "status"].iter().map(|r| metrics.retries("manifest", r)).sum();
    assert_eq!(total, 0);
}

/// Every connection is cut in the response head: the client retries a few times and gives up
/// inside the budget, with the last (retryable) error. This bounds the sequence; it does not
/// time how fast it is.
#[tokio::test(flavor = "multi_thread")]
async fn a_registry_that_keeps_failing_is_given_up_on_within_the_budget() {
    let w = world();
    let host = w.proxy.host();
    w.proxy.set_faults(Faults { cut_after: Some(20), reset: true, ..Faults::default() });
    let (c, metrics) = client();
    let t0 = Instant::now();
    let e = c.manifest(&host, &repo(), &tag("v1")).await.unwrap_err();
    let took = t0.elapsed();
    assert!(e.is_retryable(), "{e:?}");
    let tries = w.proxy.count_requests("GET", "/manifests/v1");
    eprintln!("gave up after {tries} tries in {took:?}");
    assert!(tries >= 3, "only {tries} tries in {took:?}");
    assert!(tries <= 7, "{tries} tries");
    assert_eq!(metrics.retries("manifest", "reset") as usize, tries - 1);
    assert!(took <= DEFAULT_RETRY_BUDGET + Duration::from_secs(2), "retries took {took:?}");
    // Well inside containerd's 30 s wait for response headers.
    assert!(took < Duration::from_secs(30));
}
