//! When snapshots are saved, and by whom (upstream-behaviour §6.6 plus design §3.11).
//!
//! Only nodes that publish and apply take part (one that does not apply lacks the other nodes'
//! rows; Go let it save anyway). Of those, the snapshot leader saves, under Go's `snapshot` save
//! lease: every `max_entries / shards` sequences of shard 1 (as Go), every `snapshot.interval`,
//! before the `sleep_timeout` exit, and when a recovering node asks ([`request_subject`]).
//!
//! Invariants:
//! - One save at a time per node (a trigger during a save is coalesced into one more save).
//! - Saves run beside the election heartbeat, so a long save does not cost the leadership.
//! - A trigger whose save could not take the save lease is kept until a save runs.
//! - A failed save (logged, counted) is retried at the next trigger; replication goes on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use futures::{FutureExt as _, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Error, Meta, Source, Store, leader};
use crate::config::Settings;
use crate::handle::Observers;

/// Fewest time between two saves triggered by sequences or requests (and at least three times
/// the last save's duration, so that big databases are not copied back to back).
const MIN_GAP: Duration = Duration::from_secs(1);
/// How often the trigger conditions are looked at.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// Subject where recovering nodes ask the leader for a newer snapshot.
pub fn request_subject(settings: &Settings) -> String {
    format!("{}.snapshot.request", settings.nats.stream_prefix)
}

/// Subject where `-save-snapshot`, run beside this node's daemon, asks it to save now.
pub fn save_subject(settings: &Settings) -> String {
    let (prefix, id) = (&settings.nats.stream_prefix, settings.node_id);
    format!("{prefix}.snapshot.save.{id}")
}

/// A recovering node's need: per stream, a snapshot holding the sequence before the stream's first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub node_id: u64,
    pub need: std::collections::BTreeMap<String, u64>,
}

pub struct Snapshots {
    pub settings: Arc<Settings>,
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub store: Arc<dyn Store>,
    /// `None` on a node that does not apply (it never saves).
    pub source: Option<Source>,
    pub schema_hash: String,
    pub observers: Observers,
    /// This database's identity (`-save-snapshot` names the database it asks for).
    identity: String,
    saving: tokio::sync::Mutex<()>,
    leader: AtomicBool,
    /// Set while this node recovers: it lacks changes, so it must neither lead nor save (and its
    /// publisher holds its own changes back, see [`crate::replicate::catchup`]).
    recovering: Arc<AtomicBool>,
    last_save_ms: std::sync::atomic::AtomicU64,
    /// Unix ms of the newest snapshot known to exist (for the age metric).
    newest_ms: AtomicI64,
}

/// What the save triggers remember between checks (see [`Snapshots::run`]).
struct Triggers {
    /// Sequences of the first stream between two sequence-triggered saves.
    every: u64,
    /// How many times `every` the first stream's position had reached at the last check.
    seq_bucket: u64,
    last_save: Instant,
    /// A save is wanted, and why.
    wanted: Option<&'static str>,
    save_task: Option<tokio::task::JoinHandle<bool>>,
}

impl Triggers {
    fn new(snapshots: &Snapshots) -> Triggers {
        let settings = &snapshots.settings;
        let every = (settings.replication.max_entries.max(1) as u64
            / settings.replication.shards.max(1))
        .max(1);
        Triggers {
            every,
            seq_bucket: snapshots.first_position() / every,
            last_save: Instant::now() - settings.snapshot.interval.unwrap_or_default(),
            wanted: None,
            save_task: None,
        }
    }
}

impl Snapshots {
    /// The snapshot side of `node`; `recovering` is the flag it shares with the publisher.
    pub fn new(
        node: &crate::handle::Node,
        store: Arc<dyn Store>,
        source: Option<Source>,
        schema_hash: String,
        recovering: Arc<AtomicBool>,
    ) -> Arc<Snapshots> {
        Arc::new(Snapshots {
            settings: Arc::clone(&node.settings),
            client: node.client.clone(),
            js: node.js.clone(),
            store,
            source,
            schema_hash,
            observers: node.observers.clone(),
            identity: node.identity.clone(),
            saving: tokio::sync::Mutex::new(()),
            leader: AtomicBool::new(false),
            recovering,
            last_save_ms: std::sync::atomic::AtomicU64::new(0),
            newest_ms: AtomicI64::new(0),
        })
    }

    pub fn eligible(&self) -> bool {
        self.settings.snapshot.enabled && self.settings.publish && self.source.is_some()
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// Saves now, unleased (`-save-snapshot`, the sleep exit); [`Error::Busy`] while a save runs.
    pub async fn save_now(&self, why: &str) -> Result<Meta, Error> {
        let Some(source) = &self.source else {
            return Err(Error::Unusable(
                "this node does not apply the cluster's changes (replicate = false), so its database is not a snapshot of the cluster".into(),
            ));
        };
        if self.recovering.load(Ordering::Relaxed) {
            return Err(Error::Unusable(
                "this node is recovering from a snapshot itself; its database lacks changes".into(),
            ));
        }
        if self.behind_on_schema() {
            return Err(Error::Unusable(
                "this node waits for a schema migration other nodes ran; its database lacks their changes".into(),
            ));
        }
        let _one = self.saving.try_lock().map_err(|_| Error::Busy)?;
        let started = Instant::now();
        let m = &self.observers.metrics;
        tracing::info!(reason = why, "Saving snapshot");
        let (store, node_id) = (self.store.as_ref(), self.settings.node_id);
        match super::save(source, store, node_id, &self.schema_hash).await {
            Ok(meta) => {
                self.last_save_ms
                    .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                m.snapshot_seconds
                    .with_label_values(&["save"])
                    .observe(started.elapsed().as_secs_f64());
                m.snapshots.with_label_values(&["save", "ok"]).inc();
                m.snapshot_size_bytes.set(meta.size.unwrap_or(0) as i64);
                let created = meta.created_ms.unwrap_or_else(crate::clock::unix_ms);
                self.newest_ms.fetch_max(created, Ordering::Relaxed);
                self.observers.health.update_catchup(|c| {
                    c.last_snapshot_saved_ms = created;
                    c.last_snapshot_error = None;
                });
                Ok(meta)
            }
            Err(e) => {
                m.snapshots.with_label_values(&["save", "failed"]).inc();
                let text = crate::error_chain(&e);
                tracing::error!(error = %text, store = self.store.kind(), "Unable to save snapshot");
                self.observers
                    .health
                    .update_catchup(|c| c.last_snapshot_error = Some(format!("save: {text}")));
                Err(e)
            }
        }
    }

    /// A leader's save, under Go's `snapshot` lease (refreshed meanwhile); false if not taken.
    async fn save_leased(&self, meta_kv: &kv::Store, why: &str) -> bool {
        let id = self.settings.node_id;
        match leader::acquire(meta_kv, leader::SAVE_KEY, id, leader::SAVE_TTL).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!("Snapshot saving already locked, skipping");
                return false;
            }
            Err(e) => {
                tracing::warn!(error = %e, "Error acquiring snapshot lock");
                return false;
            }
        }
        let refresh = {
            let kv = meta_kv.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(leader::SAVE_TTL / 2).await;
                    if let Err(e) =
                        leader::acquire(&kv, leader::SAVE_KEY, id, leader::SAVE_TTL).await
                    {
                        tracing::warn!(error = %e, "Error acquiring lease");
                    }
                }
            })
        };
        let _ = self.save_now(why).await;
        refresh.abort();
        true
    }

    /// Answers `-save-snapshot` on [`save_subject`] until shutdown: saves now, whoever leads (the
    /// daemon holds the positions its database is consistent with), and replies with the
    /// snapshot's metadata or `{"error": …}`.
    pub async fn serve_saves(self: Arc<Self>, shutdown: CancellationToken) {
        let subscribed = self.client.subscribe(save_subject(&self.settings)).await;
        let subscribed = subscribed.inspect_err(
            |e| tracing::warn!(error = %e, "Cannot listen for -save-snapshot requests"),
        );
        let Ok(mut saves) = subscribed else {
            return shutdown.cancelled().await;
        };
        while let Some(Some(msg)) = shutdown.run_until_cancelled(saves.next()).await {
            let Some(reply) = msg.reply else { continue };
            let saved = if !msg.payload.is_empty() && msg.payload != self.identity.as_bytes() {
                Err(Error::Unusable(
                    "this daemon runs on another database".into(),
                ))
            } else {
                self.save_now("requested by -save-snapshot").await
            };
            let answer = match saved {
                Ok(meta) => meta.to_json(),
                Err(e) => serde_json::json!({ "error": crate::error_chain(&e) }).to_string(),
            };
            if let Err(e) = self.client.publish(reply, answer.into()).await {
                tracing::warn!(error = %e, "Cannot answer a -save-snapshot request");
            }
        }
        shutdown.cancelled().await;
    }

    /// Runs the election and the triggers until shutdown.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        self.spawn_age_updates(shutdown.clone());
        if !self.eligible() {
            shutdown.cancelled().await;
            return;
        }
        let settings = Arc::clone(&self.settings);
        let Some(meta_kv) = self.leader_bucket(&shutdown).await else {
            return;
        };
        let ttl = settings.snapshot.leader_ttl;
        let heartbeat = (ttl / 3).max(Duration::from_secs(1));
        tracing::info!(
            node_id = settings.node_id,
            ttl_ms = ttl.as_millis() as u64,
            heartbeat_ms = heartbeat.as_millis() as u64,
            "Snapshot leader election started"
        );
        let mut requests = self
            .client
            .subscribe(request_subject(&settings))
            .await
            .inspect_err(|e| tracing::warn!(error = %e, "Cannot listen for snapshot requests"))
            .ok();
        let mut triggers = Triggers::new(&self);
        let mut next_round = Instant::now();
        loop {
            if Instant::now() >= next_round {
                next_round = Instant::now() + self.elect(&meta_kv, ttl).await.min(heartbeat);
            }
            self.check_triggers(&meta_kv, &mut triggers);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(msg) = crate::node::run::or_pending(requests.as_mut().map(|r| r.next())) => {
                    if self.answers(&msg) {
                        triggers.wanted = Some("request");
                    }
                }
                _ = tokio::time::sleep(CHECK_EVERY) => {}
            }
        }
        self.stop(&meta_kv, triggers.save_task).await;
    }

    /// The leader-election bucket, retried until it opens; `None` on shutdown.
    async fn leader_bucket(&self, shutdown: &CancellationToken) -> Option<kv::Store> {
        loop {
            match leader::bucket(&self.js, self.settings.replication.configured_replicas).await {
                Ok(kv) => return Some(kv),
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot open the snapshot leader bucket; retrying");
                    if !crate::retry::pause(shutdown, Duration::from_secs(2)).await {
                        return None;
                    }
                }
            }
        }
    }

    /// The applied position of the first stream (0 on a node that does not apply).
    fn first_position(&self) -> u64 {
        self.source
            .as_ref()
            .and_then(|src| src.positions.first())
            .map_or(0, |p| p.load(Ordering::Relaxed))
    }

    /// Notes fired triggers (every node keeps counters current); the leader starts a wanted save.
    fn check_triggers(self: &Arc<Self>, meta_kv: &kv::Store, t: &mut Triggers) {
        let settings = &self.settings;
        let bucket_now = self.first_position() / t.every;
        if bucket_now > t.seq_bucket {
            t.seq_bucket = bucket_now;
            t.wanted.get_or_insert("sequence");
        }
        if let Some(interval) = settings.snapshot.interval
            && t.last_save.elapsed() >= interval
        {
            t.wanted.get_or_insert("interval");
        }
        let busy = t.save_task.as_ref().is_some_and(|task| !task.is_finished());
        if !busy && let Some(Some(Ok(false))) = t.save_task.take().map(|task| task.now_or_never()) {
            // The save lease was held (a just-dead leader's, until it expires): keep the trigger.
            t.wanted.get_or_insert("retry after the save lease");
        }
        let gap = MIN_GAP.max(Duration::from_millis(
            3 * self.last_save_ms.load(Ordering::Relaxed),
        ));
        if let Some(why) = t.wanted
            && !busy
        {
            if self.is_leader() && (why == "interval" || t.last_save.elapsed() >= gap) {
                t.wanted = None;
                t.last_save = Instant::now();
                tracing::info!(reason = why, "Triggering snapshot save");
                let (me, kv) = (Arc::clone(self), meta_kv.clone());
                t.save_task = Some(tokio::spawn(async move { me.save_leased(&kv, why).await }));
            } else if !self.is_leader() {
                if why == "interval" {
                    t.last_save = Instant::now();
                }
                t.wanted = None;
            }
        }
    }

    /// Whether a recovering node's request `msg` calls for a save here: we lead and cover it.
    fn answers(&self, msg: &async_nats::Message) -> bool {
        if let Ok(req) = serde_json::from_slice::<Request>(&msg.payload)
            && self.is_leader()
        {
            if self.covers(&req) {
                tracing::info!(from_node = req.node_id, need = ?req.need, "A node needs a newer snapshot");
                return true;
            }
            tracing::warn!(from_node = req.node_id, need = ?req.need,
                "A node needs a newer snapshot, but this node has not applied that far either");
        }
        false
    }

    /// On shutdown: lets a running save finish within the drain deadline, gives up the leadership.
    async fn stop(&self, meta_kv: &kv::Store, save_task: Option<tokio::task::JoinHandle<bool>>) {
        if let Some(task) = save_task {
            let _ = tokio::time::timeout(Duration::from_secs(8), task).await;
        }
        // Unlike Go, hand the key over at once: another node leads at its next round.
        self.resign(meta_kv, "on shutdown").await;
        tracing::info!("Snapshot leader election stopped");
    }

    /// Whether this node's applied positions reach what a request needs.
    fn covers(&self, req: &Request) -> bool {
        let Some(source) = &self.source else {
            return false;
        };
        source
            .streams
            .iter()
            .zip(source.positions.iter())
            .all(|(s, p)| {
                req.need
                    .get(s)
                    .is_none_or(|&n| p.load(Ordering::Relaxed) >= n)
            })
    }

    /// Sets `recovering` (field doc); turning it on gives up the leadership at once.
    pub async fn set_recovering(&self, on: bool) {
        self.recovering.store(on, Ordering::Relaxed);
        if on && self.resign_here("this node is recovering") {
            let replicas = self.settings.replication.configured_replicas;
            if let Ok(kv) = leader::bucket(&self.js, replicas).await {
                leader::release(&kv, leader::LEADER_KEY, self.settings.node_id).await;
            }
        }
    }

    /// Gives up the leadership, if held, and its key.
    async fn resign(&self, meta_kv: &kv::Store, why: &str) {
        if self.resign_here(why) {
            leader::release(meta_kv, leader::LEADER_KEY, self.settings.node_id).await;
        }
    }

    /// Gives up the leadership in this process; true if it was held.
    fn resign_here(&self, why: &str) -> bool {
        let was = self.leader.swap(false, Ordering::Relaxed);
        if was {
            tracing::info!("Lost snapshot leadership: {why}");
            self.observers
                .health
                .update_catchup(|c| c.snapshot_leader = false);
        }
        was
    }

    /// Whether events here wait for a migration not yet run (its snapshots would lack them).
    fn behind_on_schema(&self) -> bool {
        self.observers.health.catchup().schema_waiting_events > 0
    }

    /// One election round (Go's `tryAcquireLeadership`); returns how soon the next is worth
    /// doing (right when another holder's lease runs out, at most a heartbeat).
    async fn elect(&self, meta_kv: &kv::Store, ttl: Duration) -> Duration {
        let was = self.is_leader();
        if self.recovering.load(Ordering::Relaxed) {
            return ttl;
        }
        if self.behind_on_schema() {
            self.resign(meta_kv, "this node waits for a schema migration")
                .await;
            return ttl.min(Duration::from_secs(1));
        }
        let mut next = ttl;
        let attempt =
            leader::try_acquire(meta_kv, leader::LEADER_KEY, self.settings.node_id, ttl).await;
        let now = match attempt {
            // Recovery may have begun while the round was in flight: give the key back.
            Ok(leader::Acquired::Held) if self.recovering.load(Ordering::Relaxed) => {
                let _ = meta_kv.delete(leader::LEADER_KEY).await;
                false
            }
            Ok(leader::Acquired::Held) => true,
            Ok(leader::Acquired::Other { expires_ms }) => {
                let left = (expires_ms - crate::clock::unix_ms()).max(0) as u64;
                next = Duration::from_millis(left + 20);
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "Error during leader election");
                // JetStream may have lost the bucket (a wiped store): the handle works again once
                // it exists.
                let _ =
                    leader::bucket(&self.js, self.settings.replication.configured_replicas).await;
                if was {
                    tracing::warn!("Lost snapshot leadership due to error");
                }
                false
            }
        };
        match (was, now) {
            (false, true) => tracing::info!("Became snapshot leader"),
            (true, false) => tracing::info!("Lost snapshot leadership"),
            _ => {}
        }
        self.leader.store(now, Ordering::Relaxed);
        // Recovery may have begun while the round ran (set_recovering saw no leadership yet).
        if now && self.recovering.load(Ordering::Relaxed) {
            self.leader.store(false, Ordering::Relaxed);
            let _ = meta_kv.delete(leader::LEADER_KEY).await;
            return ttl;
        }
        self.observers
            .health
            .update_catchup(|c| c.snapshot_leader = now);
        next
    }

    /// Keeps `snapshot_age_seconds` current: every node reads the store's metadata now and then.
    fn spawn_age_updates(self: &Arc<Self>, shutdown: CancellationToken) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut polled: Option<Instant> = None;
            loop {
                if polled.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                    polled = Some(Instant::now());
                    if let Ok(Some(meta)) = me.store.meta().await
                        && let Some(created) = meta.created_ms
                    {
                        me.newest_ms.fetch_max(created, Ordering::Relaxed);
                    }
                }
                let newest = me.newest_ms.load(Ordering::Relaxed);
                if newest > 0 {
                    me.observers
                        .metrics
                        .snapshot_age_seconds
                        .set(((crate::clock::unix_ms() - newest) / 1000).max(0));
                }
                if !crate::retry::pause(&shutdown, Duration::from_secs(5)).await {
                    return;
                }
            }
        });
    }

    /// Records a snapshot known to exist (after a restore).
    pub fn saw(&self, meta: &Meta) {
        if let Some(created) = meta.created_ms {
            self.newest_ms.fetch_max(created, Ordering::Relaxed);
        }
    }
}
