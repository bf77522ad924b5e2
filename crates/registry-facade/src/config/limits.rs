//! The registry listener's request and connection limits (`facade.max*`,
//! `facade.responseIdleTimeout`, `facade.requestHeadTimeout`, `facade.idleConnectionTimeout`,
//! `facade.authFailuresPerSecond`, `facade.authCheckThreads`), and the lanes of the blocking
//! pool (`facade.blocking*Threads`). The defaults are facade-server's own
//! `ServerConfig::default()` and facade-blob's `LaneSizes::default()`.

use std::time::Duration;

use facade_blob::blocking::LaneSizes;
use facade_server::ServerConfig;

use super::file::FacadeSection;
use super::values::Checker;

/// The smallest request head hyper's HTTP/1 reader accepts.
const MIN_HEADER_BYTES: u64 = 8 << 10;
/// The largest request head accepted: more only feeds header floods.
const MAX_HEADER_BYTES: u64 = 1 << 20;
/// The shortest URL limit: a manifest URL with a long repository name must fit.
const MIN_URL_BYTES: u64 = 1 << 10;
/// Most blocking threads bcrypt may take: the binary's blocking pool has 16, and blob file I/O
/// needs most of them.
const MAX_AUTH_CHECK_THREADS: u64 = 8;

/// Most blocking threads one lane may take: the runtime's blocking pool is sized to the sum of
/// the lanes, and every thread is a stack of its own.
const MAX_LANE_THREADS: u64 = 256;

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
    /// `requestHeadTimeout`: a connection without a complete request head this long after
    /// accept (HTTP/1: after the first byte of a later request) is closed (`None`: never).
    pub request_head_timeout: Option<Duration>,
    /// `idleConnectionTimeout`: a connection with no request open this long is closed
    /// (`None`: never).
    pub idle_connection_timeout: Option<Duration>,
    /// `maxConnections`: open connections on the registry port; more get 503 (0: unlimited).
    pub max_connections: usize,
    /// `authFailuresPerSecond`: failed credential checks per client address per second, bursts
    /// of twice that; more get 429 (0: unlimited).
    pub auth_failures_per_second: u32,
    /// `authCheckThreads`: blocking threads bcrypt may take at once.
    pub auth_check_threads: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        let d = ServerConfig::default();
        RequestLimits {
            max_header_bytes: d.max_header_bytes,
            max_url_bytes: d.max_url_bytes,
            max_requests_per_client: d.max_requests_per_client,
            response_idle_timeout: d.response_idle_timeout,
            request_head_timeout: d.request_head_timeout,
            idle_connection_timeout: d.idle_connection_timeout,
            max_connections: d.max_connections,
            auth_failures_per_second: d.auth_failures_per_second,
            auth_check_threads: d.auth_check_threads,
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
        s.request_head_timeout = self.request_head_timeout;
        s.idle_connection_timeout = self.idle_connection_timeout;
        s.max_connections = self.max_connections;
        s.auth_failures_per_second = self.auth_failures_per_second;
        s.auth_check_threads = self.auth_check_threads;
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
    connection_limits(f, &mut l, c);
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

/// The connection ceilings and the credential-check lane.
fn connection_limits(f: &FacadeSection, l: &mut RequestLimits, c: &mut Checker<'_>) {
    if let Some(t) = c.duration("facade.requestHeadTimeout", &f.request_head_timeout) {
        l.request_head_timeout = Some(t).filter(|t| !t.is_zero());
    }
    if let Some(t) = c.duration("facade.idleConnectionTimeout", &f.idle_connection_timeout) {
        l.idle_connection_timeout = Some(t).filter(|t| !t.is_zero());
    }
    if let Some(n) = f.max_connections {
        match usize::try_from(n) {
            Ok(n) => l.max_connections = n,
            Err(_) => c.problem("facade.maxConnections", format_args!("{n} is too large")),
        }
    }
    if let Some(n) = f.auth_failures_per_second {
        match u32::try_from(n) {
            Ok(n) => l.auth_failures_per_second = n,
            Err(_) => c.problem("facade.authFailuresPerSecond", format_args!("{n} is too large")),
        }
    }
    match f.auth_check_threads {
        Some(n) if (1..=MAX_AUTH_CHECK_THREADS).contains(&n) => l.auth_check_threads = n as usize,
        Some(n) => c.problem(
            "facade.authCheckThreads",
            format_args!(
                "{n} is outside 1..{MAX_AUTH_CHECK_THREADS} (the blocking pool that blob file I/O uses has 16 threads)"
            ),
        ),
        None => {}
    }
}

/// `facade.blocking*Threads`: how many blocking threads each class of blob I/O may take at
/// once (issue of resource ceilings: no class can starve another). Read at startup only: the
/// runtime's blocking pool is sized from them.
pub(super) fn blocking_lanes(f: &FacadeSection, c: &mut Checker<'_>) -> LaneSizes {
    let mut lanes = LaneSizes::default();
    for (key, value, slot) in [
        ("facade.blockingReadThreads", f.blocking_read_threads, &mut lanes.reads),
        ("facade.blockingSpoolWriteThreads", f.blocking_spool_write_threads, &mut lanes.spool_writes),
        ("facade.blockingCommitThreads", f.blocking_commit_threads, &mut lanes.commits),
        ("facade.blockingHousekeepingThreads", f.blocking_housekeeping_threads, &mut lanes.housekeeping),
    ] {
        match value {
            Some(n) if (1..=MAX_LANE_THREADS).contains(&n) => *slot = n as usize,
            Some(n) => c.problem(key, format_args!("{n} is outside 1..{MAX_LANE_THREADS}")),
            None => {}
        }
    }
    lanes
}
