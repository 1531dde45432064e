//! The cluster schema registry (upstream §9.6, §9.7): each node keeps its schema hash in KV bucket
//! `harmonylite-schema-registry` under `node-<id>`; `-schema-status-cluster` reports who agrees.
//! Invariants: the value is byte-compatible with Go's JSON (Go's field order, `previous_hash`
//! omitted when empty, `updated_at` RFC 3339 with nanoseconds, UTC, trailing zeros trimmed).
//! Entries expire after the bucket's 5-minute TTL (Go's setting); a running node rewrites its own
//! every minute and after every schema change, so it never disappears while the node runs (Go wrote
//! it once at start). Visibility only: failing to reach the registry is logged, never fatal.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// The bucket, as Go names and configures it.
pub const BUCKET: &str = "harmonylite-schema-registry";
/// The bucket's TTL (stream max age).
const TTL: Duration = Duration::from_secs(300);
/// How often a running node rewrites its entry.
const REFRESH: Duration = Duration::from_secs(10);
/// How soon an entry that could not be written is tried again.
const RETRY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open or create the schema registry bucket {BUCKET}: {0}")]
    Bucket(String),
    #[error("cannot write the schema registry entry {key}: {message}")]
    Put { key: String, message: String },
    #[error("cannot read the schema registry: {0}")]
    Read(String),
}

/// One node's entry (Go `NodeSchemaState`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeSchemaState {
    pub node_id: u64,
    pub schema_hash: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub previous_hash: String,
    #[serde(default)]
    pub harmonylite_version: String,
    #[serde(default)]
    pub updated_at: String,
}

impl NodeSchemaState {
    /// This node's state now.
    pub fn now(node_id: u64, schema_hash: &str, previous_hash: &str) -> NodeSchemaState {
        NodeSchemaState {
            node_id,
            schema_hash: schema_hash.to_owned(),
            previous_hash: previous_hash.to_owned(),
            harmonylite_version: env!("CARGO_PKG_VERSION").to_owned(),
            updated_at: crate::health::rfc3339_nano(
                crate::clock::unix_ms().saturating_mul(1_000_000),
            ),
        }
    }

    /// Go's JSON encoding.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Opens the bucket, creating it as Go does when it does not exist.
pub async fn bucket(js: &jetstream::Context) -> Result<kv::Store, Error> {
    let config = kv::Config {
        bucket: BUCKET.to_owned(),
        description: "HarmonyLite schema registry for cluster-wide schema visibility".to_owned(),
        max_age: TTL,
        num_replicas: 1,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    crate::stream::open_or_create(js, config)
        .await
        .map_err(|e| Error::Bucket(e.to_string()))
}

/// Writes this node's entry.
pub async fn publish(store: &kv::Store, state: &NodeSchemaState) -> Result<(), Error> {
    let key = format!("node-{}", state.node_id);
    store
        .put(&key, state.to_json().into())
        .await
        .map(|_| ())
        .map_err(|e| Error::Put {
            key,
            message: e.to_string(),
        })
}

/// Keeps this node's entry in the registry until shutdown (one generation: one schema).
pub async fn keep_published(
    js: jetstream::Context,
    node_id: u64,
    hash: String,
    previous: String,
    shutdown: CancellationToken,
) {
    let mut first = true;
    let mut store: Option<kv::Store> = None;
    loop {
        if store.is_none() {
            match bucket(&js).await {
                Ok(s) => store = Some(s),
                Err(e) if first => {
                    tracing::warn!(error = %e, "Failed to initialize schema registry, continuing without cluster visibility");
                }
                Err(e) => tracing::debug!(error = %e, "schema registry still unavailable"),
            }
        }
        if let Some(s) = &store {
            match publish(s, &NodeSchemaState::now(node_id, &hash, &previous)).await {
                Ok(()) if first => {
                    tracing::info!(schema_hash = %format!("{}...", short(&hash)),
                        "Published schema state to cluster registry");
                }
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot update the schema registry");
                    // Opened again next time: created anew if JetStream lost it.
                    store = None;
                }
            }
        }
        first = false;
        // Not written (NATS away, the bucket lost in a wipe): try again soon.
        let wait = if store.is_some() { REFRESH } else { RETRY };
        if !crate::retry::pause(&shutdown, wait).await {
            return;
        }
    }
}

/// Every node's entry by node id (Go `GetClusterSchemaState`); unreadable ones are skipped, warned.
pub async fn cluster_state(
    js: &jetstream::Context,
) -> Result<BTreeMap<u64, NodeSchemaState>, Error> {
    let store = match js.get_key_value(BUCKET).await {
        Ok(s) => s,
        Err(e) if e.kind() == jetstream::context::KeyValueErrorKind::GetBucket => {
            return Ok(BTreeMap::new());
        }
        Err(e) => return Err(Error::Read(e.to_string())),
    };
    let mut keys = store.keys().await.map_err(|e| Error::Read(e.to_string()))?;
    let mut out = BTreeMap::new();
    while let Some(key) = keys.next().await {
        let Ok(key) = key else { continue };
        match store.get(&key).await {
            Ok(Some(value)) => match serde_json::from_slice::<NodeSchemaState>(&value) {
                Ok(state) => {
                    out.insert(state.node_id, state);
                }
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "Failed to unmarshal schema state")
                }
            },
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "Failed to get key from schema registry")
            }
        }
    }
    Ok(out)
}

/// `RFC3339Nano` → RFC 3339 to the second, as Go prints `Updated At`.
fn to_seconds(t: &str) -> String {
    let Some(dot) = t.find('.') else {
        return t.to_owned();
    };
    let zone = t[dot..].find(['Z', '+', '-']).map_or(t.len(), |i| dot + i);
    format!("{}{}", &t[..dot], &t[zone..])
}

fn short(hash: &str) -> &str {
    hash.get(..16).unwrap_or(hash)
}

/// `-schema-status-cluster`'s report (upstream §9.7): groups and nodes in a stable order (Go's was
/// random); the expected hash is most nodes' (Go took whichever node its map yielded first).
pub fn render_cluster(states: &BTreeMap<u64, NodeSchemaState>) -> String {
    if states.is_empty() {
        return "No schema state information available from cluster\n".to_owned();
    }
    let mut groups: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for s in states.values() {
        groups.entry(&s.schema_hash).or_default().push(s.node_id);
    }
    let expected = groups
        .iter()
        .max_by(|a, b| a.1.len().cmp(&b.1.len()).then(b.1[0].cmp(&a.1[0])))
        .map(|(h, _)| *h)
        .unwrap_or_default();
    let consistent = groups.len() <= 1;
    let mut out = format!(
        "Cluster Schema Status\n=====================\nTotal Nodes: {}\nConsistent: {}\n\nHash Groups:\n",
        states.len(),
        if consistent { "Yes" } else { "No" }
    );
    for (hash, nodes) in &groups {
        let list: Vec<String> = nodes.iter().map(|n| format!("Node {n}")).collect();
        out.push_str(&format!("  {}: {}\n", short(hash), list.join(", ")));
    }
    out.push_str("\nNode Details:\n");
    for s in states.values() {
        out.push_str(&format!(
            "  Node {}:\n    Schema Hash: {}\n    HarmonyLite Version: {}\n    Updated At: {}\n",
            s.node_id,
            s.schema_hash,
            s.harmonylite_version,
            to_seconds(&s.updated_at)
        ));
    }
    if !consistent {
        out.push_str("\nSchema Mismatches:\n");
        for s in states.values().filter(|s| s.schema_hash != expected) {
            out.push_str(&format!(
                "  Node {}: hash mismatch (expected: {}, actual: {})\n",
                s.node_id,
                short(expected),
                short(&s.schema_hash)
            ));
        }
    }
    out
}

/// `-schema-status`'s report in Go's format (Go never got there: it printed "Not initialized").
pub fn render_local(node_id: u64, hash: &str, tables: &[String]) -> String {
    let mut out = format!(
        "Local Schema Status\n===================\nSchema Hash: {hash}\nNode ID: {node_id}\n\
         HarmonyLite Version: {}\n\nWatched Tables:\n",
        env!("CARGO_PKG_VERSION")
    );
    for t in tables {
        out.push_str(&format!("  - {t}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(id: u64, hash: &str, prev: &str) -> NodeSchemaState {
        NodeSchemaState {
            node_id: id,
            schema_hash: hash.into(),
            previous_hash: prev.into(),
            harmonylite_version: "dev".into(),
            updated_at: "2025-01-20T10:30:00.123456789Z".into(),
        }
    }

    #[test]
    fn json_matches_go_field_order_and_omits_an_empty_previous_hash() {
        assert_eq!(
            state(1, "aa", "bb").to_json(),
            r#"{"node_id":1,"schema_hash":"aa","previous_hash":"bb","harmonylite_version":"dev","updated_at":"2025-01-20T10:30:00.123456789Z"}"#
        );
        assert_eq!(
            state(2, "aa", "").to_json(),
            r#"{"node_id":2,"schema_hash":"aa","harmonylite_version":"dev","updated_at":"2025-01-20T10:30:00.123456789Z"}"#
        );
        // Go's entries round-trip, with or without the previous hash.
        let go = r#"{"node_id":3,"schema_hash":"cc","previous_hash":"dd","harmonylite_version":"v1","updated_at":"2025-01-20T10:30:00Z"}"#;
        let parsed: NodeSchemaState = serde_json::from_str(go).expect("parse");
        assert_eq!(parsed.previous_hash, "dd");
        assert_eq!(parsed.to_json(), go);
        let now = NodeSchemaState::now(4, "ee", "");
        assert!(
            now.updated_at.ends_with('Z') && now.updated_at.contains('T'),
            "{now:?}"
        );
    }

    #[test]
    fn cluster_report_in_gos_format() {
        let h1 = "907f897c838224f10a8a6bfb1ae63396abf7f8235bad760d17af35c72470cccb";
        let h2 = "77ffca4ecf9399127b5ce2be978aaae00de8f1dc5956a16fe45bfb42c3f4117e";
        let mut states = BTreeMap::new();
        states.insert(1, state(1, h1, ""));
        states.insert(2, state(2, h1, ""));
        let report = render_cluster(&states);
        assert_eq!(
            report,
            format!(
                "Cluster Schema Status\n=====================\nTotal Nodes: 2\nConsistent: Yes\n\n\
                 Hash Groups:\n  907f897c838224f1: Node 1, Node 2\n\n\
                 Node Details:\n  Node 1:\n    Schema Hash: {h1}\n    HarmonyLite Version: dev\n    Updated At: 2025-01-20T10:30:00Z\n  \
                 Node 2:\n    Schema Hash: {h1}\n    HarmonyLite Version: dev\n    Updated At: 2025-01-20T10:30:00Z\n"
            )
        );
        states.insert(3, state(3, h2, h1));
        let report = render_cluster(&states);
        assert!(report.contains("Consistent: No\n"), "{report}");
        assert!(report.contains("  77ffca4ecf939912: Node 3\n"), "{report}");
        assert!(
            report.ends_with(
                "\nSchema Mismatches:\n  Node 3: hash mismatch (expected: 907f897c838224f1, actual: 77ffca4ecf939912)\n"
            ),
            "{report}"
        );
        assert_eq!(
            render_cluster(&BTreeMap::new()),
            "No schema state information available from cluster\n"
        );
        assert_eq!(
            to_seconds("2025-01-20T10:30:00.5+02:00"),
            "2025-01-20T10:30:00+02:00"
        );
    }

    #[test]
    fn local_report() {
        assert_eq!(
            render_local(7, "abc", &["Authors".into(), "Books".into()]),
            format!(
                "Local Schema Status\n===================\nSchema Hash: abc\nNode ID: 7\nHarmonyLite Version: {}\n\n\
                 Watched Tables:\n  - Authors\n  - Books\n",
                env!("CARGO_PKG_VERSION")
            )
        );
    }
}
