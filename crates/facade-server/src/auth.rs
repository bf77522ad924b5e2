//! `requireAuth`: HTTP Basic credentials checked against a bcrypt htpasswd file, which is
//! re-read when it changes (see `reload.rs`), or, without a file, the reference facade's
//! meaning of `requireAuth`: a request must carry Basic credentials, which are not checked.
//!
//! bcrypt costs 50–100 ms of CPU per check by design, and one pull is dozens of requests, so a
//! successful check is remembered for a few minutes, keyed by (file version, user, SHA-256 of
//! the password): the password itself is never kept, and editing the file forgets every
//! remembered check; the map holds only successes (a guesser cannot grow it) and is bounded.
//!
//! bcrypt runs on a lane of its own: at most `auth_check_threads` (2) blocking threads at once,
//! with a short queue in front (past it: 429), so a flood of wrong passwords can take neither
//! the blocking pool that blob file I/O uses nor the async workers that stream blobs. Each
//! client address also has a budget of failed checks (10/s, bursts of 20): a check is paid for
//! before bcrypt runs and refunded when it succeeds, so one address can never queue more
//! bcrypt work than its budget, and an empty budget answers 429 at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::HeaderValue;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::error::{Error, Result};
use crate::reload::{self, Load, PollFiles, ReloadCounters, Watched};

/// The htpasswd file that `requireAuth` checks credentials against.
///
/// One `user:hash` per line; blank lines and lines starting with `#` are ignored. Only bcrypt
/// hashes (`$2y$`, `$2b$`, `$2a$`, as written by `htpasswd -B`) are accepted: a file with any
/// other hash (Apache MD5, SHA-1, crypt) is refused as a whole, naming the line.
///
/// An empty path is [`AuthFile::credentials_present`]: no file, only well-formed Basic
/// credentials required.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthFile {
    /// Path of the file; followed through symlinks on every reload.
    pub htpasswd: PathBuf,
}

impl AuthFile {
    /// The reference facade's `requireAuth`: a request without well-formed Basic credentials
    /// gets the 401 challenge; any user name and password pass. Nothing is remembered and no
    /// file is read.
    pub fn credentials_present() -> AuthFile {
        AuthFile { htpasswd: PathBuf::new() }
    }

    /// Whether this is [`AuthFile::credentials_present`].
    pub fn is_credentials_present(&self) -> bool {
        self.htpasswd.as_os_str().is_empty()
    }
}

/// Why a request was refused; the bounded `reason` label of
/// `registry_facade_auth_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AuthFailure {
    /// No `Authorization` header: every Docker client's first request, answered with the
    /// challenge.
    Missing,
    /// Not `Basic`, not base64, or no `user:password` inside.
    Malformed,
    UnknownUser,
    WrongPassword,
    /// No user list was ever loaded, or the check itself failed.
    Unavailable,
    /// Not checked: the client address spent its failed-check budget, or the bcrypt lane's
    /// queue is full. Answered 429, not 401.
    Throttled,
}

impl AuthFailure {
    pub(crate) const ALL: [AuthFailure; 6] = [
        AuthFailure::Missing,
        AuthFailure::Malformed,
        AuthFailure::UnknownUser,
        AuthFailure::WrongPassword,
        AuthFailure::Unavailable,
        AuthFailure::Throttled,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Malformed => "malformed",
            AuthFailure::UnknownUser => "unknown_user",
            AuthFailure::WrongPassword => "wrong_password",
            AuthFailure::Unavailable => "unavailable",
            AuthFailure::Throttled => "rate_limited",
        }
    }
}

/// Remembered successful checks at most; past it expired entries go, then all of them.
const MAX_REMEMBERED: usize = 1024;

/// Checks waiting for a bcrypt thread at most (per lane thread); more are answered 429 at
/// once instead of piling up requests (and their connections) behind the lane.
const QUEUED_PER_THREAD: usize = 16;

/// Client addresses whose failed-check budget is tracked; past it, addresses whose budget is
/// full again are forgotten, and new ones share one budget until there is room.
const MAX_TRACKED_CLIENTS: usize = 4096;

/// How the credential checks run: the bcrypt lane and the failure budget per address.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AuthLane {
    /// How long a successful check is remembered.
    pub(crate) remember_for: Duration,
    /// Blocking threads bcrypt may use at once (at least 1).
    pub(crate) threads: usize,
    /// Failed checks per second per client address, bursts of twice that (0: unlimited).
    pub(crate) failures_per_second: u32,
}

/// Distinguishes loaded versions of the file, so remembered checks die with their version.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// One loaded version of the htpasswd file.
#[derive(Debug)]
pub(crate) struct Htpasswd {
    generation: u64,
    users: HashMap<String, String>,
}

impl Htpasswd {
    pub(crate) fn parse(path: &Path, text: &str) -> Result<Self> {
        let mut users = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: String| Error::Htpasswd { path: path.to_path_buf(), line: i + 1, reason };
            let Some((user, hash)) = line.split_once(':') else {
                return Err(bad("expected `user:hash`".into()));
            };
            if user.is_empty() {
                return Err(bad("empty user name".into()));
            }
            check_hash(hash).map_err(|why| bad(format!("user {user:?}: {why}")))?;
            if users.insert(user.to_string(), hash.to_string()).is_some() {
                return Err(bad(format!("user {user:?} appears twice")));
            }
        }
        if users.is_empty() {
            tracing::warn!(path = %path.display(), "htpasswd file has no users: every request will be refused");
        }
        Ok(Htpasswd { generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed), users })
    }

    /// The bcrypt check. Blocking and slow on purpose.
    fn verify(&self, user: &str, password: &[u8]) -> std::result::Result<(), AuthFailure> {
        let Some(hash) = self.users.get(user) else {
            // The same work as for a known user: response time must not tell which names exist.
            if let Some(any) = self.users.values().next() {
                let _ignored = bcrypt::verify(password, any);
            }
            return Err(AuthFailure::UnknownUser);
        };
        match bcrypt::verify(password, hash) {
            Ok(true) => Ok(()),
            Ok(false) => Err(AuthFailure::WrongPassword),
            Err(e) => {
                tracing::warn!(user, error = %e, "bcrypt check failed");
                Err(AuthFailure::Unavailable)
            }
        }
    }
}

/// Why a hash is refused, for the error line; never echoes the hash.
fn check_hash(hash: &str) -> std::result::Result<(), String> {
    const ONLY: &str = "only bcrypt ($2y$, $2b$, $2a$; `htpasswd -B`) is supported";
    if !["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p)) {
        let what = if hash.starts_with("$apr1$") {
            "Apache MD5 ($apr1$) hash"
        } else if hash.starts_with("{SHA}") {
            "SHA-1 ({SHA}) hash"
        } else if hash.starts_with("$1$") || hash.starts_with("$5$") || hash.starts_with("$6$") {
            "crypt(3) hash"
        } else if hash.starts_with("$2x$") {
            "bcrypt $2x$ hash (the buggy variant)"
        } else {
            "unrecognized hash"
        };
        return Err(format!("{what}; {ONLY}"));
    }
    bcrypt::HashParts::from_str(hash).map(drop).map_err(|e| format!("malformed bcrypt hash ({e})"))
}

struct HtpasswdFile {
    path: PathBuf,
}

impl Load for HtpasswdFile {
    type Item = Htpasswd;
    const KIND: &'static str = "htpasswd";

    fn paths(&self) -> Vec<&Path> {
        vec![&self.path]
    }

    fn load(&self) -> Result<Htpasswd> {
        let bytes = reload::read(&self.path)?;
        let text = String::from_utf8(bytes).map_err(|e| Error::Htpasswd {
            path: self.path.clone(),
            line: 0,
            reason: format!("not UTF-8 ({e})"),
        })?;
        Htpasswd::parse(&self.path, &text)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CheckKey {
    generation: u64,
    user: String,
    password_sha256: [u8; 32],
}

/// A poller for the credentials-present mode, which follows no file.
struct NoFiles;

impl PollFiles for NoFiles {
    fn poll(&self) {}
}

/// Checks `Authorization` headers against the current htpasswd file.
pub(crate) struct Authenticator {
    /// `None`: the credentials-present mode.
    file: Option<Arc<Watched<HtpasswdFile>>>,
    /// Successful checks → when they stop counting.
    remembered: Mutex<HashMap<CheckKey, Instant>>,
    remember_for: Duration,
    bcrypt_slots: Semaphore,
    /// Checks holding or waiting for a bcrypt slot.
    queued: AtomicUsize,
    max_queued: usize,
    failures: Option<FailureBudget>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").field("file", &self.file).finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Loads the file now; `strict` makes a bad file an error instead of refusing everyone.
    pub(crate) fn open(file: &AuthFile, lane: AuthLane, counters: ReloadCounters, strict: bool) -> Result<Self> {
        let watched = if file.is_credentials_present() {
            None
        } else {
            Some(Arc::new(Watched::open(HtpasswdFile { path: file.htpasswd.clone() }, counters, strict)?))
        };
        let threads = lane.threads.max(1);
        Ok(Authenticator {
            file: watched,
            remembered: Mutex::new(HashMap::new()),
            remember_for: lane.remember_for,
            bcrypt_slots: Semaphore::new(threads),
            queued: AtomicUsize::new(0),
            max_queued: threads * (QUEUED_PER_THREAD + 1),
            failures: (lane.failures_per_second > 0).then(|| FailureBudget::new(lane.failures_per_second)),
        })
    }

    pub(crate) fn poller(&self) -> Arc<dyn PollFiles> {
        match &self.file {
            Some(file) => Arc::clone(file) as Arc<dyn PollFiles>,
            None => Arc::new(NoFiles),
        }
    }

    /// `Ok` when `authorization` carries a user and password of the current file (in the
    /// credentials-present mode: any Basic credentials). `peer` is the client address whose
    /// failed-check budget pays for a bcrypt check (`None`: no budget).
    pub(crate) async fn check(
        &self,
        authorization: Option<&HeaderValue>,
        peer: Option<IpAddr>,
    ) -> std::result::Result<(), AuthFailure> {
        let header = authorization.ok_or(AuthFailure::Missing)?;
        let Some(file) = &self.file else {
            // The reference accepts what Go's `Request.BasicAuth` parses, an empty user too.
            return has_basic_credentials(header.as_bytes()).then_some(()).ok_or(AuthFailure::Malformed);
        };
        let (user, password) = parse_basic(header.as_bytes()).ok_or(AuthFailure::Malformed)?;
        let table = file.current().ok_or(AuthFailure::Unavailable)?;
        let key = CheckKey {
            generation: table.generation,
            user: user.clone(),
            password_sha256: Sha256::digest(&password).into(),
        };
        if self.is_remembered(&key) {
            return Ok(());
        }
        let budget = self.failures.as_ref().zip(peer);
        if let Some((failures, ip)) = budget
            && !failures.take(ip)
        {
            return Err(AuthFailure::Throttled);
        }
        let verdict = self.bcrypt(move || table.verify(&user, &password)).await;
        if let Some((failures, ip)) = budget
            && (verdict.is_ok() || verdict == Err(AuthFailure::Throttled))
        {
            // Only failed checks are paid for.
            failures.refund(ip);
        }
        verdict?;
        self.remember(key);
        Ok(())
    }

    /// Runs `verify` on the bcrypt lane, or refuses it when the lane's queue is full.
    async fn bcrypt(
        &self,
        verify: impl FnOnce() -> std::result::Result<(), AuthFailure> + Send + 'static,
    ) -> std::result::Result<(), AuthFailure> {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.max_queued {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            tracing::debug!(max_queued = self.max_queued, "bcrypt lane full; refusing a credential check");
            return Err(AuthFailure::Throttled);
        }
        let _queued = QueuedGuard(&self.queued);
        let _slot = self.bcrypt_slots.acquire().await.map_err(|_closed| AuthFailure::Unavailable)?;
        tokio::task::spawn_blocking(verify).await.map_err(|_panicked| AuthFailure::Unavailable)?
    }

    fn is_remembered(&self, key: &CheckKey) -> bool {
        let remembered = self.remembered.lock().unwrap_or_else(PoisonError::into_inner);
        remembered.get(key).is_some_and(|until| *until > Instant::now())
    }

    fn remember(&self, key: CheckKey) {
        let now = Instant::now();
        let mut remembered = self.remembered.lock().unwrap_or_else(PoisonError::into_inner);
        if remembered.len() >= MAX_REMEMBERED {
            remembered.retain(|k, until| *until > now && k.generation == key.generation);
            if remembered.len() >= MAX_REMEMBERED {
                remembered.clear();
            }
        }
        remembered.insert(key, now + self.remember_for);
    }
}

/// Releases a place in the bcrypt lane's queue.
struct QueuedGuard<'a>(&'a AtomicUsize);

impl Drop for QueuedGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Failed credential checks per client address: a token bucket of `2 × rate` refilled at
/// `rate` per second. IPv6 addresses count per /64 (one host usually holds a whole /64).
#[derive(Debug)]
struct FailureBudget {
    rate: f64,
    burst: f64,
    buckets: Mutex<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    per_client: HashMap<IpAddr, Bucket>,
    /// Shared by the addresses that find the table full.
    overflow: Option<Bucket>,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl FailureBudget {
    fn new(per_second: u32) -> Self {
        let rate = f64::from(per_second.max(1));
        FailureBudget { rate, burst: 2.0 * rate, buckets: Mutex::default() }
    }

    fn client(ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::from(octets)
            }
            v4 => v4,
        }
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.at = now;
    }

    /// Takes one token from `ip`'s budget; `false` when it is empty.
    fn take(&self, ip: IpAddr) -> bool {
        let (client, now) = (Self::client(ip), Instant::now());
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if !buckets.per_client.contains_key(&client) && buckets.per_client.len() >= MAX_TRACKED_CLIENTS {
            buckets.per_client.retain(|_, b| {
                self.refill(b, now);
                b.tokens < self.burst
            });
        }
        let fresh = Bucket { tokens: self.burst, at: now };
        let bucket = if buckets.per_client.len() < MAX_TRACKED_CLIENTS || buckets.per_client.contains_key(&client) {
            buckets.per_client.entry(client).or_insert(fresh)
        } else {
            buckets.overflow.get_or_insert(fresh)
        };
        self.refill(bucket, now);
        if bucket.tokens < 1.0 {
            return false;
        }
        bucket.tokens -= 1.0;
        true
    }

    /// Gives back the token of a check that succeeded (or never ran).
    fn refund(&self, ip: IpAddr) {
        let client = Self::client(ip);
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let Buckets { per_client, overflow } = &mut *buckets;
        if let Some(b) = per_client.get_mut(&client).or(overflow.as_mut()) {
            b.tokens = (b.tokens + 1.0).min(self.burst);
        }
    }
}

/// Whether `value` is `Basic base64(user:password)`, the user possibly empty.
fn has_basic_credentials(value: &[u8]) -> bool {
    let Some((scheme, encoded)) = std::str::from_utf8(value).ok().and_then(|t| t.trim().split_once(' ')) else {
        return false;
    };
    scheme.eq_ignore_ascii_case("basic") && STANDARD.decode(encoded.trim()).is_ok_and(|d| d.contains(&b':'))
}

/// `Basic base64(user:password)` → (user, password). The password may contain `:`.
fn parse_basic(value: &[u8]) -> Option<(String, Vec<u8>)> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, encoded) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(encoded.trim()).ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
    if user.is_empty() {
        return None;
    }
    Some((user, decoded[colon + 1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lane(failures_per_second: u32) -> AuthLane {
        AuthLane { remember_for: Duration::from_secs(60), threads: 2, failures_per_second }
    }

    fn counters() -> ReloadCounters {
        ReloadCounters {
            ok: prometheus::IntCounter::new("ok", "ok").unwrap(),
            error: prometheus::IntCounter::new("err", "err").unwrap(),
        }
    }

    #[test]
    fn the_failure_budget_refills_and_refunds_and_stays_bounded() {
        let budget = FailureBudget::new(10);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..20 {
            assert!(budget.take(a), "a burst of twice the rate");
        }
        assert!(!budget.take(a), "then empty");
        budget.refund(a);
        assert!(budget.take(a), "a success gives its token back");
        assert!(budget.take("10.0.0.2".parse().unwrap()), "per address");
        // One IPv6 host holds a /64: its addresses share one budget.
        let (v6a, v6b): (IpAddr, IpAddr) = ("2001:db8::1".parse().unwrap(), "2001:db8::ffff:2".parse().unwrap());
        for _ in 0..20 {
            assert!(budget.take(v6a));
        }
        assert!(!budget.take(v6b), "same /64");
        assert!(budget.take("2001:db8:0:1::1".parse().unwrap()), "another /64");
        // A table full of spent budgets: new addresses share the overflow budget.
        let budget = FailureBudget::new(1);
        for i in 0..MAX_TRACKED_CLIENTS as u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert!(budget.take(ip) && budget.take(ip));
        }
        let newcomer: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(budget.take(newcomer) && budget.take(newcomer));
        assert!(!budget.take("192.0.2.2".parse().unwrap()), "the overflow budget is shared");
        assert_eq!(budget.buckets.lock().unwrap().per_client.len(), MAX_TRACKED_CLIENTS);
    }

    #[tokio::test]
    async fn wrong_passwords_spend_the_budget_and_right_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        std::fs::write(&path, format!("alice:{}\n", hash("right"))).unwrap();
        let auth = Authenticator::open(&AuthFile { htpasswd: path }, lane(1), counters(), true).unwrap();
        let basic = |creds: &str| HeaderValue::try_from(format!("Basic {}", STANDARD.encode(creds))).unwrap();
        let ip: IpAddr = "10.1.1.1".parse().unwrap();
        for i in 0..5 {
            // Successes (remembered or not) never spend the budget of 2.
            assert_eq!(auth.check(Some(&basic("alice:right")), Some(ip)).await, Ok(()), "{i}");
        }
        assert_eq!(auth.check(Some(&basic("alice:bad1")), Some(ip)).await, Err(AuthFailure::WrongPassword));
        assert_eq!(auth.check(Some(&basic("bob:bad2")), Some(ip)).await, Err(AuthFailure::UnknownUser));
        assert_eq!(auth.check(Some(&basic("alice:bad3")), Some(ip)).await, Err(AuthFailure::Throttled));
        assert_eq!(auth.check(Some(&basic("alice:right")), Some(ip)).await, Ok(()), "remembered: no bcrypt, no budget");
        assert_eq!(auth.check(Some(&basic("alice:bad4")), None).await, Err(AuthFailure::WrongPassword), "no address");
        assert_eq!(auth.queued.load(Ordering::Relaxed), 0);
    }

    /// The lane never runs more checks at once than its threads, and refuses checks past its
    /// queue at once instead of letting them pile up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_bcrypt_lane_is_bounded_in_threads_and_queue() {
        let auth = Arc::new(Authenticator::open(&AuthFile::credentials_present(), lane(0), counters(), true).unwrap());
        let (running, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let mut checks = Vec::new();
        let total = auth.max_queued + 10;
        for _ in 0..total {
            let (auth, running, peak) = (Arc::clone(&auth), Arc::clone(&running), Arc::clone(&peak));
            checks.push(tokio::spawn(async move {
                auth.bcrypt(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok(())
                })
                .await
            }));
        }
        let mut outcomes = Vec::new();
        for c in checks {
            outcomes.push(tokio::time::timeout(Duration::from_secs(30), c).await.unwrap().unwrap());
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2, "two threads at most, and both used");
        let refused = outcomes.iter().filter(|o| **o == Err(AuthFailure::Throttled)).count();
        assert!(refused >= 10, "checks past the queue are refused: {refused} of {total}");
        assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count() + refused, total);
        assert_eq!(auth.queued.load(Ordering::SeqCst), 0);
    }

    // Cost 4, the minimum: these tests are about parsing, not strength.
    fn hash(password: &str) -> String {
        bcrypt::hash(password, 4).unwrap()
    }

    #[test]
    fn parses_bcrypt_lines_and_skips_comments() {
        let text = format!("# users\n\nalice:{}\r\n  bob:{}  \n", hash("a"), hash("b").replacen("$2b$", "$2y$", 1));
        let h = Htpasswd::parse(Path::new("f"), &text).unwrap();
        assert_eq!(h.users.len(), 2);
        assert_eq!(h.verify("alice", b"a"), Ok(()));
        assert_eq!(h.verify("bob", b"b"), Ok(()), "$2y$ is the same algorithm");
        assert_eq!(h.verify("alice", b"b"), Err(AuthFailure::WrongPassword));
        assert_eq!(h.verify("carol", b"a"), Err(AuthFailure::UnknownUser));
        let again = Htpasswd::parse(Path::new("f"), &text).unwrap();
        assert_ne!(h.generation, again.generation);
    }

    #[test]
    fn refuses_other_hash_formats_naming_the_line() {
        let cases = [
            ("alice:$apr1$abc$def", "Apache MD5"),
            ("alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "SHA-1"),
            ("alice:$6$salt$hash", "crypt(3)"),
            ("alice:plaintext", "unrecognized"),
            ("alice:$2y$10$tooshort", "malformed bcrypt"),
            ("alice", "user:hash"),
            (":$2y$", "empty user"),
        ];
        for (line, want) in cases {
            let text = format!("# c\n{line}\n");
            let e = Htpasswd::parse(Path::new("/etc/htpasswd"), &text).unwrap_err().to_string();
            assert!(e.contains("/etc/htpasswd") && e.contains("line 2") && e.contains(want), "{line}: {e}");
            assert!(!e.contains("W6ph5"), "never echoes a hash: {e}");
        }
        let dup = format!("a:{h}\na:{h}\n", h = hash("x"));
        assert!(Htpasswd::parse(Path::new("f"), &dup).unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn parses_basic_credentials() {
        let enc = |s: &str| format!("Basic {}", STANDARD.encode(s));
        assert_eq!(parse_basic(enc("u:p:w").as_bytes()), Some(("u".into(), b"p:w".to_vec())));
        assert_eq!(parse_basic(enc("u:").as_bytes()), Some(("u".into(), Vec::new())));
        assert_eq!(parse_basic(format!("basic  {}", STANDARD.encode("u:p")).as_bytes()).map(|c| c.0), Some("u".into()));
        for bad in [enc("nocolon"), enc(":p"), "Bearer abc".into(), "Basic !!!".into(), "Basic".into(), String::new()] {
            assert_eq!(parse_basic(bad.as_bytes()), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn credentials_present_mode_asks_only_for_basic_credentials() {
        let counters = ReloadCounters {
            ok: prometheus::IntCounter::new("ok", "ok").unwrap(),
            error: prometheus::IntCounter::new("err", "err").unwrap(),
        };
        let file = AuthFile::credentials_present();
        assert!(file.is_credentials_present());
        assert!(!AuthFile { htpasswd: "/etc/htpasswd".into() }.is_credentials_present());
        let auth = Authenticator::open(&file, lane(0), counters, true).unwrap();
        let header = |v: String| HeaderValue::try_from(v).unwrap();
        assert_eq!(auth.check(None, None).await, Err(AuthFailure::Missing));
        for ok in ["anyone:anything", ":", "u:p:w", "user:"] {
            let v = header(format!("Basic {}", STANDARD.encode(ok)));
            assert_eq!(auth.check(Some(&v), None).await, Ok(()), "{ok}");
        }
        for bad in [
            "Bearer abc".to_string(),
            "Basic !!!".into(),
            format!("Basic {}", STANDARD.encode("no-colon")),
            "Basic".into(),
        ] {
            assert_eq!(auth.check(Some(&header(bad.clone())), None).await, Err(AuthFailure::Malformed), "{bad}");
        }
        auth.poller().poll();
        assert!(auth.remembered.lock().unwrap().is_empty(), "nothing to remember without a file");
    }

    #[tokio::test]
    async fn remembers_success_per_file_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        std::fs::write(&path, format!("alice:{}\n", hash("right"))).unwrap();
        let counters = ReloadCounters {
            ok: prometheus::IntCounter::new("ok", "ok").unwrap(),
            error: prometheus::IntCounter::new("err", "err").unwrap(),
        };
        let auth = Authenticator::open(&AuthFile { htpasswd: path.clone() }, lane(0), counters, true).unwrap();
        let basic = |creds: &str| HeaderValue::try_from(format!("Basic {}", STANDARD.encode(creds))).unwrap();
        assert_eq!(auth.check(None, None).await, Err(AuthFailure::Missing));
        assert_eq!(auth.check(Some(&basic("alice:wrong")), None).await, Err(AuthFailure::WrongPassword));
        assert_eq!(auth.check(Some(&basic("alice:right")), None).await, Ok(()));
        assert_eq!(auth.remembered.lock().unwrap().len(), 1, "only successes are remembered");
        assert_eq!(auth.check(Some(&basic("alice:right")), None).await, Ok(()));

        // A new version (alice's password changed) must not honour the remembered check.
        std::fs::write(&path, format!("alice:{}\n# changed\n", hash("new"))).unwrap();
        auth.poller().poll();
        assert_eq!(auth.check(Some(&basic("alice:right")), None).await, Err(AuthFailure::WrongPassword));
        assert_eq!(auth.check(Some(&basic("alice:new")), None).await, Ok(()));
    }
}
