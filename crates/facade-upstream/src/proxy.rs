//! Forward proxies from `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`, and the connector that honours
//! them: HTTPS destinations through an HTTP `CONNECT` tunnel (hyper-util's `Tunnel`), plain
//! HTTP destinations as absolute-form requests to the proxy, everything else direct.
//!
//! The rules are Go's (`net/http.ProxyFromEnvironment`, which containerd and the reference
//! facade use on the same node): the upper-case variable wins over the lower-case one, an
//! empty value is unset, a value without a scheme means `http://`, and loopback hosts are never
//! proxied. `NO_PROXY` entries are host names that also match their subdomains (a leading dot is
//! allowed), IP addresses, CIDR ranges, or `*` for everything; they are compared with the host
//! name, never with a port.

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::{Intercept, Matcher};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use crate::dns::DnsPool;
use crate::ssrf::{RefusedPeer, SharedPolicy};
use url::Url;

use crate::error::{BoxError, Error, Result};
use crate::host::is_loopback;

/// The proxy settings, as the environment gives them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Proxy for `http://` upstreams (`HTTP_PROXY`).
    pub http: Option<String>,
    /// Proxy for `https://` upstreams (`HTTPS_PROXY`).
    pub https: Option<String>,
    /// Hosts reached directly (`NO_PROXY`), comma-separated.
    pub no_proxy: Option<String>,
}

impl ProxyConfig {
    /// No proxy at all, whatever the environment says.
    pub fn none() -> ProxyConfig {
        ProxyConfig::default()
    }

    /// From the process environment.
    pub fn from_env() -> ProxyConfig {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// From any variable lookup (tests inject theirs).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> ProxyConfig {
        let first = |names: [&str; 2]| names.iter().filter_map(|n| lookup(n)).find(|v| !v.trim().is_empty());
        ProxyConfig {
            http: first(["HTTP_PROXY", "http_proxy"]),
            https: first(["HTTPS_PROXY", "https_proxy"]),
            no_proxy: first(["NO_PROXY", "no_proxy"]),
        }
    }

    /// Whether any proxy is set.
    pub fn is_set(&self) -> bool {
        self.http.is_some() || self.https.is_some()
    }
}

/// Proxy URLs may carry credentials (`http://user:pass@proxy:3128`); only the host is shown.
impl fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = |v: &Option<String>| v.as_deref().map(|v| normalize(v).map(|u| redact(&u)).unwrap_or_default());
        f.debug_struct("ProxyConfig")
            .field("http", &shown(&self.http))
            .field("https", &shown(&self.https))
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

fn normalize(value: &str) -> std::result::Result<Url, String> {
    let value = value.trim();
    let text = if value.contains("://") { value.to_string() } else { format!("http://{value}") };
    Url::parse(&text).map_err(|e| format!("not a URL ({e})"))
}

fn redact(url: &Url) -> String {
    match (url.host_str(), url.port_or_known_default()) {
        (Some(h), Some(p)) => format!("{}://{h}:{p}", url.scheme()),
        (Some(h), None) => format!("{}://{h}", url.scheme()),
        _ => String::new(),
    }
}

/// Checks one proxy variable: an `http://` URL with a host. TLS to the proxy itself and SOCKS
/// are refused rather than silently bypassed.
fn checked(var: &str, value: &Option<String>) -> Result<Option<String>> {
    let Some(value) = value else { return Ok(None) };
    let bad = |reason: String| Error::Config { reason: format!("{var}: {reason}") };
    let url = normalize(value).map_err(bad)?;
    if url.scheme() != "http" {
        return Err(bad(format!("only http:// proxies are supported, not {}://", url.scheme())));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("no proxy host".into()));
    }
    Ok(Some(url.to_string()))
}

/// Where a connection goes.
#[derive(Clone)]
pub(crate) enum Route {
    Direct,
    /// `CONNECT` through this proxy (HTTPS destinations).
    Tunnel(Intercept),
    /// Absolute-form requests to this proxy (plain HTTP destinations).
    Forward(Intercept),
}

/// The compiled proxy rules.
pub(crate) struct Proxies {
    matcher: Option<Matcher>,
}

impl Proxies {
    pub(crate) fn new(config: &ProxyConfig) -> Result<Proxies> {
        let http = checked("HTTP_PROXY", &config.http)?;
        let https = checked("HTTPS_PROXY", &config.https)?;
        if http.is_none() && https.is_none() {
            return Ok(Proxies { matcher: None });
        }
        let matcher = Matcher::builder()
            .http(http.unwrap_or_default())
            .https(https.unwrap_or_default())
            .no(config.no_proxy.clone().unwrap_or_default())
            .build();
        Ok(Proxies { matcher: Some(matcher) })
    }

    pub(crate) fn route(&self, dst: &Uri) -> Route {
        let Some(m) = &self.matcher else { return Route::Direct };
        if dst.authority().is_some_and(|a| is_loopback(a.as_str())) {
            return Route::Direct;
        }
        match (m.intercept(dst), dst.scheme_str()) {
            (Some(i), Some("https")) => Route::Tunnel(i),
            (Some(i), _) => Route::Forward(i),
            (None, _) => Route::Direct,
        }
    }
}

/// The TCP connector under TLS: direct, tunnelled or to a forward proxy, with pinned names.
#[derive(Clone)]
pub(crate) struct Connector {
    direct: HttpConnector<DnsPool>,
    proxies: Arc<Proxies>,
    resolve: Arc<[(String, IpAddr)]>,
    policy: SharedPolicy,
}

impl Connector {
    pub(crate) fn new(
        direct: HttpConnector<DnsPool>,
        proxies: Arc<Proxies>,
        resolve: &[(String, IpAddr)],
        policy: SharedPolicy,
    ) -> Connector {
        let resolve = resolve.iter().map(|(h, a)| (h.to_ascii_lowercase(), *a)).collect();
        Connector { direct, proxies, resolve, policy }
    }

    /// `dst` with a pinned host replaced by its address (the port made explicit).
    fn pinned(&self, dst: Uri) -> Uri {
        let Some(host) = dst.host() else { return dst };
        let Some((_, addr)) = self.resolve.iter().find(|(h, _)| h.eq_ignore_ascii_case(host)) else { return dst };
        let https = dst.scheme_str() == Some("https");
        let port = dst.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = match addr {
            IpAddr::V4(a) => format!("{a}:{port}"),
            IpAddr::V6(a) => format!("[{a}]:{port}"),
        };
        let scheme = if https { "https" } else { "http" };
        format!("{scheme}://{authority}/").parse().unwrap_or(dst)
    }
}

type Connecting = Pin<Box<dyn Future<Output = std::result::Result<Conn, BoxError>> + Send>>;

impl Service<Uri> for Connector {
    type Response = Conn;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::result::Result<(), BoxError>> {
        // `HttpConnector` is always ready; each call clones it.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Connecting {
        let route = self.proxies.route(&dst);
        let target = self.pinned(dst);
        let mut direct = self.direct.clone();
        let policy = self.policy.clone();
        Box::pin(async move {
            match route {
                Route::Direct => {
                    let io = direct.call(target).await?;
                    // The address really connected to, after DNS (whatever a name resolved
                    // to, an IP literal, a pinned name): nothing has been sent on it yet. A
                    // proxied connection's target is the proxy operator's to police.
                    let peer = io.inner().peer_addr()?;
                    let verdict = policy.read().unwrap_or_else(std::sync::PoisonError::into_inner).check_connect(peer);
                    if let Err(refusal) = verdict {
                        tracing::warn!(%peer, %refusal, "refused an upstream connection");
                        return Err(Box::new(RefusedPeer(refusal)) as BoxError);
                    }
                    Ok(Conn { io, forward: false })
                }
                Route::Tunnel(proxy) => {
                    tracing::trace!(proxy = %proxy.uri(), "upstream connection through CONNECT");
                    let mut tunnel = Tunnel::new(proxy.uri().clone(), direct);
                    if let Some(auth) = proxy.basic_auth() {
                        tunnel = tunnel.with_auth(auth.clone());
                    }
                    std::future::poll_fn(|cx| tunnel.poll_ready(cx)).await?;
                    Ok(Conn { io: tunnel.call(target).await?, forward: false })
                }
                Route::Forward(proxy) => Ok(Conn { io: direct.call(proxy.uri().clone()).await?, forward: true }),
            }
        })
    }
}

/// A TCP connection, marked as going to a forward proxy when it does (hyper then sends
/// absolute-form request targets on it).
pub(crate) struct Conn {
    io: TokioIo<TcpStream>,
    forward: bool,
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.forward)
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> ProxyConfig {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        ProxyConfig::from_lookup(|n| vars.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone()))
    }

    fn route(p: &Proxies, url: &str) -> &'static str {
        match p.route(&url.parse().unwrap()) {
            Route::Direct => "direct",
            Route::Tunnel(_) => "tunnel",
            Route::Forward(_) => "forward",
        }
    }

    #[test]
    fn upper_case_wins_and_empty_is_unset() {
        let c = env(&[("HTTPS_PROXY", "http://a:1"), ("https_proxy", "http://b:2"), ("HTTP_PROXY", "")]);
        assert_eq!(c.https.as_deref(), Some("http://a:1"));
        assert_eq!(c.http, None);
        let c = env(&[("https_proxy", "b:2"), ("no_proxy", "x")]);
        assert_eq!((c.https.as_deref(), c.no_proxy.as_deref()), (Some("b:2"), Some("x")));
        assert!(!env(&[]).is_set());
    }

    #[test]
    fn routes_by_scheme_no_proxy_and_loopback() {
        let p = Proxies::new(&env(&[
            ("HTTPS_PROXY", "proxy.internal:3128"),
            ("HTTP_PROXY", "http://proxy.internal:3128"),
            ("NO_PROXY", "corp.example, .svc, 10.0.0.0/8, 192.168.1.7"),
        ]))
        .unwrap();
        assert_eq!(route(&p, "https://quay.io/v2/"), "tunnel");
        assert_eq!(route(&p, "http://mirror.lan:5000/v2/"), "forward");
        assert_eq!(route(&p, "https://corp.example/v2/"), "direct");
        assert_eq!(route(&p, "https://registry.corp.example/v2/"), "direct");
        assert_eq!(route(&p, "https://notcorp.example/v2/"), "tunnel");
        assert_eq!(route(&p, "https://registry.svc:5000/v2/"), "direct");
        assert_eq!(route(&p, "https://10.1.2.3:5000/v2/"), "direct");
        assert_eq!(route(&p, "https://192.168.1.7/v2/"), "direct");
        assert_eq!(route(&p, "https://192.168.1.8/v2/"), "tunnel");
        for loopback in ["http://127.0.0.1:5000/", "http://localhost:5000/", "https://[::1]:5000/"] {
            assert_eq!(route(&p, loopback), "direct", "{loopback}");
        }
        let all = Proxies::new(&env(&[("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", "*")])).unwrap();
        assert_eq!(route(&all, "https://quay.io/"), "direct");
        let none = Proxies::new(&ProxyConfig::none()).unwrap();
        assert_eq!(route(&none, "https://quay.io/"), "direct");
        // Only HTTPS_PROXY: plain HTTP goes direct.
        let https_only = Proxies::new(&env(&[("HTTPS_PROXY", "http://p:1")])).unwrap();
        assert_eq!(route(&https_only, "http://mirror.lan/"), "direct");
    }

    #[test]
    fn refuses_proxies_it_cannot_speak() {
        for bad in ["socks5://p:1080", "https://p:3128", "http://", "http://[::1"] {
            let e = Proxies::new(&env(&[("HTTPS_PROXY", bad)])).err().unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(e.to_string().contains("HTTPS_PROXY"), "{e}");
        }
    }

    #[test]
    fn proxy_credentials_stay_out_of_debug_and_go_to_the_proxy() {
        let c = env(&[("HTTPS_PROXY", "http://user:s3cret@proxy:3128")]);
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret") && !shown.contains("user"), "{shown}");
        assert!(shown.contains("proxy:3128"), "{shown}");
        let p = Proxies::new(&c).unwrap();
        let Route::Tunnel(i) = p.route(&"https://quay.io/".parse().unwrap()) else { panic!("not tunnelled") };
        assert!(i.basic_auth().is_some());
    }

    #[test]
    fn pins_names_to_addresses() {
        let c = Connector::new(
            HttpConnector::new_with_resolver(DnsPool::new(1)),
            Arc::new(Proxies::new(&ProxyConfig::none()).unwrap()),
            &[("Registry.Test".into(), IpAddr::from([127, 0, 0, 1]))],
            SharedPolicy::default(),
        );
        assert_eq!(c.pinned("https://registry.test/v2/".parse().unwrap()).to_string(), "https://127.0.0.1:443/");
        assert_eq!(c.pinned("http://registry.test:81/".parse().unwrap()).to_string(), "http://127.0.0.1:81/");
        assert_eq!(c.pinned("https://other.test/v2/".parse().unwrap()).to_string(), "https://other.test/v2/");
    }
}
