//! The address policy against server-side request forgery (`docs/security-model.md`, "No server-side request forgery"): which
//! resolved addresses an upstream connection may go to, and which redirects may be followed.
//!
//! A workspace's author picks the registry host, and that registry picks its redirects, so
//! both are attacker-chosen names; only the *resolved address* tells where a request would
//! really go (a name can resolve to anything, and change between lookups). The policy is
//! therefore a pure function of addresses, meant to run where the address is final: on every
//! connect after DNS resolution, and on every redirect hop (see `docs/security-model.md` for
//! where the transport must call it; it is not wired in yet).
//!
//! Refused, whatever the configuration:
//! - link-local (`169.254.0.0/16`, `fe80::/10`): node-local services and cloud metadata live
//!   there;
//! - the cloud metadata addresses outside link-local (`fd00:ec2::254` on AWS IPv6,
//!   `100.100.100.200` on Alibaba Cloud), and `169.254.169.254` by name in the reason;
//! - the unspecified address (`0.0.0.0`, `::`), which Linux connects to the local host;
//!   multicast and broadcast, which no registry answers on;
//! - the facade's own listeners (a request to itself would loop through its own queue and
//!   limits, and could read what the facade serves to local clients);
//! - CIDRs the operator denies (for example the node's loopback, where the facade runs with
//!   the node's network);
//! - a redirect from an origin outside loopback and private ranges into them: a public
//!   registry has no business sending the facade to the node's or the cluster's insides.
//!
//! Allowed by default: loopback and private hosts named directly, because registries on the
//! node or in the cluster network are what the `fixed` specs and the tests use (README, "What it does").
//!
//! IPv4 embedded in IPv6 (`::ffff:a.b.c.d` mapped, `64:ff9b::/96` NAT64) is judged as the IPv4
//! address it reaches, so `::ffff:169.254.169.254` is metadata too.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// An address block, `addr/prefix`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The block of `prefix` leading bits of `addr` (`None` if the prefix is too long).
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    /// Whether `ip` is in the block. An IPv4 block also holds that address's IPv4-in-IPv6
    /// forms; an IPv6 block is matched against the address as written.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip, canonical(ip)) {
            (IpAddr::V4(net), _, IpAddr::V4(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.prefix),
            (IpAddr::V6(net), IpAddr::V6(ip), _) => prefix_eq(&net.octets(), &ip.octets(), self.prefix),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let (full, rest) = (usize::from(prefix / 8), prefix % 8);
    if a[..full] != b[..full] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    (a[full] & mask) == (b[full] & mask)
}

/// A CIDR that did not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadCidr(pub String);

impl fmt::Display for BadCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not an address block (want e.g. 10.0.0.0/8 or fd00::/8): {}", self.0)
    }
}

impl std::error::Error for BadCidr {}

impl FromStr for Cidr {
    type Err = BadCidr;

    /// `a.b.c.d/n`, `x::y/n`, or a single address (a /32 or /128).
    fn from_str(s: &str) -> Result<Cidr, BadCidr> {
        let bad = || BadCidr(s.chars().take(64).collect());
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().map_err(|_| bad())?, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s.trim().parse::<IpAddr>().map_err(|_| bad())?, None),
        };
        let prefix = prefix.unwrap_or(if addr.is_ipv4() { 32 } else { 128 });
        Cidr::new(addr, prefix).ok_or_else(bad)
    }
}

/// Why an address was refused. Never carries what the address answered: error bodies must not
/// echo internal responses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `169.254.0.0/16` or `fe80::/10`.
    LinkLocal,
    /// A cloud provider's instance metadata address.
    Metadata,
    /// `0.0.0.0`, `::`, multicast or broadcast.
    NotUnicast,
    /// One of the facade's own listeners.
    OwnListener,
    /// In a CIDR the operator denied.
    OperatorDenied,
    /// A redirect from outside loopback/private ranges into them.
    PublicToInternalRedirect,
}

impl std::error::Error for Refusal {}

/// A connection's peer address refused by the policy (carried inside the connector's error).
#[derive(Debug)]
pub(crate) struct RefusedPeer(pub(crate) Refusal);

impl fmt::Display for RefusedPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "upstream address refused: {}", self.0)
    }
}

impl std::error::Error for RefusedPeer {}

/// The policy shared by the client and its connector; the binary sets it once its listeners
/// are bound (their addresses are part of it).
pub(crate) type SharedPolicy = std::sync::Arc<std::sync::RwLock<Policy>>;

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::LinkLocal => "link-local address refused",
            Refusal::Metadata => "cloud metadata address refused",
            Refusal::NotUnicast => "not a unicast address",
            Refusal::OwnListener => "the facade's own listener",
            Refusal::OperatorDenied => "address denied by configuration",
            Refusal::PublicToInternalRedirect => "redirect from a public origin into a private or loopback range",
        })
    }
}

/// Metadata addresses outside link-local (link-local is refused as a whole anyway).
const METADATA_V4: [Ipv4Addr; 2] = [Ipv4Addr::new(169, 254, 169, 254), Ipv4Addr::new(100, 100, 100, 200)];
/// AWS's IPv6 instance metadata endpoint.
const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);

/// The address a connection to `ip` really reaches: IPv4-mapped (`::ffff:0:0/96`) and NAT64
/// well-known-prefix (`64:ff9b::/96`) addresses as their IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let o = v6.octets();
                return IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            }
            ip
        }
        IpAddr::V4(_) => ip,
    }
}

/// Loopback or private: `127.0.0.0/8`, `10.0.0.0/8`, `172.16.0.0/12`, `192.168.0.0/16`,
/// `100.64.0.0/10` (shared address space, used for pod and service networks), `::1`,
/// `fc00::/7` (unique local), and the unspecified address (which reaches the local host).
pub fn is_internal(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback() || v4.is_private() || v4.is_unspecified() || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

fn is_not_unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast(),
        IpAddr::V6(v6) => v6.is_unspecified() || v6.is_multicast(),
    }
}

/// The policy: the facade's listen addresses and the operator's denied blocks.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    own: Vec<SocketAddr>,
    denied: Vec<Cidr>,
}

impl Policy {
    /// A policy that refuses the fixed ranges, `own_listeners` (as bound: an unspecified
    /// address means "this port on every local address") and `denied`.
    pub fn new(own_listeners: Vec<SocketAddr>, denied: Vec<Cidr>) -> Policy {
        Policy { own: own_listeners, denied }
    }

    /// May a connection go to `addr` (a resolved address, any hop)?
    pub fn check_connect(&self, addr: SocketAddr) -> Result<(), Refusal> {
        let raw = addr.ip();
        let ip = canonical(raw);
        match ip {
            IpAddr::V4(v4) if METADATA_V4.contains(&v4) => return Err(Refusal::Metadata),
            IpAddr::V6(v6) if v6 == METADATA_V6 => return Err(Refusal::Metadata),
            _ => {}
        }
        if is_link_local(ip) {
            return Err(Refusal::LinkLocal);
        }
        if is_not_unicast(ip) {
            return Err(Refusal::NotUnicast);
        }
        if self.own.iter().any(|l| is_own(*l, ip, addr.port())) {
            return Err(Refusal::OwnListener);
        }
        if self.denied.iter().any(|c| c.contains(raw) || c.contains(ip)) {
            return Err(Refusal::OperatorDenied);
        }
        Ok(())
    }

    /// May a redirect from an origin at `from` (the address the redirecting response came
    /// from) be followed to `to`? Every rule of [`Policy::check_connect`] applies to `to`, and
    /// a public origin may not send us into loopback or private ranges.
    pub fn check_redirect(&self, from: IpAddr, to: SocketAddr) -> Result<(), Refusal> {
        self.check_connect(to)?;
        if !is_internal(from) && is_internal(to.ip()) {
            return Err(Refusal::PublicToInternalRedirect);
        }
        Ok(())
    }
}

/// Whether `ip:port` reaches the listener bound at `listener`. A listener on an unspecified
/// address takes the port on every local address; we cannot list the node's addresses here,
/// so any loopback or private address on that port counts as ours (a registry sharing the
/// facade's port on the node's private address is not a setup worth the risk).
fn is_own(listener: SocketAddr, ip: IpAddr, port: u16) -> bool {
    if listener.port() != port {
        return false;
    }
    let l = canonical(listener.ip());
    if l.is_unspecified() { is_internal(ip) } else { l == ip || (l.is_loopback() && ip.is_loopback()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn policy() -> Policy {
        Policy::new(
            vec![sa("0.0.0.0:31750"), sa("127.0.0.1:9500"), sa("[::1]:8086")],
            vec!["192.168.50.0/24".parse().unwrap(), "fd12:3456::/32".parse().unwrap()],
        )
    }

    #[test]
    fn connect_table() {
        use Refusal::*;
        let p = policy();
        for (addr, want) in [
            // Spec'd registries on loopback and private networks, and public ones.
            ("127.0.0.1:5000", Ok(())),
            ("[::1]:5000", Ok(())),
            ("10.1.2.3:443", Ok(())),
            ("172.16.0.1:443", Ok(())),
            ("192.168.1.10:443", Ok(())),
            ("100.64.0.1:443", Ok(())),
            ("[fd00::1]:443", Ok(())),
            ("93.184.216.34:443", Ok(())),
            ("[2606:4700::6810:84e5]:443", Ok(())),
            // Link-local and metadata, every spelling.
            ("169.254.169.254:80", Err(Metadata)),
            ("[::ffff:169.254.169.254]:80", Err(Metadata)),
            ("[64:ff9b::a9fe:a9fe]:80", Err(Metadata)),
            ("[fd00:ec2::254]:80", Err(Metadata)),
            ("100.100.100.200:80", Err(Metadata)),
            ("[::ffff:100.100.100.200]:80", Err(Metadata)),
            ("169.254.1.1:5000", Err(LinkLocal)),
            ("[::ffff:169.254.1.1]:5000", Err(LinkLocal)),
            ("[fe80::1]:5000", Err(LinkLocal)),
            ("[febf:ffff::1]:5000", Err(LinkLocal)),
            ("[fec0::1]:5000", Ok(())),
            // Not unicast: 0.0.0.0 reaches the local host on Linux.
            ("0.0.0.0:5000", Err(NotUnicast)),
            ("[::]:5000", Err(NotUnicast)),
            ("[::ffff:0.0.0.0]:5000", Err(NotUnicast)),
            ("224.0.0.1:5000", Err(NotUnicast)),
            ("255.255.255.255:5000", Err(NotUnicast)),
            ("[ff02::1]:5000", Err(NotUnicast)),
            // The facade's own listeners: the wildcard one on every internal address.
            ("127.0.0.1:31750", Err(OwnListener)),
            ("127.0.0.2:31750", Err(OwnListener)),
            ("10.0.0.7:31750", Err(OwnListener)),
            ("[::ffff:127.0.0.1]:31750", Err(OwnListener)),
            ("[::1]:31750", Err(OwnListener)),
            ("93.184.216.34:31750", Ok(())),
            ("127.0.0.1:9500", Err(OwnListener)),
            ("127.0.0.5:9500", Err(OwnListener)),
            ("10.0.0.7:9500", Ok(())),
            ("[::1]:8086", Err(OwnListener)),
            ("127.0.0.1:8086", Err(OwnListener)),
            // Operator-denied blocks, IPv4 also in its IPv6 forms.
            ("192.168.50.9:443", Err(OperatorDenied)),
            ("[::ffff:192.168.50.9]:443", Err(OperatorDenied)),
            ("192.168.51.9:443", Ok(())),
            ("[fd12:3456:1::1]:443", Err(OperatorDenied)),
            ("[fd12:3457::1]:443", Ok(())),
        ] {
            assert_eq!(p.check_connect(sa(addr)), want, "{addr}");
        }
    }

    #[test]
    fn the_operator_can_deny_the_node_loopback() {
        let p = Policy::new(vec![], vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()]);
        assert_eq!(p.check_connect(sa("127.0.0.1:5000")), Err(Refusal::OperatorDenied));
        assert_eq!(p.check_connect(sa("[::ffff:127.0.0.1]:5000")), Err(Refusal::OperatorDenied));
        assert_eq!(p.check_connect(sa("[::1]:5000")), Err(Refusal::OperatorDenied));
        assert_eq!(p.check_connect(sa("10.0.0.1:5000")), Ok(()));
        assert_eq!(Policy::default().check_connect(sa("127.0.0.1:5000")), Ok(()));
    }

    #[test]
    fn redirect_table() {
        use Refusal::*;
        let p = policy();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for (from, to, want) in [
            // Public → public, internal → anywhere allowed.
            ("93.184.216.34", "151.101.1.1:443", Ok(())),
            ("127.0.0.1", "127.0.0.1:5001", Ok(())),
            ("10.0.0.1", "127.0.0.1:5001", Ok(())),
            ("10.0.0.1", "93.184.216.34:443", Ok(())),
            ("[::1]", "[fd00::1]:443", Ok(())),
            // Public → loopback or private, every spelling.
            ("93.184.216.34", "127.0.0.1:5000", Err(PublicToInternalRedirect)),
            ("93.184.216.34", "10.0.0.1:5000", Err(PublicToInternalRedirect)),
            ("93.184.216.34", "172.31.255.255:5000", Err(PublicToInternalRedirect)),
            ("93.184.216.34", "192.168.0.1:5000", Err(PublicToInternalRedirect)),
            ("93.184.216.34", "100.127.0.1:5000", Err(PublicToInternalRedirect)),
            ("93.184.216.34", "[::ffff:10.0.0.1]:5000", Err(PublicToInternalRedirect)),
            ("93.184.216.34", "[::1]:5000", Err(PublicToInternalRedirect)),
            ("93.184.216.34", "[fc00::1]:5000", Err(PublicToInternalRedirect)),
            ("[2606:4700::1]", "127.0.0.1:5000", Err(PublicToInternalRedirect)),
            ("[::ffff:93.184.216.34]", "10.0.0.1:5000", Err(PublicToInternalRedirect)),
            // A mapped private origin is internal.
            ("[::ffff:10.0.0.1]", "10.0.0.2:5000", Ok(())),
            // The fixed rules apply to every hop, from anywhere.
            ("127.0.0.1", "169.254.169.254:80", Err(Metadata)),
            ("127.0.0.1", "[fe80::1]:80", Err(LinkLocal)),
            ("10.0.0.1", "127.0.0.1:31750", Err(OwnListener)),
        ] {
            let from = ip(from.trim_start_matches('[').trim_end_matches(']'));
            assert_eq!(p.check_redirect(from, sa(to)), want, "{from} -> {to}");
        }
    }

    #[test]
    fn classifies_internal_ranges_at_their_edges() {
        for (a, internal) in [
            ("127.255.255.255", true),
            ("128.0.0.0", false),
            ("9.255.255.255", false),
            ("10.0.0.0", true),
            ("172.15.255.255", false),
            ("172.16.0.0", true),
            ("172.31.255.255", true),
            ("172.32.0.0", false),
            ("192.167.255.255", false),
            ("192.168.255.255", true),
            ("100.63.255.255", false),
            ("100.64.0.0", true),
            ("100.127.255.255", true),
            ("100.128.0.0", false),
            ("0.0.0.0", true),
            ("::", true),
            ("::1", true),
            ("fbff::1", false),
            ("fc00::", true),
            ("fdff:ffff::1", true),
            ("fe00::", false),
            ("::ffff:127.0.0.1", true),
            ("::ffff:8.8.8.8", false),
            ("64:ff9b::a00:1", true),
            ("64:ff9b::808:808", false),
        ] {
            assert_eq!(is_internal(a.parse().unwrap()), internal, "{a}");
        }
    }

    #[test]
    fn parses_cidrs() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.255.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.1.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.0".parse().unwrap()));
        let one: Cidr = "192.168.1.1".parse().unwrap();
        assert!(one.contains("192.168.1.1".parse().unwrap()) && !one.contains("192.168.1.2".parse().unwrap()));
        let any: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(any.contains("8.8.8.8".parse().unwrap()) && !any.contains("2001:db8::1".parse().unwrap()));
        let v6: Cidr = "2001:db8::/33".parse().unwrap();
        assert!(v6.contains("2001:db8:7fff::1".parse().unwrap()) && !v6.contains("2001:db8:8000::1".parse().unwrap()));
        for bad in ["", "10.0.0.0/33", "::/129", "10.0.0/8", "x/1", "10.0.0.0/-1", "10.0.0.0/"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
