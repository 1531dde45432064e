//! The node-id lease: one live node per `node_id` in a cluster (cloned machines share the machine
//! id `node_id` defaults to, hence node names, metric labels and KV keys). Each node holds key
//! `<stream_prefix>.node-<id>` in KV bucket [`BUCKET`], valued with its database identity (plus host and pid, for
//! the message), refreshed every [`REFRESH`]; entries expire after [`TTL`]. Invariants: at start, a
//! key someone else (another database, or a copy of this one on another host) still refreshes is a
//! live node's: a conflict, the node refuses to start (exit 2). A key unchanged for two refresh
//! periods is a gone node's (a killed previous run, this database before `-cleanup`) and is taken
//! over. While running, the key is updated by compare-and-set: another identity's write is a
//! conflict too and the node stops; NATS being down is not (retried). A node that started without
//! the lease (bucket unusable: no KV, no permission) runs unchecked and tries again, from a minute
//! on to hourly.

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;

/// KV bucket of the leases (ours; Go HarmonyLite has no such bucket).
pub const BUCKET: &str = "harmonylite-node-leases";
/// How long a lease lives without refresh.
pub const TTL: Duration = Duration::from_secs(10);
/// How often a lease is refreshed.
pub const REFRESH: Duration = Duration::from_secs(2);

/// Why the lease cannot be held.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "another live node uses node_id {node_id} ({holder}); give every node its own node_id \
         (it defaults to a hash of the machine id, which cloned machines share)"
    )]
    Conflict { node_id: u64, holder: String },
    #[error("shutdown requested")]
    Cancelled,
}

/// A held lease (see the module header).
pub struct Lease {
    store: kv::Store,
    /// To create the bucket again if JetStream lost it (a wiped store).
    js: jetstream::Context,
    config: kv::Config,
    key: String,
    value: Bytes,
    revision: u64,
    node_id: u64,
}

fn describe(value: &[u8]) -> String {
    String::from_utf8_lossy(value).into_owned()
}

/// Takes the lease ([`Error::Conflict`] if another live node holds the node id); `Ok(None)` if the
/// bucket cannot be used (old server, no JetStream KV): the node runs unchecked, with a warning.
pub async fn acquire(
    js: &jetstream::Context,
    settings: &Settings,
    identity: &str,
    shutdown: &CancellationToken,
) -> Result<Option<Lease>, Error> {
    let config = bucket_config(settings);
    let opened = super::open_or_create(js, config.clone()).await;
    let Ok(store) = opened.inspect_err(|e| {
        tracing::warn!(error = %e, "Cannot use the node-id lease bucket; running without the duplicate node_id check");
    }) else {
        return Ok(None);
    };
    // Per cluster (its streams), not per server: another cluster's node 7 on the same server is
    // not this one's. KV keys take `[-_=./a-zA-Z0-9]`: other bytes as `=XX`, so distinct
    // prefixes keep distinct keys.
    let prefix: String = (settings.nats.stream_prefix.bytes())
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' => char::from(b).to_string(),
            _ => format!("={b:02X}"),
        })
        .collect();
    let key = format!("{prefix}.node-{}", settings.node_id);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let value = Bytes::from(format!(
        "identity={identity} host={host} pid={}",
        std::process::id()
    ));
    let mut lease = Lease {
        store,
        js: js.clone(),
        config,
        key,
        value,
        revision: 0,
        node_id: settings.node_id,
    };
    if !wait_until_free(&lease, identity, &host, shutdown).await? {
        return Ok(None);
    }
    match lease.store.put(&lease.key, lease.value.clone()).await {
        Ok(revision) => {
            lease.revision = revision;
            Ok(Some(lease))
        }
        Err(e) => {
            tracing::warn!(error = %e, "Cannot write the node-id lease; running without the duplicate node_id check");
            Ok(None)
        }
    }
}

/// After a start without the lease (its bucket unusable then), tries [`acquire`] again after a
/// minute, then ever less often (hourly at most: each try logs the failure) until it holds the
/// lease: the check is not skipped for good.
pub async fn acquire_later(
    js: &jetstream::Context,
    settings: &Settings,
    identity: &str,
    shutdown: &CancellationToken,
) -> Result<Lease, Error> {
    let mut backoff =
        crate::retry::Backoff::between(Duration::from_secs(60), Duration::from_secs(3600));
    loop {
        if !backoff.wait(shutdown).await {
            return Err(Error::Cancelled);
        }
        if let Some(lease) = acquire(js, settings, identity, shutdown).await? {
            tracing::info!("Took the node-id lease: the duplicate node_id check is on");
            return Ok(lease);
        }
    }
}

fn bucket_config(settings: &Settings) -> kv::Config {
    kv::Config {
        bucket: BUCKET.to_owned(),
        description: "harmonylite: one live node per node_id".to_owned(),
        history: 1,
        max_age: TTL,
        storage: jetstream::stream::StorageType::File,
        num_replicas: settings.replication.replicas.max(1),
        ..Default::default()
    }
}

/// Waits until the key of `me` (not yet written; its value names `identity` and `host`) is free
/// to take: unheld, ours, our previous run's on this host, or a foreign holder's that stopped
/// refreshing. `Ok(false)` when the key cannot be read (the node then runs without the check).
async fn wait_until_free(
    me: &Lease,
    identity: &str,
    host: &str,
    shutdown: &CancellationToken,
) -> Result<bool, Error> {
    // Watch a foreign holder for two refresh periods and a bit: a live one refreshes meanwhile.
    let mut seen_revision: Option<u64> = None;
    let deadline = tokio::time::Instant::now() + REFRESH * 2 + Duration::from_millis(500);
    loop {
        let entry = match me.store.entry(&me.key).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot read the node-id lease; running without the duplicate node_id check");
                return Ok(false);
            }
        };
        // Any value but ours is foreign: another database, a copy elsewhere, our killed last run.
        let foreign = entry
            .as_ref()
            .filter(|e| matches!(e.operation, kv::Operation::Put) && e.value != me.value);
        match foreign {
            None => return Ok(true),
            // Our own previous run on this host (killed): its process is gone, take over now.
            Some(e) if previous_run_here(&e.value, identity, host) => {
                tracing::info!(previous = %describe(&e.value), "Taking over the node-id lease of this database's previous run");
                return Ok(true);
            }
            Some(e) => {
                if seen_revision.is_some_and(|revision| revision != e.revision) {
                    return Err(Error::Conflict {
                        node_id: me.node_id,
                        holder: describe(&e.value),
                    });
                }
                if seen_revision.is_none() {
                    tracing::info!(holder = %describe(&e.value),
                        "The node-id lease names another database; waiting to see whether that node is alive");
                    seen_revision = Some(e.revision);
                }
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!(previous = %describe(&e.value), "Taking over the node-id lease of a node that is gone");
                    return Ok(true);
                }
            }
        }
        if !crate::retry::pause(shutdown, Duration::from_millis(250)).await {
            return Err(Error::Cancelled);
        }
    }
}

/// Whether a lease value was written by this database on this host by a process that no longer
/// exists (a copy of the database on this host run by another live daemon keeps its lease).
fn previous_run_here(value: &[u8], identity: &str, host: &str) -> bool {
    let text = String::from_utf8_lossy(value);
    let Some(pid) = text
        .strip_prefix(&format!("identity={identity} host={host} pid="))
        .and_then(|p| p.trim().parse::<u32>().ok())
    else {
        return false;
    };
    pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
}

impl Lease {
    /// Gives the lease up (one-shot commands, so that the daemon can start right after).
    pub async fn release(self) {
        let _ = self.store.delete(&self.key).await;
    }

    /// Refreshes the lease until shutdown; [`Error::Conflict`] when another node wrote our key.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), Error> {
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    // Let a replacement start at once.
                    let _ = self.store.delete(&self.key).await;
                    return Ok(());
                }
                _ = tick.tick() => {}
            }
            match self
                .store
                .update(&self.key, self.value.clone(), self.revision)
                .await
            {
                Ok(revision) => self.revision = revision,
                // Someone wrote it, or it expired while NATS was away, or NATS is down.
                Err(e) => match self.store.entry(&self.key).await {
                    Ok(Some(entry))
                        if matches!(entry.operation, kv::Operation::Put)
                            && entry.value != self.value =>
                    {
                        return Err(Error::Conflict {
                            node_id: self.node_id,
                            holder: describe(&entry.value),
                        });
                    }
                    Ok(_) => match self.store.put(&self.key, self.value.clone()).await {
                        Ok(revision) => self.revision = revision,
                        Err(e) => tracing::debug!(error = %e, "node-id lease refresh failed"),
                    },
                    Err(_) => {
                        tracing::debug!(error = %e, "node-id lease refresh failed");
                        let _ = super::open_or_create(&self.js, self.config.clone()).await;
                    }
                },
            }
        }
    }
}
