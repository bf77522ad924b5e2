//! The Redis side of the cluster cache: a thin byte-level client (namespaced keys, TTLs) over
//! the redis crate's `ConnectionManager`, one multiplexed, pipelined connection shared by every
//! task of the process that reconnects by itself after Redis comes back.
//!
//! Timeouts and fall-back policy live in the caller ([`super::ClusterCache`]), which wraps every
//! call here in the Redis breaker.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};

use crate::error::{Error, Result};

/// How to reach Redis.
#[derive(Clone)]
pub struct RedisConfig {
    /// `host:port` (the reference's `singleHostAddr`).
    pub addr: String,
    /// ACL user name, if any.
    pub username: Option<String>,
    /// Password (`REDIS_PASSWORD`), if any.
    pub password: Option<String>,
    /// Speak TLS (server certificates checked against the system's roots).
    pub tls: bool,
    /// With `tls`: accept any server certificate (the reference's `insecureSkipVerify`).
    pub insecure_skip_verify: bool,
    /// Prefix of every key, so the facade can share a Redis with other users.
    pub namespace: String,
    /// Connect and response deadline of one command.
    pub timeout: Duration,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        f.debug_struct("RedisConfig")
            .field("addr", &self.addr)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .field("namespace", &self.namespace)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl RedisConfig {
    /// Defaults for `addr`: no auth, plain TCP, namespace `registry-facade`, 500 ms per command.
    pub fn new(addr: impl Into<String>) -> Self {
        RedisConfig {
            addr: addr.into(),
            username: None,
            password: None,
            tls: false,
            insecure_skip_verify: false,
            namespace: "registry-facade".into(),
            timeout: Duration::from_millis(500),
        }
    }
}

fn err(context: impl Into<String>, reason: impl std::fmt::Display) -> Error {
    Error::Cluster { dependency: "redis", context: context.into(), reason: reason.to_string() }
}

/// Splits `host:port` (`[v6]:port` too).
fn split_host_port(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    (!host.is_empty()).then(|| (host.to_string(), port))
}

/// A namespaced key/value view of Redis.
#[derive(Clone)]
pub struct RedisKv {
    conn: ConnectionManager,
    namespace: String,
}

impl std::fmt::Debug for RedisKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisKv").field("namespace", &self.namespace).finish()
    }
}

impl RedisKv {
    /// A client of `config.addr`. Connects lazily (a Redis that is down at start-up must not stop
    /// the facade), so this needs a tokio runtime but no Redis.
    pub fn connect(config: &RedisConfig) -> Result<Self> {
        let (host, port) = split_host_port(&config.addr)
            .ok_or_else(|| err("configuring", format!("{:?} is not host:port", config.addr)))?;
        let addr = if config.tls {
            ConnectionAddr::TcpTls { host, port, insecure: config.insecure_skip_verify, tls_params: None }
        } else {
            ConnectionAddr::Tcp(host, port)
        };
        let mut settings = RedisConnectionInfo::default();
        if let Some(user) = config.username.as_deref().filter(|u| !u.is_empty()) {
            settings = settings.set_username(user);
        }
        if let Some(password) = config.password.as_deref().filter(|p| !p.is_empty()) {
            settings = settings.set_password(password);
        }
        let info = addr.into_connection_info().map_err(|e| err("configuring", e))?.set_redis_settings(settings);
        let client = redis::Client::open(info).map_err(|e| err("configuring", e))?;
        // No retries inside the manager: the breaker decides when to try again, and a command
        // must never wait out a reconnect loop.
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(0);
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config).map_err(|e| err("connecting", e))?;
        Ok(RedisKv { conn, namespace: config.namespace.clone() })
    }

    /// The full key of `parts` under the namespace (`<ns>:<part>:<part>…`).
    pub fn key(&self, parts: &[&str]) -> String {
        let mut k = self.namespace.clone();
        for p in parts {
            k.push(':');
            k.push_str(p);
        }
        k
    }

    /// `PING` (the breaker's recovery probe).
    pub async fn ping(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::cmd("PING").query_async::<()>(&mut conn).await.map_err(|e| err("PING", e))
    }

    /// `GET key`.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let mut conn = self.conn.clone();
        redis::cmd("GET").arg(key).query_async(&mut conn).await.map_err(|e| err("GET", e))
    }

    /// `GETEX key EX ttl`: reads and extends the entry's life (hot entries stay).
    pub async fn get_refresh(&self, key: &str, ttl: Duration) -> Result<Option<Vec<u8>>> {
        let mut conn = self.conn.clone();
        redis::cmd("GETEX")
            .arg(key)
            .arg("EX")
            .arg(ttl.as_secs().max(1))
            .query_async(&mut conn)
            .await
            .map_err(|e| err("GETEX", e))
    }

    /// `SET key value EX ttl`.
    pub async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("EX")
            .arg(ttl.as_secs().max(1))
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| err("SET", e))
    }

    /// `DEL key`.
    pub async fn del(&self, key: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::cmd("DEL").arg(key).query_async::<()>(&mut conn).await.map_err(|e| err("DEL", e))
    }

    /// Pushes `value` to the front of the list `key`, keeps its first `keep` entries and sets
    /// its TTL, atomically.
    pub async fn push_bounded(&self, key: &str, value: &[u8], keep: usize, ttl: Duration) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .cmd("LREM")
            .arg(key)
            .arg(0)
            .arg(value)
            .ignore()
            .cmd("LPUSH")
            .arg(key)
            .arg(value)
            .ignore()
            .cmd("LTRIM")
            .arg(key)
            .arg(0)
            .arg(keep.saturating_sub(1))
            .ignore()
            .cmd("EXPIRE")
            .arg(key)
            .arg(ttl.as_secs().max(1))
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| err("LPUSH", e))
    }

    /// `LRANGE key 0 -1`.
    pub async fn list(&self, key: &str) -> Result<Vec<Vec<u8>>> {
        let mut conn = self.conn.clone();
        redis::cmd("LRANGE").arg(key).arg(0).arg(-1).query_async(&mut conn).await.map_err(|e| err("LRANGE", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("redis:6379"), Some(("redis".into(), 6379)));
        assert_eq!(split_host_port("[::1]:6380"), Some(("::1".into(), 6380)));
        assert_eq!(split_host_port("redis"), None);
        assert_eq!(split_host_port(":6379"), None);
        assert_eq!(split_host_port("redis:port"), None);
    }

    #[test]
    fn the_password_is_never_printed() {
        let mut c = RedisConfig::new("redis:6379");
        c.password = Some("hunter2".into());
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[tokio::test]
    async fn connecting_is_lazy_and_keys_are_namespaced() {
        // Nothing listens on port 1: construction must still succeed.
        let kv = RedisKv::connect(&RedisConfig::new("127.0.0.1:1")).unwrap();
        assert_eq!(kv.key(&["tag", "reg/repo:1"]), "registry-facade:tag:reg/repo:1");
        assert!(kv.get("x").await.is_err());
        let mut tls = RedisConfig::new("127.0.0.1:1");
        tls.tls = true;
        assert!(RedisKv::connect(&tls).is_ok());
    }
}
