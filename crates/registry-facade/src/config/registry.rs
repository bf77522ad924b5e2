//! The `registry` section's listener, access and content keys (the reference's keys), and the
//! top-level `dockerAuth` and listener addresses.

use std::net::SocketAddr;
use std::path::PathBuf;

use facade_blob::StaticLayerSpec;
use facade_oci::ImageRef;

use super::env::LISTEN_HOST_ENV;
use super::file::{FileConfig, RegistrySection};
use super::values::Checker;

/// The address the registry binds when neither `facade.listenHost` nor the environment names
/// one: all interfaces, as the reference does.
const DEFAULT_LISTEN_HOST: &str = "0.0.0.0";

/// `registry.requireAuth`, and `facade.htpasswd` with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAuth {
    /// Anyone may pull.
    Off,
    /// The reference's meaning of `requireAuth` (no htpasswd file): a request must carry Basic
    /// credentials, whatever they are.
    CredentialsPresent,
    /// Basic credentials checked against this bcrypt htpasswd file.
    Htpasswd(PathBuf),
}

/// `facade.listenHost` (or the environment) and `registry.port`.
pub(super) fn listen(file: &FileConfig, c: &mut Checker<'_>) -> SocketAddr {
    let port = file.registry.port;
    // A config file written by the reference's installer has no `facade` section, so the
    // environment can set the listen address where the file cannot be changed.
    let (key, host) = match (&file.facade.listen_host, c.env_var(LISTEN_HOST_ENV)) {
        (Some(h), _) => ("facade.listenHost", h.clone()),
        (None, Some(h)) => (LISTEN_HOST_ENV, h),
        (None, None) => ("facade.listenHost", DEFAULT_LISTEN_HOST.to_string()),
    };
    let parsed = format!("{host}:{port}").parse().or_else(|_| format!("[{host}]:{port}").parse());
    parsed.unwrap_or_else(|_| {
        c.problem(key, format_args!("{host:?} is not an IP address"));
        SocketAddr::from(([0, 0, 0, 0], port))
    })
}

/// `registry.prefix`, without a trailing slash.
pub(super) fn prefix(r: &RegistrySection, c: &mut Checker<'_>) -> String {
    let prefix = r.prefix.trim_end_matches('/').to_string();
    if !prefix.is_empty() && (!prefix.starts_with('/') || prefix.contains("//") || prefix.contains(char::is_whitespace))
    {
        c.problem("registry.prefix", format_args!("{:?} must start with '/' and contain no spaces", r.prefix));
    }
    prefix
}

/// `registry.tls.{crt,key}`: the registry port serves TLS with them.
pub(super) fn tls(r: &RegistrySection, c: &mut Checker<'_>) -> Option<(PathBuf, PathBuf)> {
    let t = r.tls.as_ref().filter(|t| !t.crt.is_empty() || !t.key.is_empty())?;
    if t.crt.is_empty() || t.key.is_empty() {
        c.problem("registry.tls", "crt and key go together");
        return None;
    }
    let crt = c.file("registry.tls.crt", &t.crt);
    let key = c.file("registry.tls.key", &t.key);
    crt.zip(key)
}

/// `registry.requireAuth` with `facade.htpasswd`.
pub(super) fn client_auth(file: &FileConfig, c: &mut Checker<'_>) -> ClientAuth {
    match (&file.facade.htpasswd, file.registry.require_auth) {
        (Some(p), true) if p.is_empty() => {
            c.problem("facade.htpasswd", "empty; name the bcrypt htpasswd file, or leave the key out to only require that pulls carry credentials");
            ClientAuth::Off
        }
        (Some(p), true) => c.file("facade.htpasswd", p).map_or(ClientAuth::Off, ClientAuth::Htpasswd),
        (None, true) => ClientAuth::CredentialsPresent,
        (Some(_), false) => {
            c.problem(
                "facade.htpasswd",
                "set, but registry.requireAuth is false; refusing to guess whether pulls should be authenticated",
            );
            ClientAuth::Off
        }
        (None, false) => ClientAuth::Off,
    }
}

/// `registry.staticLayer`, in order.
pub(super) fn static_layers(r: &RegistrySection, c: &mut Checker<'_>) -> Vec<StaticLayerSpec> {
    let mut layers = Vec::new();
    for (i, l) in r.static_layer.iter().enumerate() {
        let key = format!("registry.staticLayer[{i}]");
        match l.kind.as_str() {
            "image" => match ImageRef::parse(&l.reference) {
                Ok(img) => layers.push(StaticLayerSpec::Image(img)),
                Err(e) => c.problem(format_args!("{key}.ref"), e),
            },
            "file" => {
                if let Some(p) = c.file(&format!("{key}.ref"), &l.reference) {
                    layers.push(StaticLayerSpec::File(p));
                } else if l.reference.is_empty() {
                    c.problem(format_args!("{key}.ref"), "empty");
                }
            }
            other => c.problem(format_args!("{key}.type"), format_args!("{other:?} is neither \"image\" nor \"file\"")),
        }
    }
    layers
}

/// `registry.store` ("" = none).
pub(super) fn store(r: &RegistrySection, c: &Checker<'_>) -> Option<PathBuf> {
    (!r.store.is_empty()).then(|| c.path(&r.store))
}

/// Refuses a file that names no spec provider: nothing could ever be served.
pub(super) fn require_a_spec_provider(r: &RegistrySection, c: &mut Checker<'_>) {
    if r.fixed_spec_file.is_empty() && r.remote_spec_provider.is_empty() {
        c.problem("registry", "neither fixedSpecFN nor remoteSpecProvider is set, so no image could ever be served");
    }
}
