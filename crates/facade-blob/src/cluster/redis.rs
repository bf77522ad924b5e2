//! The Redis side of the cluster cache: a thin byte-level client (namespaced keys, TTLs) over
//! one of three topologies (README, "The cluster cache"):
//! - a single Redis (the reference's `singleHostAddr`), through the redis crate's
//!   `ConnectionManager`: one multiplexed, pipelined connection shared by every task of the
//!   process that reconnects by itself after Redis comes back;
//! - a Redis Cluster (`clusterAddresses`), through the crate's async cluster connection, which
//!   learns the slot map from any reachable seed and follows `MOVED`/`ASK` and failovers;
//! - a master found through Redis Sentinel (`sentinel`), one multiplexed connection to the
//!   current master that is dropped on any failure, so the next call asks the sentinels again
//!   (after a failover that is the promoted replica; a demoted master answers `READONLY` to
//!   writes, which is a failure too).
//!
//! Every command used here touches one key, is `MGET` (split by slot in a cluster) or a script
//! whose keys share one hash tag, so all three topologies serve the same calls. Timeouts and
//! fall-back policy live in the callers ([`super::ClusterCache`], `lease.rs`), which wrap every
//! call in a Redis breaker.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, ConnectionAddr, FromRedisValue, IntoConnectionInfo, RedisConnectionInfo, RedisResult,
    TlsCertificates, TlsMode,
};

use crate::error::{Error, Result};
use crate::sync::lock;

/// Which Redis deployment the index lives in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisTopology {
    /// One Redis at [`RedisConfig::addr`].
    Single,
    /// A Redis Cluster; `seeds` are `host:port` of some of its nodes (one reachable is enough).
    Cluster {
        /// Seed nodes.
        seeds: Vec<String>,
    },
    /// The master Redis Sentinel names `master_name`.
    Sentinel {
        /// The monitored master's name (`sentinel monitor <name> …`).
        master_name: String,
        /// `host:port` of the sentinels.
        sentinels: Vec<String>,
    },
}

/// How to reach Redis.
#[derive(Clone)]
pub struct RedisConfig {
    /// `host:port` (the reference's `singleHostAddr`), for [`RedisTopology::Single`].
    pub addr: String,
    /// Single Redis, Cluster or Sentinel.
    pub topology: RedisTopology,
    /// ACL user name, if any.
    pub username: Option<String>,
    /// Password (`REDIS_PASSWORD`), if any.
    pub password: Option<String>,
    /// Speak TLS (server certificates checked against the system's roots, or `ca_pem`).
    pub tls: bool,
    /// With `tls`: accept any server certificate (the reference's `insecureSkipVerify`).
    pub insecure_skip_verify: bool,
    /// With `tls`: PEM certificates of a private CA to trust instead of the system's roots.
    pub ca_pem: Option<Vec<u8>>,
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
            .field("topology", &self.topology)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .field("ca_pem", &self.ca_pem.as_ref().map(Vec::len))
            .field("namespace", &self.namespace)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl RedisConfig {
    /// Defaults for a single Redis at `addr`: no auth, plain TCP, namespace `registry-facade`,
    /// 500 ms per command.
    pub fn new(addr: impl Into<String>) -> Self {
        RedisConfig {
            addr: addr.into(),
            topology: RedisTopology::Single,
            username: None,
            password: None,
            tls: false,
            insecure_skip_verify: false,
            ca_pem: None,
            namespace: "registry-facade".into(),
            timeout: Duration::from_millis(500),
        }
    }

    /// A Redis Cluster reached through `seeds`.
    pub fn cluster(seeds: Vec<String>) -> Self {
        RedisConfig { topology: RedisTopology::Cluster { seeds }, ..Self::new("") }
    }

    /// The master `master_name` of the sentinels at `sentinels`.
    pub fn sentinel(master_name: impl Into<String>, sentinels: Vec<String>) -> Self {
        RedisConfig {
            topology: RedisTopology::Sentinel { master_name: master_name.into(), sentinels },
            ..Self::new("")
        }
    }

    /// Where this config points, for logs (addresses only).
    pub fn describe(&self) -> String {
        match &self.topology {
            RedisTopology::Single => self.addr.clone(),
            RedisTopology::Cluster { seeds } => format!("cluster {}", seeds.join(",")),
            RedisTopology::Sentinel { master_name, sentinels } => {
                format!("sentinel master {master_name} via {}", sentinels.join(","))
            }
        }
    }

    fn tls_mode(&self) -> Option<TlsMode> {
        match (self.tls, self.insecure_skip_verify) {
            (false, _) => None,
            (true, false) => Some(TlsMode::Secure),
            (true, true) => Some(TlsMode::Insecure),
        }
    }

    /// The private CA, when TLS checks certificates against one.
    fn certificates(&self) -> Option<TlsCertificates> {
        let root = self.ca_pem.clone().filter(|_| self.tls && !self.insecure_skip_verify)?;
        Some(TlsCertificates { client_tls: None, root_cert: Some(root) })
    }

    fn redis_settings(&self) -> RedisConnectionInfo {
        let mut settings = RedisConnectionInfo::default();
        if let Some(user) = self.username.as_deref().filter(|u| !u.is_empty()) {
            settings = settings.set_username(user);
        }
        if let Some(password) = self.password.as_deref().filter(|p| !p.is_empty()) {
            settings = settings.set_password(password);
        }
        settings
    }

    /// `host:port` as a connection address in this config's TLS mode.
    fn conn_addr(&self, what: &str, addr: &str) -> Result<ConnectionAddr> {
        let (host, port) =
            split_host_port(addr).ok_or_else(|| err("configuring", format!("{what} {addr:?} is not host:port")))?;
        Ok(match self.tls_mode() {
            Some(mode) => ConnectionAddr::TcpTls { host, port, insecure: mode == TlsMode::Insecure, tls_params: None },
            None => ConnectionAddr::Tcp(host, port),
        })
    }
}

/// How a PEM certificate starts.
const PEM_CERT: &[u8] = b"-----BEGIN CERTIFICATE-----";

fn err(context: impl Into<String>, reason: impl std::fmt::Display) -> Error {
    Error::Cluster { dependency: "redis", context: context.into(), reason: reason.to_string() }
}

/// Splits `host:port` (`[v6]:port` too).
pub fn split_host_port(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    (!host.is_empty()).then(|| (host.to_string(), port))
}

/// The connection to the current Sentinel master, made on first use and dropped on failure.
struct SentinelConn {
    client: tokio::sync::Mutex<SentinelClient>,
    current: Mutex<Option<MultiplexedConnection>>,
    config: AsyncConnectionConfig,
}

impl SentinelConn {
    async fn connection(&self) -> RedisResult<MultiplexedConnection> {
        if let Some(c) = lock(&self.current).clone() {
            return Ok(c);
        }
        let mut client = self.client.lock().await;
        // Another task may have connected while this one waited for the lock.
        if let Some(c) = lock(&self.current).clone() {
            return Ok(c);
        }
        let conn = client.get_async_connection_with_config(&self.config).await?;
        *lock(&self.current) = Some(conn.clone());
        Ok(conn)
    }

    /// Forgets the connection, so the next call asks the sentinels where the master is. Any
    /// failure does this: a dead master refuses or times out, a demoted one answers
    /// `READONLY`, and asking the sentinels once more is cheap next to a breaker backoff.
    fn reset(&self) {
        *lock(&self.current) = None;
    }
}

#[derive(Clone)]
enum Backend {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(Arc<SentinelConn>),
}

/// A namespaced key/value view of Redis.
#[derive(Clone)]
pub struct RedisKv {
    backend: Backend,
    namespace: String,
}

impl std::fmt::Debug for RedisKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisKv").field("namespace", &self.namespace).finish()
    }
}

impl RedisKv {
    /// A client of the configured Redis. Connects lazily (a Redis that is down at start-up must
    /// not stop the facade), so this needs a tokio runtime but no Redis.
    pub fn connect(config: &RedisConfig) -> Result<Self> {
        // The redis crate takes text without a certificate as an empty trust store: every call
        // would then fail as if Redis were down. A setup error is said now, once.
        if let Some(TlsCertificates { root_cert: Some(pem), .. }) = config.certificates()
            && !pem.windows(PEM_CERT.len()).any(|w| w == PEM_CERT)
        {
            return Err(err("configuring", "the Redis CA (caFile) holds no PEM certificate"));
        }
        let backend = match &config.topology {
            RedisTopology::Single => Backend::Single(single(config)?),
            RedisTopology::Cluster { seeds } => Backend::Cluster(cluster(config, seeds)?),
            RedisTopology::Sentinel { master_name, sentinels } => {
                Backend::Sentinel(Arc::new(sentinel(config, master_name, sentinels)?))
            }
        };
        Ok(RedisKv { backend, namespace: config.namespace.clone() })
    }

    /// Runs `cmd` on the backend. Boxed: the cluster connection's futures are deep types, and
    /// every caller up to the HTTP handlers would otherwise carry them in its own layout.
    fn query<'a, T: FromRedisValue + Send + 'a>(
        &'a self,
        cmd: &'a redis::Cmd,
        what: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<T>> {
        Box::pin(async move {
            let result = match &self.backend {
                Backend::Single(conn) => cmd.query_async(&mut conn.clone()).await,
                Backend::Cluster(conn) => cmd.query_async(&mut conn.clone()).await,
                Backend::Sentinel(s) => match s.connection().await {
                    Ok(mut conn) => {
                        let r = cmd.query_async(&mut conn).await;
                        if r.is_err() {
                            s.reset();
                        }
                        r
                    }
                    Err(e) => Err(e),
                },
            };
            result.map_err(|e| err(what, e))
        })
    }

    /// Runs `pipe` on the backend (boxed, as [`RedisKv::query`]).
    fn query_pipe<'a, T: FromRedisValue + Send + 'a>(
        &'a self,
        pipe: &'a redis::Pipeline,
        what: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<T>> {
        Box::pin(async move {
            let result = match &self.backend {
                Backend::Single(conn) => pipe.query_async(&mut conn.clone()).await,
                Backend::Cluster(conn) => pipe.query_async(&mut conn.clone()).await,
                Backend::Sentinel(s) => match s.connection().await {
                    Ok(mut conn) => {
                        let r = pipe.query_async(&mut conn).await;
                        if r.is_err() {
                            s.reset();
                        }
                        r
                    }
                    Err(e) => Err(e),
                },
            };
            result.map_err(|e| err(what, e))
        })
    }
}

impl RedisKv {
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
        self.query::<()>(&redis::cmd("PING"), "PING").await
    }

    /// `GET key`.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.query(redis::cmd("GET").arg(key), "GET").await
    }

    /// `MGET keys…` (split by slot in a cluster), one answer per key.
    pub async fn mget(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.query(redis::cmd("MGET").arg(keys), "MGET").await
    }

    /// `GETEX key EX ttl`: reads and extends the entry's life (hot entries stay).
    pub async fn get_refresh(&self, key: &str, ttl: Duration) -> Result<Option<Vec<u8>>> {
        self.query(redis::cmd("GETEX").arg(key).arg("EX").arg(ttl.as_secs().max(1)), "GETEX").await
    }

    /// `SET key value EX ttl`.
    pub async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        self.query::<()>(redis::cmd("SET").arg(key).arg(value).arg("EX").arg(ttl.as_secs().max(1)), "SET").await
    }

    /// `SET key value NX PX ttl`: whether this call created the key (a lease).
    pub async fn set_nx(&self, key: &str, value: &[u8], ttl: Duration) -> Result<bool> {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let reply: Option<String> =
            self.query(redis::cmd("SET").arg(key).arg(value).arg("NX").arg("PX").arg(ms), "SET NX").await?;
        Ok(reply.is_some())
    }

    /// `DEL key`.
    pub async fn del(&self, key: &str) -> Result<()> {
        self.query::<()>(redis::cmd("DEL").arg(key), "DEL").await
    }

    /// Deletes `key` only while its value contains `needle` (one Lua call, so an entry
    /// rewritten meanwhile is left alone). Whether it was deleted.
    pub async fn del_if_contains(&self, key: &str, needle: &str) -> Result<bool> {
        const SCRIPT: &str = "local v = redis.call('GET', KEYS[1]) \
             if v and string.find(v, ARGV[1], 1, true) then return redis.call('DEL', KEYS[1]) end \
             return 0";
        let n: i64 = self.query(redis::cmd("EVAL").arg(SCRIPT).arg(1).arg(key).arg(needle), "EVAL").await?;
        Ok(n > 0)
    }

    /// `EVAL script` over `keys` with `args`. In a cluster the call goes to the slot of the
    /// first key, so every key must share its hash tag (Redis refuses a script whose keys span
    /// slots).
    pub async fn eval<T: FromRedisValue + Send>(&self, script: &str, keys: &[&str], args: &[&str]) -> Result<T> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script).arg(keys.len()).arg(keys).arg(args);
        self.query(&cmd, "EVAL").await
    }

    /// `ZADD key [XX|NX] score member` then `EXPIRE key ttl`, in one pipeline (one key, so one
    /// slot in a cluster).
    pub async fn zadd(&self, key: &str, mode: Option<&str>, score: i64, member: &str, ttl: Duration) -> Result<()> {
        let mut pipe = redis::pipe();
        let zadd = pipe.cmd("ZADD").arg(key);
        if let Some(m) = mode {
            zadd.arg(m);
        }
        zadd.arg(score).arg(member).ignore();
        pipe.cmd("EXPIRE").arg(key).arg(ttl.as_secs().max(1)).ignore();
        self.query_pipe::<()>(&pipe, "ZADD").await
    }

    /// Every member of the sorted set `key` with its score, lowest score first.
    pub async fn zrange_scores(&self, key: &str) -> Result<Vec<(String, i64)>> {
        self.query(redis::cmd("ZRANGE").arg(key).arg(0).arg(-1).arg("WITHSCORES"), "ZRANGE").await
    }

    /// `ZSCORE key member`.
    pub async fn zscore(&self, key: &str, member: &str) -> Result<Option<i64>> {
        self.query(redis::cmd("ZSCORE").arg(key).arg(member), "ZSCORE").await
    }

    /// `ZREM key member`.
    pub async fn zrem(&self, key: &str, member: &str) -> Result<()> {
        self.query::<()>(redis::cmd("ZREM").arg(key).arg(member), "ZREM").await
    }

    /// Pushes `value` to the front of the list `key`, keeps its first `keep` entries and sets
    /// its TTL, atomically.
    pub async fn push_bounded(&self, key: &str, value: &[u8], keep: usize, ttl: Duration) -> Result<()> {
        let mut pipe = redis::pipe();
        pipe.atomic()
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
            .ignore();
        self.query_pipe::<()>(&pipe, "LPUSH").await
    }

    /// `LRANGE key 0 -1`.
    pub async fn list(&self, key: &str) -> Result<Vec<Vec<u8>>> {
        self.query(redis::cmd("LRANGE").arg(key).arg(0).arg(-1), "LRANGE").await
    }
}

/// A single Redis through the connection manager.
fn single(config: &RedisConfig) -> Result<ConnectionManager> {
    let addr = config.conn_addr("address", &config.addr)?;
    let info =
        addr.into_connection_info().map_err(|e| err("configuring", e))?.set_redis_settings(config.redis_settings());
    let client = match config.certificates() {
        Some(certs) => redis::Client::build_with_tls(info, certs),
        None => redis::Client::open(info),
    }
    .map_err(|e| err("configuring", e))?;
    // No retries inside the manager: the breaker decides when to try again, and a command
    // must never wait out a reconnect loop.
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.timeout))
        .set_response_timeout(Some(config.timeout))
        .set_number_of_retries(0);
    ConnectionManager::new_lazy_with_config(client, manager_config).map_err(|e| err("connecting", e))
}

/// A Redis Cluster, connected in the background (the first command waits for the slot map).
fn cluster(config: &RedisConfig, seeds: &[String]) -> Result<ClusterConnection> {
    if seeds.is_empty() {
        return Err(err("configuring", "a Redis Cluster needs at least one seed address"));
    }
    let mut nodes = Vec::with_capacity(seeds.len());
    for seed in seeds {
        let info = config
            .conn_addr("cluster address", seed)?
            .into_connection_info()
            .map_err(|e| err("configuring", e))?
            .set_redis_settings(config.redis_settings());
        nodes.push(info);
    }
    let mut builder = ClusterClientBuilder::new(nodes)
        .connection_timeout(config.timeout)
        .response_timeout(config.timeout)
        // One retry covers a MOVED after a failover or resharding; more would only wait out a
        // dead node that the breaker skips anyway.
        .retries(1);
    if let Some(mode) = config.tls_mode() {
        builder = builder.tls(mode);
    }
    if let Some(certs) = config.certificates() {
        builder = builder.certs(certs);
    }
    let client = builder.build().map_err(|e| err("configuring", e))?;
    let cluster_config = redis::cluster::ClusterConfig::new()
        .set_connection_timeout(config.timeout)
        .set_response_timeout(config.timeout);
    Ok(client.get_pending_async_connection_with_config(cluster_config))
}

/// The master the sentinels name, with the same credentials and TLS for master and sentinels.
fn sentinel(config: &RedisConfig, master_name: &str, sentinels: &[String]) -> Result<SentinelConn> {
    if sentinels.is_empty() {
        return Err(err("configuring", "Sentinel needs at least one sentinel address"));
    }
    let addrs = sentinels.iter().map(|s| config.conn_addr("sentinel address", s)).collect::<Result<Vec<_>>>()?;
    let mut builder = SentinelClientBuilder::new(addrs, master_name, SentinelServerType::Master)
        .map_err(|e| err("configuring", e))?;
    if let Some(user) = config.username.as_deref().filter(|u| !u.is_empty()) {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = config.password.as_deref().filter(|p| !p.is_empty()) {
        builder = builder.set_client_to_redis_password(password);
    }
    if let Some(mode) = config.tls_mode() {
        builder = builder.set_client_to_redis_tls_mode(mode).set_client_to_sentinel_tls_mode(mode);
    }
    if let Some(certs) = config.certificates() {
        builder = builder.set_client_to_redis_certificates(certs.clone()).set_client_to_sentinel_certificates(certs);
    }
    let client = builder.build().map_err(|e| err("configuring", e))?;
    let conn_config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(config.timeout))
        .set_response_timeout(Some(config.timeout));
    Ok(SentinelConn { client: tokio::sync::Mutex::new(client), current: Mutex::new(None), config: conn_config })
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

    #[tokio::test]
    async fn cluster_and_sentinel_clients_are_lazy_too() {
        let cluster = RedisConfig::cluster(vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()]);
        let kv = RedisKv::connect(&cluster).unwrap();
        assert!(tokio::time::timeout(Duration::from_secs(10), kv.get("x")).await.unwrap().is_err());
        let mut sentinel = RedisConfig::sentinel("mymaster", vec!["127.0.0.1:1".into()]);
        sentinel.tls = true;
        sentinel.ca_pem = Some(b"not a certificate".to_vec());
        // A CA without a certificate is refused when the client is built, not on every call.
        let refused = RedisKv::connect(&sentinel).map(|_| ()).unwrap_err().to_string();
        assert!(refused.contains("holds no PEM certificate"), "{refused}");
        let sentinel_plain = RedisConfig::sentinel("mymaster", vec!["127.0.0.1:1".into()]);
        let kv = RedisKv::connect(&sentinel_plain).unwrap();
        assert!(tokio::time::timeout(Duration::from_secs(10), kv.get("x")).await.unwrap().is_err());
        assert!(RedisKv::connect(&RedisConfig::cluster(vec![])).is_err());
        assert!(RedisKv::connect(&RedisConfig::sentinel("m", vec!["nope".into()])).is_err());
    }
}
