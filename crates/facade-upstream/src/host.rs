//! Registry hosts as written in image references, mapped to the host and scheme the registry
//! API answers on.

use std::net::{Ipv4Addr, Ipv6Addr};

use facade_oci::image_ref::{DOCKER_HUB, DOCKER_HUB_API};

use crate::error::{Error, Result};

/// The host to send API calls to: Docker Hub's names map to `registry-1.docker.io`, everything
/// else is kept (lowercased, since host names are case-insensitive).
pub fn api_host(registry: &str) -> Result<String> {
    let host = registry.trim().to_ascii_lowercase();
    let valid = !host.is_empty()
        && host.len() <= 255
        && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    if !valid {
        let mut shown: String = registry.chars().take(100).collect();
        shown.retain(|c| !c.is_control());
        return Err(Error::InvalidHost { host: shown });
    }
    if host == DOCKER_HUB || host == "index.docker.io" {
        return Ok(DOCKER_HUB_API.to_string());
    }
    Ok(host)
}

/// The repository path on the API host: Docker Hub's single-segment names live under
/// `library/`.
pub fn api_repo(api_host: &str, repo: &str) -> String {
    if api_host == DOCKER_HUB_API && !repo.contains('/') { format!("library/{repo}") } else { repo.to_string() }
}

/// Splits `host[:port]` / `[v6][:port]` into the bare host (brackets kept off) and the port
/// text.
fn split_host_port(authority: &str) -> (&str, Option<&str>) {
    if let Some(rest) = authority.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((h, tail)) => (h, tail.strip_prefix(':')),
            None => (rest, None),
        };
    }
    match authority.rsplit_once(':') {
        // A bare IPv6 address has several colons and no port.
        Some((h, p)) if !h.contains(':') => (h, Some(p)),
        _ => (authority, None),
    }
}

/// Whether `host` (an API host, with or without port) is a loopback host: `localhost`,
/// `127.0.0.0/8` or `[::1]`.
pub fn is_loopback(host: &str) -> bool {
    let (h, _) = split_host_port(host);
    let h = h.to_ascii_lowercase();
    h == "localhost"
        || h.parse::<Ipv4Addr>().is_ok_and(|a| a.is_loopback())
        || h.parse::<Ipv6Addr>().is_ok_and(|a| a.is_loopback())
}

/// Whether to speak plain HTTP to `host`: loopback hosts always (containerd does the same),
/// plus the configured hosts, matched with or without their port.
pub fn is_plain_http(host: &str, extra: &[String]) -> bool {
    if is_loopback(host) {
        return true;
    }
    let host = host.to_ascii_lowercase();
    let (bare, _) = split_host_port(&host);
    extra.iter().any(|e| {
        let e = e.trim().to_ascii_lowercase();
        e == host || e == bare
    })
}

/// The URL scheme for `host`.
pub fn scheme_for(host: &str, extra: &[String]) -> &'static str {
    if is_plain_http(host, extra) { "http" } else { "https" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_docker_hub_names() {
        assert_eq!(api_host("docker.io").unwrap(), "registry-1.docker.io");
        assert_eq!(api_host("index.docker.io").unwrap(), "registry-1.docker.io");
        assert_eq!(api_host("Quay.IO").unwrap(), "quay.io");
        assert_eq!(api_host("127.0.0.1:5000").unwrap(), "127.0.0.1:5000");
        assert!(api_host("").is_err());
        assert!(api_host("a/b").is_err());
        assert!(api_host("host\r\nX: y").is_err());
        assert_eq!(api_repo("registry-1.docker.io", "ubuntu"), "library/ubuntu");
        assert_eq!(api_repo("registry-1.docker.io", "gitpod/ws"), "gitpod/ws");
        assert_eq!(api_repo("quay.io", "ubuntu"), "ubuntu");
    }

    #[test]
    fn loopback_hosts_are_plain_http() {
        for h in [
            "localhost",
            "localhost:5000",
            "127.0.0.1",
            "127.0.0.1:5000",
            "127.1.2.3:80",
            "[::1]",
            "[::1]:5000",
            "LOCALHOST:1",
        ] {
            assert!(is_plain_http(h, &[]), "{h}");
            assert_eq!(scheme_for(h, &[]), "http");
        }
        for h in [
            "registry-1.docker.io",
            "quay.io:443",
            "128.0.0.1:5000",
            "10.0.0.1",
            "[::2]:5000",
            "localhost.example.com",
            "127.0.0.1.nip.io",
        ] {
            assert!(!is_plain_http(h, &[]), "{h}");
            assert_eq!(scheme_for(h, &[]), "https");
        }
    }

    #[test]
    fn configured_hosts_are_plain_http() {
        let extra = vec!["registry.local:5000".to_string(), "mirror.internal".to_string()];
        assert!(is_plain_http("registry.local:5000", &extra));
        assert!(!is_plain_http("registry.local:6000", &extra));
        assert!(is_plain_http("mirror.internal", &extra));
        assert!(is_plain_http("mirror.internal:8080", &extra));
        assert!(!is_plain_http("other.internal", &extra));
        assert!(!is_plain_http("registry.local", &extra));
    }
}
