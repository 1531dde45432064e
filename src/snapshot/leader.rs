//! Snapshot leader election and the save lease, as Go HarmonyLite does them (upstream-behaviour
//! §5.7, §6.6), so that Go and Rust nodes of one cluster elect one saver. KV bucket `e-harmonylite`
//! (file storage, replicas = `replication_log.replicas`), keys [`LEADER_KEY`] and [`SAVE_KEY`],
//! value CBOR `{"NodeID": uint, "Timestamp": unix ms}`. A lease is taken when the key is missing
//! (create), ours, or expired (timestamp + TTL past); updates are compare-and-set on the entry's
//! revision. Invariants: at most one node believes it leads at a time, up to clock skew between
//! machines (Go's design: the timestamps are the holders' clocks); the save lease guards the save
//! itself. A node that cannot reach the bucket is not leader (it never saves on a guess).

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;

use crate::cbor::{self, Item};

/// The bucket (Go's `EmbeddedClusterName`).
pub const BUCKET: &str = "e-harmonylite";
pub const LEADER_KEY: &str = "snapshot-leader";
pub const SAVE_KEY: &str = "snapshot";
/// How long the save lease lives (Go's `SnapshotLeaseTTL`).
pub const SAVE_TTL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open KV bucket {BUCKET}: {0}")]
    Bucket(String),
    #[error("lease {key}: {message}")]
    Lease { key: &'static str, message: String },
}

/// Encodes `{NodeID, Timestamp}` exactly as Go's fxamacker/cbor does (fields in struct order).
pub fn encode_holder(node_id: u64, timestamp_ms: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    cbor::put_head(&mut out, 5, 2);
    cbor::put_text(&mut out, b"NodeID");
    cbor::put_head(&mut out, 0, node_id);
    cbor::put_text(&mut out, b"Timestamp");
    cbor::put_i64(&mut out, timestamp_ms);
    out
}

/// Decodes a holder value; `None` when it is not one.
pub fn decode_holder(bytes: &[u8]) -> Option<(u64, i64)> {
    let (Item::Map(entries), _) = cbor::decode_first(bytes).ok()? else {
        return None;
    };
    let mut node = None;
    let mut ts = None;
    for (k, v) in entries {
        match (k.as_str(), v) {
            (Some("NodeID"), Item::Unsigned(n)) => node = Some(n),
            (Some("Timestamp"), Item::Unsigned(n)) => ts = Some(n as i64),
            (Some("Timestamp"), Item::Negative(n)) => ts = Some(-1 - n as i64),
            _ => {}
        }
    }
    Some((node?, ts?))
}

/// The `e-harmonylite` bucket, created when missing (Go's settings).
pub async fn bucket(js: &jetstream::Context, replicas: i64) -> Result<kv::Store, Error> {
    let config = kv::Config {
        bucket: BUCKET.to_owned(),
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas.max(0) as usize,
        ..Default::default()
    };
    crate::stream::open_or_create(js, config)
        .await
        .map_err(|e| Error::Bucket(e.to_string()))
}

/// Go's `AcquireLease`: true when this node holds `key` for `ttl` from now (a lost race: error).
pub async fn acquire(
    store: &kv::Store,
    key: &'static str,
    node_id: u64,
    ttl: Duration,
) -> Result<bool, Error> {
    Ok(matches!(
        try_acquire(store, key, node_id, ttl).await?,
        Acquired::Held
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    Held,
    /// Another node holds it until this unix-ms time (by its clock).
    Other {
        expires_ms: i64,
    },
}

/// [`acquire`], plus when another holder's lease ends (to look again then, not a heartbeat later).
pub async fn try_acquire(
    store: &kv::Store,
    key: &'static str,
    node_id: u64,
    ttl: Duration,
) -> Result<Acquired, Error> {
    let now = crate::clock::unix_ms();
    let payload = Bytes::from(encode_holder(node_id, now));
    let lease = |message: String| Error::Lease { key, message };
    let Some(entry) = store.entry(key).await.map_err(|e| lease(e.to_string()))? else {
        return store
            .create(key, payload)
            .await
            .map(|_| Acquired::Held)
            .map_err(|e| lease(e.to_string()));
    };
    // A deleted or purged key is taken like an expired one: compare-and-set on its revision.
    if matches!(entry.operation, kv::Operation::Put)
        && let Some((holder, ts)) = decode_holder(&entry.value)
        && holder != node_id
    {
        let expires_ms = ts.saturating_add(ttl.as_millis() as i64);
        if expires_ms > now {
            return Ok(Acquired::Other { expires_ms });
        }
    }
    store
        .update(key, payload, entry.revision)
        .await
        .map(|_| Acquired::Held)
        .map_err(|e| lease(e.to_string()))
}

/// Deletes `key` when `node_id` holds it, so that another node can take it at once.
pub async fn release(store: &kv::Store, key: &'static str, node_id: u64) {
    if let Ok(Some(entry)) = store.entry(key).await
        && matches!(entry.operation, kv::Operation::Put)
        && decode_holder(&entry.value).is_some_and(|(holder, _)| holder == node_id)
    {
        let _ = store.delete(key).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_bytes_match_go() {
        // upstream-behaviour §5.7 golden value.
        let want = "a2664e6f64654944016954696d657374616d701b0000018bcfe56800";
        let got: String = encode_holder(1, 0x0000_018b_cfe5_6800)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(got, want);
        assert_eq!(
            decode_holder(&encode_holder(7, 1_700_000_000_000)),
            Some((7, 1_700_000_000_000))
        );
        assert_eq!(decode_holder(b"garbage"), None);
    }
}
