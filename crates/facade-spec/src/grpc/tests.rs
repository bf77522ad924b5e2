//! The `remote` provider against real tonic servers on loopback.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::Status;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use super::*;
use crate::fixed::FixedSpecProvider;
use crate::proto::GetImageSpecResponse;
use crate::proto::spec_provider_server::{SpecProvider as SpecService, SpecProviderServer};
use crate::server::ServerTls;

const BASE: &str = "127.0.0.1:5000/base:latest";

fn specs() -> FixedSpecProvider {
    FixedSpecProvider::parse(&format!(
        r#"{{"ws-1": {{"baseRef": "{BASE}", "contentLayer": [{{"direct": {{"content": "aGVsbG8="}}}}]}}}}"#
    ))
    .unwrap()
}

fn fast() -> GrpcConfig {
    GrpcConfig { timeout: Duration::from_secs(5), max_attempts: 4, ..GrpcConfig::default() }
}

fn plain(addr: SocketAddr) -> GrpcEndpoint {
    GrpcEndpoint { addr: format!("dns:///{addr}"), tls: None }
}

struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Graceful stop: the server sends GOAWAY on open connections and closes them.
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if tokio::time::timeout(Duration::from_secs(5), &mut self.task).await.is_err() {
            self.task.abort();
        }
    }
}

async fn listener(addr: &str) -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind(addr).await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

async fn start_fixed(tls: Option<ServerTls>) -> Running {
    let (l, _) = listener("127.0.0.1:0").await;
    start_fixed_on(l, tls)
}

fn start_fixed_on(l: TcpListener, tls: Option<ServerTls>) -> Running {
    let addr = l.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        crate::server::serve(l, specs(), tls, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Running { addr, stop: Some(tx), task }
}

/// A spec server that answers from a script, counting calls.
#[derive(Clone, Default)]
struct Scripted {
    answers: Arc<Mutex<VecDeque<std::result::Result<GetImageSpecResponse, Status>>>>,
    calls: Arc<AtomicUsize>,
}

impl Scripted {
    fn then(self, r: std::result::Result<GetImageSpecResponse, Status>) -> Self {
        self.answers.lock().unwrap().push_back(r);
        self
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[tonic::async_trait]
impl SpecService for Scripted {
    async fn get_image_spec(
        &self,
        _request: tonic::Request<GetImageSpecRequest>,
    ) -> std::result::Result<tonic::Response<GetImageSpecResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let next = self.answers.lock().unwrap().pop_front();
        match next {
            Some(r) => r.map(tonic::Response::new),
            None => Err(Status::internal("unexpected call")),
        }
    }
}

async fn start_scripted(s: Scripted) -> Running {
    let (l, addr) = listener("127.0.0.1:0").await;
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        Server::builder()
            .add_service(SpecProviderServer::new(s))
            .serve_with_incoming_shutdown(TcpIncoming::from(l), async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    Running { addr, stop: Some(tx), task }
}

fn ok_response() -> GetImageSpecResponse {
    GetImageSpecResponse { spec: Some(crate::proto::ImageSpec { base_ref: BASE.into(), ..Default::default() }) }
}

fn gathered(reg: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    reg.gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter().map(move |m| (f.get_field_type(), m)))
        .filter(|(_, m)| labels.iter().all(|(k, v)| m.get_label().iter().any(|l| l.name() == *k && l.value() == *v)))
        .map(|(t, m)| match t {
            prometheus::proto::MetricType::COUNTER => m.get_counter().get_value(),
            _ => m.get_histogram().get_sample_count() as f64,
        })
        .sum()
}

#[tokio::test]
async fn gets_specs_over_grpc_and_maps_not_found() {
    let server = start_fixed(None).await;
    let reg = prometheus::Registry::new();
    let p = GrpcSpecProvider::new("remote", &[plain(server.addr)], fast())
        .unwrap()
        .with_metrics(SpecMetrics::register(&reg).unwrap());
    let got = p.get_spec("ws-1").await.unwrap();
    assert_eq!(got, specs().get_spec("ws-1").await.unwrap());
    let e = p.get_spec("nope").await.unwrap_err();
    assert!(matches!(&e, Error::NotFound { provider, id } if provider == "remote" && id == "nope"), "{e:?}");
    assert_eq!(gathered(&reg, "registry_facade_spec_requests_total", &[("outcome", "ok")]), 1.0);
    assert_eq!(gathered(&reg, "registry_facade_spec_requests_total", &[("outcome", "not_found")]), 1.0);
    assert_eq!(gathered(&reg, "registry_facade_spec_request_duration_seconds", &[("provider", "remote")]), 2.0);
    server.stop().await;
}

#[tokio::test]
async fn retries_unavailable_with_backoff() {
    let s = Scripted::default()
        .then(Err(Status::unavailable("starting")))
        .then(Err(Status::unavailable("starting")))
        .then(Ok(ok_response()));
    let server = start_scripted(s.clone()).await;
    let reg = prometheus::Registry::new();
    let p = GrpcSpecProvider::new("remote", &[plain(server.addr)], fast())
        .unwrap()
        .with_metrics(SpecMetrics::register(&reg).unwrap());
    assert_eq!(p.get_spec("ws").await.unwrap().base_ref.to_string(), BASE);
    assert_eq!(s.calls(), 3);
    assert_eq!(gathered(&reg, "registry_facade_spec_retries_total", &[]), 2.0);
    server.stop().await;
}

#[tokio::test]
async fn gives_up_after_the_attempts_and_does_not_retry_other_codes() {
    let s = Scripted::default()
        .then(Err(Status::unavailable("down")))
        .then(Err(Status::unavailable("down")))
        .then(Err(Status::internal("boom")))
        .then(Err(Status::permission_denied("who are you")))
        .then(Ok(GetImageSpecResponse { spec: None }))
        .then(Ok(GetImageSpecResponse { spec: Some(crate::proto::ImageSpec::default()) }));
    let server = start_scripted(s.clone()).await;
    let cfg = GrpcConfig { max_attempts: 2, ..fast() };
    let p = GrpcSpecProvider::new("remote", &[plain(server.addr)], cfg).unwrap();
    assert!(matches!(p.get_spec("ws").await, Err(Error::Unavailable { .. })));
    assert_eq!(s.calls(), 2);
    assert!(matches!(p.get_spec("ws").await, Err(Error::Unavailable { .. })));
    assert_eq!(s.calls(), 3, "INTERNAL is not retried");
    assert!(matches!(p.get_spec("ws").await, Err(Error::Config(_))));
    let e = p.get_spec("ws").await.unwrap_err();
    assert!(matches!(&e, Error::InvalidSpec { reason, .. } if reason.contains("no spec")), "{e:?}");
    let e = p.get_spec("ws").await.unwrap_err();
    assert!(matches!(&e, Error::InvalidSpec { reason, .. } if reason.contains("baseRef")), "{e:?}");
    assert_eq!(s.calls(), 6);
    server.stop().await;
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_within_the_deadline() {
    // Accepts connections and reads nothing: the HTTP/2 handshake never completes.
    let (l, addr) = listener("127.0.0.1:0").await;
    let hold = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = l.accept().await {
            conns.push(c);
        }
    });
    let reg = prometheus::Registry::new();
    let cfg = GrpcConfig { timeout: Duration::from_millis(400), ..fast() };
    let p = GrpcSpecProvider::new("remote", &[plain(addr)], cfg)
        .unwrap()
        .with_metrics(SpecMetrics::register(&reg).unwrap());
    let started = std::time::Instant::now();
    let e = p.get_spec("ws").await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
    assert!(took >= Duration::from_millis(350) && took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(
        gathered(&reg, "registry_facade_spec_requests_total", &[("outcome", "timeout")]),
        1.0,
        "{e:?} {:?}",
        reg.gather()
    );
    hold.abort();
}

#[tokio::test]
async fn a_down_server_fails_fast_and_is_reconnected_when_it_returns() {
    let (l, addr) = listener("127.0.0.1:0").await;
    drop(l);
    let p = GrpcSpecProvider::new("remote", &[plain(addr)], fast()).unwrap();
    let started = std::time::Instant::now();
    let e = p.get_spec("ws-1").await.unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "a refused connection took {:?}", started.elapsed());

    let (l, _) = listener(&addr.to_string()).await;
    let server = start_fixed_on(l, None);
    assert!(p.get_spec("ws-1").await.is_ok(), "connects once the server is up");
    server.stop().await;
    let e = p.get_spec("ws-1").await.unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
    let (l, _) = listener(&addr.to_string()).await;
    let server = start_fixed_on(l, None);
    assert!(p.get_spec("ws-1").await.is_ok(), "reconnects after a restart");
    server.stop().await;
}

#[tokio::test]
async fn endpoints_are_tried_in_order() {
    let (l, down) = listener("127.0.0.1:0").await;
    drop(l);
    let a =
        start_scripted(Scripted::default().then(Err(Status::not_found("no"))).then(Err(Status::not_found("no")))).await;
    let b = start_fixed(None).await;
    let p = GrpcSpecProvider::new("remote", &[plain(down), plain(a.addr), plain(b.addr)], fast()).unwrap();
    assert!(p.get_spec("ws-1").await.is_ok(), "the third endpoint has it");
    let e = p.get_spec("nope").await.unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "a down endpoint might have had it: {e:?}");
    let p = GrpcSpecProvider::new("remote", &[plain(b.addr), plain(b.addr)], fast()).unwrap();
    assert!(matches!(p.get_spec("nope").await, Err(Error::NotFound { .. })), "all said NOT_FOUND");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn large_direct_layers_fit() {
    let big = vec![7u8; 6 << 20];
    let s = Scripted::default().then(Ok(GetImageSpecResponse {
        spec: Some(crate::proto::ImageSpec {
            base_ref: BASE.into(),
            content_layer: vec![crate::proto::ContentLayer {
                spec: Some(crate::proto::content_layer::Spec::Direct(crate::proto::DirectContentLayer {
                    content: big.clone(),
                })),
            }],
            ..Default::default()
        }),
    }));
    let server = start_scripted(s).await;
    let p = GrpcSpecProvider::new("remote", &[plain(server.addr)], fast()).unwrap();
    let spec = p.get_spec("ws").await.unwrap();
    assert!(matches!(&spec.content_layers[0], crate::ContentLayer::Direct { content } if content.len() == big.len()));
    server.stop().await;
}

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
    stranger: (String, String),
}

fn ca(name: &str) -> (Issuer<'static, KeyPair>, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let pem = params.self_signed(&key).unwrap().pem();
    (Issuer::new(params, key), pem)
}

fn leaf(issuer: &Issuer<'static, KeyPair>, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.extended_key_usages = vec![usage];
    (params.signed_by(&key, issuer).unwrap().pem(), key.serialize_pem())
}

fn pki() -> Pki {
    let (root, ca_pem) = ca("test ca");
    let (other, _) = ca("other ca");
    Pki {
        server: leaf(&root, &["ws-manager"], ExtendedKeyUsagePurpose::ServerAuth),
        client: leaf(&root, &["registry-facade"], ExtendedKeyUsagePurpose::ClientAuth),
        stranger: leaf(&other, &["registry-facade"], ExtendedKeyUsagePurpose::ClientAuth),
        ca_pem,
    }
}

fn tls_endpoint(addr: SocketAddr, pki: &Pki, identity: Option<&(String, String)>, name: &str) -> GrpcEndpoint {
    GrpcEndpoint {
        addr: addr.to_string(),
        tls: Some(ClientTls {
            ca_pem: pki.ca_pem.clone().into_bytes(),
            identity: identity.map(|(c, k)| (c.clone().into_bytes(), k.clone().into_bytes())),
            server_name: Some(name.into()),
        }),
    }
}

#[tokio::test]
async fn speaks_tls_and_mutual_tls() {
    let pki = pki();
    let server_tls = |mutual: bool| ServerTls {
        cert_pem: pki.server.0.clone().into_bytes(),
        key_pem: pki.server.1.clone().into_bytes(),
        client_ca_pem: mutual.then(|| pki.ca_pem.clone().into_bytes()),
    };
    let cfg = GrpcConfig { timeout: Duration::from_secs(3), ..fast() };

    let tls = start_fixed(Some(server_tls(false))).await;
    let p = GrpcSpecProvider::new("remote", &[tls_endpoint(tls.addr, &pki, None, "ws-manager")], cfg.clone()).unwrap();
    assert!(p.get_spec("ws-1").await.is_ok(), "server-only TLS");
    let p =
        GrpcSpecProvider::new("remote", &[tls_endpoint(tls.addr, &pki, None, "somebody-else")], cfg.clone()).unwrap();
    assert!(p.get_spec("ws-1").await.is_err(), "the server name is verified");
    let p = GrpcSpecProvider::new("remote", &[plain(tls.addr)], cfg.clone()).unwrap();
    assert!(p.get_spec("ws-1").await.is_err(), "plaintext to a TLS server");
    tls.stop().await;

    let mtls = start_fixed(Some(server_tls(true))).await;
    let p =
        GrpcSpecProvider::new("remote", &[tls_endpoint(mtls.addr, &pki, Some(&pki.client), "ws-manager")], cfg.clone())
            .unwrap();
    assert!(p.get_spec("ws-1").await.is_ok(), "mutual TLS");
    assert!(matches!(p.get_spec("nope").await, Err(Error::NotFound { .. })));
    for (what, identity) in [("no client certificate", None), ("a stranger's certificate", Some(&pki.stranger))] {
        let p = GrpcSpecProvider::new("remote", &[tls_endpoint(mtls.addr, &pki, identity, "ws-manager")], cfg.clone())
            .unwrap();
        let started = std::time::Instant::now();
        let e = p.get_spec("ws-1").await.unwrap_err();
        assert!(!matches!(e, Error::NotFound { .. }), "{what}: {e:?}");
        assert!(started.elapsed() < Duration::from_secs(4), "{what}: took {:?}", started.elapsed());
    }
    mtls.stop().await;
}

#[tokio::test]
async fn unusable_certificates_are_refused_when_building() {
    let pki = pki();
    let mut ep = tls_endpoint("127.0.0.1:1".parse().unwrap(), &pki, None, "ws-manager");
    if let Some(t) = &mut ep.tls {
        t.ca_pem = b"not a certificate".to_vec();
    }
    assert!(matches!(GrpcSpecProvider::new("remote", &[ep], fast()), Err(Error::Config(_))));
    let mut ep = tls_endpoint("127.0.0.1:1".parse().unwrap(), &pki, Some(&pki.client), "ws-manager");
    if let Some(t) = &mut ep.tls {
        t.identity = Some((pki.client.0.clone().into_bytes(), b"not a key".to_vec()));
    }
    assert!(matches!(GrpcSpecProvider::new("remote", &[ep], fast()), Err(Error::Config(_))));
    assert!(matches!(GrpcSpecProvider::new("remote", &[], fast()), Err(Error::Config(_))));
}

#[test]
fn target_uris() {
    let ok = [
        ("dns:///ws-manager:8080", false, "http://ws-manager:8080/"),
        ("dns://8.8.8.8/ws-manager:8080", true, "https://ws-manager:8080/"),
        ("dns:ws-manager:8080", false, "http://ws-manager:8080/"),
        ("passthrough:///10.0.0.1:1", false, "http://10.0.0.1:1/"),
        ("127.0.0.1:9000", true, "https://127.0.0.1:9000/"),
        ("[::1]:9000", false, "http://[::1]:9000/"),
        ("http://h:1", false, "http://h:1/"),
        ("https://h:1/", true, "https://h:1/"),
    ];
    for (addr, tls, want) in ok {
        assert_eq!(target_uri(addr, tls).unwrap().to_string(), want, "{addr}");
    }
    for (addr, tls) in [
        ("", false),
        ("unix:///run/ws.sock", false),
        ("xds:///svc", false),
        ("https://h:1", false),
        ("http://h:1", true),
        ("h:1/path", false),
        ("dns:///", false),
        ("user@h:1", false),
    ] {
        assert!(matches!(target_uri(addr, tls), Err(Error::Config(_))), "{addr} should be refused");
    }
}
