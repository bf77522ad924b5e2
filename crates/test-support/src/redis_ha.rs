//! Real highly available Redis deployments on loopback, for tests of the cluster cache's
//! Cluster and Sentinel modes: `redis-server` processes (Debian's `redis-server`, whose binary
//! also runs sentinels with `--sentinel`) and `redis-cli --cluster create`, killed on drop.
//!
//! Assertions talk RESP directly ([`command_at`]); a [`RedisCluster`] follows `MOVED`
//! answers, a [`RedisSentinel`] asks its sentinels where the master is.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::proc::{KillOnDrop, free_port, run, wait_for_tcp};

const REDIS_BIN: &str = "redis-server";
const CLI_BIN: &str = "redis-cli";

/// Sends one command over RESP to `addr` and returns the raw reply (`$len\r\nvalue\r\n…`).
pub fn command_at(addr: SocketAddr, args: &[&str]) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut req = Vec::new();
    for cmd in [args, &["QUIT"][..]] {
        req.extend_from_slice(format!("*{}\r\n", cmd.len()).as_bytes());
        for a in cmd {
            req.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
    }
    s.write_all(&req)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Sends one command to a sentinel and returns the raw reply. Sentinels know no `QUIT`, so
/// the reply is read until the connection has been quiet for a moment.
pub fn sentinel_command(addr: SocketAddr, args: &[&str]) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes())?;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    // The first bytes may take a while; the rest of a reply follows at once.
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                s.set_read_timeout(Some(Duration::from_millis(200)))?;
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::ensure!(!out.is_empty(), "no answer from the sentinel at {addr}");
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The bulk strings of a raw array reply (as `KEYS` answers).
pub fn bulk_strings(raw: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = raw.split("\r\n");
    while let Some(l) = lines.next() {
        if l.starts_with('$')
            && l != "$-1"
            && let Some(v) = lines.next()
        {
            out.push(v.to_string());
        }
    }
    out
}

/// A free loopback port whose cluster bus port (port + 10000) is free too.
fn free_port_pair() -> u16 {
    for _ in 0..200 {
        let p = free_port();
        if p < 50000 && TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
            return p;
        }
    }
    panic!("no free port pair for a Redis Cluster node");
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// One `redis-server` process with its own directory.
struct Node {
    addr: SocketAddr,
    dir: PathBuf,
    proc: Option<KillOnDrop>,
}

impl Node {
    fn start(name: &str, root: &Path, port: u16, extra: &[&str]) -> anyhow::Result<Node> {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut cmd = Command::new(REDIS_BIN);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .args(extra);
        let log = dir.join("redis.log");
        let mut proc = KillOnDrop::spawn(name, cmd, &log)?;
        wait_for_tcp(addr, Duration::from_secs(10)).map_err(|e| anyhow::anyhow!("{name}: {e}: {}", log_of(&log)))?;
        proc.check_running().map_err(|e| anyhow::anyhow!("{name}: {e}: {}", log_of(&log)))?;
        Ok(Node { addr, dir, proc: Some(proc) })
    }

    fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    fn log(&self) -> String {
        log_of(&self.dir.join("redis.log"))
    }
}

/// A Redis Cluster of loopback masters (no replicas), slots spread by `redis-cli`.
pub struct RedisCluster {
    /// Work dir of every node.
    pub dir: tempfile::TempDir,
    nodes: Vec<Node>,
}

impl RedisCluster {
    /// Starts `masters` (at least 3, as `redis-cli --cluster create` requires) and waits until
    /// every node reports `cluster_state:ok`.
    pub fn start(masters: usize) -> anyhow::Result<RedisCluster> {
        anyhow::ensure!(crate::proc::have(CLI_BIN), "redis-cli is not installed (Debian redis-tools)");
        let dir = tempfile::Builder::new().prefix("redis-cluster-").tempdir()?;
        let mut nodes = Vec::new();
        for n in 0..masters {
            let port = free_port_pair();
            nodes.push(Node::start(
                &format!("node{n}"),
                dir.path(),
                port,
                &["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"],
            )?);
        }
        let mut create = Command::new(CLI_BIN);
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(n.addr.to_string());
        }
        create.args(["--cluster-replicas", "0", "--cluster-yes"]);
        run(create, Duration::from_secs(60))?;
        let cluster = RedisCluster { dir, nodes };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = cluster
                .nodes
                .iter()
                .all(|n| command_at(n.addr, &["CLUSTER", "INFO"]).is_ok_and(|info| info.contains("cluster_state:ok")));
            if ok {
                return Ok(cluster);
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = cluster.nodes.iter().map(Node::log).collect();
                anyhow::bail!("the Redis Cluster did not reach cluster_state:ok in 30s: {logs:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `host:port` of every node (the facade's `clusterAddresses`).
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.to_string()).collect()
    }

    /// Runs a one-key command on the node that owns the key (following `MOVED`).
    pub fn command(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut addr = self.nodes[0].addr;
        for _ in 0..3 {
            let reply = command_at(addr, args)?;
            match reply.strip_prefix("-MOVED ") {
                Some(rest) => {
                    let target = rest.split_whitespace().nth(1).unwrap_or_default();
                    addr = target.parse()?;
                }
                None => return Ok(reply),
            }
        }
        anyhow::bail!("{args:?} was moved more than twice")
    }

    /// The keys matching `pattern` on every node.
    pub fn keys(&self, pattern: &str) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        for n in &self.nodes {
            out.extend(bulk_strings(&command_at(n.addr, &["KEYS", pattern])?));
        }
        Ok(out)
    }

    /// How many nodes hold at least one key matching `pattern` (the keys are spread).
    pub fn nodes_holding(&self, pattern: &str) -> usize {
        self.nodes
            .iter()
            .filter(|n| command_at(n.addr, &["KEYS", pattern]).is_ok_and(|r| !bulk_strings(&r).is_empty()))
            .count()
    }
}

/// The master name every [`RedisSentinel`] monitors.
pub const MASTER_NAME: &str = "facade-master";

/// A master, one replica and `sentinels` sentinels watching them, on loopback.
pub struct RedisSentinel {
    /// Work dir of every process.
    pub dir: tempfile::TempDir,
    master: Node,
    replica: Node,
    sentinels: Vec<Node>,
}

impl RedisSentinel {
    /// Starts the master, the replica (synchronised) and the sentinels (quorum: a majority),
    /// and waits until every sentinel knows the master and its replica.
    pub fn start(sentinels: usize) -> anyhow::Result<RedisSentinel> {
        let dir = tempfile::Builder::new().prefix("redis-sentinel-").tempdir()?;
        let master = Node::start("master", dir.path(), free_port(), &[])?;
        let mport = master.addr.port().to_string();
        let replica = Node::start("replica", dir.path(), free_port(), &["--replicaof", "127.0.0.1", &mport])?;
        let quorum = sentinels / 2 + 1;
        let mut nodes = Vec::new();
        for n in 0..sentinels {
            let port = free_port();
            let sdir = dir.path().join(format!("sentinel{n}"));
            std::fs::create_dir_all(&sdir)?;
            // Sentinel rewrites its config file, so each gets a writable copy of its own.
            let conf = sdir.join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {mport} {quorum}\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 5000\n\
                     sentinel parallel-syncs {MASTER_NAME} 1\n",
                    sdir.display()
                ),
            )?;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let mut cmd = Command::new(REDIS_BIN);
            cmd.arg(&conf).arg("--sentinel");
            let log = sdir.join("redis.log");
            let proc = KillOnDrop::spawn(&format!("sentinel{n}"), cmd, &log)?;
            wait_for_tcp(addr, Duration::from_secs(10))
                .map_err(|e| anyhow::anyhow!("sentinel{n}: {e}: {}", log_of(&log)))?;
            nodes.push(Node { addr, dir: sdir, proc: Some(proc) });
        }
        let s = RedisSentinel { dir, master, replica, sentinels: nodes };
        let replica_port = s.replica.addr.port().to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let synced =
                command_at(s.replica.addr, &["INFO", "replication"]).is_ok_and(|i| i.contains("master_link_status:up"));
            let known = s.sentinels.iter().all(|n| {
                sentinel_command(n.addr, &["SENTINEL", "REPLICAS", MASTER_NAME])
                    .is_ok_and(|r| r.contains(&replica_port))
            });
            if synced && known {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "sentinels did not see the replica in 30s (synced: {synced}): {}",
                    s.sentinels.iter().map(Node::log).collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `host:port` of every sentinel (the facade's `sentinel.addresses`).
    pub fn sentinel_addrs(&self) -> Vec<String> {
        self.sentinels.iter().map(|n| n.addr.to_string()).collect()
    }

    /// Where the sentinels say the master is now.
    pub fn master_addr(&self) -> anyhow::Result<SocketAddr> {
        let mut last = None;
        for n in &self.sentinels {
            match sentinel_command(n.addr, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME]) {
                Ok(raw) => {
                    let parts = bulk_strings(&raw);
                    if let [host, port] = parts.as_slice() {
                        return Ok(format!("{host}:{port}").parse()?);
                    }
                    last = Some(anyhow::anyhow!("unexpected answer {raw:?}"));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no sentinel")))
    }

    /// The first master's address (the one [`RedisSentinel::kill_master`] kills).
    pub fn first_master(&self) -> SocketAddr {
        self.master.addr
    }

    /// The replica's address (the master after a failover).
    pub fn replica_addr(&self) -> SocketAddr {
        self.replica.addr
    }

    /// Kills the master (an outage the sentinels turn into a failover).
    pub fn kill_master(&mut self) {
        self.master.kill();
    }

    /// Waits until the sentinels name the replica as the master and it accepts writes.
    pub fn wait_for_failover(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let promoted = self.master_addr().is_ok_and(|a| a == self.replica.addr)
                && command_at(self.replica.addr, &["ROLE"]).is_ok_and(|r| r.contains("master"));
            if promoted {
                return Ok(());
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "no failover within {timeout:?}: {}",
                    self.sentinels.iter().map(Node::log).collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs a command on the current master.
    pub fn command(&self, args: &[&str]) -> anyhow::Result<String> {
        command_at(self.master_addr()?, args)
    }

    /// The keys matching `pattern` on the current master.
    pub fn keys(&self, pattern: &str) -> anyhow::Result<Vec<String>> {
        Ok(bulk_strings(&self.command(&["KEYS", pattern])?))
    }
}
