//! The publisher: local change log → JetStream (design §3.1, §3.12, §4).
//!
//! A pass reads up to `scan_max_changes` pending changes in commit order, encodes each as a Go
//! event and publishes them all without waiting (pipelined). Passes overlap in two stages: while
//! pass N+1 is read and sent, pass N's acks are awaited. A pass is started by a file-change
//! notification, follow-up scans after it, the polling timer, or the retry timer after a failure.
//!
//! Acknowledged changes are not marked in the database one pass at a time: they go to an
//! in-memory [`Outbox`] that the keeper ([`keep`]) retires in one write transaction per cleanup
//! interval, together with the cleanup of old rows. Every commit of ours can make an application's
//! deferred read-then-write transaction fail with SQLITE_BUSY, so we commit rarely. A crash loses
//! only the outbox, and nothing is sent twice because of it: before sending anything after a
//! start or a failure, the publisher reads the message ids in the streams past the last retired
//! sequence ([`crate::stream::find_published`]) and treats the changes found there as sent.
//!
//! Invariants:
//! - A change is retired only after its PubAck (or after it was found in the stream), and only as
//!   part of an acknowledged prefix: on any publish error the rest stays pending, the read cursor
//!   goes back to the oldest unacknowledged change, and everything from there is sent again after
//!   a backoff, in the original order. Nothing is dropped while NATS is away.
//! - Each message carries `Nats-Msg-Id: <node_id>:<database identity>:<table>:<change id>:<created_at
//!   ms>`: unique per database even when two databases share a node id (cloned machines), and per
//!   capture even after `-cleanup` restarts change ids. Receivers use the identity to recognise
//!   their own events.
//! - A PubAck flagged `duplicate` for a message we had not sent before means another database
//!   publishes with our identity: it is logged as an error.
//! - With `publish = false` changes are captured and retired without being sent.
//! - A change too large for the server to ever accept is marked failed (`state = -1`) and logged,
//!   instead of blocking every later change forever.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use bytes::Bytes;
use rusqlite::Connection;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::config::Settings;
use crate::db::changelog::{ChangeLog, PendingChange, Retired, Retirement};
use crate::db::{self, Table};
use crate::health::HealthState;
use crate::metrics::Metrics;
use crate::stream;
use crate::wire::{self, ChangeEvent, PkColumn, ReplicationEvent};

/// The writing side of the local log: marking published, marking failed, cleanup. Shared with the
/// cleanup loop; always used from blocking threads.
pub struct LocalLog {
    pub conn: Connection,
    pub log: Arc<ChangeLog>,
}

/// A handle to the shared local log.
pub type SharedLog = Arc<Mutex<LocalLog>>;

/// Changes done with (acknowledged, failed for good, or orphaned) that the keeper has not yet
/// retired in the database.
pub type Outbox = Arc<Mutex<Retirement>>;

/// Changes found in the streams before sending: (table, change id) → (shard, stream sequence,
/// capture time).
type Found = HashMap<(usize, i64), (u64, u64, i64)>;

/// Per row (table, primary key), the newest of its pending changes found in the streams: (change
/// id, shard, stream sequence). An older pending change of the row that is not there must never be
/// sent: it would land after the newer one and every node would roll the row back to it. That
/// happens when a connection drops under a pipeline — the messages in the dying socket are lost
/// while the ones queued behind them go out after the reconnect.
type Newest = HashMap<(usize, crate::db::apply::Key), (i64, u64, u64)>;

/// What this publisher knows of where its sends landed, shared with the recovery. After a failed
/// pass, changes sent past the acknowledged prefix stay pending until a search of the streams
/// settles them; a restore must wait for that search and count what it found as landed: taken
/// for changes in flight, they would keep their rows over a snapshot that holds them already
/// (under newer values), for good.
#[derive(Clone)]
pub struct Unsettled {
    /// Set after a failure, cleared by a completed search.
    must_search: Arc<std::sync::atomic::AtomicBool>,
    /// The highest global id handed to NATS by this run.
    sent: Arc<AtomicI64>,
    /// Changes found in the stream by the last search, not to be sent again.
    found: Arc<Mutex<Found>>,
    /// Set when a call found the publisher held (no pass runs until the hold ends), cleared at
    /// the start of every call: a pass that began before the hold may still fail its acks.
    parked: Arc<std::sync::atomic::AtomicBool>,
}

impl Unsettled {
    /// Whether changes this run sent may have landed without this publisher knowing where.
    pub fn pending(&self) -> bool {
        self.must_search.load(Ordering::SeqCst) && self.sent.load(Ordering::SeqCst) > 0
    }

    /// Whether the publisher, held, has no pass running and knows where all it sent landed.
    pub fn settled(&self) -> bool {
        self.parked.load(Ordering::SeqCst) && !self.pending()
    }

    /// (table, change-log id, shard, sequence) of the changes the last search found.
    pub fn found(&self) -> Vec<(usize, i64, u64, u64)> {
        let found = self.found.lock().unwrap_or_else(|p| p.into_inner());
        found
            .iter()
            .map(|(&(t, id), &(shard, seq, _))| (t, id, shard, seq))
            .collect()
    }
}

/// How far this database has handed changes to NATS: file `<db>-harmonylite.sent`, holding the
/// database identity and the highest global change id of any send, written (then renamed into
/// place) before the send. After a crash, a pending change above it was never sent, so it is
/// certainly still in flight; only those at or below it that the streams no longer show have an
/// unknown fate (see [`crate::db::restore::NotKept`]). Outside the database on purpose: every
/// commit of ours can fail an application's deferred transaction.
pub struct SentMark {
    path: std::path::PathBuf,
    identity: String,
    written: AtomicI64,
    warned: std::sync::atomic::AtomicBool,
}

impl SentMark {
    /// `floor`: the highest global id that may have been sent before (what [`SentMark::read`]
    /// found, or what existed at start when there is no mark). The mark never goes below it: a
    /// crash after a send of older pending changes must not hide that newer ones went out in an
    /// earlier run.
    pub fn new(db_path: &std::path::Path, identity: &str, floor: i64) -> SentMark {
        SentMark {
            path: db::sent_mark_path(db_path),
            identity: identity.to_owned(),
            written: AtomicI64::new(floor),
            warned: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The highest global id recorded so far by this run.
    fn written(&self) -> i64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Records that changes up to global id `last` are about to be sent.
    fn advance(&self, last: i64) {
        if last <= self.written.load(Ordering::Relaxed) {
            return;
        }
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        let written = std::fs::write(&tmp, format!("{} {last}\n", self.identity))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        match written {
            Ok(()) => self.written.store(last, Ordering::Relaxed),
            Err(e) => {
                // Without it a crash only widens the set of changes of unknown fate.
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(path = %self.path.display(), error = %e, "Cannot record how far changes were sent");
                }
            }
        }
    }

    /// The highest global id the previous run of this database recorded as sent, if it left a
    /// readable mark.
    pub fn read(db_path: &std::path::Path, identity: &str) -> Option<i64> {
        let text = std::fs::read_to_string(db::sent_mark_path(db_path)).ok()?;
        let (who, last) = text.trim().split_once(' ')?;
        (who == identity).then(|| last.parse().ok()).flatten()
    }
}

/// How often a held publisher (see [`Publisher::run`]) looks again.
const HELD_POLL: Duration = Duration::from_millis(250);

/// How many changes the sent mark is moved ahead of the send at a time.
const MARK_AHEAD: usize = 64;

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

/// What to tell the operator when a change can never be published.
const MAX_PAYLOAD_HINT: &str =
    "the change exceeds the server's max_payload; raise max_payload in the nats-server config";

/// Per-table data the publisher needs for every row.
struct TableMeta {
    /// Primary-key column indexes.
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

/// Why sending stopped inside a pass.
enum Failure {
    Nats(PublishError),
    /// Index of a change the server can never accept.
    TooLarge(usize),
    /// Index of the first change held back by flow control (sent later, in order).
    Paced,
}

/// One pass that has been sent and not yet acknowledged.
struct Sent {
    changes: Vec<PendingChange>,
    /// Per change: where it already is, when it was found in the stream (not sent again).
    landed: Vec<Option<(u64, u64)>>,
    /// Per change: its shard.
    shards: Vec<u64>,
    orphans: Vec<i64>,
    /// Ack futures for the changes of `changes[..acks.len()]` that were sent (`None`: found in
    /// the stream, nothing to wait for).
    acks: Vec<Option<PublishAckFuture>>,
    failure: Option<Failure>,
    /// Rows read by the scan (changes and orphans).
    read: usize,
    /// Highest global id read.
    last_global_id: i64,
}

/// Publishes local changes.
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
    /// Per shard: the sequence of the newest acknowledged change (where a search for changes
    /// already in the stream starts after a failure).
    acked: Mutex<HashMap<u64, u64>>,
    /// What the last search found, by row: older changes of those rows are not sent.
    newest: Mutex<Newest>,
    /// Whether the streams must be searched before the next send (at start, after a failure),
    /// and how far this run has sent.
    unsettled: Unsettled,
    duplicates: AtomicU64,
    /// When this publisher was made (unix ms): a change captured before may have been sent by
    /// the previous run, so a duplicate ack for it is expected.
    started_ms: i64,
    /// Highest global id recorded in the sent mark (see [`SentMark`]).
    sent_mark: SentMark,
    /// Flow control and what it needs: per shard, this node's applied position and the
    /// estimated sequence of the last message sent.
    pacing: Option<Pacing>,
    /// Set while this node recovers from a snapshot: its changes wait (see
    /// [`super::catchup`]).
    hold: Arc<std::sync::atomic::AtomicBool>,
}

/// What the publisher needs to pace itself (see [`super::flow`]).
pub struct Pacing {
    pub flow: Arc<super::flow::Flow>,
    /// Per shard (index shard − 1): this node's last applied sequence.
    pub applied: Arc<[AtomicU64]>,
    /// Per shard: messages sent whose ack has not been awaited yet. The stream's end is
    /// estimated as what is known for sure (acks, this node's position) plus these: an ack
    /// flagged duplicate added nothing to the stream, and an estimate that counted every send
    /// stayed too high for good after one, holding publishing back forever.
    unacked: Vec<AtomicU64>,
    /// Since when publishing has been held back (for one log line per episode).
    held_since: Mutex<Option<Instant>>,
}

impl Pacing {
    pub fn new(flow: Arc<super::flow::Flow>, applied: Arc<[AtomicU64]>) -> Pacing {
        let unacked = applied.iter().map(|_| AtomicU64::new(0)).collect();
        Pacing {
            flow,
            applied,
            unacked,
            held_since: Mutex::new(None),
        }
    }
}

impl Publisher {
    /// Builds a publisher that reads through `reader` (`writer` gives it the change log); what it
    /// is done with goes to `outbox`. `acked` is, per shard, the sequence of the
    /// last change retired as published (where the first search starts); `sent_floor` is the
    /// sent mark's floor (see [`SentMark::new`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        writer: SharedLog,
        reader: Connection,
        js: jetstream::Context,
        settings: Arc<Settings>,
        schema_hash: String,
        identity: String,
        outbox: Outbox,
        acked: HashMap<u64, u64>,
        metrics: Arc<Metrics>,
        health: Arc<HealthState>,
        pacing: Option<Pacing>,
        hold: Arc<std::sync::atomic::AtomicBool>,
        sent_floor: i64,
    ) -> Publisher {
        let log = Arc::clone(&writer.lock().unwrap_or_else(|p| p.into_inner()).log);
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
        let sent_mark = SentMark::new(&settings.db_path, &identity, sent_floor);
        Publisher {
            sent_mark,
            reader: Arc::new(Mutex::new(reader)),
            log,
            js,
            settings,
            schema_hash,
            meta,
            compressor: Mutex::new(None),
            metrics,
            health,
            identity,
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

    fn tables(&self) -> &[Table] {
        self.log.tables()
    }

    /// A handle on what this publisher has sent without knowing where it landed.
    pub fn unsettled(&self) -> Unsettled {
        self.unsettled.clone()
    }

    /// Runs until shutdown: a pass on every wake-up, follow-up, poll tick, or retry deadline.
    ///
    /// # Errors
    /// Only when publishing cannot go on (see [`PublishError::is_fatal`]).
    pub async fn run(
        self,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
    ) -> Result<(), PublishError> {
        // A safety-net scan even without polling_interval: cheap (one indexed read) and it bounds
        // the delay if a file notification is ever missed.
        let idle = self
            .settings
            .polling_interval
            .unwrap_or(Duration::from_secs(1));
        let mut retry = Duration::from_millis(100);
        let mut failing = false;
        let mut followups: &[Duration] = &[];
        loop {
            let wait = match self.publish_pending(&shutdown).await {
                Ok(()) => {
                    if failing {
                        tracing::info!("Publishing resumed");
                    }
                    failing = false;
                    retry = Duration::from_millis(100);
                    match followups.split_first() {
                        Some((next, rest)) => {
                            followups = rest;
                            *next
                        }
                        None => idle,
                    }
                }
                Err(e) => {
                    if e.is_fatal() {
                        tracing::error!(error = %crate::error_chain(&e), "Publishing cannot go on");
                        return Err(e);
                    }
                    if matches!(
                        e,
                        PublishError::Nats {
                            stream_missing: true,
                            ..
                        }
                    ) {
                        self.recreate_streams(&shutdown).await;
                    }
                    if failing {
                        tracing::debug!(error = %crate::error_chain(&e), "publish retry failed");
                    } else {
                        tracing::error!(error = %crate::error_chain(&e), "Unable to publish changes; they stay pending and will be retried");
                    }
                    failing = true;
                    let w = retry;
                    retry = stream::next_backoff(retry);
                    w
                }
            };
            // While held (a restore runs), file notifications are ignored: the restore's own
            // writes would wake us thousands of times a second for a count nobody needs that
            // often, competing with the restore for the CPU and the database.
            let held = self.hold.load(Ordering::Relaxed);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = wake.notified(), if !failing && !held => followups = FOLLOW_UP_SCANS,
                _ = tokio::time::sleep(if held { HELD_POLL.min(wait) } else { wait }) => {}
            }
        }
        // Changes committed before the stop request still go out (bounded: with NATS away they
        // stay pending for the next start).
        if !failing {
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
        tracing::debug!("publisher stopped");
        Ok(())
    }

    /// Publishes everything pending, pass after pass, until the log is drained.
    ///
    /// # Errors
    /// The first failure; everything from the failing change on stays pending.
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
        let (reader, log) = (Arc::clone(&self.reader), Arc::clone(&self.log));
        let started = Instant::now();
        let after = self.cursor.load(Ordering::Relaxed);
        let counted = tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
            log.pending_count(&conn, after)
        })
        .await;
        self.metrics
            .count_changes
            .observe(started.elapsed().as_micros() as f64);
        if let Ok(Ok(n)) = counted {
            self.metrics.pending_publish.set(n);
            self.health
                .pending
                .store(n, std::sync::atomic::Ordering::Relaxed);
        }
    }

    async fn publish_all(&self, shutdown: &CancellationToken) -> Result<(), PublishError> {
        let limit = self.settings.scan_max_changes as usize;
        let mut cursor = self.cursor.load(Ordering::Relaxed);
        let mut in_flight: Option<Sent> = None;
        loop {
            // Recovery began meanwhile: what is sent is settled, the rest waits.
            if shutdown.is_cancelled() || self.hold.load(Ordering::Relaxed) {
                return match in_flight {
                    Some(prev) => self.finish(prev).await,
                    None => Ok(()),
                };
            }
            let previous = async {
                match in_flight.take() {
                    Some(prev) => self.finish(prev).await,
                    None => Ok(()),
                }
            };
            let (next, previous) = tokio::join!(self.scan_and_send(cursor), previous);
            // If the previous pass failed, the one just sent is not acknowledged: it is sent
            // again later, in order, after a search of the stream for what already arrived.
            previous?;
            let sent = next?;
            if sent.read == 0 {
                return Ok(());
            }
            cursor = sent.last_global_id;
            if matches!(sent.failure, Some(Failure::Paced)) {
                // Held back: settle what was sent, wait for the slow node to report progress
                // (or a short while), and go on from the first change not sent.
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

    /// Waits until a position report arrives or a short while passed; false on shutdown.
    async fn wait_for_pace(&self, shutdown: &CancellationToken) -> bool {
        let Some(p) = &self.pacing else {
            return !shutdown.is_cancelled();
        };
        self.metrics.publish_paced.inc();
        {
            let mut since = p.held_since.lock().unwrap_or_else(|e| e.into_inner());
            match *since {
                None => *since = Some(Instant::now()),
                Some(t) if t.elapsed() >= Duration::from_secs(2) => {
                    let ends = self.stream_ends();
                    let slow: Vec<String> = p
                        .flow
                        .view(&ends)
                        .into_iter()
                        .filter(|v| v.counted)
                        .map(|v| format!("{} at {:?}", v.node_id, v.positions))
                        .collect();
                    tracing::info!(streams_end = ?ends, peers = ?slow,
                        "Publishing is paced to the slowest live node (the stream would otherwise discard changes it has not read)");
                    *since = Some(Instant::now() + Duration::from_secs(28));
                }
                Some(_) => {}
            }
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => false,
            _ = p.flow.changed.notified() => true,
            _ = tokio::time::sleep(Duration::from_millis(50)) => true,
        }
    }

    /// Per shard: the stream's end as far as this node knows.
    fn stream_ends(&self) -> Vec<u64> {
        let Some(p) = &self.pacing else {
            return Vec::new();
        };
        let acked = self.acked.lock().unwrap_or_else(|e| e.into_inner());
        (0..p.unacked.len())
            .map(|i| {
                let shard = i as u64 + 1;
                acked
                    .get(&shard)
                    .copied()
                    .unwrap_or(0)
                    .max(p.applied[i].load(Ordering::Relaxed))
                    + p.unacked[i].load(Ordering::Relaxed)
            })
            .collect()
    }

    /// Whether flow control lets a message go to `shard` now; if so, counts it as sent.
    fn may_send(&self, shard: u64) -> bool {
        let Some(p) = &self.pacing else {
            return true;
        };
        let i = shard as usize - 1;
        let Some(end) = self.stream_ends().get(i).copied() else {
            return true;
        };
        if !p.flow.allows(i, end + 1, end) {
            return false;
        }
        p.unacked[i].fetch_add(1, Ordering::Relaxed);
        *p.held_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
        true
    }

    /// One awaited ack: no longer counted as unacknowledged for flow control.
    fn acked_one<T>(&self, shard: u64, ack: T) -> T {
        if let Some(p) = &self.pacing
            && let Some(n) = p.unacked.get(shard as usize - 1)
        {
            let _ = n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
        }
        ack
    }

    /// Looks in every shard stream, past the newest acknowledged sequence, for messages this
    /// database sent whose changes are still pending (a crash or a lost ack between the stream
    /// storing them and us hearing of it). Those are not sent again: sending them after
    /// JetStream's duplicate window (2 minutes) would replay old changes over newer ones.
    async fn search(&self) -> Result<(), PublishError> {
        let (reader, log) = (Arc::clone(&self.reader), Arc::clone(&self.log));
        let pending = tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
            log.pending_ids(&conn)
        })
        .await
        .map_err(|e| PublishError::Join(e.to_string()))??;
        let mut found: Found = HashMap::new();
        if !pending.is_empty() {
            let acked = self.acked.lock().unwrap_or_else(|p| p.into_inner()).clone();
            for shard in 1..=self.settings.replication.shards {
                let from = acked.get(&shard).copied().unwrap_or(0) + 1;
                let ids = stream::find_published(
                    &self.js,
                    &self.settings.stream_name(shard),
                    &self.settings.subject_name(shard),
                    from,
                    &format!("{}:{}:", self.settings.node_id, self.identity),
                )
                .await
                .map_err(PublishError::Find)?;
                for (msg_id, seq) in ids {
                    // <node>:<identity>:<table>:<change id>:<created_at>; tables may hold ':'.
                    let mut parts = msg_id.rsplitn(3, ':');
                    let (Some(created), Some(id), Some(rest)) =
                        (parts.next(), parts.next(), parts.next())
                    else {
                        continue;
                    };
                    let Some(table_name) = rest.splitn(3, ':').nth(2) else {
                        continue;
                    };
                    let (Ok(created), Ok(id)) = (created.parse::<i64>(), id.parse::<i64>()) else {
                        continue;
                    };
                    if let Some(t) = self.log.table_index(table_name)
                        && pending.contains_key(&(t, id))
                    {
                        found.insert((t, id), (shard, seq, created));
                    }
                }
            }
        }
        let mut newest = Newest::new();
        if !found.is_empty() {
            tracing::info!(
                changes = found.len(),
                "Pending changes already in the stream (sent before a crash or a lost ack); not sending them again"
            );
            let mut by_table: HashMap<usize, Vec<(i64, u64, u64)>> = HashMap::new();
            for (&(t, id), &(shard, seq, _)) in &found {
                by_table.entry(t).or_default().push((id, shard, seq));
            }
            let (reader, log) = (Arc::clone(&self.reader), Arc::clone(&self.log));
            newest = tokio::task::spawn_blocking(move || -> Result<Newest, db::Error> {
                let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
                let mut newest = Newest::new();
                for (t, changes) in by_table {
                    let ids: Vec<i64> = changes.iter().map(|c| c.0).collect();
                    let at: HashMap<i64, (u64, u64)> = changes
                        .iter()
                        .map(|&(id, sh, seq)| (id, (sh, seq)))
                        .collect();
                    for (id, key) in log.keys_of(&conn, t, &ids)? {
                        let Some(&(shard, seq)) = at.get(&id) else {
                            continue;
                        };
                        let slot = newest
                            .entry((t, crate::db::apply::Key::of(&key)))
                            .or_insert((id, shard, seq));
                        if id > slot.0 {
                            *slot = (id, shard, seq);
                        }
                    }
                }
                Ok(newest)
            })
            .await
            .map_err(|e| PublishError::Join(e.to_string()))??;
        }
        *self
            .unsettled
            .found
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = found;
        *self.newest.lock().unwrap_or_else(|p| p.into_inner()) = newest;
        self.unsettled.must_search.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// At start, before anything is applied: finds pending changes that already reached the
    /// streams (a crash between the ack and their retirement) and retires them at once with where
    /// they landed, so that the applier knows which of them have come back.
    ///
    /// # Errors
    /// NATS or database errors (the caller stops: start-up cannot go on safely without it).
    pub async fn recover(&self, writer: &SharedLog) -> Result<usize, PublishError> {
        if !self.settings.publish {
            return Ok(0);
        }
        self.search().await?;
        let found = std::mem::take(
            &mut *self
                .unsettled
                .found
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        if found.is_empty() {
            return Ok(0);
        }
        let (writer, log) = (Arc::clone(writer), Arc::clone(&self.log));
        let retired = tokio::task::spawn_blocking(move || -> Result<usize, db::Error> {
            let mut guard = writer.lock().unwrap_or_else(|p| p.into_inner());
            let LocalLog { conn, .. } = &mut *guard;
            let pending = log.pending_ids(conn)?;
            let mut batch = Retirement::default();
            for ((t, log_id), (shard, seq, created)) in found {
                let Some(&global_id) = pending.get(&(t, log_id)) else {
                    continue;
                };
                if log.created_at(conn, t, log_id)? != Some(created) {
                    continue; // same id, another capture (the change log was recreated)
                }
                batch.published.push(Retired {
                    global_id,
                    table: t,
                    log_id,
                    landed: Some((shard, seq)),
                });
            }
            log.retire(conn, &batch)?;
            Ok(batch.published.len())
        })
        .await
        .map_err(|e| PublishError::Join(e.to_string()))??;
        Ok(retired)
    }

    /// Reads the next pass after `cursor` and sends it.
    async fn scan_and_send(&self, cursor: i64) -> Result<Sent, PublishError> {
        let started = Instant::now();
        let (reader, log) = (Arc::clone(&self.reader), Arc::clone(&self.log));
        let limit = self.settings.scan_max_changes;
        let scan = tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
            log.scan(&conn, cursor, limit)
        })
        .await
        .map_err(|e| PublishError::Join(e.to_string()))??;
        let scanned = started.elapsed();
        self.metrics
            .scan_changes
            .observe(scanned.as_micros() as f64);
        if scan.schema_changed {
            tracing::debug!("schema changed; publishing waits for capture to be confirmed");
        }
        for (id, why) in &scan.orphans {
            tracing::warn!(global_id = id, reason = %why, "Dropping change-log entry that cannot be published");
        }
        let last_global_id = scan
            .changes
            .iter()
            .map(|c| c.global_id)
            .chain(scan.orphans.iter().map(|o| o.0))
            .max()
            .unwrap_or(cursor);
        let read = scan.changes.len() + scan.orphans.len();
        if !scan.changes.is_empty() {
            self.health.pulse();
        }
        let orphans = scan.orphans.into_iter().map(|o| o.0).collect();
        let changes = scan.changes;
        let shards: Vec<u64> = changes.iter().map(|c| self.shard_of(c)).collect();
        let mut superseded = 0usize;
        let landed: Vec<Option<(u64, u64)>> = {
            let found = self
                .unsettled
                .found
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let newest = self.newest.lock().unwrap_or_else(|p| p.into_inner());
            changes
                .iter()
                .map(|c| {
                    let here = found
                        .get(&(c.table, c.log_id))
                        .filter(|(_, _, created)| *created == c.created_at)
                        .map(|&(shard, seq, _)| (shard, seq));
                    if here.is_some() || newest.is_empty() {
                        return here;
                    }
                    // A newer change of this row is in the stream: this one is done with, and
                    // counts as having landed where that one did.
                    let key = crate::db::apply::Key::of(
                        self.meta[c.table].pks.iter().map(|&i| &c.values[i]),
                    );
                    let later = newest
                        .get(&(c.table, key))
                        .filter(|(id, _, _)| *id > c.log_id)
                        .map(|&(_, shard, seq)| (shard, seq));
                    superseded += usize::from(later.is_some());
                    later
                })
                .collect()
        };
        if superseded > 0 {
            tracing::info!(
                changes = superseded,
                "Pending changes superseded by newer changes of the same rows already in the stream; not sending them"
            );
        }
        let (acks, failure) = if self.settings.publish {
            self.send(&changes, &shards, &landed).await
        } else {
            (Vec::new(), None)
        };
        if read > 0 {
            tracing::debug!(
                rows = read,
                scan_us = scanned.as_micros() as u64,
                send_us = (started.elapsed() - scanned).as_micros() as u64,
                "publish pass sent"
            );
        }
        Ok(Sent {
            changes,
            landed,
            shards,
            orphans,
            acks,
            failure,
            read,
            last_global_id,
        })
    }

    /// Awaits a pass's acks in order and hands the acknowledged prefix to the outbox.
    async fn finish(&self, sent: Sent) -> Result<(), PublishError> {
        let Sent {
            changes,
            landed,
            shards,
            orphans,
            acks,
            mut failure,
            last_global_id,
            ..
        } = sent;
        let mut retired: Vec<Retired> = Vec::with_capacity(changes.len());
        let done = if self.settings.publish {
            // Highest acknowledged sequence per stream, recorded once per pass.
            let mut highest: Vec<(u64, u64)> = Vec::new();
            for (i, ack) in acks.into_iter().enumerate() {
                let at = match ack {
                    None => landed[i],
                    Some(ack) => match self.acked_one(shards[i], ack.await) {
                        Ok(ack) => {
                            if ack.duplicate {
                                self.duplicate(&changes[i]);
                            }
                            Some((shards[i], ack.sequence))
                        }
                        Err(e) => {
                            // Later acks may have succeeded, but only a prefix is retired: the
                            // rest is sent again after a search of the stream.
                            failure = Some(self.nats_failure(
                                &changes[i],
                                e.to_string(),
                                matches!(e.kind(), PublishErrorKind::StreamNotFound),
                            ));
                            break;
                        }
                    },
                };
                if let Some((shard, seq)) = at {
                    match highest.iter_mut().find(|(s, _)| *s == shard) {
                        Some(entry) => entry.1 = entry.1.max(seq),
                        None => highest.push((shard, seq)),
                    }
                }
                let c = &changes[i];
                retired.push(Retired {
                    global_id: c.global_id,
                    table: c.table,
                    log_id: c.log_id,
                    landed: at,
                });
            }
            let mut acked = self.acked.lock().unwrap_or_else(|p| p.into_inner());
            for (shard, sequence) in &highest {
                let slot = acked.entry(*shard).or_insert(0);
                *slot = (*slot).max(*sequence);
                self.metrics
                    .last_published_sequence
                    .with_label_values(&[shard.to_string().as_str()])
                    .set(*sequence as i64);
            }
            retired.len()
        } else {
            retired.extend(changes.iter().map(|c| Retired {
                global_id: c.global_id,
                table: c.table,
                log_id: c.log_id,
                landed: None,
            }));
            changes.len()
        };
        let oversize = match &failure {
            Some(Failure::TooLarge(i)) if *i == done => Some(changes[*i].clone()),
            _ => None,
        };
        if done > 0 {
            self.metrics.published.inc_by(done as u64);
            if self.settings.publish {
                self.health.published_now();
            }
        }
        // Everything below the first change not done with is done with.
        let stop = match (&failure, &oversize) {
            (None, _) => None,
            (Some(Failure::Paced), _) => changes.get(done).map(|c| c.global_id),
            (Some(_), Some(_)) => changes.get(done + 1).map(|c| c.global_id),
            (Some(_), None) => changes.get(done).map(|c| c.global_id),
        };
        let new_cursor = match stop {
            None => last_global_id,
            Some(g) => g - 1,
        };
        {
            let mut outbox = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
            outbox.published.extend(retired);
            outbox
                .orphans
                .extend(orphans.iter().copied().filter(|&o| o <= new_cursor));
            if let Some(c) = &oversize {
                outbox.failed.push(Retired {
                    global_id: c.global_id,
                    table: c.table,
                    log_id: c.log_id,
                    landed: None,
                });
            }
        }
        self.cursor.store(new_cursor, Ordering::Relaxed);
        match failure {
            Some(Failure::Nats(e)) => Err(e),
            Some(Failure::TooLarge(i)) => {
                let c = &changes[i];
                tracing::error!(table = %self.tables()[c.table].name, id = c.log_id,
                    "{MAX_PAYLOAD_HINT}; the change is marked failed (state = -1) and will not replicate");
                Ok(())
            }
            Some(Failure::Paced) | None => Ok(()),
        }
    }

    /// A PubAck said "duplicate" for a change we had not sent before: another database uses our
    /// node id and identity (a copied database file), or a resend went unnoticed.
    fn duplicate(&self, c: &PendingChange) {
        if c.created_at < self.started_ms {
            tracing::debug!(table = %self.tables()[c.table].name, id = c.log_id,
                "change captured before this start was already in the stream (sent by the previous run)");
            return;
        }
        let n = self.duplicates.fetch_add(1, Ordering::Relaxed);
        if n == 0 || (n + 1).is_power_of_two() {
            tracing::error!(table = %self.tables()[c.table].name, id = c.log_id, count = n + 1,
                "JetStream reports this change as a duplicate of a message already stored: another node \
                 publishes with this node's id and database identity (a copied database file?). Give each \
                 node its own node_id and database");
        }
    }

    /// The shard a change is routed to.
    fn shard_of(&self, c: &PendingChange) -> u64 {
        let table = &self.tables()[c.table];
        let meta = &self.meta[c.table];
        let mut pks: Vec<PkColumn<'_>> = meta
            .pks
            .iter()
            .map(|&i| PkColumn {
                name: &table.columns[i].name,
                decl_type: &meta.decl_lower[i],
                value: &c.values[i],
            })
            .collect();
        wire::shard_for(
            wire::shard_hash(&table.name, &mut pks),
            self.settings.replication.shards,
        )
    }

    /// Encodes one change for `shard`: (body, subject, message id).
    fn encode(&self, c: &PendingChange, shard: u64) -> Result<(Bytes, String, String), String> {
        let table = &self.tables()[c.table];
        let row = table
            .columns
            .iter()
            .zip(&c.values)
            .map(|(col, v)| (col.name.clone(), v.clone()))
            .collect();
        let event = ReplicationEvent {
            from_node_id: self.settings.node_id,
            event: ChangeEvent {
                id: c.log_id,
                op: c.op,
                table: table.name.clone(),
                row,
                schema_hash: self.schema_hash.clone(),
            },
        };
        let msg_id = format!(
            "{}:{}:{}:{}:{}",
            self.settings.node_id, self.identity, table.name, c.log_id, c.created_at
        );
        let body = event.encode();
        let body = if self.settings.replication.compress {
            let mut slot = self.compressor.lock().unwrap_or_else(|p| p.into_inner());
            let compressor = match slot.as_mut() {
                Some(c) => c,
                None => {
                    slot.insert(wire::Compressor::new().map_err(|e| format!("zstd context: {e}"))?)
                }
            };
            compressor
                .compress(&body)
                .map_err(|e| format!("zstd compression failed: {e}"))?
        } else {
            body
        };
        Ok((Bytes::from(body), self.settings.subject_name(shard), msg_id))
    }

    /// Sends `changes` in order without waiting for acks (changes already found in the stream
    /// are not sent); stops at the first that cannot be sent.
    async fn send(
        &self,
        changes: &[PendingChange],
        shards: &[u64],
        landed: &[Option<(u64, u64)>],
    ) -> (Vec<Option<PublishAckFuture>>, Option<Failure>) {
        let mut acks = Vec::with_capacity(changes.len());
        for (i, c) in changes.iter().enumerate() {
            if landed[i].is_some() {
                acks.push(None);
                continue;
            }
            if !self.may_send(shards[i]) {
                return (acks, Some(Failure::Paced));
            }
            if c.global_id > self.sent_mark.written() {
                // Ahead of the sends by at most MARK_AHEAD changes (one small write per group).
                let ahead = changes[i..].iter().take(MARK_AHEAD).map(|c| c.global_id);
                self.sent_mark.advance(ahead.max().unwrap_or(c.global_id));
            }
            let (body, subject, msg_id) = match self.encode(c, shards[i]) {
                Ok(encoded) => encoded,
                Err(message) => return (acks, Some(self.nats_failure(c, message, false))),
            };
            self.unsettled.sent.fetch_max(c.global_id, Ordering::SeqCst);
            let publish = jetstream::message::PublishMessage::build()
                .payload(body)
                .message_id(msg_id);
            match self.js.send_publish(subject, publish).await {
                Ok(ack) => acks.push(Some(ack)),
                Err(e) if matches!(e.kind(), PublishErrorKind::MaxPayloadExceeded) => {
                    return (acks, Some(Failure::TooLarge(i)));
                }
                Err(e) => {
                    let missing = matches!(e.kind(), PublishErrorKind::StreamNotFound);
                    return (acks, Some(self.nats_failure(c, e.to_string(), missing)));
                }
            }
        }
        (acks, None)
    }

    fn nats_failure(&self, c: &PendingChange, message: String, stream_missing: bool) -> Failure {
        Failure::Nats(PublishError::Nats {
            table: self.tables()[c.table].name.clone(),
            id: c.log_id,
            message,
            stream_missing,
        })
    }

    /// A stream vanished (JetStream store wiped or the stream deleted): recreate the streams,
    /// and forget acknowledged positions past the end of a recreated one.
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
            let mut acked = self.acked.lock().unwrap_or_else(|p| p.into_inner());
            if acked.get(&shard).is_some_and(|&a| a > last) {
                acked.insert(shard, 0);
            }
        }
    }
}

/// How long one housekeeping attempt waits for application read transactions to end.
const QUIET_WAIT: Duration = Duration::from_millis(250);
/// How long the application must have been out of any read transaction before we commit: a
/// pause in its work, so that it is unlikely to begin one during our short commit.
const QUIET_SUSTAIN: Duration = Duration::from_millis(20);
/// How soon an attempt that found no quiet moment is tried again.
const QUIET_RETRY: Duration = Duration::from_millis(100);
/// Housekeeping is forced (committed even while an application transaction is open) when it
/// has not succeeded for this long...
const FORCE_AFTER: Duration = Duration::from_secs(60);
/// ... or when this many changes wait to be retired (bounds memory).
const FORCE_BACKLOG: usize = 100_000;

/// Retires what the publisher is done with and deletes old change-log rows, in one write
/// transaction every `cleanup_interval` (and once more on shutdown). `positions` (per shard, the
/// last applied sequence) is given when this node applies its own events: rows are then kept
/// until their event has come back.
///
/// Every commit of ours makes an application's deferred transaction that has read and not yet
/// written fail with SQLITE_BUSY — and so does every such transaction that tries to write while
/// ours holds the write lock, committed or not. So the keeper writes only at a quiet moment: no
/// other process in a read transaction before it starts, and none beginning while it runs (it
/// looks every few statements, rolls back at once and tries again shortly). Only when no quiet moment came for [`FORCE_AFTER`], or
/// [`FORCE_BACKLOG`] changes wait, does it commit regardless.
///
/// # Errors
/// Only a fatal database error (disk full, read-only, corrupt, I/O): the node must stop.
pub async fn keep(
    log: SharedLog,
    outbox: Outbox,
    settings: Arc<Settings>,
    positions: Option<Arc<[AtomicU64]>>,
    shutdown: CancellationToken,
) -> Result<(), db::Error> {
    let period = settings.cleanup_interval;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    let probe = Arc::new(db::ReaderProbe::open(&settings.db_path));
    let mut last_done = Instant::now();
    let mut overdue = false;
    loop {
        let stopping = tokio::select! {
            biased;
            _ = shutdown.cancelled() => true,
            _ = tick.tick() => false,
            _ = tokio::time::sleep(QUIET_RETRY), if overdue => false,
        };
        // A copy: the batch stays in the outbox until it is committed, because a restore
        // prepared meanwhile reads the outbox to know which of our changes have landed (taken
        // out while waiting for a quiet moment, they would look pending, and the restore would
        // keep their rows over the snapshot's newer values).
        let batch = outbox.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let force = stopping || last_done.elapsed() >= FORCE_AFTER || batch.len() >= FORCE_BACKLOG;
        if force && !stopping {
            // The one commit of ours that may fail an application transaction: worth a line.
            tracing::debug!(
                since_ms = last_done.elapsed().as_millis() as u64,
                waiting = batch.len(),
                "change-log cleanup found no quiet moment; committing regardless"
            );
        }
        let horizon = crate::clock::unix_ms() - period.as_millis() as i64;
        let applied: Option<Vec<u64>> = positions
            .as_ref()
            .map(|p| p.iter().map(|a| a.load(Ordering::Relaxed)).collect());
        let shared = Arc::clone(&log);
        let quiet = Arc::clone(&probe);
        let result = tokio::task::spawn_blocking(move || {
            let mut guard = shared.lock().unwrap_or_else(|p| p.into_inner());
            let LocalLog { conn, log } = &mut *guard;
            let probe = quiet.as_deref();
            if !force && !probe.is_none_or(|p| p.wait_quiet_for(QUIET_SUSTAIN, QUIET_WAIT)) {
                return (batch, Ok(None));
            }
            // Asked throughout the transaction: an application reader that appears while it
            // runs makes it roll back at once (see `ChangeLog::housekeep`).
            let undisturbed = || force || probe.is_none_or(|p| !p.others_reading());
            let outcome = log.housekeep(conn, &batch, horizon, applied.as_deref(), &undisturbed);
            (batch, outcome)
        })
        .await;
        let result = match result {
            Ok((_, Ok(None))) => {
                // No quiet moment: the batch stays in the outbox; try again shortly.
                overdue = true;
                continue;
            }
            Ok((batch, Ok(Some(count)))) => {
                outbox
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove_front(&batch);
                last_done = Instant::now();
                overdue = false;
                Ok((batch, Ok(count)))
            }
            Ok((batch, Err(e))) => Ok((batch, Err(e))),
            Err(e) => Err(e),
        };
        match result {
            Ok((_, Ok(count))) => {
                if failing {
                    tracing::info!("Change-log cleanup works again");
                }
                failing = false;
                if count > 0 {
                    tracing::debug!(count, "Cleaned up DB change logs");
                }
            }
            Ok((_, Err(e))) => {
                // The batch stays in the outbox (and pending in the database, so nothing is lost
                // even if this never succeeds; a restart finds those changes in the stream).
                if e.is_fatal() {
                    return Err(e);
                }
                if e.is_busy() && last_done.elapsed() < FORCE_AFTER {
                    // Another transaction held the lock (a snapshot restore can take seconds):
                    // the next attempt comes soon enough. Still locked after a minute: warn.
                    tracing::debug!(error = %crate::error_chain(&e), "change-log cleanup waited too long for the lock; retrying");
                } else {
                    if !failing {
                        tracing::warn!(error = %crate::error_chain(&e), "Unable to cleanup change logs");
                    }
                    failing = true;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cleanup task failed"),
        }
        if stopping {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SentMark;

    #[test]
    fn sent_mark_round_trips_and_belongs_to_one_database() {
        let dir = tempfile::tempdir().expect("dir");
        let db = dir.path().join("app.db");
        assert_eq!(SentMark::read(&db, "abc"), None, "no mark yet");
        let mark = SentMark::new(&db, "abc", 10);
        mark.advance(9);
        assert_eq!(
            SentMark::read(&db, "abc"),
            None,
            "at or below the floor: no write"
        );
        mark.advance(41);
        mark.advance(7); // never goes back
        assert_eq!(SentMark::read(&db, "abc"), Some(41));
        assert_eq!(
            SentMark::read(&db, "other"),
            None,
            "another identity's mark"
        );
        std::fs::write(crate::db::sent_mark_path(&db), "abc garbage").expect("write");
        assert_eq!(SentMark::read(&db, "abc"), None, "unreadable: unknown");
    }
}
