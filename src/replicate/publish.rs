//! The publisher: local change log → JetStream (design §3.1, §4).
//!
//! A pass reads up to `scan_max_changes` pending changes in commit order, encodes each as a Go
//! event and publishes them all without waiting (pipelined). Passes overlap in two stages: while
//! pass N+1 is read and sent, pass N's acks are awaited and its acknowledged prefix is marked
//! published. Reading uses its own connection, so a mark that waits for the write lock (a WAL
//! checkpoint, the applier's commit) does not stall sending. A pass is started by a file-change
//! notification, follow-up scans after it, the polling timer, or the retry timer after a failure.
//!
//! Invariants:
//! - A change is marked published only after its PubAck, and only as part of an acknowledged
//!   prefix: on any publish error the rest stays pending, the read cursor goes back to the oldest
//!   pending change, and everything from there is sent again after a backoff. Nothing is dropped
//!   while NATS is away; messages are sent again in their original order.
//! - Each message carries `Nats-Msg-Id: <node_id>:<table>:<change-log id>:<created_at ms>`, so
//!   sending again (after a crash between ack and mark, or a retry) does not duplicate within
//!   JetStream's dedup window. The capture time is part of the id because change-log ids restart
//!   from 1 after `-cleanup` or a dropped change log, and a bare id could then be deduplicated
//!   against an older, different change.
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

use crate::config::Settings;
use crate::db::changelog::{ChangeLog, PendingChange};
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

/// Extra scans after a file notification. inotify reports the WAL write, but a commit becomes
/// visible to readers only after SQLite updates the wal-index in `-shm`, through mmap, which
/// inotify cannot see; a scan racing that gap finds nothing, so look again shortly after.
const FOLLOW_UP_SCANS: &[Duration] = &[
    Duration::from_millis(1),
    Duration::from_millis(5),
    Duration::from_millis(25),
    Duration::from_millis(100),
];

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
    #[error("database: {0}")]
    Db(#[from] db::Error),
    #[error("publish of {table} change {id} failed: {message}")]
    Nats {
        table: String,
        id: i64,
        message: String,
    },
    #[error("database worker failed: {0}")]
    Join(String),
}

/// Why sending stopped inside a pass.
enum Failure {
    Nats(PublishError),
    /// Index of a change the server can never accept.
    TooLarge(usize),
}

/// One pass that has been sent and not yet marked.
struct Sent {
    changes: Vec<PendingChange>,
    orphans: Vec<i64>,
    /// Ack futures for `changes[..acks.len()]`.
    acks: Vec<PublishAckFuture>,
    failure: Option<Failure>,
    /// Rows read by the scan (changes and orphans).
    read: usize,
    /// Highest global id read.
    last_global_id: i64,
}

/// Publishes local changes.
pub struct Publisher {
    writer: SharedLog,
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
}

impl Publisher {
    /// Builds a publisher that reads through `reader` and marks through `writer`.
    pub fn new(
        writer: SharedLog,
        reader: Connection,
        js: jetstream::Context,
        settings: Arc<Settings>,
        schema_hash: String,
        metrics: Arc<Metrics>,
        health: Arc<HealthState>,
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
        Publisher {
            writer,
            reader: Arc::new(Mutex::new(reader)),
            log,
            js,
            settings,
            schema_hash,
            meta,
            compressor: Mutex::new(None),
            metrics,
            health,
        }
    }

    fn tables(&self) -> &[Table] {
        self.log.tables()
    }

    /// Runs until shutdown: a pass on every wake-up, follow-up, poll tick, or retry deadline.
    pub async fn run(self, wake: Arc<Notify>, shutdown: CancellationToken) {
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
                    if failing {
                        tracing::debug!(error = %e, "publish retry failed");
                    } else {
                        tracing::error!(error = %e, "Unable to publish changes; they stay pending and will be retried");
                    }
                    failing = true;
                    let w = retry;
                    retry = stream::next_backoff(retry);
                    w
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = wake.notified(), if !failing => followups = FOLLOW_UP_SCANS,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        tracing::debug!("publisher stopped");
    }

    /// Publishes everything pending, pass after pass, until the log is drained.
    ///
    /// # Errors
    /// The first failure; everything from the failing change on stays pending.
    pub async fn publish_pending(&self, shutdown: &CancellationToken) -> Result<(), PublishError> {
        let result = self.publish_all(shutdown).await;
        if result.is_err() {
            self.metrics.publish_errors.inc();
        }
        self.count_pending().await;
        result
    }

    /// Refreshes `pending_publish` (and the health endpoint's view) with a timed count.
    async fn count_pending(&self) {
        let (reader, log) = (Arc::clone(&self.reader), Arc::clone(&self.log));
        let started = Instant::now();
        let counted = tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
            log.pending_count(&conn)
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
        let mut cursor = 0;
        let mut in_flight: Option<Sent> = None;
        loop {
            if shutdown.is_cancelled() {
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
            // If the previous pass failed, the one just sent is not marked: it is sent again
            // later, in order, and deduplicated by its message ids.
            previous?;
            let sent = next?;
            if sent.read == 0 {
                return Ok(());
            }
            cursor = sent.last_global_id;
            if sent.failure.is_some() || sent.read < limit {
                return self.finish(sent).await;
            }
            in_flight = Some(sent);
        }
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
        let (acks, failure) = if self.settings.publish {
            self.send(&changes).await
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
            orphans,
            acks,
            failure,
            read,
            last_global_id,
        })
    }

    /// Awaits a pass's acks in order and marks the acknowledged prefix published.
    async fn finish(&self, sent: Sent) -> Result<(), PublishError> {
        let Sent {
            changes,
            orphans,
            acks,
            mut failure,
            ..
        } = sent;
        let done = if self.settings.publish {
            let mut done = 0;
            // Highest acknowledged sequence per stream, recorded once per pass.
            let mut highest: Vec<(String, u64)> = Vec::new();
            for ack in acks {
                match ack.await {
                    Ok(ack) => {
                        done += 1;
                        match highest.iter_mut().find(|(s, _)| *s == ack.stream) {
                            Some(entry) => entry.1 = entry.1.max(ack.sequence),
                            None => highest.push((ack.stream, ack.sequence)),
                        }
                    }
                    Err(e) => {
                        // Later acks may have succeeded, but only a prefix is marked: the rest is
                        // sent again and deduplicated by Nats-Msg-Id.
                        failure = Some(self.nats_failure(&changes[done], e.to_string()));
                        break;
                    }
                }
            }
            for (stream, sequence) in &highest {
                self.note_ack(stream, *sequence);
            }
            done
        } else {
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
        let published: Vec<PendingChange> = changes[..done].to_vec();
        let writer = Arc::clone(&self.writer);
        tokio::task::spawn_blocking(move || {
            let mut guard = writer.lock().unwrap_or_else(|p| p.into_inner());
            let LocalLog { conn, log } = &mut *guard;
            log.mark_published(conn, &published, &orphans)?;
            if let Some(c) = &oversize {
                log.mark_failed(conn, c)?;
            }
            Ok::<_, db::Error>(())
        })
        .await
        .map_err(|e| PublishError::Join(e.to_string()))??;
        match failure {
            Some(Failure::Nats(e)) => Err(e),
            Some(Failure::TooLarge(i)) => {
                let c = &changes[i];
                tracing::error!(table = %self.tables()[c.table].name, id = c.log_id,
                    "{MAX_PAYLOAD_HINT}; the change is marked failed (state = -1) and will not replicate");
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Encodes one change: (body, subject, message id).
    fn encode(&self, c: &PendingChange) -> Result<(Bytes, String, String), String> {
        let table = &self.tables()[c.table];
        let meta = &self.meta[c.table];
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
        let mut pks: Vec<PkColumn<'_>> = meta
            .pks
            .iter()
            .map(|&i| PkColumn {
                name: &table.columns[i].name,
                decl_type: &meta.decl_lower[i],
                value: &c.values[i],
            })
            .collect();
        let shard = wire::shard_for(
            wire::shard_hash(&table.name, &mut pks),
            self.settings.replication.shards,
        );
        let msg_id = format!(
            "{}:{}:{}:{}",
            self.settings.node_id, table.name, c.log_id, c.created_at
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

    /// Sends `changes` in order without waiting for acks; stops at the first that cannot be sent.
    async fn send(&self, changes: &[PendingChange]) -> (Vec<PublishAckFuture>, Option<Failure>) {
        let mut acks = Vec::with_capacity(changes.len());
        for (i, c) in changes.iter().enumerate() {
            let (body, subject, msg_id) = match self.encode(c) {
                Ok(encoded) => encoded,
                Err(message) => return (acks, Some(self.nats_failure(c, message))),
            };
            let publish = jetstream::message::PublishMessage::build()
                .payload(body)
                .message_id(msg_id);
            match self.js.send_publish(subject, publish).await {
                Ok(ack) => acks.push(ack),
                Err(e) if matches!(e.kind(), PublishErrorKind::MaxPayloadExceeded) => {
                    return (acks, Some(Failure::TooLarge(i)));
                }
                Err(e) => return (acks, Some(self.nats_failure(c, e.to_string()))),
            }
        }
        (acks, None)
    }

    /// Records a PubAck's sequence under its shard (the stream name ends in `-<shard>`).
    fn note_ack(&self, stream: &str, sequence: u64) {
        if let Some(shard) = stream.rsplit('-').next() {
            self.metrics
                .last_published_sequence
                .with_label_values(&[shard])
                .set(sequence as i64);
        }
    }

    fn nats_failure(&self, c: &PendingChange, message: String) -> Failure {
        Failure::Nats(PublishError::Nats {
            table: self.tables()[c.table].name.clone(),
            id: c.log_id,
            message,
        })
    }
}
