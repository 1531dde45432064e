//! The publisher: local change log → JetStream (design §3.1, §4).
//!
//! A pass reads up to `scan_max_changes` pending changes in commit order, encodes each as a Go
//! event, publishes them all without waiting (pipelined), then awaits the acks in order and marks
//! exactly the acknowledged prefix published, in one transaction. Passes repeat while full batches
//! come back. A pass is started by a file-change notification, the polling timer, or the retry
//! timer after a failure.
//!
//! Invariants:
//! - A change is marked published only after its PubAck. On any publish error the rest of the
//!   pass stays pending and is retried with backoff; nothing is dropped while NATS is away.
//! - Each message carries `Nats-Msg-Id: <node_id>:<table>:<change-log id>:<created_at ms>`, so a
//!   crash between ack and mark does not duplicate within JetStream's dedup window. The capture
//!   time is part of the id because change-log ids restart from 1 after `-cleanup` or a dropped
//!   change log, and a bare id could then be deduplicated against an older, different change.
//! - With `publish = false` changes are captured and retired without being sent.
//! - A change too large to ever be accepted by the server is marked failed (`state = -1`) and
//!   logged, instead of blocking every later change forever.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use rusqlite::Connection;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::db::changelog::{ChangeLog, PendingChange};
use crate::db::{self, Table};
use crate::stream;
use crate::wire::{self, ChangeEvent, PkColumn, ReplicationEvent};

/// The publisher's database side: one connection and the prepared change-log reader. Shared with
/// the cleanup loop; always used from blocking threads.
pub struct LocalLog {
    pub conn: Connection,
    pub log: ChangeLog,
}

/// A handle to the shared local log.
pub type SharedLog = Arc<Mutex<LocalLog>>;

/// Per-table data the publisher needs for every row.
struct TableMeta {
    /// Primary-key column indexes.
    pks: Vec<usize>,
    /// Lower-cased declared types (Go hashes time-typed keys specially).
    decl_lower: Vec<String>,
}

/// Publishes local changes.
pub struct Publisher {
    log: SharedLog,
    js: jetstream::Context,
    settings: Arc<Settings>,
    schema_hash: String,
    meta: Vec<TableMeta>,
    tables: Vec<Table>,
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

/// What to tell the operator when a change can never be published.
const MAX_PAYLOAD_HINT: &str =
    "the change exceeds the server's max_payload; raise max_payload in the nats-server config";

impl Publisher {
    /// Builds a publisher over the shared local log.
    pub fn new(
        log: SharedLog,
        js: jetstream::Context,
        settings: Arc<Settings>,
        schema_hash: String,
        tables: Vec<Table>,
    ) -> Publisher {
        let meta = tables
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
            log,
            js,
            settings,
            schema_hash,
            meta,
            tables,
        }
    }

    /// Runs until shutdown: a pass on every wake-up, poll tick, or retry deadline.
    pub async fn run(self, wake: Arc<Notify>, shutdown: CancellationToken) {
        // A safety-net scan even without polling_interval: cheap (one indexed read) and it bounds
        // the delay if a file notification is ever missed.
        let idle = self
            .settings
            .polling_interval
            .unwrap_or(Duration::from_secs(1));
        let mut retry = Duration::from_millis(100);
        let mut failing = false;
        loop {
            let result = self.publish_pending(&shutdown).await;
            let wait = match result {
                Ok(()) => {
                    if failing {
                        tracing::info!("Publishing resumed");
                    }
                    failing = false;
                    retry = Duration::from_millis(100);
                    idle
                }
                Err(e) => {
                    if !failing {
                        tracing::error!(error = %e, "Unable to publish changes; they stay pending and will be retried");
                    } else {
                        tracing::debug!(error = %e, "publish retry failed");
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
                _ = wake.notified(), if !failing => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        tracing::debug!("publisher stopped");
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut LocalLog) -> Result<T, db::Error> + Send + 'static,
    ) -> Result<T, PublishError> {
        let log = Arc::clone(&self.log);
        tokio::task::spawn_blocking(move || {
            let mut guard = log.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| PublishError::Join(e.to_string()))?
        .map_err(PublishError::from)
    }

    /// Publishes everything pending, pass after pass, until the log is drained.
    ///
    /// # Errors
    /// The first failure; everything from the failing change on stays pending.
    pub async fn publish_pending(&self, shutdown: &CancellationToken) -> Result<(), PublishError> {
        let limit = self.settings.scan_max_changes;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let scan = self.blocking(move |l| l.log.scan(&l.conn, limit)).await?;
            for (id, why) in &scan.orphans {
                tracing::warn!(global_id = id, reason = %why, "Dropping change-log entry that cannot be published");
            }
            let orphans: Vec<i64> = scan.orphans.iter().map(|o| o.0).collect();
            let read = scan.changes.len() + orphans.len();
            if read == 0 {
                return Ok(());
            }
            let changes = scan.changes;
            let (done, failure) = if self.settings.publish {
                self.send(&changes).await
            } else {
                (changes.len(), None)
            };
            let published: Vec<PendingChange> = changes[..done].to_vec();
            let oversize = match &failure {
                Some(Failure::TooLarge(i)) => Some(changes[*i].clone()),
                _ => None,
            };
            self.blocking(move |l| {
                l.log.mark_published(&mut l.conn, &published, &orphans)?;
                if let Some(c) = oversize {
                    l.log.mark_failed(&mut l.conn, &c)?;
                }
                Ok(())
            })
            .await?;
            match failure {
                Some(Failure::Nats(e)) => return Err(e),
                Some(Failure::TooLarge(i)) => {
                    let c = &changes[i];
                    tracing::error!(table = %self.tables[c.table].name, id = c.log_id,
                        "{MAX_PAYLOAD_HINT}; the change is marked failed (state = -1) and will not replicate");
                }
                None => {}
            }
            if read < limit as usize {
                return Ok(());
            }
        }
    }

    /// Encodes one change: (body, subject, message id).
    fn event_for(&self, c: &PendingChange) -> Result<(Bytes, String, String), String> {
        let table = &self.tables[c.table];
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
            wire::compress(&body).map_err(|e| format!("zstd compression failed: {e}"))?
        } else {
            body
        };
        Ok((Bytes::from(body), self.settings.subject_name(shard), msg_id))
    }

    /// Sends `changes` pipelined and returns how many, from the start, were acknowledged, plus
    /// why the next one was not.
    async fn send(&self, changes: &[PendingChange]) -> (usize, Option<Failure>) {
        let mut acks = Vec::with_capacity(changes.len());
        let mut failure = None;
        for (i, c) in changes.iter().enumerate() {
            let (body, subject, msg_id) = match self.event_for(c) {
                Ok(encoded) => encoded,
                Err(message) => {
                    failure = Some(self.nats_failure(c, message));
                    break;
                }
            };
            let publish = jetstream::message::PublishMessage::build()
                .payload(body)
                .message_id(msg_id);
            match self.js.send_publish(subject, publish).await {
                Ok(ack) => acks.push(ack),
                Err(e) => {
                    failure = Some(
                        if matches!(
                            e.kind(),
                            jetstream::context::PublishErrorKind::MaxPayloadExceeded
                        ) {
                            Failure::TooLarge(i)
                        } else {
                            self.nats_failure(c, e.to_string())
                        },
                    );
                    break;
                }
            }
        }
        let mut done = 0;
        for ack in acks {
            match ack.await {
                Ok(_) => done += 1,
                Err(e) => {
                    // Later acks may have succeeded, but only a prefix is marked: the rest is
                    // republished and deduplicated by Nats-Msg-Id.
                    return (done, Some(self.nats_failure(&changes[done], e.to_string())));
                }
            }
        }
        (done, failure)
    }

    fn nats_failure(&self, c: &PendingChange, message: String) -> Failure {
        Failure::Nats(PublishError::Nats {
            table: self.tables[c.table].name.clone(),
            id: c.log_id,
            message,
        })
    }
}

enum Failure {
    Nats(PublishError),
    /// Index of a change the server can never accept.
    TooLarge(usize),
}
