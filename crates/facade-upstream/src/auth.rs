//! Registry authentication state: credentials, the token cache keyed by (realm, service,
//! scope), and per (host, repository) the scheme to send up front so a warm client never
//! pays a 401 round trip.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::header::{ACCEPT, AUTHORIZATION};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use tokio::time::Instant;
use url::Url;

use crate::challenge::Challenge;
use crate::docker_auth::DockerAuth;
use crate::error::{Error, Result};
use crate::transport::{Redirectable, Transport, authority, read_bounded, status_error};

/// Lifetime assumed when a token response has no `expires_in` (or a smaller one): the token
/// spec's minimum, and what Docker's client assumes.
const MIN_TOKEN_TTL: Duration = Duration::from_secs(60);
/// Longest we keep a token whatever it claims: a long-lived token that was revoked would
/// otherwise fail every pull until the first 401.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Refresh this long before expiry so a token does not run out between send and check.
const TOKEN_MARGIN: Duration = Duration::from_secs(10);

/// Which token a Bearer challenge asks for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TokenKey {
    pub(crate) realm: String,
    pub(crate) service: String,
    pub(crate) scope: String,
}

#[derive(Clone)]
pub(crate) struct CachedToken {
    pub(crate) value: String,
    refresh_at: Instant,
}

/// What to send up front for a (host, repository).
#[derive(Clone, Debug)]
pub(crate) enum Plan {
    Basic,
    Bearer(TokenKey),
}

type TokenSlot = Arc<tokio::sync::Mutex<Option<CachedToken>>>;

/// Credentials and everything learned with them. `Client::set_auth` replaces the whole state,
/// so tokens fetched with old credentials can never be served again.
pub(crate) struct AuthState {
    pub(crate) creds: DockerAuth,
    tokens: Mutex<HashMap<TokenKey, TokenSlot>>,
    plans: Mutex<HashMap<(String, String), Plan>>,
}

/// Std mutexes here guard plain map operations that cannot panic halfway, so a poisoned lock
/// still holds a consistent map.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The Authorization header we sent, and whether a 401 to it is worth one retry.
pub(crate) enum Sent {
    Nothing,
    Basic,
    Token { key: TokenKey, value: String, fresh: bool },
}

impl AuthState {
    pub(crate) fn new(creds: DockerAuth) -> Self {
        AuthState { creds, tokens: Mutex::new(HashMap::new()), plans: Mutex::new(HashMap::new()) }
    }

    pub(crate) fn plan(&self, host: &str, repo: &str) -> Option<Plan> {
        lock(&self.plans).get(&(host.to_string(), repo.to_string())).cloned()
    }

    pub(crate) fn remember(&self, host: &str, repo: &str, plan: Plan) {
        lock(&self.plans).insert((host.to_string(), repo.to_string()), plan);
    }

    fn slot(&self, key: &TokenKey) -> TokenSlot {
        lock(&self.tokens).entry(key.clone()).or_default().clone()
    }

    /// Drops `value` from the cache if it is still the cached token for `key`.
    pub(crate) async fn forget(&self, key: &TokenKey, value: &str) {
        let slot = self.slot(key);
        let mut g = slot.lock().await;
        if g.as_ref().is_some_and(|t| t.value == value) {
            *g = None;
        }
    }

    /// A usable token for `key`: the cached one unless it is `not` (refused a moment ago) or
    /// near expiry, else a fresh one. Concurrent callers for one key share one fetch.
    /// Returns the token and whether it was fetched by this call.
    pub(crate) async fn token(
        &self,
        transport: &Transport,
        registry_host: &str,
        key: &TokenKey,
        not: Option<&str>,
    ) -> Result<(String, bool)> {
        let slot = self.slot(key);
        let mut g = slot.lock().await;
        if let Some(t) = g.as_ref()
            && t.refresh_at > Instant::now()
        {
            match not {
                Some(bad) if t.value == bad => {}
                // Someone else refreshed it since the refused one was sent: as good as fresh.
                Some(_) => return Ok((t.value.clone(), true)),
                None => return Ok((t.value.clone(), false)),
            }
        }
        *g = None;
        let t = fetch_token(transport, &self.creds, registry_host, key).await?;
        let value = t.value.clone();
        *g = Some(t);
        Ok((value, true))
    }
}

/// The token to ask for from a Bearer challenge: its own scope, else pull on `repo`.
pub(crate) fn token_key(ch: &Challenge, repo: &str) -> Option<TokenKey> {
    let realm = ch.param("realm").filter(|r| !r.is_empty())?.to_string();
    let service = ch.param("service").unwrap_or("").to_string();
    let scope = match ch.param("scope").map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) => s.to_string(),
        None => format!("repository:{repo}:pull"),
    };
    Some(TokenKey { realm, service, scope })
}

pub(crate) fn bearer_header(token: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    v.set_sensitive(true);
    Some(v)
}

pub(crate) fn basic_header(creds: &DockerAuth, host: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(&creds.basic_header(host)?).ok()?;
    v.set_sensitive(true);
    Some(v)
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

pub(crate) fn token_ttl(expires_in: Option<&serde_json::Value>) -> Duration {
    let secs = expires_in.and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f.max(0.0) as u64)));
    secs.map(Duration::from_secs).unwrap_or(MIN_TOKEN_TTL).clamp(MIN_TOKEN_TTL, MAX_TOKEN_TTL)
}

/// GET realm?service=…&scope=…, with Basic credentials for the *registry* host when we have
/// them (Docker's rule), anonymously otherwise.
async fn fetch_token(
    transport: &Transport,
    creds: &DockerAuth,
    registry_host: &str,
    key: &TokenKey,
) -> Result<CachedToken> {
    let mut url = Url::parse(&key.realm)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
        .ok_or_else(|| Error::Protocol { host: registry_host.to_string(), reason: "unusable token realm".into() })?;
    {
        let mut q = url.query_pairs_mut();
        if !key.service.is_empty() {
            q.append_pair("service", &key.service);
        }
        // Docker sends one scope parameter per space-separated scope.
        for s in key.scope.split_whitespace() {
            q.append_pair("scope", s);
        }
    }
    let realm_host = authority(&url);
    let mut headers = HeaderMap::new();
    headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
    let authz = basic_header(creds, registry_host);
    if let Some(a) = &authz {
        headers.insert(AUTHORIZATION, a.clone());
    }
    let origin = url.origin();
    let resp = transport.exchange(&Method::GET, &url, &headers, &realm_host).await?;
    let hop = Redirectable {
        method: &Method::GET,
        headers: &headers,
        authz: authz.as_ref(),
        auth_origin: &origin,
        host: &realm_host,
    };
    let resp = transport.follow(resp, url, hop).await?;
    let status = resp.status();
    if status == StatusCode::UNAUTHORIZED {
        return Err(Error::Unauthorized {
            host: realm_host,
            status: 401,
            reason: if authz.is_some() {
                "token server refused the credentials"
            } else {
                "token server wants credentials"
            },
        });
    }
    if !status.is_success() {
        return Err(status_error(&realm_host, status, resp.headers(), || "token endpoint".into()));
    }
    // Token bodies are small; the metadata bound is generous for them.
    let body = read_bounded(resp, 1 << 20, &realm_host).await?;
    let parsed: TokenResponse = serde_json::from_slice(&body)
        .map_err(|_| Error::Protocol { host: realm_host.clone(), reason: "token response is not JSON".into() })?;
    let value =
        parsed.token.filter(|t| !t.is_empty()).or(parsed.access_token.filter(|t| !t.is_empty())).ok_or_else(|| {
            Error::Protocol { host: realm_host.clone(), reason: "token response without token".into() }
        })?;
    if bearer_header(&value).is_none() {
        return Err(Error::Protocol { host: realm_host, reason: "token is not a valid header value".into() });
    }
    let ttl = token_ttl(parsed.expires_in.as_ref());
    tracing::debug!(registry = registry_host, realm = %realm_host, scope = %key.scope, ttl_s = ttl.as_secs(), "fetched registry token");
    Ok(CachedToken { value, refresh_at: Instant::now() + ttl - TOKEN_MARGIN })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::challenge;

    #[test]
    fn token_ttl_defaults_and_caps() {
        use serde_json::json;
        assert_eq!(token_ttl(None), Duration::from_secs(60));
        assert_eq!(token_ttl(Some(&json!(0))), Duration::from_secs(60));
        assert_eq!(token_ttl(Some(&json!(30))), Duration::from_secs(60));
        assert_eq!(token_ttl(Some(&json!(300))), Duration::from_secs(300));
        assert_eq!(token_ttl(Some(&json!(300.5))), Duration::from_secs(300));
        assert_eq!(token_ttl(Some(&json!(86400))), Duration::from_secs(3600));
        assert_eq!(token_ttl(Some(&json!("300"))), Duration::from_secs(60));
    }

    #[test]
    fn token_key_from_challenge() {
        let ch = &challenge::parse(r#"Bearer realm="https://a/token",service="reg""#)[0];
        let k = token_key(ch, "x/y").unwrap();
        assert_eq!(
            k,
            TokenKey { realm: "https://a/token".into(), service: "reg".into(), scope: "repository:x/y:pull".into() }
        );
        let ch = &challenge::parse(r#"Bearer realm="https://a/token",scope="repository:x/y:pull,push""#)[0];
        assert_eq!(token_key(ch, "x/y").unwrap().scope, "repository:x/y:pull,push");
        assert!(token_key(&challenge::parse("Bearer service=x")[0], "r").is_none());
    }
}
