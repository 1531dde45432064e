//! The applying side: JetStream → SQLite (design §3.2, §3.3, §3.7, §4).
//!
//! One ordered consumer per shard reads from the saved sequence + 1 and forwards raw messages into
//! one bounded channel. One dedicated thread owns the applier connection and the seq map: it takes
//! whatever is waiting (up to [`MAX_BATCH`]), decodes, applies the batch in one transaction,
//! then advances the seq map once. Per-shard order is preserved because each shard's messages enter
//! the channel in stream order and are applied in channel order.
//!
//! Invariants:
//! - The seq map is advanced only after the batch committed durably; a crash in between replays
//!   the batch, which is idempotent (whole-row upserts and deletes by key).
//! - Every node applies every event, its own included: that is what makes the last message of a
//!   shard win on every node.
//! - A batch that fails for environmental reasons is retried, with backoff, until it commits or
//!   shutdown is requested; poison events are quarantined by [`crate::db::apply`].
//! - On shutdown the thread finishes the batch in hand, saves the seq map and exits; messages still
//!   in the channel are delivered again after restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::db::apply::{Applier, Incoming, Outcome};
use crate::health::HealthState;
use crate::metrics::Metrics;
use crate::seqmap::SeqMap;
use crate::stream;
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

/// What the apply thread is given: messages in stream order, or a snapshot to restore once the
/// messages before it are applied.
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
    /// Messages applied since the recovery looked took this node past the snapshot: restoring
    /// would take rows back.
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

/// A consumer found messages it needed already discarded by the stream.
#[derive(Debug, Clone, Copy)]
pub struct Gap {
    /// Index shard − 1.
    pub stream: usize,
    /// The first sequence this node lacks.
    pub missing_from: u64,
    /// The stream's first retained sequence.
    pub first: u64,
}

/// Where the apply thread reports what it did.
#[derive(Clone)]
pub struct ApplyObservers {
    pub metrics: Arc<Metrics>,
    pub health: Arc<HealthState>,
}

/// What one shard's consumer reads, and from where.
pub struct ConsumerSpec {
    pub js: jetstream::Context,
    pub settings: Arc<crate::config::Settings>,
    /// 1-based.
    pub shard: u64,
    /// First sequence to read (saved position + 1).
    pub start_seq: u64,
    pub health: Arc<HealthState>,
    /// Where a gap is reported (then the consumer stops and waits to be cancelled); `None`:
    /// log it and go on past it (no snapshots to recover from).
    pub gaps: Option<mpsc::UnboundedSender<Gap>>,
}

/// Messages asked for per fetch; a new fetch is sent when one completes.
const FETCH_BATCH: usize = 1000;
/// How long one fetch waits for messages before it ends and the next one starts.
const FETCH_EXPIRES: Duration = Duration::from_secs(5);
/// How long past FETCH_EXPIRES a fetch may stay silent before it is considered lost.
const FETCH_GRACE: Duration = Duration::from_secs(5);

/// Reads one shard from `start_seq` on and forwards every message in stream order, reopening
/// the consumer after any error or gap from just past the last forwarded message. Returns on
/// shutdown or when the apply thread has gone away.
///
/// Why a hand-driven fetch loop: async-nats' ordered consumer stalled silently under bursts in
/// our benchmark (messages in the stream, none delivered, no error). Here every fetch is explicit,
/// consumer sequences are checked for gaps, and every failure leads to a visible reopen.
pub async fn run_consumer(spec: ConsumerSpec, tx: mpsc::Sender<Work>, shutdown: CancellationToken) {
    let ConsumerSpec {
        js,
        settings,
        shard,
        start_seq,
        health,
        gaps,
    } = spec;
    let report_gap = |missing_from: u64, first: u64| {
        gaps.as_ref().is_some_and(|g| {
            g.send(Gap {
                stream: shard as usize - 1,
                missing_from,
                first,
            })
            .is_ok()
        })
    };
    let stream_idx = shard as usize - 1;
    let stream_name = settings.stream_name(shard);
    let subject = settings.subject_name(shard);
    let mut next = start_seq.max(1);
    let mut delay = Duration::from_millis(200);
    // Set when the stream was found missing or recreated: the next message delivered resets
    // this shard's position instead of advancing it.
    let mut reset = false;
    'reopen: loop {
        // A stream that vanished (JetStream store wiped, stream deleted) is recreated; one whose
        // end is before our position was recreated meanwhile: read it from its start, or every
        // message in it would be skipped.
        match stream::stream_range(&js, &stream_name).await {
            Ok(None) => {
                health.set_consumer_down(stream_idx, true);
                tracing::warn!(stream = %stream_name, "Stream is missing; recreating it and consuming from its start");
                if let Err(e) = stream::ensure_stream(&js, &settings, shard, &shutdown).await {
                    if matches!(e, stream::Error::Cancelled) {
                        return;
                    }
                    tracing::error!(stream = %stream_name, error = %crate::error_chain(&e), "Cannot recreate stream");
                }
                next = 1;
                reset = true;
            }
            Ok(Some((first, last))) if next > 1 && last < next - 1 => {
                tracing::warn!(stream = %stream_name, position = next - 1, stream_last = last,
                    "Stream ends before this node's position (it was recreated); consuming from its start");
                next = first.max(1);
                reset = true;
            }
            Ok(Some((first, _))) if first > next && !reset && report_gap(next, first) => {
                tracing::warn!(stream = %stream_name, missing_from = next, stream_first = first,
                    "Stream gap detected: the stream no longer holds changes this node lacks; recovering from a snapshot");
                shutdown.cancelled().await;
                return;
            }
            Ok(Some(_)) => {}
            Err(e) => {
                health.set_consumer_down(stream_idx, true);
                tracing::warn!(stream = %stream_name, error = %e, "Cannot read stream state, retrying");
                if !back_off(&mut delay, &shutdown).await {
                    return;
                }
                continue 'reopen;
            }
        }
        let opened = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            r = stream::pull_consumer(&js, &stream_name, &subject, next) => r,
        };
        let consumer = match opened {
            Ok(c) => c,
            Err(e) => {
                health.set_consumer_down(stream_idx, true);
                tracing::warn!(stream = %stream_name, error = %e, "Cannot open consumer, retrying");
                if !back_off(&mut delay, &shutdown).await {
                    return;
                }
                continue 'reopen;
            }
        };
        tracing::debug!(stream = %stream_name, from = next, "consumer started");
        health.set_consumer_down(stream_idx, false);
        let mut consumer_seq = 0u64;
        loop {
            let fetch = consumer
                .batch()
                .max_messages(FETCH_BATCH)
                // No idle heartbeat: async-nats 0.51 answers one with Poll::Pending without
                // arranging a wake-up, so a fetch that saw a heartbeat slept until it expired
                // (multi-second stalls after idle). Our own timeout below detects a lost fetch.
                .expires(FETCH_EXPIRES)
                .messages();
            let mut batch = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                b = fetch => match b {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(stream = %stream_name, error = %e, "fetch failed; reopening consumer");
                        continue 'reopen;
                    }
                },
            };
            let mut received = 0usize;
            loop {
                let item = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    // The server ends every fetch by FETCH_EXPIRES; a longer silence means the
                    // fetch or the consumer was lost (e.g. a stream leader change).
                    item = tokio::time::timeout(FETCH_EXPIRES + FETCH_GRACE, batch.next()) => match item {
                        Ok(item) => item,
                        Err(_) => {
                            tracing::warn!(stream = %stream_name, "fetch went silent; reopening consumer");
                            continue 'reopen;
                        }
                    },
                };
                let msg = match item {
                    None => {
                        // Fetch complete or expired. An empty one while the stream holds messages
                        // we have not seen means the consumer is stranded (it can happen around
                        // stream leader elections): reopen it.
                        if received == 0 && stream_is_ahead(&js, &stream_name, next).await {
                            tracing::warn!(stream = %stream_name, from = next,
                                "consumer stalled behind the stream; reopening");
                            continue 'reopen;
                        }
                        break;
                    }
                    Some(Ok(msg)) => msg,
                    Some(Err(e)) => {
                        tracing::warn!(stream = %stream_name, error = %e, "consumer error; reopening");
                        continue 'reopen;
                    }
                };
                let (seq, cseq, stream_time_ns) = match msg.info() {
                    Ok(info) => (
                        info.stream_sequence,
                        info.consumer_sequence,
                        info.published.unix_timestamp_nanos() as i64,
                    ),
                    Err(e) => {
                        tracing::warn!(stream = %stream_name, error = %e, "message without JetStream metadata; reopening");
                        continue 'reopen;
                    }
                };
                if cseq != consumer_seq + 1 {
                    tracing::warn!(stream = %stream_name, expected = consumer_seq + 1, got = cseq,
                        "consumer skipped messages; reopening from the last one forwarded");
                    continue 'reopen;
                }
                consumer_seq = cseq;
                received += 1;
                if seq < next {
                    continue; // already forwarded before a reopen
                }
                if seq > next && !reset && report_gap(next, seq) {
                    tracing::warn!(stream = %stream_name, missing_from = next, stream_first = seq,
                        "Stream gap detected: the stream no longer holds changes this node lacks; recovering from a snapshot");
                    shutdown.cancelled().await;
                    return;
                }
                if seq > next && !reset {
                    // Retention (max_entries) dropped messages this node had not applied yet.
                    tracing::error!(stream = %stream_name, missing_from = next, missing_to = seq - 1,
                        "Stream gap detected: required messages have been truncated; this node lacks \
                         those changes until it restores a snapshot (raise replication_log.max_entries)");
                }
                let msg_id = msg
                    .message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                    .map(|v| v.as_str().to_owned());
                let delivered = Delivered {
                    stream: stream_idx,
                    seq,
                    stream_time_ns,
                    msg_id,
                    reset: std::mem::take(&mut reset),
                    body: msg.message.payload.clone(),
                };
                if tx.send(Work::Message(delivered)).await.is_err() {
                    // The apply thread is gone; it reports why. Wait for the shutdown it causes
                    // rather than end first and be taken for the failure.
                    shutdown.cancelled().await;
                    return;
                }
                next = seq + 1;
                delay = Duration::from_millis(200);
            }
        }
    }
}

/// Sleeps `delay` and grows it; false if shutdown came first.
async fn back_off(delay: &mut Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => return false,
        _ = tokio::time::sleep(*delay) => {}
    }
    *delay = stream::next_backoff(*delay);
    true
}

/// Whether `stream` holds a message at or after `next` (by its last sequence).
async fn stream_is_ahead(js: &jetstream::Context, stream: &str, next: u64) -> bool {
    match js.get_stream(stream).await {
        Ok(s) => s.cached_info().state.last_sequence >= next,
        Err(e) => {
            tracing::debug!(stream, error = %e, "stream info failed");
            false
        }
    }
}

/// Whether a message id names this database as its publisher
/// (`<node_id>:<database identity>:<table>:<change id>:<created_at>`).
pub fn is_own(msg_id: Option<&str>, identity: &str) -> bool {
    msg_id
        .and_then(|id| id.split(':').nth(1))
        .is_some_and(|origin| !identity.is_empty() && origin == identity)
}

/// Decodes a body into an event for the applier; errors become quarantine reasons.
fn decode(
    body: &[u8],
    decompressor: Option<&mut wire::Decompressor>,
    limit: usize,
) -> Result<wire::ChangeEvent, String> {
    let plain;
    let bytes = if let Some(d) = decompressor {
        plain = d
            .decompress_limited(body, limit)
            .map_err(|e| e.to_string())?;
        &plain[..]
    } else {
        body
    };
    ReplicationEvent::decode(bytes)
        .map(|e| e.event)
        .map_err(|e| format!("undecodable event: {e}"))
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
    pub observers: ApplyObservers,
    /// Per shard (index shard − 1): last applied sequence, for the change-log cleanup and the
    /// position reports.
    pub positions: Arc<[AtomicU64]>,
    /// Told after every advance (the position reporter sends a report at once).
    pub flow: Option<Arc<super::flow::Flow>>,
    /// Held while a batch is applied and its positions published (a snapshot copy begins only
    /// between batches).
    pub gate: Arc<std::sync::Mutex<()>>,
    /// Our acknowledged changes not yet marked in the database: those whose events can no
    /// longer come back (a gap skipped, a stream recreated) must stop holding their rows.
    pub outbox: super::publish::Outbox,
}

/// (table, change-log id, shard, sequence) of the outbox's acknowledged changes.
fn landed_in(outbox: &super::publish::Outbox) -> Vec<(usize, i64, u64, u64)> {
    let outbox = outbox.lock().unwrap_or_else(|p| p.into_inner());
    outbox.landed().collect()
}

/// Why the apply thread stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot create a zstd context")]
    Zstd(#[source] wire::DecodeError),
    #[error("the database cannot be written")]
    Fatal(#[source] crate::db::Error),
}

/// Starts the apply thread. It runs until the channel closes or `shutdown` is cancelled; it
/// returns an error only when it cannot go on (the node must stop).
///
/// # Errors
/// Only if the OS refuses to start a thread.
pub fn spawn_apply_thread(
    work: ApplyThread,
    mut rx: mpsc::Receiver<Work>,
    shutdown: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<Result<(), ApplyError>>> {
    let runtime = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("harmonylite-apply".into())
        .spawn(move || {
            let ApplyThread {
                mut applier,
                mut seqmap,
                streams,
                compressed,
                max_event_bytes,
                identity,
                observers,
                positions,
                flow,
                gate,
                outbox,
            } = work;
            let mut batch: Vec<Delivered> = Vec::with_capacity(MAX_BATCH);
            // Per-shard metric handles, resolved once instead of per event.
            let shard_label = |i: usize| (i + 1).to_string();
            let shard_applied: Vec<IntCounter> = (0..streams.len())
                .map(|i| {
                    observers
                        .metrics
                        .applied
                        .with_label_values(&[shard_label(i).as_str()])
                })
                .collect();
            let shard_last: Vec<IntGauge> = (0..streams.len())
                .map(|i| {
                    observers
                        .metrics
                        .last_applied_sequence
                        .with_label_values(&[shard_label(i).as_str()])
                })
                .collect();
            let mut decompressor = compressed
                .then(wire::Decompressor::new)
                .transpose()
                .map_err(ApplyError::Zstd)?;
            let report = |applier: &Applier| {
                let m = &observers.metrics;
                m.held_events.set(applier.held_len() as i64);
                m.schema_mismatch_paused
                    .set(i64::from(applier.waiting_len() > 0));
                observers.health.update_catchup(|c| {
                    c.schema_waiting_events = applier.waiting_len();
                });
            };
            report(&applier);
            let mut last: Vec<u64> = streams.iter().map(|s| seqmap.get(s)).collect();
            // Events that waited for the schema are tried once capture is installed for the
            // schema of this run (the applier is made anew after every reinstall).
            let mut retry_waiting = applier.waiting_len() > 0;
            loop {
                if shutdown.is_cancelled() {
                    break;
                }
                if retry_waiting {
                    let _held = gate.lock().unwrap_or_else(|p| p.into_inner());
                    match applier.retry_waiting() {
                        Ok(_) => retry_waiting = false,
                        Err(e) if e.is_fatal() => return Err(ApplyError::Fatal(e)),
                        Err(crate::db::Error::SchemaChanged) => {}
                        Err(e) => tracing::warn!(error = %crate::error_chain(&e), "Cannot retry events waiting for the schema"),
                    }
                    report(&applier);
                }
                // Wake up now and then while events are held: a local write may have freed the
                // value they wait for.
                let wait = if applier.held_len() > 0 || retry_waiting {
                    HELD_RETRY
                } else {
                    IDLE_WAKE
                };
                let first = runtime.block_on(async {
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => None,
                        r = tokio::time::timeout(wait, rx.recv()) => Some(r),
                    }
                });
                let first = match first {
                    None | Some(Ok(None)) => break,
                    Some(Ok(Some(Work::Restore(job)))) => {
                        let _held = gate.lock().unwrap_or_else(|p| p.into_inner());
                        let fatal = restore(&mut applier, &mut seqmap, &streams, &mut last, &positions, &shard_last, job);
                        if let Some(e) = fatal {
                            return Err(ApplyError::Fatal(e));
                        }
                        report(&applier);
                        continue;
                    }
                    Some(Err(_)) => {
                        match applier.retry_held() {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(applied = n, "Held events applied"),
                            Err(e) if e.is_fatal() => return Err(ApplyError::Fatal(e)),
                            Err(e) => tracing::warn!(error = %crate::error_chain(&e), "Cannot retry held events"),
                        }
                        report(&applier);
                        continue;
                    }
                    Some(Ok(Some(Work::Message(d)))) => d,
                };
                let mut bytes = first.body.len();
                batch.push(first);
                // A restore that arrives behind messages runs after their batch.
                let mut then_restore: Option<RestoreJob> = None;
                while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(Work::Message(d)) => {
                            bytes += d.body.len();
                            batch.push(d);
                        }
                        Ok(Work::Restore(job)) => {
                            then_restore = Some(job);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let held = gate.lock().unwrap_or_else(|p| p.into_inner());
                match apply_with_retry(
                    &mut applier,
                    &streams,
                    decompressor.as_mut(),
                    max_event_bytes,
                    &identity,
                    &batch,
                    &observers,
                    &shard_applied,
                    &shutdown,
                ) {
                    Ok(true) => {}
                    Ok(false) => break, // shutdown while retrying: redelivered after restart
                    Err(e) => return Err(ApplyError::Fatal(e)),
                }
                tracing::trace!(events = batch.len(), "applied batch");
                let mut high: HashMap<usize, u64> = HashMap::new();
                let mut jumped = false;
                for d in batch.iter().filter(|d| d.reset) {
                    // The stream was recreated: its sequences start again, and our changes
                    // published into the old one will never come back.
                    if let Err(e) = seqmap.reset(&streams[d.stream], d.seq.saturating_sub(1)) {
                        tracing::error!(error = %crate::error_chain(&e), "Cannot save sequence map");
                    }
                    last[d.stream] = d.seq.saturating_sub(1);
                    if let Err(e) = applier.forget_published(d.stream + 1) {
                        tracing::warn!(error = %crate::error_chain(&e), "Cannot reset published changes of the recreated stream");
                    }
                    let shard = d.stream as u64 + 1;
                    applier.forget_landed(&landed_in(&outbox), |s, _| s == shard);
                    jumped = true;
                }
                for d in &batch {
                    let e = high.entry(d.stream).or_insert(0);
                    *e = (*e).max(d.seq);
                    if d.seq > last[d.stream] + 1 {
                        jumped = true;
                    }
                    last[d.stream] = last[d.stream].max(d.seq);
                }
                save_seqmap(&mut seqmap, &streams, &high, &shutdown);
                for (&i, &seq) in &high {
                    shard_last[i].set(seq as i64);
                    applier.set_applied(i + 1, seq);
                    positions[i].store(seq, Ordering::Relaxed);
                }
                if let Some(flow) = &flow {
                    flow.record_local(&positions);
                    flow.advanced.notify_one();
                }
                if jumped {
                    // Messages were skipped (retention): our changes among them can no longer come
                    // back and must stop holding their rows.
                    if let Err(e) = applier.rebuild_in_flight() {
                        tracing::warn!(error = %crate::error_chain(&e), "Cannot re-read in-flight changes");
                    }
                    applier.forget_landed(&landed_in(&outbox), |shard, seq| {
                        last.get((shard.max(1) - 1) as usize).is_some_and(|&p| seq <= p)
                    });
                }
                drop(held);
                report(&applier);
                batch.clear();
                if let Some(job) = then_restore {
                    let _held = gate.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(e) = restore(&mut applier, &mut seqmap, &streams, &mut last, &positions, &shard_last, job) {
                        return Err(ApplyError::Fatal(e));
                    }
                    report(&applier);
                }
            }
            tracing::debug!("apply thread stopped");
            Ok(())
        })
}

/// Merges a snapshot and moves every position to the snapshot's; answers the job. Returns the
/// error when it is fatal (the thread must stop).
fn restore(
    applier: &mut Applier,
    seqmap: &mut SeqMap,
    streams: &[String],
    last: &mut [u64],
    positions: &[AtomicU64],
    shard_last: &[IntGauge],
    job: RestoreJob,
) -> Option<crate::db::Error> {
    let RestoreJob {
        file,
        positions: at,
        not_kept,
        replay_all,
        reply,
    } = job;
    // Messages applied since the recovery looked (they were in the channel before the job) may
    // have taken this node past the snapshot on some stream: restoring would take rows back.
    if let Some((i, name)) = streams
        .iter()
        .enumerate()
        .find(|(i, _)| !replay_all && at.get(*i).copied().unwrap_or(0) < last[*i])
    {
        let _ = reply.send(Err(RestoreError::Passed {
            stream: name.clone(),
            snapshot: at.get(i).copied().unwrap_or(0),
            applied: last[i],
        }));
        return None;
    }
    match applier.restore_snapshot(&file, streams, &at, &not_kept) {
        Ok(restored) => {
            let at_of = |i: usize| at.get(i).copied().unwrap_or(0);
            let all = streams
                .iter()
                .enumerate()
                .map(|(i, name)| (name.as_str(), at_of(i)));
            if let Err(e) = seqmap.reset_all(all) {
                tracing::error!(error = %crate::error_chain(&e), "Cannot save sequence map");
            }
            for i in 0..streams.len() {
                let p = at_of(i);
                last[i] = p;
                positions[i].store(p, Ordering::SeqCst);
                shard_last[i].set(p as i64);
            }
            let _ = reply.send(Ok(restored));
            None
        }
        Err(e) if e.is_fatal() => {
            let _ = reply.send(Err(RestoreError::Stopping));
            Some(e)
        }
        Err(e) => {
            let _ = reply.send(Err(RestoreError::Db(e)));
            None
        }
    }
}

/// How often held events are retried while the database changes.
const HELD_RETRY: Duration = Duration::from_secs(1);
/// How long the thread waits for work before looking at shutdown again.
const IDLE_WAKE: Duration = Duration::from_secs(5);
/// Bytes of message bodies taken into one batch (bounds memory with large events).
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// Applies a batch, retrying environmental failures. `Ok(false)` if shutdown interrupted it.
///
/// # Errors
/// A failure that retrying cannot fix (disk full, read-only, corrupt, I/O): the node must stop.
#[allow(clippy::too_many_arguments)]
fn apply_with_retry(
    applier: &mut Applier,
    streams: &[String],
    mut decompressor: Option<&mut wire::Decompressor>,
    max_event_bytes: usize,
    identity: &str,
    batch: &[Delivered],
    observers: &ApplyObservers,
    shard_applied: &[IntCounter],
    shutdown: &CancellationToken,
) -> Result<bool, crate::db::Error> {
    let incoming: Vec<Incoming<'_>> = batch
        .iter()
        .map(|d| Incoming {
            stream: &streams[d.stream],
            seq: d.seq,
            event: decode(&d.body, decompressor.as_deref_mut(), max_event_bytes),
            own: is_own(d.msg_id.as_deref(), identity),
            raw: &d.body,
        })
        .collect();
    let mut delay = Duration::from_millis(50);
    let mut attempt = 0u32;
    loop {
        match applier.apply_batch(&incoming) {
            Ok(outcomes) => {
                let now_ns = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as i64);
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
                        Outcome::Waiting(_) => {
                            m.skipped.with_label_values(&["waiting_for_schema"]).inc()
                        }
                        Outcome::Discarded(why) => {
                            m.skipped.with_label_values(&["dropped_table"]).inc();
                            tracing::debug!(seq = incoming[i].seq, reason = %why, "event discarded");
                        }
                        Outcome::Unchanged => m.skipped.with_label_values(&["unchanged"]).inc(),
                        Outcome::Superseded => m.skipped.with_label_values(&["superseded"]).inc(),
                        Outcome::Applied => {}
                    }
                    shard_applied[d.stream].inc();
                    if d.stream_time_ns > 0 {
                        let lag_ns = (now_ns - d.stream_time_ns).max(0);
                        m.apply_lag_seconds.observe(lag_ns as f64 / 1e9);
                        observers.health.applied(d.stream_time_ns, lag_ns / 1000);
                    }
                }
                return Ok(true);
            }
            Err(e) if e.is_fatal() => return Err(e),
            // DDL by the application: capture is being reinstalled, the node then starts a
            // fresh applier; until then, wait without noise.
            Err(crate::db::Error::SchemaChanged) => {
                if sleep_or_cancel(Duration::from_millis(50), shutdown) {
                    return Ok(false);
                }
            }
            Err(e) => {
                attempt += 1;
                if attempt == 1 || attempt.is_power_of_two() {
                    tracing::warn!(error = %crate::error_chain(&e), attempt, events = batch.len(), "Cannot apply batch; retrying");
                }
                if sleep_or_cancel(delay, shutdown) {
                    return Ok(false);
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Records the highest applied sequence per stream; retries until it sticks (a seq map that cannot
/// be written means replays after restart, never loss, so keep trying rather than stop applying).
fn save_seqmap(
    seqmap: &mut SeqMap,
    streams: &[String],
    high: &HashMap<usize, u64>,
    shutdown: &CancellationToken,
) {
    let mut delay = Duration::from_millis(50);
    loop {
        let updates = high.iter().map(|(&i, &s)| (streams[i].as_str(), s));
        match seqmap.advance(updates) {
            Ok(_) => return,
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "Cannot save sequence map; retrying");
                if sleep_or_cancel(delay, shutdown) {
                    return;
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Sleeps on this blocking thread; returns true if shutdown was requested meanwhile.
fn sleep_or_cancel(d: Duration, shutdown: &CancellationToken) -> bool {
    let step = Duration::from_millis(20);
    let mut left = d;
    while !left.is_zero() {
        if shutdown.is_cancelled() {
            return true;
        }
        let s = left.min(step);
        std::thread::sleep(s);
        left -= s;
    }
    shutdown.is_cancelled()
}
