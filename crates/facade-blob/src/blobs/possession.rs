//! Proof that an origin holds a blob before its requester is served the node's stored copy.
//!
//! The store is shared by every workspace on the node, and a digest is not a secret: a tenant
//! who learned the digest of another tenant's private layer could name it in a manifest on a
//! registry of their own, and a plain store hit would hand them the bytes without their
//! registry ever being asked. So a stored blob is served for an origin (registry host +
//! repository) only once that origin has shown it holds the content: it delivered the blob in
//! a fill, or it answers a ranged request at a random offset with exactly the stored bytes —
//! which nobody can do without the content itself. Probes are remembered (bounded), so they
//! cost one small request per (blob, origin) per process.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use bytes::BytesMut;
use facade_oci::Digest;
use futures::StreamExt;

use crate::blobs::fill::{Origin, UpstreamBlob};

/// Bytes compared by a probe.
const PROBE_BYTES: u64 = 64;

/// How long a probe may take before it counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The (blob, origin) pairs known to hold, bounded.
pub(crate) struct Vouched {
    known: moka::sync::Cache<(Digest, UpstreamBlob), ()>,
}

impl Vouched {
    pub(crate) fn new(capacity: u64) -> Self {
        Vouched { known: moka::sync::Cache::new(capacity) }
    }

    /// Records that `from` delivered `digest` (a verified fill).
    pub(crate) fn vouch(&self, digest: &Digest, from: &UpstreamBlob) {
        self.known.insert((digest.clone(), from.clone()), ());
    }

    /// Whether `from` has already shown it holds `digest` (no probe: a peer's request must not
    /// cause upstream traffic).
    pub(crate) fn holds(&self, digest: &Digest, from: &UpstreamBlob) -> bool {
        self.known.contains_key(&(digest.clone(), from.clone()))
    }

    /// Whether `from` has shown it holds `digest`, probing it now if it has not yet.
    pub(crate) async fn check(
        &self,
        origin: &dyn Origin,
        from: &UpstreamBlob,
        digest: &Digest,
        stored: &std::fs::File,
        size: u64,
    ) -> bool {
        let key = (digest.clone(), from.clone());
        if self.known.contains_key(&key) {
            return true;
        }
        let held = probe(origin, from, digest, stored, size).await;
        if held {
            self.known.insert(key, ());
        } else {
            tracing::warn!(
                %digest, registry = %from.registry, repo = %from.repo,
                "the origin a workspace names could not show it holds a stored blob; not serving the node's copy"
            );
        }
        held
    }
}

/// Asks `from` for `PROBE_BYTES` at a random offset and compares them with `stored`.
async fn probe(origin: &dyn Origin, from: &UpstreamBlob, digest: &Digest, stored: &std::fs::File, size: u64) -> bool {
    let n = PROBE_BYTES.min(size);
    if n == 0 {
        return true;
    }
    let offset = rand::random_range(0..=size - n);
    let mut expected = vec![0u8; n as usize];
    if stored.read_exact_at(&mut expected, offset).is_err() {
        return false;
    }
    let got = tokio::time::timeout(PROBE_TIMEOUT, read_prefix(origin, from, digest, offset, n)).await;
    matches!(got, Ok(Some(bytes)) if bytes[..] == expected[..])
}

/// The first `n` bytes the origin sends from `offset`, or `None`.
async fn read_prefix(
    origin: &dyn Origin,
    from: &UpstreamBlob,
    digest: &Digest,
    offset: u64,
    n: u64,
) -> Option<BytesMut> {
    let mut stream = origin.open(from, digest, offset).await.ok()?;
    let mut got = BytesMut::with_capacity(n as usize);
    while (got.len() as u64) < n {
        let chunk = stream.body.next().await?.ok()?;
        got.extend_from_slice(&chunk);
    }
    got.truncate(n as usize);
    Some(got)
}
