//! Pins follow the index: a blob's IPFS pin is removed once its index entry is gone, and the
//! pinned bytes of one IPFS node stay within `facade.clusterIPFSMaxBytes` (README, "The
//! cluster cache", pins).
//!
//! Redis expiry cannot be watched reliably (keyspace notifications are best effort and off by
//! default), so the pins are recorded and swept:
//! - every IPFS node has a record in Redis, `ipfs-pins:<peer ID>`, a sorted set of
//!   `<digest> <cid> <size>` members scored by last use (Unix milliseconds). The peer ID (the
//!   node's `id`), not the address, names it: facades reach one node by different addresses,
//!   and one pin on a node is one pin however many facades added the content;
//! - a facade that adds a blob records it there (score: now) and names the node in the index
//!   entry (`pinner`); a cluster hit moves the member's score to now (`ZADD XX`);
//! - every sweep interval each facade asks its IPFS node for its ID and tries to take that
//!   node's sweep lease (`ipfs-sweep:<peer ID>`, `SET NX PX`), so one facade per node sweeps;
//!   the sweeper reads the record and the index entries (`MGET`) and unpins every member whose
//!   entry is gone (`unindexed`: expired, evicted or removed) or names another CID
//!   (`replaced`), then, over the byte budget, the least recently used members: their index
//!   entry is deleted first (only while it still names that CID), so no node is sent to
//!   content that is about to go, and then the pin.
//!
//! Who unpins: any facade of the IPFS node the pin is on, and only when the index no longer
//! names the content. A pin is never removed because one facade is done with it: two facades
//! that added the same blob made one pin, which the one index entry they share keeps. After a
//! `pin/rm` the entry is read again, and if a facade published the blob again meanwhile it is
//! pinned again. A facade whose own node holds a pin listed under another node's entry (both
//! downloaded the blob) removes only its own pin on the budget, never the shared entry.
//!
//! Redis losing its data (a restart without persistence, a failover that loses the last
//! writes) loses records too; each facade remembers the pins it made within the index TTL and
//! writes them back when its node's record is missing, and records that failed to be written
//! are retried. The IPFS repository itself shrinks when the node collects garbage: Kubo with
//! `--enable-gc` does so on its own schedule; the facade does not call `repo/gc`, which
//! blocks the node's adds while it runs.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::metrics::UnpinReason;
use super::{ClusterCache, IndexEntry};
use crate::sync::lock;

/// Pins this process remembers (made within the index TTL), for records Redis lost.
const MAX_LOCAL_PINS: usize = 4096;

/// Index entries read per `MGET`.
const MGET_BATCH: usize = 256;

/// Unix milliseconds now.
pub(super) fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
}

/// One recorded pin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PinMember {
    pub digest: String,
    pub cid: String,
    pub size: u64,
}

impl PinMember {
    /// The sorted-set member: `<digest> <cid> <size>`.
    pub fn encode(&self) -> String {
        format!("{} {} {}", self.digest, self.cid, self.size)
    }

    pub fn decode(s: &str) -> Option<PinMember> {
        let mut parts = s.split(' ');
        let (digest, cid, size) = (parts.next()?, parts.next()?, parts.next()?.parse().ok()?);
        (parts.next().is_none() && digest.contains(':') && !cid.is_empty()).then(|| PinMember {
            digest: digest.to_string(),
            cid: cid.to_string(),
            size,
        })
    }
}

/// A pin this process made.
#[derive(Clone, Debug)]
struct LocalPin {
    peer: String,
    member: String,
    at: i64,
    /// Whether its record write reached Redis.
    recorded: bool,
}

/// The pins this process made, newest last, bounded.
#[derive(Debug, Default)]
pub(super) struct LocalPins {
    pins: VecDeque<LocalPin>,
}

impl LocalPins {
    fn push(&mut self, peer: &str, member: String, at: i64, recorded: bool) {
        if self.pins.len() >= MAX_LOCAL_PINS {
            self.pins.pop_front();
        }
        self.pins.push_back(LocalPin { peer: peer.to_string(), member, at, recorded });
    }

    fn prune(&mut self, older_than: i64) {
        self.pins.retain(|p| p.at >= older_than);
    }
}

/// What one sweep did (for logs and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Whether this facade held its node's sweep lease and swept.
    pub swept: bool,
    /// Pins removed.
    pub unpinned: u64,
    /// Bytes still pinned after the sweep.
    pub pinned_bytes: u64,
}

impl ClusterCache {
    /// The peer ID of this facade's IPFS node, asked once and again after a failure.
    pub(super) async fn ipfs_peer(&self) -> Option<String> {
        let i = self.ipfs.as_ref()?;
        if let Some(p) = lock(&i.peer).clone() {
            return Some(p);
        }
        let timeout = self.ipfs_call_timeout();
        let peer = i.breaker.call(timeout, i.store.peer_id()).await?;
        *lock(&i.peer) = Some(peer.clone());
        Some(peer)
    }

    fn ipfs_call_timeout(&self) -> Duration {
        self.config.ipfs.as_ref().map(|c| c.first_byte_timeout * 4).unwrap_or(Duration::from_secs(12))
    }

    fn pins_key(&self, peer: &str) -> Option<String> {
        Some(self.redis.as_ref()?.kv.key(&["ipfs-pins", peer]))
    }

    /// The record's life: refreshed by every write and sweep, so only the record of a node no
    /// facade uses any more expires (its pins cannot be reached then anyway).
    fn record_ttl(&self) -> Duration {
        self.config.index_ttl * 2
    }

    /// Records a pin just made on `peer`'s node (called after the index entry is written).
    pub(super) async fn record_pin(&self, peer: &str, member: PinMember) {
        let member = member.encode();
        let at = now_millis();
        let recorded = match (self.redis.as_ref(), self.pins_key(peer)) {
            (Some(r), Some(key)) => {
                r.breaker.call(r.timeout, r.kv.zadd(&key, None, at, &member, self.record_ttl())).await.is_some()
            }
            _ => false,
        };
        lock(&self.local_pins).push(peer, member, at, recorded);
    }

    /// Moves a pin's last use to now after a cluster hit (in the background, best effort).
    pub(super) fn touch_pin(&self, digest: &str, entry: &IndexEntry) {
        let (Some(r), Some(peer)) = (self.redis.as_ref(), entry.pinner.as_deref()) else { return };
        let Some(key) = self.pins_key(peer) else { return };
        let member = PinMember { digest: digest.to_string(), cid: entry.cid.clone(), size: entry.size }.encode();
        let (kv, timeout, ttl) = (r.kv.clone(), r.timeout, self.record_ttl());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(timeout, kv.zadd(&key, Some("XX"), now_millis(), &member, ttl)).await;
        });
    }

    /// One sweep of this facade's IPFS node, if this facade gets the node's sweep lease.
    pub async fn sweep_pins(&self) -> SweepReport {
        let mut report = SweepReport::default();
        let (Some(r), Some(i)) = (self.redis.as_ref(), self.ipfs.as_ref()) else { return report };
        if !r.breaker.allow() || !i.breaker.allow() {
            return report;
        }
        // Asked every time: a node that restarted with a new repository has a new identity.
        let Some(peer) = i.breaker.call(self.ipfs_call_timeout(), i.store.peer_id()).await else { return report };
        *lock(&i.peer) = Some(peer.clone());
        let lease_key = r.kv.key(&["ipfs-sweep", &peer]);
        let lease_ttl = self.config.pin_sweep_interval.mul_f64(0.9).max(Duration::from_millis(500));
        if r.breaker.call(r.timeout, r.kv.set_nx(&lease_key, self.me.as_bytes(), lease_ttl)).await != Some(true) {
            return report;
        }
        report.swept = true;
        let Some(key) = self.pins_key(&peer) else { return report };
        let Some(record) = self.load_record(&peer, &key).await else { return report };

        // Read the index entries of every member, in batches.
        let mut members = Vec::with_capacity(record.len());
        for (raw, score) in record {
            match PinMember::decode(&raw) {
                Some(m) => members.push((m, raw, score)),
                None => {
                    tracing::warn!(member = %raw, "dropping a member of the IPFS pin record that does not parse");
                    let _ = r.breaker.call(r.timeout, r.kv.zrem(&key, &raw)).await;
                }
            }
        }
        let mut entries = Vec::with_capacity(members.len());
        for batch in members.chunks(MGET_BATCH) {
            let keys: Vec<String> = batch.iter().map(|(m, _, _)| r.kv.key(&["blob", &m.digest])).collect();
            let Some(values) = r.breaker.call(r.timeout, r.kv.mget(&keys)).await else { return report };
            entries.extend(values.into_iter().map(|v| v.map(|raw| serde_json::from_slice::<IndexEntry>(&raw))));
        }

        let mut kept = Vec::new();
        for ((m, raw, score), entry) in members.into_iter().zip(entries) {
            let reason = match &entry {
                None => Some(UnpinReason::Unindexed),
                Some(Ok(e)) if e.cid != m.cid => Some(UnpinReason::Replaced),
                // A live entry, or one that does not parse (a lookup removes that, and the next
                // sweep sees it gone): kept for now.
                Some(_) => None,
            };
            match reason {
                Some(reason) => match self.unpin(&key, &m, &raw, reason, true).await {
                    Some(true) => report.unpinned += 1,
                    Some(false) => {}
                    None => return report,
                },
                None => {
                    let shared_elsewhere =
                        matches!(&entry, Some(Ok(e)) if e.pinner.as_deref().is_some_and(|p| p != peer));
                    kept.push((m, raw, score, shared_elsewhere));
                }
            }
        }

        let mut total: u64 = kept.iter().map(|(m, ..)| m.size).sum();
        if let Some(budget) = self.config.ipfs_max_bytes {
            // Least recently used first (ZRANGE answers by ascending score).
            for (m, raw, _, shared_elsewhere) in &kept {
                if total <= budget {
                    break;
                }
                if !shared_elsewhere {
                    let entry_key = r.kv.key(&["blob", &m.digest]);
                    let needle = format!("\"cid\":\"{}\"", m.cid);
                    if r.breaker.call(r.timeout, r.kv.del_if_contains(&entry_key, &needle)).await.is_none() {
                        return report;
                    }
                }
                match self.unpin(&key, m, raw, UnpinReason::Budget, !shared_elsewhere).await {
                    Some(true) => {
                        report.unpinned += 1;
                        total = total.saturating_sub(m.size);
                    }
                    Some(false) => total = total.saturating_sub(m.size),
                    None => return report,
                }
            }
        }
        report.pinned_bytes = total;
        self.metrics.set_pinned_bytes(total);
        report
    }

    /// The node's record, after writing back what this process pinned and Redis does not
    /// have: pins whose record write failed, and all remembered pins when the record is gone.
    async fn load_record(&self, peer: &str, key: &str) -> Option<Vec<(String, i64)>> {
        let r = self.redis.as_ref()?;
        let index_ttl_ms = i64::try_from(self.config.index_ttl.as_millis()).unwrap_or(i64::MAX);
        let local: Vec<LocalPin> = {
            let mut l = lock(&self.local_pins);
            l.prune(now_millis().saturating_sub(index_ttl_ms));
            l.pins.iter().filter(|p| p.peer == peer).cloned().collect()
        };
        let mut record = r.breaker.call(r.timeout, r.kv.zrange_scores(key)).await?;
        let missing: Vec<&LocalPin> =
            if record.is_empty() { local.iter().collect() } else { local.iter().filter(|p| !p.recorded).collect() };
        if missing.is_empty() {
            return Some(record);
        }
        for p in &missing {
            r.breaker.call(r.timeout, r.kv.zadd(key, Some("NX"), p.at, &p.member, self.record_ttl())).await?;
        }
        {
            let written: HashMap<&str, ()> = missing.iter().map(|p| (p.member.as_str(), ())).collect();
            for p in lock(&self.local_pins).pins.iter_mut() {
                if p.peer == peer && written.contains_key(p.member.as_str()) {
                    p.recorded = true;
                }
            }
        }
        record = r.breaker.call(r.timeout, r.kv.zrange_scores(key)).await?;
        Some(record)
    }

    /// Removes the pin of `m` and its record. With `recheck`, an index entry that names the CID
    /// again afterwards (the blob was published again meanwhile) has it pinned again; without,
    /// the entry is another node's pin of the same content. `Some(true)`: unpinned;
    /// `Some(false)`: it was not pinned, or it was pinned again; `None`: a dependency failed
    /// (the sweep stops, the member stays for the next one).
    async fn unpin(&self, key: &str, m: &PinMember, raw: &str, reason: UnpinReason, recheck: bool) -> Option<bool> {
        let (r, i) = (self.redis.as_ref()?, self.ipfs.as_ref()?);
        let removed = i.breaker.call(self.ipfs_call_timeout(), i.store.unpin(&m.cid)).await?;
        // Published again meanwhile (same content, same CID)? Then it must stay pinned.
        let entry_key = r.kv.key(&["blob", &m.digest]);
        let again = r.breaker.call(r.timeout, r.kv.get(&entry_key)).await?;
        let named_again = again
            .and_then(|raw| serde_json::from_slice::<IndexEntry>(&raw).ok())
            .is_some_and(|e| recheck && e.cid == m.cid);
        if named_again {
            tracing::debug!(digest = %m.digest, cid = %m.cid, "blob was published again while it was unpinned; pinning it again");
            let _ = i.breaker.call(self.ipfs_call_timeout(), i.store.pin(&m.cid)).await;
            let _ = r.breaker.call(r.timeout, r.kv.zadd(key, None, now_millis(), raw, self.record_ttl())).await;
            return Some(false);
        }
        r.breaker.call(r.timeout, r.kv.zrem(key, raw)).await?;
        lock(&self.local_pins).pins.retain(|p| p.member != raw);
        if removed {
            self.metrics.unpinned(reason);
            tracing::debug!(digest = %m.digest, cid = %m.cid, size = m.size, reason = ?reason, "unpinned a blob from IPFS");
        }
        Some(removed)
    }

    /// Sweeps every `pin_sweep_interval` while the cache lives.
    pub(super) fn spawn_sweeper(self: &Arc<Self>) {
        if !self.shares_blobs() {
            return;
        }
        let weak = Arc::downgrade(self);
        let interval = self.config.pin_sweep_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(cache) = weak.upgrade() else { return };
                let report = cache.sweep_pins().await;
                if report.unpinned > 0 {
                    tracing::info!(
                        unpinned = report.unpinned,
                        pinned_bytes = report.pinned_bytes,
                        "removed IPFS pins of blobs the index no longer names"
                    );
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_round_trip_and_garbage_is_refused() {
        let m = PinMember { digest: "sha256:ab".into(), cid: "bafkrei".into(), size: 42 };
        assert_eq!(PinMember::decode(&m.encode()), Some(m));
        for bad in ["", "sha256:ab bafkrei", "sha256:ab bafkrei x", "ab bafkrei 1", "sha256:ab bafkrei 1 extra"] {
            assert_eq!(PinMember::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn local_pins_are_bounded_and_pruned() {
        let mut l = LocalPins::default();
        for n in 0..(MAX_LOCAL_PINS + 10) {
            l.push("peer", format!("m{n}"), n as i64, true);
        }
        assert_eq!(l.pins.len(), MAX_LOCAL_PINS);
        assert_eq!(l.pins.front().map(|p| p.member.as_str()), Some("m10"));
        l.prune(MAX_LOCAL_PINS as i64);
        assert_eq!(l.pins.len(), 10);
    }
}
