//! Registry authentication state: credentials, the token cache, and per (host, repository)
//! the scheme to send up front so a warm client never pays a 401 round trip.
//!
//! Every registry a workspace names may be hostile (`docs/security-model.md`, invariant 1):
//! its challenge's realm, service and scope are text it chose. So a cached token is keyed by
//! the registry host it was fetched for *and* the challenge, never by the challenge alone (a
//! registry copying a private registry's challenge would otherwise be handed that registry's
//! token); credentials are looked up by the host the request goes to; and every map here is
//! bounded in entries and age, whatever hosts, repositories and challenges the workspaces name.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use facade_oci::image_ref::DOCKER_HUB_API;
use http::header::{ACCEPT, AUTHORIZATION};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use tokio::time::Instant;
use url::Url;

use crate::challenge::Challenge;
use crate::docker_auth::DockerAuth;
use crate::error::{Error, Result};
use crate::host::is_loopback;
use crate::transport::{Redirectable, Transport, authority, read_bounded, status_error};

/// Lifetime assumed when a token response has no `expires_in` (or a smaller one): the token
/// spec's minimum, and what Docker's client assumes.
const MIN_TOKEN_TTL: Duration = Duration::from_secs(60);
/// Longest we keep a token whatever it claims: a long-lived token that was revoked would
/// otherwise fail every pull until the first 401.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Refresh this long before expiry so a token does not run out between send and check.
const TOKEN_MARGIN: Duration = Duration::from_secs(10);
/// Token cache entries (one per registry host and challenge). A node pulls from a few dozen
/// registries and repositories; a workspace naming thousands only evicts its own and others'
/// least recently used entries, which costs a token request, never a failure.
const MAX_TOKEN_SLOTS: usize = 1024;
/// Learned auth schemes, one per (host, repository).
const MAX_PLANS: usize = 4096;
/// A token slot unused this long, and a learned scheme this old, is dropped: no token outlives
/// `MAX_TOKEN_TTL` anyway, and a registry that changed its scheme is re-learned.
const MAX_IDLE: Duration = MAX_TOKEN_TTL;
/// Longest realm + service + scope we cache a token for. Real challenges are a few hundred
/// bytes; the cap keeps one entry's cost independent of what an upstream sends.
const MAX_KEY_BYTES: usize = 4096;

/// Which token a Bearer challenge asks for. Attacker-chosen text: only meaningful together with
/// the registry host it came from (the cache key is `(host, TokenKey)`).
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

/// A cache entry and when it was last handed out: `used` for idle expiry, `seq` (a counter,
/// unlike clock readings never equal for two uses) for least-recently-used eviction.
struct Aged<T> {
    value: T,
    used: Instant,
    seq: u64,
}

/// Keeps `map` under `max` entries before one is inserted: first entries idle longer than
/// `MAX_IDLE`, then the least recently used one. O(n) on a full map only, with n bounded.
fn make_room<K: Clone + Eq + std::hash::Hash, T>(map: &mut HashMap<K, Aged<T>>, max: usize, now: Instant) {
    if map.len() < max {
        return;
    }
    map.retain(|_, e| now.saturating_duration_since(e.used) < MAX_IDLE);
    while map.len() >= max {
        let Some(oldest) = map.iter().min_by_key(|(_, e)| e.seq).map(|(k, _)| k.clone()) else { break };
        map.remove(&oldest);
    }
}

/// Credentials and everything learned with them. `Client::set_auth` replaces the whole state,
/// so tokens fetched with old credentials can never be served again.
pub(crate) struct AuthState {
    pub(crate) creds: DockerAuth,
    tokens: Mutex<HashMap<(String, TokenKey), Aged<TokenSlot>>>,
    plans: Mutex<HashMap<(String, String), Aged<Plan>>>,
    uses: AtomicU64,
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
        AuthState {
            creds,
            tokens: Mutex::new(HashMap::new()),
            plans: Mutex::new(HashMap::new()),
            uses: AtomicU64::new(0),
        }
    }

    fn tick(&self) -> u64 {
        self.uses.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn plan(&self, host: &str, repo: &str) -> Option<Plan> {
        let plans = lock(&self.plans);
        let e = plans.get(&(host.to_string(), repo.to_string()))?;
        (e.used.elapsed() < MAX_IDLE).then(|| e.value.clone())
    }

    pub(crate) fn remember(&self, host: &str, repo: &str, plan: Plan) {
        let now = Instant::now();
        let mut plans = lock(&self.plans);
        let key = (host.to_string(), repo.to_string());
        if !plans.contains_key(&key) {
            make_room(&mut plans, MAX_PLANS, now);
        }
        plans.insert(key, Aged { value: plan, used: now, seq: self.tick() });
    }

    /// The slot of `registry_host`'s token for `key`: a token fetched for another host is never
    /// in it, whatever that host's challenge said.
    fn slot(&self, registry_host: &str, key: &TokenKey) -> TokenSlot {
        let now = Instant::now();
        let mut tokens = lock(&self.tokens);
        let k = (registry_host.to_string(), key.clone());
        if let Some(e) = tokens.get_mut(&k) {
            e.used = now;
            e.seq = self.tick();
            return e.value.clone();
        }
        make_room(&mut tokens, MAX_TOKEN_SLOTS, now);
        let slot = TokenSlot::default();
        tokens.insert(k, Aged { value: slot.clone(), used: now, seq: self.tick() });
        slot
    }

    /// Drops `value` from the cache wherever it is still the cached token for `key`. The caller
    /// knows the key but not the host; matching the exact value keeps this from touching any
    /// other registry's token.
    pub(crate) async fn forget(&self, key: &TokenKey, value: &str) {
        let slots: Vec<TokenSlot> =
            lock(&self.tokens).iter().filter(|((_, k), _)| k == key).map(|(_, e)| e.value.clone()).collect();
        for slot in slots {
            let mut g = slot.lock().await;
            if g.as_ref().is_some_and(|t| t.value == value) {
                *g = None;
            }
        }
    }

    /// A usable token for `registry_host` and `key`: the cached one unless it is `not` (refused
    /// a moment ago) or near expiry, else a fresh one. Concurrent callers for one host and key
    /// share one fetch. Returns the token and whether it was fetched by this call.
    pub(crate) async fn token(
        &self,
        transport: &Transport,
        registry_host: &str,
        key: &TokenKey,
        not: Option<&str>,
    ) -> Result<(String, bool)> {
        let slot = self.slot(registry_host, key);
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

/// The token to ask for from a Bearer challenge: its own scope, else pull on `repo`. `None`
/// for a challenge without a realm or too long to cache (see `MAX_KEY_BYTES`).
pub(crate) fn token_key(ch: &Challenge, repo: &str) -> Option<TokenKey> {
    let realm = ch.param("realm").filter(|r| !r.is_empty())?.to_string();
    let service = ch.param("service").unwrap_or("").to_string();
    let scope = match ch.param("scope").map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) => s.to_string(),
        None => format!("repository:{repo}:pull"),
    };
    (realm.len() + service.len() + scope.len() <= MAX_KEY_BYTES).then_some(TokenKey { realm, service, scope })
}

/// The bare host of a `host[:port]` authority, lowercased.
fn bare_host(authority: &str) -> Option<String> {
    Url::parse(&format!("http://{authority}/")).ok()?.host_str().map(str::to_ascii_lowercase)
}

/// Whether the token request to `realm` may carry `registry_host`'s credentials.
///
/// Docker sends them to whatever realm the registry names. We send them only where the
/// operator's trust in that registry evidently extends:
/// - the realm is on the registry's own host (any port: token servers commonly listen on
///   another port of the registry's machine, as in distribution's token-auth setups);
/// - Docker Hub's registry and its token service (`auth.docker.io`), the one well-known pair
///   on different hosts;
/// - the operator configured the very same credentials for the realm's host in `dockerAuth`
///   (GitLab's `registry.example.com` → `example.com/jwt/auth`, for instance): sending them
///   there reveals nothing the operator did not already hand to that host.
///
/// And never over plain HTTP to a host that is not loopback and not the registry itself. A
/// realm outside these gets an anonymous token request; a private image then fails with 403
/// `DENIED` naming the token server, which is the safe direction to fail in.
fn realm_may_get_credentials(creds: &DockerAuth, registry_host: &str, realm: &Url) -> bool {
    let (Some(realm_host), Some(reg_host)) = (realm.host_str().map(str::to_ascii_lowercase), bare_host(registry_host))
    else {
        return false;
    };
    let realm_host = realm_host.trim_start_matches('[').trim_end_matches(']').to_string();
    let reg_host = reg_host.trim_start_matches('[').trim_end_matches(']').to_string();
    let same_host = realm_host == reg_host;
    if realm.scheme() != "https" && !same_host && !is_loopback(&realm_host) {
        return false;
    }
    same_host
        || (reg_host == DOCKER_HUB_API && realm_host == "auth.docker.io")
        || creds.lookup(&authority(realm)).is_some_and(|c| Some(c) == creds.lookup(registry_host))
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
/// them and the realm may see them (`realm_may_get_credentials`), anonymously otherwise.
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
    let authz = basic_header(creds, registry_host).filter(|_| {
        let ok = realm_may_get_credentials(creds, registry_host, &url);
        if !ok {
            tracing::warn!(registry = registry_host, realm = %realm_host, "token realm is on another host: credentials withheld, asking anonymously");
        }
        ok
    });
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

    fn key(realm: &str) -> TokenKey {
        TokenKey { realm: realm.into(), service: "svc".into(), scope: "repository:private/base:pull".into() }
    }

    async fn put(state: &AuthState, host: &str, key: &TokenKey, value: &str) {
        let slot = state.slot(host, key);
        *slot.lock().await = Some(CachedToken { value: value.into(), refresh_at: Instant::now() + MIN_TOKEN_TTL });
    }

    async fn cached(state: &AuthState, host: &str, key: &TokenKey) -> Option<String> {
        state.slot(host, key).lock().await.as_ref().map(|t| t.value.clone())
    }

    #[tokio::test]
    async fn a_copied_challenge_finds_no_token_of_another_host() {
        let state = AuthState::new(DockerAuth::empty());
        let k = key("http://127.0.0.1:5001/token");
        put(&state, "127.0.0.1:5000", &k, "legit-token").await;
        assert_eq!(cached(&state, "127.0.0.1:5000", &k).await.as_deref(), Some("legit-token"));
        assert_eq!(cached(&state, "127.0.0.1:6666", &k).await, None);
        assert_eq!(cached(&state, "evil.example", &k).await, None);
    }

    #[tokio::test]
    async fn forget_drops_only_the_refused_value() {
        let state = AuthState::new(DockerAuth::empty());
        let k = key("https://auth/token");
        put(&state, "a", &k, "token-a").await;
        put(&state, "b", &k, "token-b").await;
        state.forget(&k, "token-a").await;
        assert_eq!(cached(&state, "a", &k).await, None);
        assert_eq!(cached(&state, "b", &k).await.as_deref(), Some("token-b"));
    }

    #[tokio::test]
    async fn caches_are_bounded_whatever_upstreams_name() {
        let state = AuthState::new(DockerAuth::empty());
        for i in 0..MAX_TOKEN_SLOTS + 50 {
            state.slot(&format!("host-{i}"), &key("https://attacker/realm"));
        }
        assert_eq!(lock(&state.tokens).len(), MAX_TOKEN_SLOTS);
        // The most recent entries stay; the least recently used went first.
        assert!(
            lock(&state.tokens)
                .contains_key(&(format!("host-{}", MAX_TOKEN_SLOTS + 49), key("https://attacker/realm")))
        );
        assert!(!lock(&state.tokens).contains_key(&("host-0".to_string(), key("https://attacker/realm"))));
        for i in 0..MAX_PLANS + 50 {
            state.remember("evil", &format!("repo-{i}"), Plan::Basic);
        }
        assert_eq!(lock(&state.plans).len(), MAX_PLANS);
        assert!(state.plan("evil", &format!("repo-{}", MAX_PLANS + 49)).is_some());
        assert!(state.plan("evil", "repo-0").is_none());
    }

    #[test]
    fn idle_entries_go_before_recent_ones() {
        let now = Instant::now();
        let mut m: HashMap<u32, Aged<()>> = HashMap::new();
        for i in 0..4 {
            m.insert(i, Aged { value: (), used: now, seq: u64::from(i) });
        }
        // Not full: nothing goes, however old.
        make_room(&mut m, 5, now + MAX_IDLE * 2);
        assert_eq!(m.len(), 4);
        m.insert(9, Aged { value: (), used: now + MAX_IDLE * 2, seq: 9 });
        // Full: every idle entry goes at once, the recent one stays.
        make_room(&mut m, 5, now + MAX_IDLE * 2);
        assert_eq!(m.keys().copied().collect::<Vec<_>>(), vec![9]);
    }

    #[test]
    fn challenges_too_long_to_cache_are_refused() {
        let long = "x".repeat(MAX_KEY_BYTES);
        let ch = &challenge::parse(&format!(r#"Bearer realm="https://a/token",service="{long}""#))[0];
        assert!(token_key(ch, "r").is_none());
    }

    #[test]
    fn credentials_go_only_to_realms_the_registry_evidently_owns() {
        let creds = DockerAuth::parse(
            r#"{"auths": {
                "127.0.0.1:5000": {"username": "u", "password": "p"},
                "registry.example.com": {"username": "g", "password": "pw"},
                "example.com": {"username": "g", "password": "pw"},
                "other.example.com": {"username": "g", "password": "different"},
                "docker.io": {"username": "h", "password": "hub"}
            }}"#,
        )
        .unwrap();
        let url = |u: &str| Url::parse(u).unwrap();
        for (registry, realm, ok) in [
            // Same host, any port, any path.
            ("127.0.0.1:5000", "http://127.0.0.1:5001/token", true),
            ("registry.example.com", "https://registry.example.com/v2/token", true),
            ("registry.example.com", "https://REGISTRY.example.com:8443/t", true),
            ("[::1]:5000", "http://[::1]:5001/token", true),
            // Docker Hub and its token service.
            ("registry-1.docker.io", "https://auth.docker.io/token", true),
            ("quay.io", "https://auth.docker.io/token", false),
            // The operator gave the realm's host the same credentials.
            ("registry.example.com", "https://example.com/jwt/auth", true),
            // Different credentials, or none, for the realm's host.
            ("registry.example.com", "https://other.example.com/jwt/auth", false),
            ("registry.example.com", "https://attacker.example/token", false),
            ("127.0.0.1:5000", "http://10.0.0.1/token", false),
            // Plain HTTP to another, non-loopback host never gets them.
            ("registry.example.com", "http://example.com/jwt/auth", false),
            // A loopback token server of a loopback registry on another port is the same host.
            ("localhost:5000", "http://localhost:9999/token", true),
        ] {
            assert_eq!(realm_may_get_credentials(&creds, registry, &url(realm)), ok, "{registry} -> {realm}");
        }
    }
}
