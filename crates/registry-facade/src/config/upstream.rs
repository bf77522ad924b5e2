//! Upstream registries and images: `facade.plainHTTPHosts`, `facade.upstream*`,
//! `facade.platform`, `facade.tagTTL` and `facade.composeTTL`, resolved into
//! facade-upstream's `Config` and facade-blob's `FetchConfig` and `ImagesConfig` (whose
//! `Default`s are the defaults).

use facade_blob::{FetchConfig, ImagesConfig};
use facade_oci::Platform;
use facade_upstream::ssrf::Cidr;

use super::file::FacadeSection;
use super::values::Checker;

/// The upstream client's keys over its defaults. The CA bundle is read now, so a missing file
/// or one without a certificate stops the start with one line.
pub(super) fn client(f: &FacadeSection, c: &mut Checker<'_>) -> facade_upstream::Config {
    let mut u = facade_upstream::Config { plain_http_hosts: f.plain_http_hosts.clone(), ..Default::default() };
    if let Some(t) = c.duration("facade.upstreamConnectTimeout", &f.upstream_connect_timeout) {
        u.connect_timeout = t;
    }
    if let Some(t) = c.duration("facade.upstreamMetadataTimeout", &f.upstream_metadata_timeout) {
        u.metadata_timeout = t;
    }
    if let Some(t) = c.duration("facade.upstreamReadTimeout", &f.upstream_read_timeout) {
        u.read_timeout = t;
    }
    u.extra_ca_pem = f.upstream_ca.as_deref().and_then(|s| ca_bundle(s, c));
    u
}

/// `facade.upstreamDenyNetworks`: CIDRs (`10.0.0.0/8`, `::1/128`) or single addresses.
pub(super) fn deny_networks(f: &FacadeSection, c: &mut Checker<'_>) -> Vec<Cidr> {
    let mut out = Vec::new();
    for s in &f.upstream_deny_networks {
        match s.parse::<Cidr>() {
            Ok(cidr) => out.push(cidr),
            Err(e) => c.problem("facade.upstreamDenyNetworks", format_args!("{s:?}: {e}")),
        }
    }
    out
}

/// `facade.upstreamCA`: the PEM text, checked to hold a certificate.
fn ca_bundle(s: &str, c: &mut Checker<'_>) -> Option<String> {
    const KEY: &str = "facade.upstreamCA";
    if s.is_empty() {
        c.problem(KEY, "empty; name a PEM file of CA certificates, or leave the key out");
        return None;
    }
    let p = c.path(s);
    let text = std::fs::read_to_string(&p)
        .map_err(|e| c.problem(KEY, format_args!("cannot read {}: {e}", p.display())))
        .ok()?;
    match facade_upstream::parse_ca_bundle(&text) {
        Ok(_) => Some(text),
        Err(facade_upstream::Error::Config { reason }) => {
            c.problem(KEY, format_args!("{}: {reason}", p.display()));
            None
        }
        Err(e) => {
            c.problem(KEY, format_args!("{}: {e}", p.display()));
            None
        }
    }
}

/// `facade.platform` and `facade.tagTTL` over the fetcher's defaults (this host's platform).
pub(super) fn fetch(f: &FacadeSection, c: &mut Checker<'_>) -> FetchConfig {
    let mut out = FetchConfig::default();
    if let Some(s) = &f.platform {
        match Platform::parse(s) {
            Some(p) => out.platform = p,
            None => c.problem("facade.platform", format_args!("{s:?} is not os/arch[/variant]")),
        }
    }
    if let Some(t) = c.duration("facade.tagTTL", &f.tag_ttl) {
        out.tag_ttl = t;
    }
    out
}

/// `facade.composeTTL` over the image service's defaults.
pub(super) fn images(f: &FacadeSection, c: &mut Checker<'_>) -> ImagesConfig {
    let mut out = ImagesConfig::default();
    if let Some(t) = c.duration("facade.composeTTL", &f.compose_ttl) {
        out.compose_ttl = t;
    }
    out
}
