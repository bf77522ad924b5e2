//! A real `redis-server` on a free loopback port, with no persistence, killed on drop.
//!
//! `--port 0` means "no TCP" to Redis, so the port is picked before the server starts (and a
//! few ports are tried in case another process wins the race). `kill` and `restart` keep the
//! port, so clients configured with the address see an outage and a recovery.
//!
//! [`Redis::start_tls`] serves TLS only (`--port 0 --tls-port P`), for clients that must
//! trust a private CA or skip verification (the cluster cache's `redis.caFile`,
//! `insecureSkipVerify`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::proc::{KillOnDrop, free_port, wait_for_tcp};

const REDIS_BIN: &str = "redis-server";

/// A running Redis.
pub struct Redis {
    /// Its address.
    pub addr: SocketAddr,
    /// Work dir (log).
    pub dir: tempfile::TempDir,
    password: Option<String>,
    tls: Option<TlsPems>,
    proc: Option<KillOnDrop>,
}

/// What a TLS Redis serves with; written into the work dir at every launch, since a failed
/// launch hands the next attempt a fresh dir.
#[derive(Clone)]
struct TlsPems {
    cert: String,
    key: String,
    ca: String,
}

impl Redis {
    /// Whether `redis-server` is installed.
    pub fn available() -> bool {
        crate::proc::have(REDIS_BIN)
    }

    /// Starts Redis without authentication.
    pub fn start() -> anyhow::Result<Redis> {
        Self::start_with(None)
    }

    /// Starts Redis that requires `password` (for the default user) when given.
    pub fn start_with(password: Option<&str>) -> anyhow::Result<Redis> {
        Self::start_inner(password, None)
    }

    /// Starts Redis that speaks TLS only, with this server certificate and key (PEM). `ca_pem`
    /// is its `tls-ca-cert-file`; clients are not asked for certificates
    /// (`tls-auth-clients no`). [`Redis::command`] and [`Redis::keys`] speak plain RESP and
    /// refuse to run against it.
    pub fn start_tls(cert_pem: &str, key_pem: &str, ca_pem: &str) -> anyhow::Result<Redis> {
        let pems = TlsPems { cert: cert_pem.to_string(), key: key_pem.to_string(), ca: ca_pem.to_string() };
        Self::start_inner(None, Some(pems))
    }

    fn start_inner(password: Option<&str>, tls: Option<TlsPems>) -> anyhow::Result<Redis> {
        let mut dir = tempfile::Builder::new().prefix("redis-").tempdir()?;
        let mut last_err = None;
        for _ in 0..5 {
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let mut r = Redis { addr, dir, password: password.map(str::to_string), tls: tls.clone(), proc: None };
            match r.launch() {
                Ok(()) => return Ok(r),
                Err(e) => {
                    last_err = Some(e);
                    dir = r.take_dir()?;
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    fn take_dir(&mut self) -> anyhow::Result<tempfile::TempDir> {
        let fresh = tempfile::Builder::new().prefix("redis-").tempdir()?;
        Ok(std::mem::replace(&mut self.dir, fresh))
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(REDIS_BIN);
        match &self.tls {
            // `--port 0` turns plain TCP off, so the only listener is the TLS one.
            Some(pems) => {
                let dir = self.dir.path();
                let (cert, key, ca) = (dir.join("server.crt"), dir.join("server.key"), dir.join("ca.crt"));
                std::fs::write(&cert, &pems.cert)?;
                std::fs::write(&key, &pems.key)?;
                std::fs::write(&ca, &pems.ca)?;
                cmd.arg("--port")
                    .arg("0")
                    .arg("--tls-port")
                    .arg(self.addr.port().to_string())
                    .arg("--tls-cert-file")
                    .arg(cert)
                    .arg("--tls-key-file")
                    .arg(key)
                    .arg("--tls-ca-cert-file")
                    .arg(ca)
                    .arg("--tls-auth-clients")
                    .arg("no");
            }
            None => {
                cmd.arg("--port").arg(self.addr.port().to_string());
            }
        }
        cmd.arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--dir")
            .arg(self.dir.path());
        if let Some(p) = &self.password {
            cmd.arg("--requirepass").arg(p);
        }
        let mut proc = KillOnDrop::spawn("redis-server", cmd, &self.dir.path().join("redis.log"))?;
        match wait_for_tcp(self.addr, Duration::from_secs(10)) {
            Ok(()) if proc.check_running().is_ok() => {
                self.proc = Some(proc);
                Ok(())
            }
            Ok(()) => anyhow::bail!("redis-server exited: {}", log_of(self.dir.path())),
            Err(e) => anyhow::bail!("{e}: {}", log_of(self.dir.path())),
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Kills the server now (an outage: clients get refused connections).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts the server again on the same port (empty: nothing was persisted).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        // The old socket may linger briefly; retry within a bound.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match self.launch() {
                Ok(()) => return Ok(()),
                Err(e) if std::time::Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Runs a command with `redis-cli` style arguments over RESP and returns the raw reply
    /// (for assertions such as counting keys).
    pub fn command(&self, args: &[&str]) -> anyhow::Result<String> {
        use std::io::{Read, Write};
        if self.tls.is_some() {
            anyhow::bail!("Redis at {} speaks TLS only; command() speaks plain RESP", self.addr);
        }
        let mut s = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut req = Vec::new();
        let mut push = |args: &[&str]| {
            req.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
            for a in args {
                req.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
            }
        };
        if let Some(p) = &self.password {
            push(&["AUTH", p]);
        }
        push(args);
        push(&["QUIT"]);
        s.write_all(&req)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    /// The keys matching `pattern`.
    pub fn keys(&self, pattern: &str) -> anyhow::Result<Vec<String>> {
        let raw = self.command(&["KEYS", pattern])?;
        // Bulk strings of the array reply: every line after a `$N` line.
        let mut keys = Vec::new();
        let mut lines = raw.split("\r\n");
        while let Some(l) = lines.next() {
            if l.starts_with('$')
                && l != "$-1"
                && let Some(k) = lines.next()
            {
                keys.push(k.to_string());
            }
        }
        Ok(keys)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        log_of(self.dir.path())
    }
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default()
}
