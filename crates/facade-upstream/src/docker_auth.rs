//! Registry credentials from a docker `config.json` (the `dockerAuth` file of the facade's
//! configuration).

use std::collections::HashMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use facade_oci::image_ref::{DOCKER_HUB, DOCKER_HUB_API};

use crate::error::{Error, Result};

/// Credentials per registry host. `Debug` lists hosts only, never secrets.
#[derive(Clone, Default)]
pub struct DockerAuth {
    creds: HashMap<String, (String, String)>,
}

#[derive(serde::Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: Option<HashMap<String, Entry>>,
}

#[derive(serde::Deserialize)]
struct Entry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// The key credentials are stored under: scheme and path dropped (`https://host/v1/` forms are
/// what `docker login` writes for Hub), lowercased, and every Docker Hub alias folded into one.
fn normalize(key: &str) -> String {
    let k = key.trim();
    let k = k.strip_prefix("https://").or_else(|| k.strip_prefix("http://")).unwrap_or(k);
    let k = k.split('/').next().unwrap_or("").to_ascii_lowercase();
    match k.as_str() {
        "index.docker.io" | DOCKER_HUB_API | "registry.hub.docker.com" => DOCKER_HUB.to_string(),
        _ => k,
    }
}

impl DockerAuth {
    /// No credentials: every registry is accessed anonymously.
    pub fn empty() -> Self {
        DockerAuth::default()
    }

    /// Parses a docker `config.json`. Entries carry `auth` (base64 of `user:password`) or
    /// `username` + `password`; other keys (`credsStore`, `credHelpers`, `identitytoken`) are
    /// ignored. Errors never quote the file's content.
    pub fn parse(json: &str) -> Result<DockerAuth> {
        // Only line and column of serde's error: its message can quote the file's text.
        let value: serde_json::Value = serde_json::from_str(json).map_err(|e| Error::DockerConfig {
            reason: format!("not JSON: line {} column {}", e.line(), e.column()),
        })?;
        if !value.is_object() {
            return Err(Error::DockerConfig { reason: "not a JSON object".into() });
        }
        let file: ConfigFile = serde_json::from_value(value)
            .map_err(|_| Error::DockerConfig { reason: "`auths` must map hosts to objects".into() })?;
        let mut creds = HashMap::new();
        for (key, entry) in file.auths.unwrap_or_default() {
            let host = normalize(&key);
            if host.is_empty() {
                continue;
            }
            let pair = match (
                entry.auth.as_deref().map(str::trim).filter(|a| !a.is_empty()),
                entry.username,
                entry.password,
            ) {
                (Some(auth), _, _) => {
                    let raw = STANDARD
                        .decode(auth)
                        .map_err(|_| Error::DockerConfig { reason: format!("auths.{host}.auth is not base64") })?;
                    let text = String::from_utf8(raw)
                        .map_err(|_| Error::DockerConfig { reason: format!("auths.{host}.auth is not UTF-8") })?;
                    let (u, p) = text.split_once(':').ok_or_else(|| Error::DockerConfig {
                        reason: format!("auths.{host}.auth is not user:password"),
                    })?;
                    (u.to_string(), p.to_string())
                }
                (None, Some(u), Some(p)) if !u.is_empty() => (u, p),
                // An entry without usable credentials (e.g. only an identity token) means
                // anonymous access for that host.
                _ => continue,
            };
            creds.insert(host, pair);
        }
        Ok(DockerAuth { creds })
    }

    /// User and password for a registry host (as in image refs or API hosts; Docker Hub's
    /// names are interchangeable).
    pub fn lookup(&self, registry_host: &str) -> Option<(String, String)> {
        self.creds.get(&normalize(registry_host)).cloned()
    }

    /// Whether no credentials are configured.
    pub fn is_empty(&self) -> bool {
        self.creds.is_empty()
    }

    /// The `Authorization: Basic` value for a host.
    pub(crate) fn basic_header(&self, registry_host: &str) -> Option<String> {
        self.creds.get(&normalize(registry_host)).map(|(u, p)| format!("Basic {}", STANDARD.encode(format!("{u}:{p}"))))
    }
}

impl fmt::Debug for DockerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut hosts: Vec<&String> = self.creds.keys().collect();
        hosts.sort();
        f.debug_struct("DockerAuth").field("hosts", &hosts).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        STANDARD.encode(s)
    }

    #[test]
    fn parses_auth_and_username_password_forms() {
        let json = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{}"}},
                "127.0.0.1:5000": {{"username": "u2", "password": "p:2"}},
                "https://Quay.io": {{"auth": "{}", "email": "x@y"}},
                "ghcr.io": {{"identitytoken": "abc"}}
            }}, "credsStore": "desktop"}}"#,
            b64("hub:pw"),
            b64("q:with:colons")
        );
        let a = DockerAuth::parse(&json).unwrap();
        for hub in ["docker.io", "index.docker.io", "registry-1.docker.io", "https://index.docker.io/v1/"] {
            assert_eq!(a.lookup(hub), Some(("hub".into(), "pw".into())), "{hub}");
        }
        assert_eq!(a.lookup("127.0.0.1:5000"), Some(("u2".into(), "p:2".into())));
        assert_eq!(a.lookup("127.0.0.1:5001"), None);
        assert_eq!(a.lookup("quay.io"), Some(("q".into(), "with:colons".into())));
        assert_eq!(a.lookup("ghcr.io"), None);
        assert_eq!(a.basic_header("docker.io").unwrap(), format!("Basic {}", b64("hub:pw")));
    }

    #[test]
    fn accepts_empty_configs() {
        assert!(DockerAuth::parse("{}").unwrap().is_empty());
        assert!(DockerAuth::parse(r#"{"auths":{}}"#).unwrap().is_empty());
        assert!(DockerAuth::empty().lookup("docker.io").is_none());
    }

    #[test]
    fn rejects_bad_files_without_quoting_secrets() {
        for bad in ["", "[]", "{\"auths\": 1}", "{\"auths\": {\"h\": {\"auth\": \"%%%\"}}}"] {
            let e = DockerAuth::parse(bad).unwrap_err();
            assert!(matches!(e, Error::DockerConfig { .. }), "{bad}: {e}");
        }
        let secret = b64("nocolon-secret");
        let e = DockerAuth::parse(&format!(r#"{{"auths":{{"h":{{"auth":"{secret}"}}}}}}"#)).unwrap_err();
        assert!(!e.to_string().contains("nocolon-secret") && !e.to_string().contains(&secret));
    }

    #[test]
    fn debug_shows_hosts_only() {
        let a = DockerAuth::parse(&format!(r#"{{"auths":{{"h":{{"auth":"{}"}}}}}}"#, b64("user:hunter2"))).unwrap();
        let d = format!("{a:?}");
        assert!(d.contains("\"h\"") && !d.contains("hunter2") && !d.contains("user"));
    }
}
