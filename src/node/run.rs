//! Running a node: one `spawn_*` line per subsystem (below), then supervise and drain. The
//! embedded broker runs outside the task set; its exit is watched too.
//!
//! Invariants:
//! - One fatal path: the first subsystem to end on its own, with an error or without, stops the
//!   node; its name and cause chain are logged, and [`run`] returns it (exit 1, or 2 for
//!   conflicts).
//! - Before anything is applied, changes that reached the stream before a crash are retired with
//!   where they landed, so the applier knows which of ours have come back.
//! - Shutdown (design §3.9): stop intake; the publisher makes its last pass, the keeper its last
//!   retirement, the apply thread its batch and seq-map save, all under [`DRAIN_TIMEOUT`]; then
//!   the NATS client is flushed (bounded) and the broker stopped.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::setup::{Capture, Ready};
use super::snapshots::{snapshots, spawn_snapshots};
use super::watchdog::{SchemaDrift, spawn_watchdog};
use super::{Node, StartError};
use super::{Subsystems, spawn, spawn_forever};
use crate::db::{self, apply::Applier, changelog::ChangeLog};
use crate::replicate::apply as applying;
use crate::replicate::catchup;
use crate::replicate::flow::{self, Flow};
use crate::replicate::publish::{self, LocalLog, Outbox, Pacing, Publisher, SentMark, SharedLog};
use crate::replicate::watch;
use crate::seqmap::SeqMap;
use crate::snapshot::scheduler::Snapshots;
use crate::stream;

/// How long shutdown waits for subsystems to finish their current work.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the snapshot before a `sleep_timeout` exit may take.
const SLEEP_SAVE_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs a node set up by [`super::setup::setup`] until shutdown or its first failure.
pub async fn run(ready: Ready) -> anyhow::Result<()> {
    let Ready {
        node,
        mut capture,
        embedded,
        lease,
        lock,
        sent_before_start,
    } = ready;
    // The lease outlives the generations below: another node must never take our id while
    // capture is being reinstalled.
    let n = node.clone();
    let mut lease = Some(tokio::spawn(async move {
        let lease = match lease {
            Some(lease) => lease,
            None => stream::lease::acquire_later(&n.js, &n.settings, &n.identity, &n.root).await?,
        };
        lease.run(n.root.clone()).await
    }));
    let mut first = true;
    let result = loop {
        let generation = node.generation();
        let (tables, stale) = (capture.tables.clone(), capture.stale_up_to.clone());
        let ran = run_subsystems(
            &generation,
            capture,
            &mut lease,
            embedded.as_ref(),
            first,
            sent_before_start,
        )
        .await;
        first = false;
        let reason = match ran {
            Ok(Ended::SchemaChanged(reason)) => reason,
            other => break other.map(|_| ()),
        };
        if reason.capture_lost {
            tracing::warn!(change = %reason, "Capture damaged; reinstalling it");
        } else {
            tracing::info!(change = %reason, "Schema changed; reinstalling capture");
        }
        match reinstall(&node, tables, stale).await {
            Some(Ok(next)) => {
                node.observers.health.tables_tracked.store(
                    next.tables.len() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
                capture = next;
            }
            Some(Err(e)) => break Err(e),
            None => break Ok(()),
        }
    };
    node.root.cancel();
    // The lease's release is one KV delete: bounded like the flush below, or a dead broker
    // (its request timeout, after a refresh already waiting on it) holds shutdown for 20 s more.
    if let Some(task) = lease {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    // Bounded: with the broker gone, a flush would wait for a reconnect that never comes.
    match tokio::time::timeout(Duration::from_secs(2), node.client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "NATS flush on shutdown failed"),
        Err(_) => tracing::debug!("NATS flush on shutdown timed out"),
    }
    if let Some(server) = &embedded {
        tracing::info!("Stopping embedded nats-server");
        server.stop().await;
    }
    drop(lock);
    result
}

/// Reinstalls capture after a schema change, retrying what a retry can fix (the application
/// holding the write lock, a table being changed again meanwhile); `None` on shutdown.
async fn reinstall(
    node: &Node,
    tables: Vec<db::Table>,
    stale: Vec<i64>,
) -> Option<anyhow::Result<Capture>> {
    let mut backoff = crate::retry::Backoff::starting_at(Duration::from_millis(100));
    loop {
        match super::setup::reinstall(&node.settings, tables.clone(), stale.clone()).await {
            Ok(capture) => return Some(Ok(capture)),
            Err(e) => {
                if e.chain()
                    .any(|c| c.downcast_ref().is_some_and(db::Error::is_fatal))
                {
                    return Some(Err(e));
                }
                tracing::warn!(error = %format!("{e:#}"), "Cannot reinstall capture yet; retrying");
            }
        }
        if !backoff.wait(&node.root).await {
            return None;
        }
    }
}

/// How one generation of subsystems ended.
enum Ended {
    /// Shutdown (or the idle timeout): the node stops.
    Stopped,
    /// The application changed the schema: capture is reinstalled and a new generation starts.
    SchemaChanged(db::ddl::Drift),
}

/// Runs one generation (one installed capture: one schema) until shutdown, failure or drift.
async fn run_subsystems(
    node: &Node,
    capture: Capture,
    lease: &mut Option<tokio::task::JoinHandle<Result<(), stream::lease::Error>>>,
    embedded: Option<&stream::embedded::EmbeddedNats>,
    first: bool,
    sent_before_start: i64,
) -> anyhow::Result<Ended> {
    let settings = &node.settings;
    let mut tasks = Subsystems::new();
    let (local, conn) = Local::read(node, capture)?;
    let Some(out) = Outgoing::prepare(node, &local, conn, sent_before_start).await? else {
        return Ok(Ended::Stopped);
    };
    let positions = &local.positions;
    let reported = out.positions_kv.is_some().then(|| Arc::clone(&out.flow));
    if let Some(store) = out.positions_kv {
        spawn_flow(&mut tasks, node, &out.flow, store, positions);
    }
    let gate = Arc::new(Mutex::new(()));
    let hash = local.hashes.current.clone();
    let snapshots = snapshots(node, positions, &gate, hash.clone(), out.recovering)?;
    if let Some(s) = &snapshots {
        spawn_snapshots(&mut tasks, node, s);
    }
    let previous_hash = local.hashes.previous.clone();
    if settings.replicate {
        let wiring = ApplyWiring {
            own: out.own,
            seqmap: local.seqmap,
            positions: Arc::clone(positions),
            flow: reported,
            gate,
            snapshots: snapshots.clone(),
            hashes: local.hashes,
            confirmed: Arc::clone(&local.confirmed),
            stale_up_to: local.stale_up_to,
        };
        spawn_apply(&mut tasks, node, &local.log, wiring)?;
    } else {
        tracing::info!("replicate = false: remote changes will not be applied");
    }
    let keeper_stop = spawn_publisher(&mut tasks, node, out.publisher);
    let (shared, outbox) = (out.shared, out.outbox);
    spawn_keeper(&mut tasks, node, shared, outbox, positions, keeper_stop);
    spawn_registry(&mut tasks, node, &hash, &previous_hash);
    let (watched, confirmed, poke) = (local.watched, local.confirmed, local.poke);
    spawn_watchdog(&mut tasks, node, watched, hash, confirmed, poke);
    if first {
        tracing::info!(shards = settings.replication.shards, "Replication running");
        crate::systemd::notify("READY=1");
    } else {
        tracing::info!("Capture reinstalled for the new schema; replication resumed");
    }
    let failure = supervise(node, &mut tasks, lease, embedded, snapshots.as_deref()).await;
    conclude(node, tasks, failure).await
}

/// Ends a generation once [`supervise`] returns: reports a failure (a schema change is not
/// one), then stops and drains the subsystems.
async fn conclude(
    node: &Node,
    tasks: Subsystems,
    failure: Option<anyhow::Error>,
) -> anyhow::Result<Ended> {
    let drift = failure
        .as_ref()
        .and_then(|e| e.downcast_ref::<SchemaDrift>())
        .map(|d| d.0.clone());
    if drift.is_none() {
        if let Some(e) = &failure {
            node.observers.health.set_failed();
            tracing::error!("{e:#}; shutting down");
        }
        crate::systemd::notify("STOPPING=1");
    }
    node.root.cancel();
    drain(tasks).await;
    match (drift, failure) {
        (Some(reason), _) => Ok(Ended::SchemaChanged(reason)),
        (None, Some(e)) => Err(e),
        (None, None) => Ok(Ended::Stopped),
    }
}

/// What one generation's subsystems share, read from the installed capture and the seq map.
struct Local {
    log: Arc<ChangeLog>,
    /// The tables capture was installed for (the watchdog checks them).
    watched: Vec<db::Table>,
    /// The local schema's hashes (`current` is what this node sends as `sh`).
    hashes: db::apply::SchemaHashes,
    /// The schema version capture is confirmed for: none (-1) until the watchdog's first look.
    confirmed: Arc<AtomicI64>,
    /// Wakes the watchdog for an early look.
    poke: Arc<Notify>,
    stale_up_to: Vec<i64>,
    seqmap: SeqMap,
    positions: Arc<[AtomicU64]>,
}

impl Local {
    /// Takes `capture` apart; returns the shared state and the capture connection.
    fn read(node: &Node, capture: Capture) -> anyhow::Result<(Local, rusqlite::Connection)> {
        node.observers
            .health
            .update_catchup(|c| c.schema_hash = capture.hash.clone());
        let confirmed = Arc::new(AtomicI64::new(-1));
        let poke = Arc::new(Notify::new());
        let log = ChangeLog::new(capture.tables.clone())
            .with_confirmed(Arc::clone(&confirmed), Arc::clone(&poke));
        let seqmap = SeqMap::open_tolerant(&node.settings.seq_map_path)?;
        let local = Local {
            log: Arc::new(log),
            watched: capture.tables,
            hashes: db::apply::SchemaHashes {
                current: capture.hash,
                previous: capture.previous_hash,
            },
            confirmed,
            poke,
            stale_up_to: capture.stale_up_to,
            positions: node.positions(&seqmap),
            seqmap,
        };
        Ok((local, capture.conn))
    }
}

/// The publishing side of a generation, with what it shares with the others.
struct Outgoing {
    publisher: Publisher,
    shared: SharedLog,
    outbox: Outbox,
    flow: Arc<Flow>,
    /// The positions bucket, when flow control can use one.
    positions_kv: Option<async_nats::jetstream::kv::Store>,
    /// Set while recovering from a snapshot (the publisher then holds local changes back).
    recovering: Arc<AtomicBool>,
    own: catchup::OwnChanges,
}

impl Outgoing {
    /// Builds the publisher, retiring what reached the stream before a restart; `None` on shutdown.
    async fn prepare(
        node: &Node,
        local: &Local,
        conn: rusqlite::Connection,
        sent_before_start: i64,
    ) -> anyhow::Result<Option<Outgoing>> {
        let settings = &node.settings;
        let acked = ChangeLog::last_landed(&conn).context("Unable to read publish state")?;
        let last_retired = acked.clone();
        // The highest global id any run may have handed to NATS: this process's mark (an earlier
        // generation's sends), else what was known at start. Only pending changes up to it can
        // have an unknown fate; later ones are certainly in flight.
        let sent_global = SentMark::read(&settings.db_path, &node.identity)
            .unwrap_or(0)
            .max(sent_before_start);
        let sent_before = local
            .log
            .max_ids_up_to(&conn, sent_global)
            .context("Unable to read the change logs")?;
        let flow = Flow::new(
            node.streams(),
            settings.node_id,
            settings.replication.max_entries,
        );
        if settings.replicate {
            // A publisher counts its own node from the start (see `Flow::new`).
            flow.record_local(&local.positions);
        }
        let positions_kv = if settings.publish || settings.replicate {
            flow::bucket(&node.js, settings).await
        } else {
            None
        };
        let pacing = (settings.publish && positions_kv.is_some())
            .then(|| Pacing::new(Arc::clone(&flow), Arc::clone(&local.positions)));
        let outbox = Outbox::default();
        let recovering = Arc::new(AtomicBool::new(
            settings.snapshot.enabled
                && settings.replicate
                && catchup::gap_at_start(node, &local.positions).await,
        ));
        let shared: SharedLog = Arc::new(Mutex::new(LocalLog {
            conn,
            log: Arc::clone(&local.log),
        }));
        let publisher = Publisher::new(
            node,
            Arc::clone(&shared),
            db::open(&settings.db_path)?,
            local.hashes.current.clone(),
            Arc::clone(&outbox),
            acked,
            pacing,
            Arc::clone(&recovering),
            sent_global,
        );
        if !recover(node, &publisher, &shared).await? {
            return Ok(None);
        }
        let own = own_changes(node, &last_retired, sent_before, &outbox, &publisher).await;
        Ok(Some(Outgoing {
            publisher,
            shared,
            outbox,
            flow,
            positions_kv,
            recovering,
            own,
        }))
    }
}

/// What a restore must know about this node's own changes. Pending changes from before this
/// start (up to `sent_before`) whose possible landing the streams no longer hold: whether they
/// were published is unknown (a restore must not keep their rows).
async fn own_changes(
    node: &Node,
    last_retired: &std::collections::HashMap<u64, u64>,
    sent_before: Vec<i64>,
    outbox: &Outbox,
    publisher: &Publisher,
) -> catchup::OwnChanges {
    let unknown_up_to = if search_was_complete(node, last_retired).await {
        vec![0; sent_before.len()]
    } else {
        sent_before
    };
    catchup::OwnChanges {
        unknown_up_to,
        outbox: Arc::clone(outbox),
        sends: publisher.unsettled(),
    }
}

/// Retires changes that reached the stream before a restart; retries while NATS is flaky.
/// `Ok(false)` on shutdown.
async fn recover(node: &Node, publisher: &Publisher, shared: &SharedLog) -> anyhow::Result<bool> {
    let mut backoff = crate::retry::Backoff::default();
    loop {
        match publisher.recover(shared).await {
            Ok(0) => return Ok(true),
            Ok(n) => {
                tracing::info!(changes = n, "Recovered published changes from the stream");
                return Ok(true);
            }
            Err(e) if e.is_fatal() => {
                return Err(anyhow::Error::new(e).context("Unable to recover published changes"));
            }
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "Cannot check the streams for changes sent before the restart; retrying");
                if !backoff.wait(&node.root).await {
                    return Ok(false);
                }
            }
        }
    }
}

/// What the applying side shares with the other subsystems.
struct ApplyWiring {
    own: catchup::OwnChanges,
    seqmap: SeqMap,
    /// Per shard: the last applied sequence (the keeper, flow control and snapshots read it).
    positions: Arc<[AtomicU64]>,
    /// Told of every advance, when positions are reported.
    flow: Option<Arc<Flow>>,
    /// Taken by snapshot copies between apply batches.
    gate: Arc<Mutex<()>>,
    /// Recovery from snapshots, when they are enabled.
    snapshots: Option<Arc<Snapshots>>,
    /// The local schema's hashes (incoming `sh` is checked against them).
    hashes: db::apply::SchemaHashes,
    /// The schema version capture is confirmed for (see [`db::ddl::drift`]).
    confirmed: Arc<AtomicI64>,
    /// Per table: changes captured before its columns changed (see [`Applier::set_stale_up_to`]).
    stale_up_to: Vec<i64>,
}

/// Whether the start-up search for changes sent before the restart could see every sequence
/// after the last retired landing of each shard (the stream still holds them).
async fn search_was_complete(
    node: &Node,
    last_retired: &std::collections::HashMap<u64, u64>,
) -> bool {
    for (i, name) in node.streams().iter().enumerate() {
        let from = last_retired.get(&(i as u64 + 1)).copied().unwrap_or(0) + 1;
        let range = stream::stream_range(&node.js, name).await;
        if !matches!(range, Ok(r) if r.is_none_or(|(first, _)| first <= from)) {
            return false;
        }
    }
    true
}

/// The applying side: one consumer per shard feeding the apply thread (and recovering from a
/// snapshot when a stream no longer holds what this node lacks).
fn spawn_apply(
    tasks: &mut Subsystems,
    node: &Node,
    log: &Arc<ChangeLog>,
    w: ApplyWiring,
) -> anyhow::Result<()> {
    let settings = &node.settings;
    let streams = node.streams();
    let applied: Vec<u64> = streams.iter().map(|s| w.seqmap.get(s)).collect();
    let applier = applier(node, log, applied, &w)?;
    let (tx, rx) = mpsc::channel(applying::CHANNEL_DEPTH);
    let outbox = Arc::clone(&w.own.outbox);
    let (n, p, snapshots, own) = (node.clone(), Arc::clone(&w.positions), w.snapshots, w.own);
    spawn(tasks, "consumers", catchup::run(n, tx, p, snapshots, own));
    let thread = applying::spawn_apply_thread(
        applying::ApplyThread {
            applier,
            seqmap: w.seqmap,
            streams,
            compressed: settings.replication.compress,
            max_event_bytes: settings
                .replication
                .max_event_bytes
                .unwrap_or_else(|| max_event_bytes(&node.client)),
            identity: node.identity.clone(),
            observers: node.observers.clone(),
            apply_interval: settings.replication.apply_interval,
            positions: w.positions,
            flow: w.flow,
            gate: w.gate,
            outbox,
        },
        rx,
        node.root.clone(),
    )?;
    // Joined off the reactor.
    spawn(tasks, "apply thread", async move {
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(anyhow::Error::new(e)),
            Ok(Err(_)) | Err(_) => Err(anyhow::anyhow!("the apply thread panicked")),
        }
    });
    Ok(())
}

/// The applier of a generation, at the seq map's positions `applied`, wired as `w` says.
fn applier(
    node: &Node,
    log: &Arc<ChangeLog>,
    applied: Vec<u64>,
    w: &ApplyWiring,
) -> anyhow::Result<Applier> {
    let settings = &node.settings;
    // Own events come back (and must be told apart) only when we both publish and apply.
    let conn = db::open(&settings.db_path)?;
    let mut applier = Applier::new(conn, Arc::clone(log), applied, settings.publish)
        .context("Unable to start the applier")?;
    applier.set_schema_hashes(w.hashes.clone());
    applier.set_confirmed_schema(Arc::clone(&w.confirmed));
    if w.stale_up_to.iter().any(|&id| id > 0) {
        applier
            .set_stale_up_to(w.stale_up_to.clone())
            .context("Unable to start the applier")?;
    }
    if w.own.unknown_up_to.iter().any(|&id| id > 0) {
        tracing::warn!(
            "Some pending changes were captured before the restart and the streams no longer hold where they may have landed; they do not hold back other nodes' changes of their rows"
        );
        applier
            .set_unknown_up_to(w.own.unknown_up_to.clone())
            .context("Unable to start the applier")?;
    }
    Ok(applier)
}

/// Flow control: reports this node's applied positions (when it applies), follows everyone's
/// (when it publishes), and keeps the peer-lag metrics current.
fn spawn_flow(
    tasks: &mut Subsystems,
    node: &Node,
    flow: &Arc<Flow>,
    store: async_nats::jetstream::kv::Store,
    positions: &Arc<[AtomicU64]>,
) {
    let (settings, observers, token) = (&node.settings, &node.observers, &node.root);
    let observe = flow::observe(Arc::clone(flow), observers.clone(), token.clone());
    spawn_forever(tasks, "peer view", observe);
    if settings.replicate {
        let report = flow::report(
            (node.js.clone(), store.clone()),
            Arc::clone(flow),
            Arc::clone(settings),
            Arc::clone(positions),
            token.clone(),
        );
        spawn_forever(tasks, "position reporter", report);
    }
    if settings.publish {
        let watch = flow::watch(store, Arc::clone(flow), token.clone());
        spawn_forever(tasks, "position watcher", watch);
        let (js, s) = (node.js.clone(), Arc::clone(settings));
        let limits = flow::follow_limits(js, Arc::clone(flow), s, token.clone());
        spawn_forever(tasks, "stream limits", limits);
    }
}

/// The publisher, woken by file notifications. Returns the token that tells the keeper the
/// publisher has finished (the keeper outlives it by one final retirement).
fn spawn_publisher(tasks: &mut Subsystems, node: &Node, publisher: Publisher) -> CancellationToken {
    let wake = Arc::new(Notify::new());
    let watcher = watch::watch(&node.settings.db_path, Arc::clone(&wake))
        .inspect_err(|e| {
            tracing::warn!(error = %crate::error_chain(e), "Cannot watch database files; relying on periodic scans");
        })
        .ok();
    let done = CancellationToken::new();
    let (finished, token) = (done.clone(), node.root.clone());
    spawn(tasks, "publisher", async move {
        let _watcher = watcher;
        let result = publisher.run(wake, token).await;
        finished.cancel();
        result.map_err(anyhow::Error::new)
    });
    done
}

/// The change-log keeper (see [`publish::keep`]).
fn spawn_keeper(
    tasks: &mut Subsystems,
    node: &Node,
    shared: SharedLog,
    outbox: Outbox,
    positions: &Arc<[AtomicU64]>,
    stop: CancellationToken,
) {
    let settings = Arc::clone(&node.settings);
    let tracked = (settings.publish && settings.replicate).then(|| Arc::clone(positions));
    let keep = publish::keep(shared, outbox, settings, tracked, stop);
    spawn(tasks, "change-log keeper", async move {
        keep.await.map_err(anyhow::Error::new)
    });
}

/// Keeps this node's schema hash in the cluster schema registry.
fn spawn_registry(tasks: &mut Subsystems, node: &Node, hash: &str, previous: &str) {
    let (js, id, token) = (node.js.clone(), node.settings.node_id, node.root.clone());
    let (hash, previous) = (hash.to_owned(), previous.to_owned());
    let keep = crate::registry::keep_published(js, id, hash, previous, token);
    spawn_forever(tasks, "schema registry", keep);
}

/// Waits for shutdown, the idle timeout, the broker's exit, or the first subsystem to end on its
/// own; returns the failure, if it is one.
async fn supervise(
    node: &Node,
    tasks: &mut Subsystems,
    lease: &mut Option<tokio::task::JoinHandle<Result<(), stream::lease::Error>>>,
    embedded: Option<&stream::embedded::EmbeddedNats>,
    snapshots: Option<&Snapshots>,
) -> Option<anyhow::Error> {
    let lease_ended = or_pending(lease.as_mut());
    let broker_exit = or_pending(embedded.map(|server| server.exited()));
    let health = &node.observers.health;
    let idle = or_pending(node.settings.sleep_timeout.map(|t| health.idle_for(t)));
    tokio::select! {
        biased;
        _ = node.root.cancelled() => None,
        _ = idle => {
            tracing::info!("No more events to process, initiating shutdown");
            if let Some(s) = snapshots.filter(|s| s.is_leader()) {
                tracing::info!("Saving snapshot before going to sleep");
                let saved = tokio::time::timeout(SLEEP_SAVE_TIMEOUT, s.save_now("sleep timeout")).await;
                if saved.is_err() {
                    tracing::error!("Unable to save snapshot: it took longer than {SLEEP_SAVE_TIMEOUT:?}");
                }
            }
            None
        }
        status = broker_exit => Some(anyhow::anyhow!(
            "embedded nats-server exited unexpectedly ({status}); stopping rather than running without a broker"
        )),
        ended = lease_ended => {
            *lease = None;
            (!node.root.is_cancelled()).then(|| match ended {
                Ok(Ok(())) => anyhow::anyhow!("node-id lease stopped unexpectedly"),
                Ok(Err(e)) => anyhow::Error::new(StartError::Conflict(e.to_string()))
                    .context("node-id lease failed"),
                Err(e) => anyhow::anyhow!("node-id lease task panicked: {e}"),
            })
        }
        Some(done) = tasks.join_next() => {
            // Subsystems end by themselves once shutdown has begun; only an early end fails.
            (!node.root.is_cancelled()).then(|| match done {
                Ok((name, Ok(()))) => anyhow::anyhow!("{name} stopped unexpectedly"),
                Ok((name, Err(e))) => e.context(format!("{name} failed")),
                Err(e) => anyhow::anyhow!("task panicked: {e}"),
            })
        }
    }
}

/// Awaits `future`, or never when there is none.
pub(crate) async fn or_pending<F: std::future::Future>(future: Option<F>) -> F::Output {
    match future {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

/// Joins every subsystem under [`DRAIN_TIMEOUT`], aborting stragglers.
async fn drain(mut tasks: Subsystems) {
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(done) = tasks.join_next().await {
            if let Ok((name, Err(e))) = done {
                tracing::warn!(task = name, error = %format!("{e:#}"), "task failed during shutdown");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("some tasks did not stop in time; aborting them");
        tasks.abort_all();
    }
}

/// Largest decompressed event accepted: 16 × the server's `max_payload` (a compressed message
/// must fit in one payload; zstd rarely does better than 16:1 on real rows), at least 16 MiB.
fn max_event_bytes(client: &async_nats::Client) -> usize {
    let payload = client.server_info().max_payload;
    payload.saturating_mul(16).max(16 * 1024 * 1024)
}
