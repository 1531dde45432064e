//! Consumers and recovery (design §3.11; Go restores only at start): one consumer per shard; when
//! one finds a gap (the stream dropped changes this node lacks: new node, long stop, fell behind),
//! all stop, the apply thread restores a verified snapshot and they restart from its positions.
//!
//! Invariants:
//! - Consumers restart only after the apply thread has taken the restore, which it runs after
//!   every message forwarded before it: no message is applied twice across a restore, none skipped.
//! - A snapshot is used only if it contains, for every stream, everything up to the stream's first
//!   retained sequence (else the node asks the leader for a newer one and waits). A snapshot made
//!   by Go HarmonyLite (no positions) is used with a replay of everything retained.
//! - While recovering, health is 503 with the reason; a node that cannot recover says why and
//!   keeps trying, it never crash-loops and never goes on silently with a gap.
//! - While recovering, the publisher holds this node's new changes back (pending until restored):
//!   else after a cluster-wide outage the first nodes back would publish their backlogs past the
//!   node holding everything, and every node would lack something no other could give it.
//! - Without snapshots (`snapshot.enabled = false`) a gap is logged as an error and skipped.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::apply::{RestoreError, RestoreJob, Work};
use super::consume::{self, Gap};
use crate::db::restore::Restored;
use crate::handle::Node;
use crate::replicate::lock;
use crate::snapshot::{self, Meta, scheduler::Snapshots};
use crate::stream;

/// How long a node behind on a migration waits to download a newer snapshot, schema unchanged.
const BEHIND_RECHECK: Duration = Duration::from_secs(600);

/// Longest wait between recovery attempts (one finding no new snapshot costs a metadata read).
const MAX_RETRY: Duration = Duration::from_secs(5);

/// Whether a stream has already discarded messages after this node's position (checked before
/// anything is published at start, so a node coming back with a gap holds its backlog).
pub async fn gap_at_start(node: &Node, positions: &[AtomicU64]) -> bool {
    for (i, name) in node.streams().iter().enumerate() {
        if let Ok(Some((first, _))) = stream::stream_range(&node.js, name).await
            && first > positions[i].load(Ordering::SeqCst) + 1
        {
            tracing::warn!(stream = %name, position = positions[i].load(Ordering::SeqCst), stream_first = first,
                "This node lacks changes the stream no longer holds: holding local changes back until it has restored a snapshot");
            return true;
        }
    }
    false
}

/// What a restore must know about this node's own changes ([`crate::db::restore::NotKept`]).
#[derive(Clone)]
pub struct OwnChanges {
    /// Per table: pending changes up to this change-log id have an unknown publish status.
    pub unknown_up_to: Vec<i64>,
    /// Acknowledged changes not yet marked in the database.
    pub outbox: super::publish::Outbox,
    /// What the publisher knows of sends whose acks it lacks.
    pub sends: super::publish::Unsettled,
}

impl OwnChanges {
    fn not_kept(&self) -> crate::db::restore::NotKept {
        let outbox = lock(&self.outbox);
        crate::db::restore::NotKept {
            unknown_up_to: self.unknown_up_to.clone(),
            landed: outbox.landed().chain(self.sends.found()).collect(),
        }
    }
}

/// Runs the consumers (and recoveries) until shutdown; fails only when the apply thread is gone.
pub async fn run(
    node: Node,
    tx: mpsc::Sender<Work>,
    positions: Arc<[AtomicU64]>,
    snapshots: Option<Arc<Snapshots>>,
    own: OwnChanges,
) -> anyhow::Result<()> {
    let shutdown = node.root.clone();
    loop {
        let (gap_tx, mut gaps) = mpsc::unbounded_channel();
        let round = shutdown.child_token();
        let mut consumers = JoinSet::new();
        for (idx, name) in node.streams().iter().enumerate() {
            let start = positions[idx].load(Ordering::SeqCst) + 1;
            tracing::info!(stream = %name, from_seq = start, "Starting consumer");
            let spec = consume::ConsumerSpec {
                js: node.js.clone(),
                settings: Arc::clone(&node.settings),
                shard: idx as u64 + 1,
                start_seq: start,
                health: Arc::clone(&node.observers.health),
                gaps: snapshots.as_ref().map(|_| gap_tx.clone()),
            };
            consumers.spawn(consume::run_consumer(spec, tx.clone(), round.clone()));
        }
        drop(gap_tx);
        let gap = tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            // Without snapshots no consumer reports gaps: the closed channel must not end a round.
            Some(g) = gaps.recv(), if snapshots.is_some() => Some(g),
        };
        round.cancel();
        while consumers.join_next().await.is_some() {}
        let (Some(gap), Some(snapshots)) = (gap, snapshots.as_ref()) else {
            return Ok(());
        };
        if tx.is_closed() {
            anyhow::bail!("the apply thread is gone");
        }
        if !recover(&node, &tx, snapshots, &positions, &own, gap).await? {
            return Ok(());
        }
    }
}

/// Recovers from a snapshot; `Ok(false)` on shutdown.
async fn recover(
    node: &Node,
    tx: &mpsc::Sender<Work>,
    snapshots: &Snapshots,
    positions: &[AtomicU64],
    own: &OwnChanges,
    gap: Gap,
) -> anyhow::Result<bool> {
    let health = &node.observers.health;
    let metrics = &node.observers.metrics;
    let streams = node.streams();
    let reason = format!(
        "stream {} no longer holds sequences {}..{} that this node lacks; restoring a snapshot",
        streams[gap.stream],
        gap.missing_from,
        gap.first.saturating_sub(1)
    );
    health.update_catchup(|c| c.recovering = Some(reason.clone()));
    snapshots.set_recovering(true).await;
    tracing::warn!("{reason}");
    let started = Instant::now();
    let mut backoff = crate::retry::Backoff::between(Duration::from_secs(1), MAX_RETRY);
    let mut seen = Seen::default();
    let mut logged: Option<String> = None;
    let outcome = loop {
        match attempt(node, tx, snapshots, &streams, positions, own, &mut seen).await {
            Ok(Attempt::Restored(meta)) => break Ok(Some(meta)),
            Ok(Attempt::Stopping) => break Ok(None),
            Ok(Attempt::Wait(why)) => {
                // Said once per reason: a node waiting for its migration may wait for days.
                if logged.as_ref() != Some(&why) {
                    tracing::warn!(store = snapshots.store.kind(), "{why}; waiting");
                    logged = Some(why.clone());
                }
                health.update_catchup(|c| c.recovering = Some(format!("{reason}: {why}")));
            }
            Err(e) => {
                let text = crate::error_chain(&e);
                let was_refused = matches!(e, snapshot::Error::Refused(_));
                metrics
                    .snapshots
                    .with_label_values(&["restore", if was_refused { "refused" } else { "failed" }])
                    .inc();
                tracing::error!(error = %text, store = snapshots.store.kind(), "Unable to restore snapshot; retrying");
                health.update_catchup(|c| {
                    c.recovering = Some(format!("{reason}: {text}"));
                    c.last_snapshot_error = Some(format!("restore: {text}"));
                });
                if let snapshot::Error::Unusable(_) = e
                    && tx.is_closed()
                {
                    break Err(anyhow::anyhow!("the apply thread is gone"));
                }
            }
        }
        if !backoff.wait(&node.root).await {
            break Ok(None);
        }
    };
    health.update_catchup(|c| c.recovering = None);
    snapshots.set_recovering(false).await;
    let Some(meta) = outcome? else {
        return Ok(false);
    };
    metrics.recoveries.inc();
    metrics
        .snapshot_seconds
        .with_label_values(&["restore"])
        .observe(started.elapsed().as_secs_f64());
    snapshots.saw(&meta);
    Ok(true)
}

enum Attempt {
    Restored(Meta),
    /// No usable snapshot yet (why).
    Wait(String),
    Stopping,
}

/// Per stream: the sequence before the first retained one, and what a snapshot must reach: that, or
/// this node's position if higher (an older one would take rows back until the replay caught up).
async fn needs(
    node: &Node,
    streams: &[String],
    applied: &[AtomicU64],
) -> Result<(Vec<u64>, Vec<u64>), snapshot::Error> {
    let (mut before_first, mut need) = (Vec::new(), Vec::new());
    for (i, name) in streams.iter().enumerate() {
        let range = stream::stream_range(&node.js, name)
            .await
            .map_err(|e| snapshot::Error::Unusable(format!("cannot read stream {name}: {e}")))?;
        let first = range.map_or(0, |(first, _)| first.saturating_sub(1));
        let own = applied.get(i).map_or(0, |p| p.load(Ordering::SeqCst));
        before_first.push(first);
        need.push(first.max(own));
    }
    Ok((before_first, need))
}

/// The positions a snapshot contains, per stream; `None` for one without (Go's, or metadata lost).
fn positions_of(meta: &Meta, streams: &[String]) -> Option<Vec<u64>> {
    meta.positions.as_ref().map(|p| {
        streams
            .iter()
            .map(|s| p.get(s).copied().unwrap_or(0))
            .collect()
    })
}

/// Whether a snapshot may be restored now: its positions reach `need`, or it has none.
fn usable(meta: &Meta, streams: &[String], need: &[u64]) -> bool {
    positions_of(meta, streams).is_none_or(|have| covers(&have, need))
}

fn covers(have: &[u64], need: &[u64]) -> bool {
    have.iter().zip(need).all(|(h, n)| h >= n)
}

/// One recovery try: look at the store, download, hand to the apply thread, account for it.
async fn attempt(
    node: &Node,
    tx: &mpsc::Sender<Work>,
    snapshots: &Snapshots,
    streams: &[String],
    applied: &[AtomicU64],
    own: &OwnChanges,
    seen: &mut Seen,
) -> Result<Attempt, snapshot::Error> {
    let (before_first, need, listed) =
        match look(node, snapshots, streams, applied, own, seen).await? {
            ControlFlow::Continue(found) => found,
            ControlFlow::Break(attempt) => return Ok(attempt),
        };
    let fetched = snapshot::fetch_verified(snapshots.store.as_ref(), &node.settings.db_path).await;
    if let Err(snapshot::Error::Refused(_)) = &fetched {
        seen.refused = Some(listed.clone());
        ask_for_snapshot(node, &need, streams).await;
    }
    let Some((dir, file, meta)) = fetched? else {
        return Ok(Attempt::Wait(
            "the snapshot disappeared from the store".into(),
        ));
    };
    // What was downloaded may be newer than the metadata looked at first, or record positions the
    // store's metadata lost: check it again (and do not download it again).
    if !usable(&meta, streams, &need) {
        seen.refused = Some(listed);
        ask_for_snapshot(node, &need, streams).await;
        return Ok(Attempt::Wait(format!(
            "the downloaded snapshot (positions {:?}) does not reach {:?}",
            meta.positions, need
        )));
    }
    let positionless = meta.positions.is_none();
    let at = positions_of(&meta, streams).unwrap_or(before_first);
    if positionless {
        tracing::warn!(
            "The snapshot records no stream positions (made by Go HarmonyLite, or its metadata was lost); replaying everything the streams retain over it"
        );
    }
    let (answer, version) = hand_over(node, tx, own, file, &at, positionless).await?;
    let restored = match answer {
        Ok(restored) => restored,
        Err(RestoreError::Db(e @ crate::db::Error::Behind(_))) => {
            let why = e.to_string();
            if let Some(version) = version {
                seen.behind = Some((Instant::now(), version, why.clone()));
            }
            return Ok(Attempt::Wait(why));
        }
        Err(e) => return Err(snapshot::Error::Unusable(crate::error_chain(&e))),
    };
    drop(dir);
    account(node, &restored, &meta, &at);
    Ok(Attempt::Restored(meta))
}

/// Looks at the store before downloading: `Continue` with [`needs`] and the snapshot listed, or
/// `Break` when nothing is worth downloading (shutdown, no snapshot, one seen or too old, no room).
async fn look(
    node: &Node,
    snapshots: &Snapshots,
    streams: &[String],
    applied: &[AtomicU64],
    own: &OwnChanges,
    seen: &Seen,
) -> Result<ControlFlow<Attempt, (Vec<u64>, Vec<u64>, Meta)>, snapshot::Error> {
    if !settled(node, &own.sends).await? {
        return Ok(ControlFlow::Break(Attempt::Stopping));
    }
    let wait = |why: String| Ok(ControlFlow::Break(Attempt::Wait(why)));
    let (before_first, need) = needs(node, streams, applied).await?;
    let Some(meta) = snapshots.store.meta().await? else {
        ask_for_snapshot(node, &need, streams).await;
        return wait("the store holds no snapshot yet".into());
    };
    if let Some((when, version, why)) = &seen.behind
        && when.elapsed() < BEHIND_RECHECK
        && schema_version(node).await == Some(*version)
    {
        return wait(why.clone());
    }
    // Not for a snapshot without metadata: every one looks the same (Go's; a store's loss).
    if seen.refused.as_ref() == Some(&meta) && meta != Meta::default() {
        ask_for_snapshot(node, &need, streams).await;
        return wait("the store still holds the snapshot refused before".into());
    }
    if !usable(&meta, streams, &need) {
        ask_for_snapshot(node, &need, streams).await;
        return wait(format!(
            "the newest snapshot (positions {:?}) is older than what the streams still hold (from {:?})",
            meta.positions,
            need.iter().map(|n| n + 1).collect::<Vec<_>>()
        ));
    }
    if let Some(size) = meta.size
        && let Some(room) = snapshot::lacks_room_to_restore(&node.settings.db_path, size)
    {
        return wait(format!(
            "not enough free disk space next to the database to restore: the snapshot is {} MB and needs {} MB free (its download and the merge)",
            size >> 20,
            room >> 20
        ));
    }
    Ok(ControlFlow::Continue((before_first, need, meta)))
}

/// Hands `file` to the apply thread to restore at `at`; its answer and the schema version then.
async fn hand_over(
    node: &Node,
    tx: &mpsc::Sender<Work>,
    own: &OwnChanges,
    file: std::path::PathBuf,
    at: &[u64],
    replay_all: bool,
) -> Result<(Result<Restored, RestoreError>, Option<i64>), snapshot::Error> {
    // Read before the restore looks at the schema, so a migration in between counts as a change.
    let version = schema_version(node).await;
    let (reply, answer) = tokio::sync::oneshot::channel();
    let job = RestoreJob {
        file,
        positions: at.to_vec(),
        not_kept: own.not_kept(),
        replay_all,
        reply,
    };
    let gone = || snapshot::Error::Unusable("the apply thread is gone".into());
    tx.send(Work::Restore(job)).await.map_err(|_| gone())?;
    Ok((answer.await.map_err(|_| gone())?, version))
}

/// Logs, counts and reports a completed restore.
fn account(node: &Node, restored: &Restored, meta: &Meta, at: &[u64]) {
    for (table, why) in &restored.skipped {
        tracing::warn!(table = %table, reason = %why, "Table not restored from the snapshot");
    }
    let m = &node.observers.metrics;
    m.snapshots.with_label_values(&["restore", "ok"]).inc();
    m.snapshot_size_bytes.set(meta.size.unwrap_or(0) as i64);
    node.observers.health.update_catchup(|c| {
        c.last_snapshot_restored_ms = meta.created_ms.unwrap_or(0).max(1);
        c.last_snapshot_error = None;
    });
    tracing::info!(deleted = restored.deleted, updated = restored.updated, inserted = restored.inserted,
        kept_in_flight = restored.kept, positions = ?at, "Restore complete...");
}

/// What a recovery's earlier attempts learned of the store's snapshot (not to refetch it).
#[derive(Default)]
struct Seen {
    refused: Option<Meta>,
    /// Refused for being behind on a migration: when, the schema version then, and why; no download
    /// again until the schema changes or [`BEHIND_RECHECK`] passes (the cluster may go back).
    behind: Option<(Instant, i64, String)>,
}

/// The database's `PRAGMA schema_version` (it changes with every schema change).
async fn schema_version(node: &Node) -> Option<i64> {
    let path = node.settings.db_path.clone();
    tokio::task::spawn_blocking(move || {
        let conn = crate::db::open(&path).ok()?;
        conn.query_row("PRAGMA schema_version", [], |r| r.get(0))
            .ok()
    })
    .await
    .ok()
    .flatten()
}

/// How long a restore waits for the publisher to settle what a failed pass sent.
const SETTLE_WAIT: Duration = Duration::from_secs(30);

/// Waits until the held publisher knows where all it sent landed ([`super::publish::Unsettled`]): a
/// restore counts those as landed, not in flight. `Ok(false)` on shutdown.
async fn settled(node: &Node, sends: &super::publish::Unsettled) -> Result<bool, snapshot::Error> {
    let started = Instant::now();
    while !sends.settled() {
        if started.elapsed() > SETTLE_WAIT {
            return Err(snapshot::Error::Unusable(
                "the publisher did not settle what it sent (a pass still running, or the streams could not be searched after a failed one)"
                    .into(),
            ));
        }
        if !crate::retry::pause(&node.root, Duration::from_millis(50)).await {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Asks the snapshot leader for a snapshot reaching `need`.
async fn ask_for_snapshot(node: &Node, need: &[u64], streams: &[String]) {
    let request = snapshot::scheduler::Request {
        node_id: node.settings.node_id,
        need: streams.iter().cloned().zip(need.iter().copied()).collect(),
    };
    let Ok(body) = serde_json::to_vec(&request) else {
        return;
    };
    let subject = snapshot::scheduler::request_subject(&node.settings);
    if let Err(e) = node.client.publish(subject, body.into()).await {
        tracing::debug!(error = %e, "cannot ask for a snapshot");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_covers_a_gap_only_up_to_the_first_retained_sequence() {
        let streams = vec!["s-1".to_owned(), "s-2".to_owned()];
        let meta = Meta {
            positions: Some([("s-1".to_owned(), 100), ("s-2".to_owned(), 7)].into()),
            ..Meta::default()
        };
        assert!(usable(&meta, &streams, &[100, 7]));
        assert!(!usable(&meta, &streams, &[101, 0]));
        assert_eq!(positions_of(&meta, &streams), Some(vec![100, 7]));
        // Go's snapshots record nothing: usable, with everything retained replayed over them.
        let go = Meta::default();
        assert!(usable(&go, &streams, &[40, 2]));
        assert_eq!(positions_of(&go, &streams), None);
    }
}
