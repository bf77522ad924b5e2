//! Trust and proxies against real parts: a CNCF distribution registry serving HTTPS with a
//! certificate from a private CA (refused without that CA, pulled with it), and Debian's
//! tinyproxy as `HTTPS_PROXY` (requests tunnel through CONNECT; `NO_PROXY` and loopback go
//! direct) and as `HTTP_PROXY` (absolute-form requests).
//!
//! The TLS registry listens on 127.0.0.1 but is addressed as `registry.test`, pinned to that
//! address with `Config::resolve`: loopback names are always spoken to over plain HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;
use std::time::{Duration, Instant};

use facade_oci::media_types as mt;
use facade_oci::{Digest, Reference, RepoName};
use facade_upstream::{Client, Config, DockerAuth, Error, ErrorKind, ProxyConfig};
use test_support::registry::Registry;
use test_support::tinyproxy::Tinyproxy;
use test_support::tls_registry::{PrivateCa, TlsRegistry};

const NAME: &str = "registry.test";
const REPO: &str = "private/img";

struct World {
    tls: TlsRegistry,
    plain: Registry,
    ca: PrivateCa,
    config_digest: Digest,
    manifest_digest: Digest,
}

fn world() -> World {
    let plain = Registry::start().unwrap();
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec();
    let config_digest = plain.push_blob(REPO, &config).unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": mt::OCI_MANIFEST,
        "config": {"mediaType": mt::OCI_CONFIG, "digest": config_digest.as_str(), "size": config.len()},
        "layers": []
    }))
    .unwrap();
    let manifest_digest = plain.push_manifest(REPO, "v1", mt::OCI_MANIFEST, &manifest).unwrap();
    let ca = PrivateCa::new("registry-facade test CA").unwrap();
    let (cert, key) = ca.issue(&[NAME]).unwrap();
    let tls = TlsRegistry::start(&plain.storage(), &cert, &key).unwrap();
    World { tls, plain, ca, config_digest, manifest_digest }
}

impl World {
    fn host(&self) -> String {
        format!("{NAME}:{}", self.tls.port())
    }

    fn config(&self, ca: Option<String>, proxy: ProxyConfig) -> Config {
        Config {
            extra_ca_pem: ca,
            proxy,
            resolve: vec![(NAME.to_string(), IpAddr::from([127, 0, 0, 1]))],
            connect_timeout: Duration::from_secs(5),
            metadata_timeout: Duration::from_secs(15),
            ..Config::default()
        }
    }

    fn client(&self, ca: bool, proxy: ProxyConfig) -> Client {
        let ca = ca.then(|| self.ca.cert_pem());
        Client::new(self.config(ca, proxy), DockerAuth::empty()).unwrap()
    }

    /// Resolves the tag, fetches the manifest and the config: what composing an image asks.
    async fn pull(&self, c: &Client) -> Result<(), Error> {
        let repo = RepoName::parse(REPO).unwrap();
        let tag = Reference::Tag("v1".into());
        let r = c.resolve(&self.host(), &repo, &tag).await?;
        assert_eq!(r.digest, self.manifest_digest);
        let m = c.manifest(&self.host(), &repo, &Reference::Digest(r.digest)).await?;
        assert_eq!(m.digest, self.manifest_digest);
        c.blob_bytes(&self.host(), &repo, &self.config_digest).await?;
        Ok(())
    }
}

fn proxy_env(vars: &[(&str, String)]) -> ProxyConfig {
    ProxyConfig::from_lookup(|n| vars.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone()))
}

#[tokio::test(flavor = "multi_thread")]
async fn private_ca_is_refused_without_it_and_trusted_with_it() {
    let w = world();
    let t0 = Instant::now();
    let e = w.pull(&w.client(false, ProxyConfig::none())).await.unwrap_err();
    assert!(matches!(e, Error::Tls { .. }), "{e:?}");
    assert_eq!(e.kind(), ErrorKind::Protocol);
    assert!(!e.is_retryable());
    assert_eq!(e.detail().upstream.as_deref(), Some(w.host().as_str()));
    // Not retried: an untrusted certificate stays untrusted.
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());

    w.pull(&w.client(true, ProxyConfig::none())).await.unwrap();

    // The CA vouches for `registry.test` only: another name on the same server is refused.
    let c = Client::new(
        Config {
            resolve: vec![("other.test".into(), IpAddr::from([127, 0, 0, 1]))],
            ..w.config(Some(w.ca.cert_pem()), ProxyConfig::none())
        },
        DockerAuth::empty(),
    )
    .unwrap();
    let repo = RepoName::parse(REPO).unwrap();
    let other = format!("other.test:{}", w.tls.port());
    let e = c.manifest(&other, &repo, &Reference::Tag("v1".into())).await.unwrap_err();
    assert!(matches!(e, Error::Tls { .. }), "{e:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn https_proxy_tunnels_and_no_proxy_bypasses() {
    let w = world();
    let proxy = Tinyproxy::start().unwrap();
    let target = format!("127.0.0.1:{}", w.tls.port());

    w.pull(&w.client(true, proxy_env(&[("HTTPS_PROXY", proxy.url())]))).await.unwrap();
    let connects = proxy.connects();
    assert!(!connects.is_empty(), "no CONNECT reached the proxy");
    assert!(connects.iter().all(|c| *c == target), "{connects:?}");
    // One pooled connection serves the tag, manifest and config requests.
    assert_eq!(connects.len(), 1, "{connects:?}");

    // Lower-case variables count too.
    w.pull(&w.client(true, proxy_env(&[("https_proxy", proxy.url())]))).await.unwrap();
    assert_eq!(proxy.connects().len(), 2);

    // NO_PROXY by name, by domain suffix and `*`: straight to the registry.
    for no in [NAME, ".test", "example.com, test", "*"] {
        let env = [("HTTPS_PROXY", proxy.url()), ("NO_PROXY", no.to_string())];
        w.pull(&w.client(true, proxy_env(&env))).await.unwrap();
        assert_eq!(proxy.connects().len(), 2, "NO_PROXY={no} still went through the proxy");
    }

    // Loopback registries are never proxied.
    let repo = RepoName::parse(REPO).unwrap();
    let c = w.client(true, proxy_env(&[("HTTPS_PROXY", proxy.url()), ("HTTP_PROXY", proxy.url())]));
    c.manifest(&w.plain.host(), &repo, &Reference::Tag("v1".into())).await.unwrap();
    assert_eq!(proxy.requests().len(), 2, "{:?}", proxy.requests());

    // The CA is still checked end to end through the tunnel.
    let e = w.pull(&w.client(false, proxy_env(&[("HTTPS_PROXY", proxy.url())]))).await.unwrap_err();
    assert!(matches!(e, Error::Tls { .. }), "{e:?}");
}

/// Plain-HTTP upstreams go to `HTTP_PROXY` as absolute-form requests; the proxy resolves the
/// name itself (here it cannot, and says so with a 5xx).
#[tokio::test(flavor = "multi_thread")]
async fn http_proxy_gets_absolute_form_requests() {
    let proxy = Tinyproxy::start().unwrap();
    let config = Config {
        plain_http_hosts: vec!["mirror.invalid".into()],
        proxy: proxy_env(&[("HTTP_PROXY", proxy.url())]),
        retry_budget: Duration::ZERO,
        ..Config::default()
    };
    let c = Client::new(config, DockerAuth::empty()).unwrap();
    let repo = RepoName::parse(REPO).unwrap();
    let e = c.manifest("mirror.invalid:5000", &repo, &Reference::Tag("v1".into())).await.unwrap_err();
    assert_eq!(e.detail().upstream.as_deref(), Some("mirror.invalid:5000"), "{e:?}");
    let requests = proxy.requests();
    assert_eq!(requests, ["GET http://mirror.invalid:5000/v2/private/img/manifests/v1 HTTP/1.1"], "{e:?}");
}
