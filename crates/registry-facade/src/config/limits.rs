//! The registry listener's request limits (`facade.max*`, `facade.responseIdleTimeout`). The
//! defaults are facade-server's own `ServerConfig::default()`.

use std::time::Duration;

use facade_server::ServerConfig;

use super::file::FacadeSection;
use super::values::Checker;

/// The smallest request head hyper's HTTP/1 reader accepts.
const MIN_HEADER_BYTES: u64 = 8 << 10;
/// The largest request head accepted: more only feeds header floods.
const MAX_HEADER_BYTES: u64 = 1 << 20;
/// The shortest URL limit: a manifest URL with a long repository name must fit.
const MIN_URL_BYTES: u64 = 1 << 10;

/// The validated request limits of the registry listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// `maxRequestHeaderBytes`: request heads over it get 431.
    pub max_header_bytes: usize,
    /// `maxURLBytes`: URLs over it get 414 `NAME_INVALID`.
    pub max_url_bytes: usize,
    /// `maxRequestsPerClient`: more in flight from one address get 429 (0: unlimited).
    pub max_requests_per_client: usize,
    /// `responseIdleTimeout` (`None`: never).
    pub response_idle_timeout: Option<Duration>,
}

impl Default for RequestLimits {
    fn default() -> Self {
        let d = ServerConfig::default();
        RequestLimits {
            max_header_bytes: d.max_header_bytes,
            max_url_bytes: d.max_url_bytes,
            max_requests_per_client: d.max_requests_per_client,
            response_idle_timeout: d.response_idle_timeout,
        }
    }
}

impl RequestLimits {
    /// Sets these limits in a server configuration.
    pub fn apply_to(&self, s: &mut ServerConfig) {
        s.max_header_bytes = self.max_header_bytes;
        s.max_url_bytes = self.max_url_bytes;
        s.max_requests_per_client = self.max_requests_per_client;
        s.response_idle_timeout = self.response_idle_timeout;
    }
}

/// The blob sources' own "no bytes for this long" deadlines (key, value), which a response idle
/// timeout must outlast.
pub(super) fn stall_timeouts(
    upstream: &facade_upstream::Config,
    cluster: &facade_blob::ClusterConfig,
) -> Vec<(&'static str, Duration)> {
    let mut v = vec![("upstreamReadTimeout", upstream.read_timeout)];
    v.extend(cluster.ipfs.as_ref().map(|i| ("clusterIPFSTimeout", i.first_byte_timeout)));
    v
}

/// The request-limit keys over the defaults. `stall_timeouts` are the blob sources' own "no
/// bytes for this long" deadlines (key, value): a response idle timeout must outlast them, or a
/// client is cut while the download behind it is still being resumed.
pub(super) fn request_limits(
    f: &FacadeSection,
    stall_timeouts: &[(&str, Duration)],
    c: &mut Checker<'_>,
) -> RequestLimits {
    let mut l = RequestLimits::default();
    let header = c.size("facade.maxRequestHeaderBytes", &f.max_request_header_bytes, "64KiB");
    let url = c.size("facade.maxURLBytes", &f.max_url_bytes, "8KiB");
    if let Some(h) = header.filter(|h| !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(h)) {
        c.problem("facade.maxRequestHeaderBytes", format_args!("{h} is outside 8KiB..1MiB"));
    }
    // An invalid head limit is reported alone; an absent one is the default.
    let header_known = header.is_some() || f.max_request_header_bytes.is_none();
    let effective_header = header.unwrap_or(l.max_header_bytes as u64);
    match url {
        Some(u) if u < MIN_URL_BYTES => c.problem("facade.maxURLBytes", format_args!("{u} is less than 1KiB")),
        Some(u) if header_known && u > effective_header => c.problem(
            "facade.maxURLBytes",
            format_args!("{u} is more than facade.maxRequestHeaderBytes ({effective_header}), so long URLs would get a bare 431 instead of the OCI 414"),
        ),
        _ => {}
    }
    let as_usize = |n: u64| usize::try_from(n).ok();
    if let Some(h) = header.and_then(as_usize) {
        l.max_header_bytes = h;
    }
    if let Some(u) = url.and_then(as_usize) {
        l.max_url_bytes = u;
    }
    if let Some(n) = f.max_requests_per_client.and_then(as_usize) {
        l.max_requests_per_client = n;
    }
    if let Some(t) = c.duration("facade.responseIdleTimeout", &f.response_idle_timeout) {
        l.response_idle_timeout = Some(t).filter(|t| !t.is_zero());
    }
    if let Some(t) = l.response_idle_timeout {
        for (key, stall) in stall_timeouts {
            if t <= *stall {
                c.problem(
                    "facade.responseIdleTimeout",
                    format_args!(
                        "{} is not more than facade.{key} ({}), so clients would be cut while a stalled download is still being resumed",
                        humantime::format_duration(t),
                        humantime::format_duration(*stall)
                    ),
                );
            }
        }
    }
    l
}
