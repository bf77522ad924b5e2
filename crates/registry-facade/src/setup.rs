//! `registry-facade setup`: points the node's containerd at the facade. It writes
//! `<hostfs>/etc/containerd/certs.d/<host>:<port>/hosts.toml`, copies the CA that signs the
//! facade's certificate next to it, and maps `<host>` to `127.0.0.1` in `<hostfs>/etc/hosts`.
//! containerd reads `certs.d` per pull, so no restart is needed once its CRI config has
//! `config_path = "/etc/containerd/certs.d"` (README, deploy/README.md).
//!
//! The reference installer's init container runs `setup --hostfs=/mnt/dst --hostname=reg.<domain>
//! --port=31750` with no CA flag and mounts the CA at [`INSTALLER_CA`]; with exactly those
//! arguments the node must be able to pull (README, "Migrating from the Go facade").

use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// Where the reference installer mounts the CA of the facade's certificate into the setup
/// container. Used when `--ca` is not given.
pub const INSTALLER_CA: &str = "/usr/local/share/ca-certificates/gitpod-ca.crt";

/// What to write.
#[derive(Debug, Clone)]
pub struct SetupOptions {
    /// Host name or IP the node's containerd uses for the facade.
    pub hostname: String,
    /// The facade's registry port.
    pub port: u16,
    /// The node's root filesystem as mounted into the facade's pod (`/` when run on the node).
    pub hostfs: PathBuf,
    /// PEM CA of the facade's serving certificate. Without it the CA the installer mounts at
    /// [`INSTALLER_CA`] is used; without that either, the facade is spoken to over plain HTTP.
    pub ca: Option<PathBuf>,
}

/// What `/etc/hosts` got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcHosts {
    /// `127.0.0.1 <host>` was appended.
    Added,
    /// The host was listed already (with this address); the file was left alone.
    AlreadyListed { address: String },
    /// `--hostname` is an IP address: nothing to resolve.
    NotAName,
    /// `<hostfs>/etc/hosts` does not exist (only `certs.d` of the node is mounted, as in
    /// deploy/kubernetes): the node must resolve the host by itself.
    NoFile,
}

/// What `setup` wrote.
#[derive(Debug, Clone)]
pub struct SetupReport {
    /// The `hosts.toml` written.
    pub hosts_toml: PathBuf,
    /// The CA copied next to it (`None`: plain HTTP).
    pub ca: Option<PathBuf>,
    /// What happened to `<hostfs>/etc/hosts`.
    pub etc_hosts: EtcHosts,
}

/// Where the CA comes from, in order: `--ca`, the installer's mount, none (plain HTTP).
#[derive(Debug, Clone, PartialEq, Eq)]
enum CaSource {
    Flag(PathBuf),
    Installer(PathBuf),
    None,
}

/// The CA file `hosts.toml` names, relative to its own directory: containerd resolves a
/// relative `ca` against the directory holding `hosts.toml`, so the file is found whatever
/// directory the node's `config_path` names.
pub const CA_FILE: &str = "ca.crt";

/// The `hosts.toml` text. Capabilities are `pull` and `resolve` only: nothing is ever pushed.
///
/// With TLS the CA is named twice. containerd tries the `[host]` entries first and falls back
/// to `server` after a 404; `server` takes its TLS settings from the top-level keys, so without
/// a top-level `ca` a missing workspace reaches the kubelet as "x509: certificate signed by
/// unknown authority" instead of "not found". Top-level keys must come before the first table.
pub fn hosts_toml(hostname: &str, port: u16, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    let url = format!("{scheme}://{hostname}:{port}");
    let mut s = format!("# Written by registry-facade setup: pulls of {hostname}:{port}/… go to the facade.\n");
    s.push_str(&format!("server = \"{url}\"\n"));
    if tls {
        s.push_str(&format!("ca = \"{CA_FILE}\"\n"));
    }
    s.push_str(&format!("\n[host.\"{url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"));
    if tls {
        s.push_str(&format!("  ca = \"{CA_FILE}\"\n"));
    }
    s
}

/// `/etc/hosts` text with `127.0.0.1 <hostname>` appended, or what already maps the name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostsEdit {
    /// The new text: the old one unchanged (a missing final newline added) plus the entry.
    Append(String),
    /// The name is listed already, with this address.
    Listed(String),
}

/// Adds `127.0.0.1 <hostname>` to `/etc/hosts` text unless a line already lists the name (as
/// its canonical name or an alias, case-insensitively; comments do not count).
pub fn add_hosts_entry(text: &str, hostname: &str) -> HostsEdit {
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut fields = line.split_whitespace();
        let Some(address) = fields.next() else { continue };
        if fields.any(|name| name.eq_ignore_ascii_case(hostname)) {
            return HostsEdit::Listed(address.to_string());
        }
    }
    let mut out = String::with_capacity(text.len() + hostname.len() + 12);
    out.push_str(text);
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&format!("127.0.0.1 {hostname}\n"));
    HostsEdit::Append(out)
}

/// The host as an IP address, if it is one (`[v6]` included).
fn ip_of(hostname: &str) -> Option<IpAddr> {
    hostname.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(hostname).parse().ok()
}

fn valid_hostname(h: &str) -> bool {
    if let Some(ip) = ip_of(h) {
        // An IPv6 address needs its brackets in `host:port`, the certs.d directory's name.
        return ip.is_ipv4() || h.starts_with('[');
    }
    // A DNS name: it becomes a directory name and an /etc/hosts field.
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// [`setup`] with the installer's CA at [`INSTALLER_CA`]; returns the `hosts.toml` path.
pub fn run(o: &SetupOptions) -> anyhow::Result<PathBuf> {
    Ok(setup(o, Path::new(INSTALLER_CA))?.hosts_toml)
}

/// Writes the files (each atomically: temp file + rename) and logs each step. The CA is `--ca`,
/// else `installer_ca` when that exists, else there is none and `hosts.toml` says plain HTTP: our
/// own deploy/kubernetes runs setup without a CA for a facade without TLS, so a missing CA is
/// not an error (it is logged at warn). A CA that is there but unreadable or not PEM is.
pub fn setup(o: &SetupOptions, installer_ca: &Path) -> anyhow::Result<SetupReport> {
    anyhow::ensure!(valid_hostname(&o.hostname), "--hostname {:?} is not a host name or IP address", o.hostname);
    anyhow::ensure!(o.port != 0, "--port must not be 0");
    anyhow::ensure!(o.hostfs.is_dir(), "--hostfs {} is not a directory", o.hostfs.display());
    let source = match &o.ca {
        Some(ca) => CaSource::Flag(ca.clone()),
        None if installer_ca.exists() => CaSource::Installer(installer_ca.to_path_buf()),
        None => CaSource::None,
    };
    let ca_pem = match &source {
        CaSource::Flag(p) => Some(read_ca(p, "--ca")?),
        CaSource::Installer(p) => Some(read_ca(p, "the installer's CA")?),
        CaSource::None => None,
    };

    let dir = o.hostfs.join("etc/containerd/certs.d").join(format!("{}:{}", o.hostname, o.port));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = match &ca_pem {
        Some(pem) => {
            let path = dir.join(CA_FILE);
            write_atomic(&path, pem, None)?;
            match &source {
                CaSource::Flag(from) | CaSource::Installer(from) => {
                    tracing::info!(from = %from.display(), to = %path.display(), "copied the facade's CA");
                }
                CaSource::None => {}
            }
            Some(path)
        }
        None => {
            tracing::warn!(
                installer_ca = %installer_ca.display(),
                "no --ca and no CA at the installer's path: containerd will speak plain HTTP to the \
                 facade, so pulls fail if the facade serves TLS"
            );
            None
        }
    };
    let hosts_toml_path = dir.join("hosts.toml");
    write_atomic(&hosts_toml_path, hosts_toml(&o.hostname, o.port, ca.is_some()).as_bytes(), None)?;
    tracing::info!(path = %hosts_toml_path.display(), tls = ca.is_some(), "wrote containerd's hosts.toml");

    let etc_hosts = update_etc_hosts(&o.hostfs.join("etc/hosts"), &o.hostname)?;
    Ok(SetupReport { hosts_toml: hosts_toml_path, ca, etc_hosts })
}

fn read_ca(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| format!("{what}: cannot read {}", path.display()))?;
    anyhow::ensure!(
        String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----"),
        "{what} {} holds no PEM certificate",
        path.display()
    );
    Ok(pem)
}

fn update_etc_hosts(path: &Path, hostname: &str) -> anyhow::Result<EtcHosts> {
    if ip_of(hostname).is_some() {
        return Ok(EtcHosts::NotAName);
    }
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(
                path = %path.display(),
                host = hostname,
                "no hosts file under --hostfs: the node must resolve the host to its own facade by itself"
            );
            return Ok(EtcHosts::NoFile);
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    match add_hosts_entry(&text, hostname) {
        HostsEdit::Listed(address) => {
            if ip_of(&address).is_some_and(|ip| ip.is_loopback()) {
                tracing::info!(path = %path.display(), host = hostname, %address, "host already listed");
            } else {
                tracing::warn!(
                    path = %path.display(),
                    host = hostname,
                    %address,
                    "host already listed with a non-loopback address; left as it is"
                );
            }
            Ok(EtcHosts::AlreadyListed { address })
        }
        HostsEdit::Append(new) => {
            let mode = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.permissions();
            write_atomic(path, new.as_bytes(), Some(mode))?;
            tracing::info!(path = %path.display(), host = hostname, "added 127.0.0.1 to the hosts file");
            Ok(EtcHosts::Added)
        }
    }
}

/// Writes `data` to a temp file in `path`'s directory, syncs it and renames it over `path`, so a
/// reader (containerd, the node's resolver) sees the old file or the new one, never half of one.
fn write_atomic(path: &Path, data: &[u8], mode: Option<std::fs::Permissions>) -> anyhow::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.registry-facade-setup.tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        if let Some(mode) = mode {
            f.set_permissions(mode)?;
        }
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", tmp.display()));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("renaming {} into {}", tmp.display(), path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn opts(fs: &Path, hostname: &str) -> SetupOptions {
        SetupOptions { hostname: hostname.into(), port: 31750, hostfs: fs.into(), ca: None }
    }

    #[test]
    fn setup_hosts_toml_text_for_tls_names_the_ca_for_server_and_host() {
        assert_eq!(
            hosts_toml("reg.example.com", 31750, true),
            "# Written by registry-facade setup: pulls of reg.example.com:31750/… go to the facade.\n\
             server = \"https://reg.example.com:31750\"\n\
             ca = \"ca.crt\"\n\
             \n\
             [host.\"https://reg.example.com:31750\"]\n  \
             capabilities = [\"pull\", \"resolve\"]\n  \
             ca = \"ca.crt\"\n"
        );
    }

    #[test]
    fn setup_hosts_toml_text_for_plain_http() {
        assert_eq!(
            hosts_toml("10.0.0.5", 31750, false),
            "# Written by registry-facade setup: pulls of 10.0.0.5:31750/… go to the facade.\n\
             server = \"http://10.0.0.5:31750\"\n\
             \n\
             [host.\"http://10.0.0.5:31750\"]\n  \
             capabilities = [\"pull\", \"resolve\"]\n"
        );
    }

    #[test]
    fn setup_etc_hosts_entry_is_appended_keeping_every_line() {
        let text = "127.0.0.1\tlocalhost\n# a comment\n::1 localhost ip6-localhost\n";
        assert_eq!(
            add_hosts_entry(text, "reg.example.com"),
            HostsEdit::Append(format!("{text}127.0.0.1 reg.example.com\n"))
        );
        assert_eq!(add_hosts_entry("", "reg.x"), HostsEdit::Append("127.0.0.1 reg.x\n".into()));
    }

    #[test]
    fn setup_etc_hosts_without_final_newline_gets_one() {
        assert_eq!(
            add_hosts_entry("127.0.0.1 localhost", "reg.x"),
            HostsEdit::Append("127.0.0.1 localhost\n127.0.0.1 reg.x\n".into())
        );
    }

    #[test]
    fn setup_etc_hosts_host_already_listed_is_left_alone() {
        // As canonical name, as alias, in another case, with another address.
        assert_eq!(add_hosts_entry("127.0.0.1 reg.x\n", "reg.x"), HostsEdit::Listed("127.0.0.1".into()));
        assert_eq!(add_hosts_entry("127.0.1.1 node reg.x # ours\n", "reg.x"), HostsEdit::Listed("127.0.1.1".into()));
        assert_eq!(add_hosts_entry("10.1.2.3\tREG.X", "reg.x"), HostsEdit::Listed("10.1.2.3".into()));
        // A comment, a longer name or a name that merely contains it are not the host.
        for text in ["# 127.0.0.1 reg.x\n", "127.0.0.1 reg.x.other\n", "127.0.0.1 myreg.x\n", "reg.x\n"] {
            assert!(matches!(add_hosts_entry(text, "reg.x"), HostsEdit::Append(_)), "{text:?}");
        }
    }

    #[test]
    fn setup_with_the_installer_ca_writes_tls_files_and_the_hosts_entry_once() {
        let fs = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(fs.path().join("etc")).unwrap();
        std::fs::write(fs.path().join("etc/hosts"), "127.0.0.1 localhost\n::1 localhost").unwrap();
        let installer_ca = fs.path().join("gitpod-ca.crt");
        std::fs::write(&installer_ca, PEM).unwrap();
        let o = opts(fs.path(), "reg.example.com");

        let r = setup(&o, &installer_ca).unwrap();
        let dir = fs.path().join("etc/containerd/certs.d/reg.example.com:31750");
        assert_eq!(r.hosts_toml, dir.join("hosts.toml"));
        assert_eq!(r.ca, Some(dir.join("ca.crt")));
        assert_eq!(std::fs::read_to_string(dir.join("ca.crt")).unwrap(), PEM);
        assert_eq!(std::fs::read_to_string(&r.hosts_toml).unwrap(), hosts_toml("reg.example.com", 31750, true));
        assert_eq!(r.etc_hosts, EtcHosts::Added);
        let want = "127.0.0.1 localhost\n::1 localhost\n127.0.0.1 reg.example.com\n";
        assert_eq!(std::fs::read_to_string(fs.path().join("etc/hosts")).unwrap(), want);

        // Init containers run on every pod start: a second run changes nothing.
        let r = setup(&o, &installer_ca).unwrap();
        assert_eq!(r.etc_hosts, EtcHosts::AlreadyListed { address: "127.0.0.1".into() });
        assert_eq!(std::fs::read_to_string(fs.path().join("etc/hosts")).unwrap(), want);
        let mut names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["ca.crt", "hosts.toml"], "no temp file left behind");
    }

    #[test]
    fn setup_explicit_ca_wins_over_the_installer_ca() {
        let fs = tempfile::tempdir().unwrap();
        let installer_ca = fs.path().join("gitpod-ca.crt");
        std::fs::write(&installer_ca, "-----BEGIN CERTIFICATE-----\ninstaller\n-----END CERTIFICATE-----\n").unwrap();
        let flag_ca = fs.path().join("flag.pem");
        std::fs::write(&flag_ca, PEM).unwrap();
        let o = SetupOptions { ca: Some(flag_ca), ..opts(fs.path(), "reg.example.com") };
        let r = setup(&o, &installer_ca).unwrap();
        assert_eq!(std::fs::read_to_string(r.ca.unwrap()).unwrap(), PEM);
        // No hosts file under this hostfs (only certs.d mounted): nothing is created.
        assert_eq!(r.etc_hosts, EtcHosts::NoFile);
        assert!(!fs.path().join("etc/hosts").exists());
    }

    #[test]
    fn setup_without_any_ca_writes_plain_http() {
        let fs = tempfile::tempdir().unwrap();
        let o = opts(fs.path(), "10.0.0.5");
        let r = setup(&o, &fs.path().join("no-such-ca.crt")).unwrap();
        assert_eq!(r.hosts_toml, fs.path().join("etc/containerd/certs.d/10.0.0.5:31750/hosts.toml"));
        assert_eq!(r.ca, None);
        assert_eq!(std::fs::read_to_string(&r.hosts_toml).unwrap(), hosts_toml("10.0.0.5", 31750, false));
        assert_eq!(r.etc_hosts, EtcHosts::NotAName);
    }

    #[test]
    fn setup_etc_hosts_keeps_its_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let fs = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(fs.path().join("etc")).unwrap();
        let hosts = fs.path().join("etc/hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        std::fs::set_permissions(&hosts, std::fs::Permissions::from_mode(0o644)).unwrap();
        let r = setup(&opts(fs.path(), "reg.x"), &fs.path().join("none")).unwrap();
        assert_eq!(r.etc_hosts, EtcHosts::Added);
        assert_eq!(std::fs::metadata(&hosts).unwrap().permissions().mode() & 0o777, 0o644);
    }

    #[test]
    fn setup_refuses_bad_input() {
        let fs = tempfile::tempdir().unwrap();
        let none = fs.path().join("none");
        let base = opts(fs.path(), "node");
        let run = |o: &SetupOptions| setup(o, &none);
        for bad in ["../../etc", "a b", "", "a..b", "-a.b", "reg.x:1", "a/b", "::1"] {
            assert!(run(&SetupOptions { hostname: bad.into(), ..base.clone() }).is_err(), "{bad:?}");
        }
        assert!(run(&SetupOptions { hostname: "[::1]".into(), ..base.clone() }).is_ok());
        assert!(run(&SetupOptions { port: 0, ..base.clone() }).is_err());
        assert!(run(&SetupOptions { hostfs: fs.path().join("missing"), ..base.clone() }).is_err());
        let notpem = fs.path().join("x");
        std::fs::write(&notpem, "hello").unwrap();
        assert!(run(&SetupOptions { ca: Some(notpem.clone()), ..base.clone() }).is_err());
        assert!(run(&SetupOptions { ca: Some(fs.path().join("missing.pem")), ..base.clone() }).is_err());
        // An unreadable installer CA is an error too, not a silent fall-back to plain HTTP.
        assert!(setup(&base, &notpem).is_err());
    }
}
