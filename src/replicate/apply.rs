//! The applying side: JetStream → SQLite (design §3.2, §3.3, §3.7, §4).
//!
//! One consumer per shard ([`super::consume`]) forwards raw messages from the saved sequence + 1
//! into one bounded channel, in stream order (so per-shard order holds). One thread owns the
//! applier connection and the seq map: it applies what is waiting (up to [`MAX_BATCH`]) in one
//! transaction, then advances the seq map once.
//!
//! Invariants:
//! - The seq map advances only after the batch committed durably; a crash in between replays the
//!   batch, which is idempotent (whole-row upserts and deletes by key).
//! - Every node applies every event, its own included, so a shard's last message wins everywhere.
//! - Failed batches are retried with backoff; poison events are quarantined ([`crate::db::apply`]).
//! - On shutdown the batch in hand still commits unless failing; queued messages are redelivered.
//!
//! Commit pacing (`replication_log.apply_interval_ms`, default 20): while events keep arriving,
//! writing batches commit at most once per interval; the first event after a quiet spell, or a full
//! batch waiting (catch-up), goes at once; batches writing nothing (own events back) neither wait
//! nor count. Why: an apply commit between the first read and first write of an application's
//! deferred transaction fails it (WAL: stale snapshot, BUSY at once, no busy handler helps), so
//! failures follow commits/s, not rows/s; only `BEGIN IMMEDIATE` is safe (figures:
//! docs/performance.md#commits-and-readers).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::db::apply::{Applier, Incoming, Outcome};
use crate::handle::Observers;
use crate::replicate::lock;
use crate::seqmap::SeqMap;
use crate::wire::{self, ReplicationEvent};
use prometheus::{IntCounter, IntGauge};

/// Most events applied in one transaction.
pub const MAX_BATCH: usize = 2000;
/// Depth of the channel between consumers and the apply thread.
pub const CHANNEL_DEPTH: usize = 8192;

/// A message taken from a shard stream.
#[derive(Debug)]
pub struct Delivered {
    /// Index into the stream-name list given to [`spawn_apply_thread`] (shard - 1).
    pub stream: usize,
    pub seq: u64,
    /// When the message entered the stream, unix nanoseconds (0 if unknown).
    pub stream_time_ns: i64,
    /// The `Nats-Msg-Id` header, if any (ours carry the publishing database's identity).
    pub msg_id: Option<String>,
    /// The stream was recreated: this shard's position restarts at this message.
    pub reset: bool,
    pub body: Bytes,
}

/// Work for the apply thread: messages in stream order, or a snapshot to restore after them.
#[derive(Debug)]
pub enum Work {
    Message(Delivered),
    Restore(RestoreJob),
}

/// A verified snapshot to merge into the database, with the positions it contains.
#[derive(Debug)]
pub struct RestoreJob {
    pub file: std::path::PathBuf,
    /// Per shard (index shard − 1).
    pub positions: Vec<u64>,
    /// Local changes whose rows are not kept although they look in flight.
    pub not_kept: crate::db::restore::NotKept,
    /// The snapshot records no positions: `positions` are the streams' starts, and the node may
    /// go back to them (everything retained is replayed), as Go does.
    pub replay_all: bool,
    pub reply: tokio::sync::oneshot::Sender<Result<crate::db::restore::Restored, RestoreError>>,
}

/// Why the apply thread did not restore a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Messages applied since recovery looked passed the snapshot: restoring takes rows back.
    #[error(
        "the snapshot reaches {stream} sequence {snapshot}, but this node has applied up to {applied}"
    )]
    Passed {
        stream: String,
        snapshot: u64,
        applied: u64,
    },
    /// The merge failed; nothing changed.
    #[error("cannot merge the snapshot")]
    Db(#[source] crate::db::Error),
    /// The database failed for good: the apply thread stops (and says why).
    #[error("the database failed; the apply thread stops")]
    Stopping,
}

/// Whether a message id (`<node_id>:<identity>:<table>:<change id>:<created_at>`) is ours.
pub fn is_own(msg_id: Option<&str>, identity: &str) -> bool {
    msg_id
        .and_then(|id| id.split(':').nth(1))
        .is_some_and(|origin| !identity.is_empty() && origin == identity)
}

/// Decodes a body into an event (errors become quarantine reasons) and its sender's node id.
fn decode(
    body: &[u8],
    decompressor: Option<&mut wire::Decompressor>,
    limit: usize,
) -> (Result<wire::ChangeEvent, wire::DecodeError>, Option<u64>) {
    let decoded = match decompressor {
        Some(d) => d
            .decompress_limited(body, limit)
            .and_then(|plain| ReplicationEvent::decode(&plain)),
        None => ReplicationEvent::decode(body),
    };
    let from_node = decoded.as_ref().ok().map(|e| e.from_node_id);
    (decoded.map(|e| e.event), from_node)
}

/// What the apply thread needs besides its channel.
pub struct ApplyThread {
    pub applier: Applier,
    pub seqmap: SeqMap,
    pub streams: Vec<String>,
    pub compressed: bool,
    /// Largest decompressed event accepted (a bigger one is quarantined).
    pub max_event_bytes: usize,
    /// This database's identity (tells own events apart).
    pub identity: String,
    pub observers: Observers,
    /// Least time between batch commits while events keep arriving (zero: none); see [`pace`].
    pub apply_interval: Duration,
    /// Per shard (index shard − 1): last applied sequence (change-log cleanup, position reports).
    pub positions: Arc<[AtomicU64]>,
    /// Told after every advance (the position reporter sends a report at once).
    pub flow: Option<Arc<super::flow::Flow>>,
    /// Held while a batch is applied and its positions published (snapshots copy between).
    pub gate: Arc<std::sync::Mutex<()>>,
    /// Our acknowledged changes not yet marked in the database: those whose events can no
    /// longer come back (a gap skipped, a stream recreated) must stop holding their rows.
    pub outbox: super::publish::Outbox,
}

/// (table, change-log id, shard, sequence) of the outbox's acknowledged changes.
fn landed_in(outbox: &super::publish::Outbox) -> Vec<(usize, i64, u64, u64)> {
    lock(outbox).landed().collect()
}

/// Why the apply thread stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot create a zstd context")]
    Zstd(#[source] wire::DecodeError),
    #[error("the database cannot be written")]
    Fatal(#[source] crate::db::Error),
}

/// Starts the apply thread (fails only if the OS refuses); it errs only when the node must stop.
pub fn spawn_apply_thread(
    work: ApplyThread,
    rx: mpsc::Receiver<Work>,
    shutdown: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<Result<(), ApplyError>>> {
    let runtime = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("harmonylite-apply".into())
        .spawn(move || Worker::new(work, shutdown, runtime)?.run(rx))
}

/// The apply thread's state: [`ApplyThread`], per-shard metric handles and applied sequences.
struct Worker {
    work: ApplyThread,
    shutdown: CancellationToken,
    /// The node's runtime, for waiting on this thread.
    runtime: tokio::runtime::Handle,
    decompressor: Option<wire::Decompressor>,
    shard_applied: Vec<IntCounter>,
    shard_last: Vec<IntGauge>,
    last: Vec<u64>,
    /// When a batch last committed a write (own unchanged events write nothing, disturb no one).
    last_write: Option<Instant>,
}

/// What the thread waited for.
enum Received {
    Stop,
    Restore(RestoreJob),
    /// Nothing came for a while: time to retry held events.
    Idle,
    Message(Delivered),
}

impl Worker {
    fn new(
        work: ApplyThread,
        shutdown: CancellationToken,
        runtime: tokio::runtime::Handle,
    ) -> Result<Worker, ApplyError> {
        let metrics = &work.observers.metrics;
        let label = |i: usize| (i + 1).to_string();
        let n = work.streams.len();
        let decompressor = work
            .compressed
            .then(wire::Decompressor::new)
            .transpose()
            .map_err(ApplyError::Zstd)?;
        Ok(Worker {
            shard_applied: (0..n)
                .map(|i| metrics.applied.with_label_values(&[label(i)]))
                .collect(),
            shard_last: (0..n)
                .map(|i| metrics.last_applied_sequence.with_label_values(&[label(i)]))
                .collect(),
            last: work.streams.iter().map(|s| work.seqmap.get(s)).collect(),
            decompressor,
            last_write: None,
            work,
            shutdown,
            runtime,
        })
    }

    fn run(mut self, mut rx: mpsc::Receiver<Work>) -> Result<(), ApplyError> {
        let mut batch: Vec<Delivered> = Vec::with_capacity(MAX_BATCH);
        // A pause of the previous generation (before a migration) is over; a full one recurs.
        let health = &self.work.observers.health;
        health.update_catchup(|c| c.apply_paused = None);
        self.report();
        // The applier is made anew after every reinstall: retry what waited for the schema.
        let mut retry_waiting = self.work.applier.waiting_len() > 0;
        while !self.shutdown.is_cancelled() {
            if retry_waiting {
                retry_waiting = !self.retry_waiting()?;
            }
            // Wake now and then while events are held: a local write may have freed their value.
            let wait = if self.work.applier.held_len() > 0 || retry_waiting {
                HELD_RETRY
            } else {
                IDLE_WAKE
            };
            let first = match self.receive(&mut rx, wait) {
                Received::Stop => break,
                Received::Restore(job) => {
                    self.restore(job)?;
                    continue;
                }
                Received::Idle => {
                    self.retry_held()?;
                    continue;
                }
                Received::Message(d) => d,
            };
            let wait = pace(self.work.apply_interval, self.last_write, Instant::now());
            // Catch-up (a full batch waiting) goes at once; on shutdown the batch is still applied.
            if !wait.is_zero() && rx.len() < MAX_BATCH {
                pause(&self.runtime, &self.shutdown, wait);
            }
            let then_restore = gather(first, &mut rx, &mut batch);
            let gate = Arc::clone(&self.work.gate);
            let held = lock(&gate);
            if !self.apply_with_retry(&batch).map_err(ApplyError::Fatal)? {
                break; // shutdown while retrying: redelivered after restart
            }
            tracing::trace!(events = batch.len(), "applied batch");
            self.advance(&batch);
            drop(held);
            self.report();
            batch.clear();
            if let Some(job) = then_restore {
                self.restore(job)?;
            }
        }
        tracing::debug!("apply thread stopped");
        Ok(())
    }

    fn report(&self) {
        let (applier, observers) = (&self.work.applier, &self.work.observers);
        let m = &observers.metrics;
        m.held_events.set(applier.held_len() as i64);
        m.schema_mismatch_paused
            .set(i64::from(applier.waiting_len() > 0));
        observers.health.update_catchup(|c| {
            c.schema_waiting_events = applier.waiting_len();
        });
    }

    /// Retries the events waiting for the schema; true when that is done with.
    fn retry_waiting(&mut self) -> Result<bool, ApplyError> {
        let _held = lock(&self.work.gate);
        let done = match self.work.applier.retry_waiting() {
            Ok(_) => true,
            Err(e) if e.is_fatal() => return Err(ApplyError::Fatal(e)),
            Err(crate::db::Error::SchemaChanged) => false,
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "Cannot retry events waiting for the schema");
                false
            }
        };
        self.report();
        Ok(done)
    }

    fn retry_held(&mut self) -> Result<(), ApplyError> {
        match self.work.applier.retry_held() {
            Ok(0) => {}
            Ok(n) => tracing::info!(applied = n, "Held events applied"),
            Err(e) if e.is_fatal() => return Err(ApplyError::Fatal(e)),
            Err(e) => tracing::warn!(error = %crate::error_chain(&e), "Cannot retry held events"),
        }
        self.report();
        Ok(())
    }

    fn receive(&self, rx: &mut mpsc::Receiver<Work>, wait: Duration) -> Received {
        let got = self.runtime.block_on(async {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => None,
                r = tokio::time::timeout(wait, rx.recv()) => Some(r),
            }
        });
        match got {
            None | Some(Ok(None)) => Received::Stop,
            Some(Ok(Some(Work::Restore(job)))) => Received::Restore(job),
            Some(Ok(Some(Work::Message(d)))) => Received::Message(d),
            Some(Err(_)) => Received::Idle,
        }
    }

    /// After a batch committed: moves the positions (seq map, metrics, flow control), and lets
    /// go of our changes that can no longer come back (a stream recreated or messages skipped).
    fn advance(&mut self, batch: &[Delivered]) {
        let w = &mut self.work;
        let mut high: HashMap<usize, u64> = HashMap::new();
        let mut jumped = false;
        for d in batch.iter().filter(|d| d.reset) {
            // Recreated stream: sequences start again; ours published into the old one are gone.
            if let Err(e) = w
                .seqmap
                .reset(&w.streams[d.stream], d.seq.saturating_sub(1))
            {
                tracing::error!(error = %crate::error_chain(&e), "Cannot save sequence map");
            }
            self.last[d.stream] = d.seq.saturating_sub(1);
            if let Err(e) = w.applier.forget_published(d.stream + 1) {
                tracing::warn!(error = %crate::error_chain(&e), "Cannot reset published changes of the recreated stream");
            }
            let shard = d.stream as u64 + 1;
            w.applier
                .forget_landed(&landed_in(&w.outbox), |s, _| s == shard);
            jumped = true;
        }
        for d in batch {
            let e = high.entry(d.stream).or_insert(0);
            *e = (*e).max(d.seq);
            jumped |= d.seq > self.last[d.stream] + 1;
            self.last[d.stream] = self.last[d.stream].max(d.seq);
        }
        self.save_seqmap(&high);
        let w = &mut self.work;
        for (&i, &seq) in &high {
            self.shard_last[i].set(seq as i64);
            w.applier.set_applied(i + 1, seq);
            w.positions[i].store(seq, Ordering::Relaxed);
        }
        if let Some(flow) = &w.flow {
            flow.record_local(&w.positions);
            flow.advanced.notify_one();
        }
        if jumped {
            // Messages skipped (retention): our changes among them stop holding their rows.
            if let Err(e) = w.applier.rebuild_in_flight() {
                tracing::warn!(error = %crate::error_chain(&e), "Cannot re-read in-flight changes");
            }
            let last = &self.last;
            w.applier
                .forget_landed(&landed_in(&w.outbox), |shard, seq| {
                    crate::db::restore::reaches(last, shard, seq)
                });
        }
    }

    /// Merges a snapshot, moves every position to its own and answers the job; `Err` when fatal.
    fn restore(&mut self, job: RestoreJob) -> Result<(), ApplyError> {
        let gate = Arc::clone(&self.work.gate);
        let _held = lock(&gate);
        let (w, at, reply) = (&mut self.work, &job.positions, job.reply);
        let at_of = |i: usize| at.get(i).copied().unwrap_or(0);
        // Messages queued before the job may have passed the snapshot ([`RestoreError::Passed`]).
        if let Some(i) = (0..w.streams.len()).find(|&i| !job.replay_all && at_of(i) < self.last[i])
        {
            let _ = reply.send(Err(RestoreError::Passed {
                stream: w.streams[i].clone(),
                snapshot: at_of(i),
                applied: self.last[i],
            }));
            return Ok(());
        }
        let restored = match w
            .applier
            .restore_snapshot(&job.file, &w.streams, at, &job.not_kept)
        {
            Ok(restored) => restored,
            Err(e) if e.is_fatal() => {
                let _ = reply.send(Err(RestoreError::Stopping));
                return Err(ApplyError::Fatal(e));
            }
            Err(e) => {
                let _ = reply.send(Err(RestoreError::Db(e)));
                return Ok(());
            }
        };
        let all = w
            .streams
            .iter()
            .enumerate()
            .map(|(i, name)| (name.as_str(), at_of(i)));
        if let Err(e) = w.seqmap.reset_all(all) {
            tracing::error!(error = %crate::error_chain(&e), "Cannot save sequence map");
        }
        for i in 0..w.streams.len() {
            self.last[i] = at_of(i);
            w.positions[i].store(at_of(i), Ordering::SeqCst);
            self.shard_last[i].set(at_of(i) as i64);
        }
        let _ = reply.send(Ok(restored));
        self.report();
        Ok(())
    }

    /// Records the highest applied sequence per stream, retrying until it sticks (an unwritable
    /// seq map means replays after restart, never loss: keep applying).
    fn save_seqmap(&mut self, high: &HashMap<usize, u64>) {
        let mut backoff = crate::retry::Backoff::starting_at(Duration::from_millis(50));
        let w = &mut self.work;
        let updates = || high.iter().map(|(&i, &s)| (w.streams[i].as_str(), s));
        while let Err(e) = w.seqmap.advance(updates()) {
            tracing::error!(error = %crate::error_chain(&e), "Cannot save sequence map; retrying");
            if !pause(&self.runtime, &self.shutdown, backoff.next_delay()) {
                return;
            }
        }
    }

    /// Applies a batch with retries (module header); `Ok(false)` on shutdown, `Err` when fatal.
    fn apply_with_retry(&mut self, batch: &[Delivered]) -> Result<bool, crate::db::Error> {
        let w = &mut self.work;
        let mut decompressor = self.decompressor.as_mut();
        let incoming: Vec<Incoming<'_>> = batch
            .iter()
            .map(|d| {
                let (event, from_node) =
                    decode(&d.body, decompressor.as_deref_mut(), w.max_event_bytes);
                Incoming {
                    stream: &w.streams[d.stream],
                    seq: d.seq,
                    event,
                    own: is_own(d.msg_id.as_deref(), &w.identity),
                    from_node,
                    raw: &d.body,
                }
            })
            .collect();
        let mut backoff = crate::retry::Backoff::starting_at(Duration::from_millis(50));
        let mut attempt = 0u32;
        loop {
            let result = w.applier.apply_batch(&incoming);
            let paused = match &result {
                Err(e @ crate::db::Error::WaitingFull(_)) => Some(e.to_string()),
                _ => None,
            };
            if paused.is_some() || attempt > 0 {
                w.observers
                    .health
                    .update_catchup(|c| c.apply_paused = paused);
            }
            match result {
                Ok(outcomes) => {
                    if outcomes.iter().any(|o| !read_only(o)) {
                        self.last_write = Some(Instant::now());
                        w.observers.metrics.apply_commits.inc();
                    }
                    record(
                        &w.observers,
                        &self.shard_applied,
                        batch,
                        &incoming,
                        &outcomes,
                    );
                    return Ok(true);
                }
                Err(e) if e.is_fatal() => return Err(e),
                // Application DDL: capture is reinstalled, then a new applier starts; wait quietly.
                Err(crate::db::Error::SchemaChanged) => {
                    if !pause(&self.runtime, &self.shutdown, Duration::from_millis(50)) {
                        return Ok(false);
                    }
                }
                Err(e) => {
                    attempt += 1;
                    if attempt == 1 || attempt.is_power_of_two() {
                        tracing::warn!(error = %crate::error_chain(&e), attempt, events = batch.len(), "Cannot apply batch; retrying");
                    }
                    if !pause(&self.runtime, &self.shutdown, backoff.next_delay()) {
                        return Ok(false);
                    }
                }
            }
        }
    }
}

/// Takes `first` and whatever else waits (up to [`MAX_BATCH`] events or [`MAX_BATCH_BYTES`])
/// into `batch`; a restore found behind them is returned, to run after their batch.
fn gather(
    first: Delivered,
    rx: &mut mpsc::Receiver<Work>,
    batch: &mut Vec<Delivered>,
) -> Option<RestoreJob> {
    let mut bytes = first.body.len();
    batch.push(first);
    while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
        match rx.try_recv() {
            Ok(Work::Message(d)) => {
                bytes += d.body.len();
                batch.push(d);
            }
            Ok(Work::Restore(job)) => return Some(job),
            Err(_) => break,
        }
    }
    None
}

/// Whether an outcome can come from the applier's read-only pass (such batches commit no write).
fn read_only(o: &Outcome) -> bool {
    matches!(
        o,
        Outcome::Unchanged | Outcome::Superseded | Outcome::Discarded(_)
    )
}

/// Commit pacing: the next batch's wait so commits are ≥ `interval` apart (0 after a quiet spell).
fn pace(interval: Duration, last_commit: Option<Instant>, now: Instant) -> Duration {
    last_commit.map_or(Duration::ZERO, |at| {
        (at + interval).saturating_duration_since(now)
    })
}

/// How often held events are retried while the database changes.
const HELD_RETRY: Duration = Duration::from_secs(1);
/// How long the thread waits for work before looking at shutdown again.
const IDLE_WAKE: Duration = Duration::from_secs(5);
/// Bytes of message bodies taken into one batch (bounds memory with large events).
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// Counts what a batch's events came to, and the lag of those applied.
fn record(
    observers: &Observers,
    shard_applied: &[IntCounter],
    batch: &[Delivered],
    incoming: &[Incoming<'_>],
    outcomes: &[Outcome],
) {
    let now_ns = crate::clock::unix_ns();
    let m = &observers.metrics;
    for (i, o) in outcomes.iter().enumerate() {
        let d = &batch[i];
        match o {
            Outcome::Quarantined(why) => {
                m.quarantined.inc();
                tracing::error!(stream = %incoming[i].stream, seq = incoming[i].seq,
                    error = %why, "Event quarantined in __harmonylite__dead_letter; replication continues");
                continue;
            }
            Outcome::Held(_) => m.unique_conflicts.inc(),
            Outcome::Waiting(_) => m.skipped.with_label_values(&["waiting_for_schema"]).inc(),
            Outcome::Discarded(why) => {
                m.skipped.with_label_values(&["dropped_table"]).inc();
                tracing::debug!(seq = incoming[i].seq, reason = %why, "event discarded");
            }
            Outcome::Unchanged => m.skipped.with_label_values(&["unchanged"]).inc(),
            Outcome::Superseded => m.skipped.with_label_values(&["superseded"]).inc(),
            Outcome::Overruled { table, kind } => {
                m.conflicts.with_label_values(&[table, kind]).inc();
                observers.health.update_catchup(|c| c.conflicts += 1);
            }
            Outcome::Applied => {}
        }
        shard_applied[d.stream].inc();
        if d.stream_time_ns > 0 {
            let lag_ns = (now_ns - d.stream_time_ns).max(0);
            m.apply_lag_seconds.observe(lag_ns as f64 / 1e9);
            observers.health.applied(d.stream_time_ns, lag_ns / 1000);
        }
    }
}

/// Sleeps `d` on this blocking thread; false when shutdown came first.
fn pause(runtime: &tokio::runtime::Handle, shutdown: &CancellationToken, d: Duration) -> bool {
    runtime.block_on(crate::retry::pause(shutdown, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_waits_only_for_events_within_the_interval_of_the_last_commit() {
        let ms = Duration::from_millis;
        let now = Instant::now();
        let at = |back: u64| Some(now - ms(back));
        // No pacing: never a wait, as before pacing existed.
        for last in [None, at(0), at(3), at(1000)] {
            assert_eq!(pace(Duration::ZERO, last, now), Duration::ZERO);
        }
        // The first event ever, or after a quiet spell, goes in at once.
        assert_eq!(pace(ms(20), None, now), Duration::ZERO);
        assert_eq!(pace(ms(20), at(20), now), Duration::ZERO);
        assert_eq!(pace(ms(20), at(500), now), Duration::ZERO);
        // Within the interval: waits for the rest of it.
        assert_eq!(pace(ms(20), at(0), now), ms(20));
        assert_eq!(pace(ms(20), at(5), now), ms(15));
    }
}
