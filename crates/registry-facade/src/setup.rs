//! `registry-facade setup`: points the node's containerd at the facade by writing
//! `<hostfs>/etc/containerd/certs.d/<host>:<port>/hosts.toml` (and the CA that signs the facade's
//! certificate, when it serves TLS). containerd reads `certs.d` per pull, so no restart is needed
//! once its CRI config has `config_path = "/etc/containerd/certs.d"`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// What to write.
#[derive(Debug, Clone)]
pub struct SetupOptions {
    /// Host name or IP the node's containerd uses for the facade.
    pub hostname: String,
    /// The facade's registry port.
    pub port: u16,
    /// The node's root filesystem as mounted into the facade's pod (`/` when run on the node).
    pub hostfs: PathBuf,
    /// PEM CA of the facade's serving certificate; without it the facade is spoken to over
    /// plain HTTP.
    pub ca: Option<PathBuf>,
}

/// The `hosts.toml` text. Capabilities are `pull` and `resolve` only: nothing is ever pushed.
pub fn hosts_toml(o: &SetupOptions, ca_path_on_node: Option<&Path>) -> String {
    let scheme = if o.ca.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{}:{}", o.hostname, o.port);
    let mut s = format!(
        "# Written by registry-facade setup: pulls of {host}:{port}/… go to the facade.\nserver = \"{url}\"\n\n[host.\"{url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        host = o.hostname,
        port = o.port,
    );
    if let Some(ca) = ca_path_on_node {
        s.push_str(&format!("  ca = \"{}\"\n", ca.display()));
    }
    s
}

fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        && !h.contains("..")
}

/// Writes the files (atomically: temp file + rename) and returns the `hosts.toml` path.
pub fn run(o: &SetupOptions) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(valid_hostname(&o.hostname), "--hostname {:?} is not a host name or IP address", o.hostname);
    anyhow::ensure!(o.port != 0, "--port must not be 0");
    anyhow::ensure!(o.hostfs.is_dir(), "--hostfs {} is not a directory", o.hostfs.display());
    let rel = PathBuf::from("etc/containerd/certs.d").join(format!("{}:{}", o.hostname, o.port));
    let dir = o.hostfs.join(&rel);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_on_node = match &o.ca {
        Some(ca) => {
            let pem = std::fs::read(ca).with_context(|| format!("--ca: cannot read {}", ca.display()))?;
            anyhow::ensure!(
                String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----"),
                "--ca {} holds no PEM certificate",
                ca.display()
            );
            write_atomic(&dir.join("ca.crt"), &pem)?;
            Some(Path::new("/").join(&rel).join("ca.crt"))
        }
        None => None,
    };
    let path = dir.join("hosts.toml");
    write_atomic(&path, hosts_toml(o, ca_on_node.as_deref()).as_bytes())?;
    Ok(path)
}

fn write_atomic(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_plain_and_tls_hosts_files() {
        let fs = tempfile::tempdir().unwrap();
        let o = SetupOptions { hostname: "10.0.0.5".into(), port: 31750, hostfs: fs.path().into(), ca: None };
        let p = run(&o).unwrap();
        assert_eq!(p, fs.path().join("etc/containerd/certs.d/10.0.0.5:31750/hosts.toml"));
        let t = std::fs::read_to_string(&p).unwrap();
        assert!(t.contains("server = \"http://10.0.0.5:31750\""), "{t}");
        assert!(t.contains("capabilities = [\"pull\", \"resolve\"]"));

        let ca = fs.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").unwrap();
        let o = SetupOptions { ca: Some(ca), ..o };
        let t = std::fs::read_to_string(run(&o).unwrap()).unwrap();
        assert!(t.contains("server = \"https://10.0.0.5:31750\""));
        assert!(t.contains("ca = \"/etc/containerd/certs.d/10.0.0.5:31750/ca.crt\""), "{t}");
        assert!(fs.path().join("etc/containerd/certs.d/10.0.0.5:31750/ca.crt").exists());
    }

    #[test]
    fn refuses_bad_input() {
        let fs = tempfile::tempdir().unwrap();
        let base = SetupOptions { hostname: "node".into(), port: 1, hostfs: fs.path().into(), ca: None };
        assert!(run(&SetupOptions { hostname: "../../etc".into(), ..base.clone() }).is_err());
        assert!(run(&SetupOptions { hostname: "a b".into(), ..base.clone() }).is_err());
        assert!(run(&SetupOptions { port: 0, ..base.clone() }).is_err());
        assert!(run(&SetupOptions { hostfs: fs.path().join("missing"), ..base.clone() }).is_err());
        let notpem = fs.path().join("x");
        std::fs::write(&notpem, "hello").unwrap();
        assert!(run(&SetupOptions { ca: Some(notpem), ..base }).is_err());
    }
}
