//! The publisher: local change log → JetStream (design §3.1, §3.12, §4).
//!
//! A pass reads up to `scan_max_changes` pending changes in commit order, encodes them as Go events
//! and sends them pipelined, awaiting pass N's acks while pass N+1 is read and sent. Passes start
//! on a file notification (and follow-up scans), the polling timer or the retry timer.
//!
//! Acknowledged changes go to an in-memory [`Outbox`] that the keeper ([`keep`]) retires, with the
//! cleanup of old rows, in one write transaction per cleanup interval. A crash loses only the
//! outbox, and nothing is sent twice because of it (see `search`).
//!
//! Here: the publisher loop and shared types. `send`: one pass; `search`: changes already sent
//! ([`Unsettled`], `recover`); `pace`: flow control; `mark`: [`SentMark`]; `keeper`: [`keep`].
//!
//! Invariants:
//! - Only an acknowledged prefix is retired; the rest is resent in order (`send`), never dropped.
//! - After any failed pass, nothing is sent until a search of the streams has completed.

mod keeper;
mod mark;
mod pace;
mod search;
mod send;

pub use keeper::keep;
pub use mark::SentMark;
pub use pace::Pacing;
pub use search::Unsettled;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use rusqlite::Connection;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::db::changelog::{ChangeLog, Retirement};
use crate::db::{self, Table};
use crate::handle::Node;
use crate::health::HealthState;
use crate::metrics::Metrics;
use crate::replicate::lock;
use crate::stream;
use crate::wire;

use search::Newest;
use send::{Failure, Sent};

/// The writing side of the local log (marking published or failed, cleanup), for blocking threads.
pub struct LocalLog {
    pub conn: Connection,
    pub log: Arc<ChangeLog>,
}

pub type SharedLog = Arc<Mutex<LocalLog>>;

/// Changes done with (acknowledged, failed for good, or orphaned), not yet retired by the keeper.
pub type Outbox = Arc<Mutex<Retirement>>;

/// How often a held publisher (see [`Publisher::run`]) looks again.
const HELD_POLL: Duration = Duration::from_millis(250);

/// Extra scans after a file notification. inotify reports the WAL write, but a commit becomes
/// visible to readers only after SQLite updates the wal-index in `-shm`, through mmap, which
/// inotify cannot see; a scan racing that gap finds nothing, so look again shortly after.
const FOLLOW_UP_SCANS: &[Duration] = &[
    Duration::from_micros(300),
    Duration::from_micros(700),
    Duration::from_millis(1),
    Duration::from_millis(2),
    Duration::from_millis(4),
    Duration::from_millis(8),
    Duration::from_millis(25),
    Duration::from_millis(100),
];

/// How long the publish pass after a stop request may take.
const FINAL_PASS: Duration = Duration::from_secs(3);

/// Per-table data the publisher needs for every row.
struct TableMeta {
    pks: Vec<usize>,
    /// Lower-cased declared types (Go hashes time-typed keys specially).
    decl_lower: Vec<String>,
}

/// Why a pass stopped early.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("database")]
    Db(#[from] db::Error),
    #[error("publish of {table} change {id} failed: {message}")]
    Nats {
        table: String,
        id: i64,
        message: String,
        /// The server has no stream for the subject.
        stream_missing: bool,
    },
    #[error("database worker failed: {0}")]
    Join(String),
    #[error("cannot look for changes already in the stream")]
    Find(#[source] stream::Error),
}

impl PublishError {
    /// Whether publishing cannot go on (the database cannot be read or written any more).
    pub fn is_fatal(&self) -> bool {
        matches!(self, PublishError::Db(e) if e.is_fatal())
    }
}

pub struct Publisher {
    reader: Arc<Mutex<Connection>>,
    log: Arc<ChangeLog>,
    js: jetstream::Context,
    settings: Arc<Settings>,
    schema_hash: String,
    meta: Vec<TableMeta>,
    /// Reused across messages; only the publisher task uses it (the lock is never contended).
    compressor: Mutex<Option<wire::Compressor>>,
    metrics: Arc<Metrics>,
    health: Arc<HealthState>,
    /// This database's identity, in every message id.
    identity: String,
    outbox: Outbox,
    /// Global id below which every change is done with (acknowledged or retired).
    cursor: AtomicI64,
    /// Per shard: the newest acknowledged sequence (where a search after a failure starts).
    acked: Mutex<HashMap<u64, u64>>,
    /// What the last search found, by row: older changes of those rows are not sent.
    newest: Mutex<Newest>,
    /// Whether a search must precede the next send (at start, after a failure); how far we sent.
    unsettled: Unsettled,
    duplicates: AtomicU64,
    /// When this publisher was made (unix ms): a change captured before may have been sent by
    /// the previous run, so a duplicate ack for it is expected.
    started_ms: i64,
    /// Highest global id recorded in the sent mark (see [`SentMark`]).
    sent_mark: SentMark,
    /// Flow control: per shard, this node's applied position and the estimated last sequence sent.
    pacing: Option<Pacing>,
    /// Set while this node recovers from a snapshot: its changes wait (see [`super::catchup`]).
    hold: Arc<std::sync::atomic::AtomicBool>,
}

impl Publisher {
    /// Builds `node`'s publisher, reading through `reader` (`writer` gives it the change log);
    /// finished changes go to `outbox`. `acked`: per shard, the sequence of the last change
    /// retired as published (where the first search starts); `sent_floor`: [`SentMark::new`].
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node: &Node,
        writer: SharedLog,
        reader: Connection,
        schema_hash: String,
        outbox: Outbox,
        acked: HashMap<u64, u64>,
        pacing: Option<Pacing>,
        hold: Arc<std::sync::atomic::AtomicBool>,
        sent_floor: i64,
    ) -> Publisher {
        let log = Arc::clone(&lock(&writer).log);
        let meta = log
            .tables()
            .iter()
            .map(|t| TableMeta {
                pks: t.pk_indexes(),
                decl_lower: t
                    .columns
                    .iter()
                    .map(|c| c.decl_type.to_lowercase())
                    .collect(),
            })
            .collect();
        Publisher {
            sent_mark: SentMark::new(&node.settings.db_path, &node.identity, sent_floor),
            reader: Arc::new(Mutex::new(reader)),
            log,
            js: node.js.clone(),
            settings: Arc::clone(&node.settings),
            schema_hash,
            meta,
            compressor: Mutex::new(None),
            metrics: Arc::clone(&node.observers.metrics),
            health: Arc::clone(&node.observers.health),
            identity: node.identity.clone(),
            outbox,
            cursor: AtomicI64::new(0),
            acked: Mutex::new(acked),
            newest: Mutex::new(HashMap::new()),
            unsettled: Unsettled {
                must_search: Arc::new(std::sync::atomic::AtomicBool::new(true)),
                sent: Arc::new(AtomicI64::new(0)),
                found: Arc::new(Mutex::new(HashMap::new())),
                parked: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            },
            duplicates: AtomicU64::new(0),
            started_ms: crate::clock::unix_ms(),
            pacing,
            hold,
        }
    }

    /// Runs `read` on a blocking thread with the reader connection and the change log.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Connection, &ChangeLog) -> Result<T, db::Error> + Send + 'static,
    ) -> Result<T, PublishError> {
        let (reader, log) = (Arc::clone(&self.reader), Arc::clone(&self.log));
        tokio::task::spawn_blocking(move || read(&lock(&reader), &log))
            .await
            .map_err(|e| PublishError::Join(e.to_string()))?
            .map_err(PublishError::Db)
    }

    fn tables(&self) -> &[Table] {
        self.log.tables()
    }

    /// A handle on what this publisher has sent without knowing where it landed.
    pub fn unsettled(&self) -> Unsettled {
        self.unsettled.clone()
    }

    /// Runs passes (module header) until shutdown; fails only on a fatal [`PublishError`].
    pub async fn run(
        self,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
    ) -> Result<(), PublishError> {
        // A hold of the previous generation's publisher (before a schema change) is over.
        self.health
            .update_catchup(|c| c.publish_held_since_ms = None);
        // Even without polling_interval, a safety-net scan (one indexed read) bounds lost wake-ups.
        let idle = self
            .settings
            .polling_interval
            .unwrap_or(Duration::from_secs(1));
        let mut retry = crate::retry::Backoff::starting_at(Duration::from_millis(100));
        let mut failing = false;
        let mut followups: &[Duration] = &[];
        loop {
            let wait = match self.publish_pending(&shutdown).await {
                Ok(()) => {
                    if std::mem::take(&mut failing) {
                        tracing::info!("Publishing resumed");
                    }
                    retry.reset();
                    match followups.split_first() {
                        Some((next, rest)) => {
                            followups = rest;
                            *next
                        }
                        None => idle,
                    }
                }
                Err(e) => {
                    self.failed(e, failing, &shutdown).await?;
                    failing = true;
                    retry.next_delay()
                }
            };
            // While held (a restore runs), file notifications are ignored: the restore's writes
            // would wake us thousands of times a second, competing with it for CPU and database.
            let held = self.hold.load(Ordering::Relaxed);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = wake.notified(), if !failing && !held => followups = FOLLOW_UP_SCANS,
                _ = tokio::time::sleep(if held { HELD_POLL.min(wait) } else { wait }) => {}
            }
        }
        // Changes committed before the stop still go out (bounded: NATS away, they stay pending).
        if !failing {
            self.final_pass().await;
        }
        tracing::debug!("publisher stopped");
        Ok(())
    }

    /// Handles a failed pass: a fatal error is returned; a missing stream is recreated; the
    /// failure is logged (as an error once per episode: `failing` says one is under way).
    async fn failed(
        &self,
        e: PublishError,
        failing: bool,
        shutdown: &CancellationToken,
    ) -> Result<(), PublishError> {
        if e.is_fatal() {
            tracing::error!(error = %crate::error_chain(&e), "Publishing cannot go on");
            return Err(e);
        }
        if let PublishError::Nats {
            stream_missing: true,
            ..
        } = e
        {
            self.recreate_streams(shutdown).await;
        }
        if failing {
            tracing::debug!(error = %crate::error_chain(&e), "publish retry failed");
        } else {
            tracing::error!(error = %crate::error_chain(&e), "Unable to publish changes; they stay pending and will be retried");
        }
        Ok(())
    }

    /// One last pass after a stop request, bounded by [`FINAL_PASS`].
    async fn final_pass(&self) {
        let fresh = CancellationToken::new();
        let last = self.publish_pending(&fresh);
        match tokio::time::timeout(FINAL_PASS, last).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %crate::error_chain(&e), "final publish pass failed")
            }
            Err(_) => tracing::debug!("final publish pass timed out"),
        }
    }

    /// Publishes everything pending, pass after pass, until drained or the first failure (header).
    pub async fn publish_pending(&self, shutdown: &CancellationToken) -> Result<(), PublishError> {
        // Cleared before the hold is looked at: while it is set, no pass runs.
        self.unsettled.parked.store(false, Ordering::SeqCst);
        if self.hold.load(Ordering::SeqCst) {
            // Nothing is sent while held, but what a failed pass sent is searched for: a restore
            // waits for that (see [`Unsettled`]). A failed search is retried like a failed pass.
            let searched = if self.unsettled.pending() {
                self.search().await
            } else {
                Ok(())
            };
            self.count_pending().await;
            self.unsettled.parked.store(true, Ordering::SeqCst);
            return searched;
        }
        let result = async {
            if self.settings.publish && self.unsettled.must_search.load(Ordering::SeqCst) {
                self.search().await?;
            }
            self.publish_all(shutdown).await
        }
        .await;
        if result.is_err() {
            self.unsettled.must_search.store(true, Ordering::SeqCst);
            self.metrics.publish_errors.inc();
            // Unacknowledged sends are forgotten; the estimate starts again from the acks.
            if let Some(p) = &self.pacing {
                p.unacked.iter().for_each(|s| s.store(0, Ordering::Relaxed));
            }
        }
        self.count_pending().await;
        result
    }

    /// Refreshes `pending_publish` (and the health endpoint's view) with a timed count.
    async fn count_pending(&self) {
        let started = Instant::now();
        let after = self.cursor.load(Ordering::Relaxed);
        let counted = self
            .read(move |conn, log| log.pending_count(conn, after))
            .await;
        self.metrics
            .count_changes
            .observe(started.elapsed().as_micros() as f64);
        if let Ok(n) = counted {
            self.metrics.pending_publish.set(n);
            self.health.pending.store(n, Ordering::Relaxed);
        }
    }

    async fn publish_all(&self, shutdown: &CancellationToken) -> Result<(), PublishError> {
        let limit = self.settings.scan_max_changes as usize;
        let mut cursor = self.cursor.load(Ordering::Relaxed);
        let mut in_flight: Option<Sent> = None;
        loop {
            // Recovery began meanwhile: what is sent is settled, the rest waits.
            if shutdown.is_cancelled() || self.hold.load(Ordering::Relaxed) {
                return self.finish_any(in_flight).await;
            }
            let previous = self.finish_any(in_flight.take());
            let (next, previous) = tokio::join!(self.scan_and_send(cursor), previous);
            // A failed previous pass leaves this one unacknowledged: resent, in order, later.
            previous?;
            let sent = next?;
            if sent.read == 0 {
                return Ok(());
            }
            cursor = sent.last_global_id;
            if matches!(sent.failure, Some(Failure::Paced)) {
                // Held back: settle what was sent, wait for the slow node (or a while), go on.
                self.finish(sent).await?;
                cursor = self.cursor.load(Ordering::Relaxed);
                if !self.wait_for_pace(shutdown).await {
                    return Ok(());
                }
                continue;
            }
            if sent.failure.is_some() || sent.read < limit {
                return self.finish(sent).await;
            }
            in_flight = Some(sent);
        }
    }

    async fn finish_any(&self, sent: Option<Sent>) -> Result<(), PublishError> {
        match sent {
            Some(sent) => self.finish(sent).await,
            None => Ok(()),
        }
    }

    /// A stream vanished: recreate the streams, forgetting acknowledged positions past a new end.
    async fn recreate_streams(&self, shutdown: &CancellationToken) {
        tracing::warn!("A shard stream is missing; recreating the streams from the configuration");
        if let Err(e) = stream::ensure_streams(&self.js, &self.settings, shutdown).await {
            tracing::error!(error = %crate::error_chain(&e), "Cannot recreate streams");
            return;
        }
        for shard in 1..=self.settings.replication.shards {
            let Ok(Some((_, last))) =
                stream::stream_range(&self.js, &self.settings.stream_name(shard)).await
            else {
                continue;
            };
            let mut acked = lock(&self.acked);
            if let Some(&a) = acked.get(&shard).filter(|&&a| a > last) {
                tracing::warn!(
                    shard,
                    acked_up_to = a,
                    "The lost stream held this node's changes up to that sequence: nodes that had not applied them lack them (compare tables)"
                );
                acked.insert(shard, 0);
            }
        }
    }
}
