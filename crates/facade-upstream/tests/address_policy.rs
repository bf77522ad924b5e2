//! The address policy against request forgery, enforced by the real client against a scripted
//! hostile registry on loopback: redirects into link-local, metadata or the facade's own
//! listeners are refused before anything is sent there, and so is a connection to a listener
//! of the facade itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use facade_oci::{Digest, RepoName};
use facade_upstream::ssrf::Policy;
use facade_upstream::{Client, Config, DockerAuth, ErrorKind};
use test_support::hostile_registry::{Behaviour, HostileRegistry};

fn client() -> Client {
    Client::new(Config::default(), DockerAuth::default()).unwrap()
}

/// A listener standing in for one of the facade's own ports; counts connections it accepts.
fn own_listener() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for c in l.incoming().take(16) {
            if c.is_ok() {
                count.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn redirects_to_link_local_metadata_or_own_listeners_are_refused() {
    let reg = HostileRegistry::start().unwrap();
    let (own, accepted) = own_listener();
    let c = client();
    c.set_address_policy(Policy::new(vec![own], vec![]));
    let repo = RepoName::parse("x/y").unwrap();
    let digest = Digest::sha256_of(b"anything");
    for target in [
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://[fe80::1]:80/x".to_string(),
        format!("http://{own}/metrics"),
        format!("http://localhost:{}/metrics", own.port()),
    ] {
        reg.blob("x/y", digest.as_str(), Behaviour::Redirect { location: target.clone() });
        let err = c.blob_stream(&reg.host(), &repo, &digest, 0).await.expect_err(&target);
        assert_eq!(err.kind(), ErrorKind::Denied, "{target}: {err}");
        assert!(!err.is_retryable());
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "a refused redirect target was connected to");
}

#[tokio::test]
async fn a_registry_on_the_facades_own_listener_is_refused_and_others_are_not() {
    let reg = HostileRegistry::start().unwrap();
    let addr: SocketAddr = reg.host().parse().unwrap();
    let repo = RepoName::parse("x/y").unwrap();
    let digest = Digest::sha256_of(b"layer");
    reg.blob("x/y", digest.as_str(), Behaviour::blob(b"layer".to_vec()));

    let c = client();
    // Allowed by default: in-cluster registries and every test live on loopback/private ranges.
    assert!(c.blob_stream(&reg.host(), &repo, &digest, 0).await.is_ok());

    c.set_address_policy(Policy::new(vec![addr], vec![]));
    let err = c.blob_stream(&reg.host(), &repo, &digest, 0).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");

    c.set_address_policy(Policy::new(vec![], vec!["127.0.0.0/8".parse().unwrap()]));
    let err = c.blob_stream(&reg.host(), &repo, &digest, 0).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
}
