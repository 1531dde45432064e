//! One publish pass: scan the change log after the cursor, encode each change as a Go event,
//! send the pass pipelined, await its acks in order, hand the acknowledged prefix to the outbox.
//!
//! Invariants:
//! - A change is retired only after its PubAck (or being found in the stream), and only within an
//!   acknowledged prefix: on any publish error the rest stays pending and the read cursor goes back
//!   to the oldest unacknowledged change, all resent from there in order after a backoff.
//! - A pending change in the stream, or superseded there by a newer one of its row, is not resent.
//! - The sent mark is written before the send it covers.
//! - `Nats-Msg-Id: <node_id>:<database identity>:<table>:<change id>:<created_at ms>` is unique
//!   per database even when two share a node id (cloned machines), and per capture even after
//!   `-cleanup` restarts change ids; receivers recognise their own events by the identity.
//! - A PubAck flagged `duplicate` for a message not sent before means another database publishes
//!   with our identity: logged as an error.
//! - With `publish = false` changes are captured and retired without being sent.
//! - A change too large to publish is logged and marked failed (`state = -1`), blocking nothing.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use async_nats::jetstream;
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use bytes::Bytes;

use crate::db::changelog::{PendingChange, Retired};
use crate::replicate::lock;
use crate::wire::{self, ChangeEvent, PkColumn, ReplicationEvent};

use super::{PublishError, Publisher};

/// How many changes the sent mark is moved ahead of the send at a time.
const MARK_AHEAD: usize = 64;

/// What to tell the operator when a change can never be published.
const MAX_PAYLOAD_HINT: &str =
    "the change exceeds the server's max_payload; raise max_payload in the nats-server config";

/// Why sending stopped inside a pass.
pub(super) enum Failure {
    Nats(PublishError),
    /// Index of a change the server can never accept.
    TooLarge(usize),
    /// Index of the first change held back by flow control (sent later, in order).
    Paced,
}

/// One pass that has been sent and not yet acknowledged.
pub(super) struct Sent {
    pub(super) changes: Vec<PendingChange>,
    /// Per change: where it already is, when it was found in the stream (not sent again).
    pub(super) landed: Vec<Option<(u64, u64)>>,
    pub(super) shards: Vec<u64>,
    pub(super) orphans: Vec<i64>,
    /// Per change of `changes[..acks.len()]`: its ack (`None`: found in the stream, not sent).
    pub(super) acks: Vec<Option<PublishAckFuture>>,
    pub(super) failure: Option<Failure>,
    /// Rows read by the scan (changes and orphans).
    pub(super) read: usize,
    /// Highest global id read.
    pub(super) last_global_id: i64,
}

impl Publisher {
    pub(super) async fn scan_and_send(&self, cursor: i64) -> Result<Sent, PublishError> {
        let started = Instant::now();
        let limit = self.settings.scan_max_changes;
        let scan = self
            .read(move |conn, log| log.scan(conn, cursor, limit))
            .await?;
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
        let landed = self.landed(&changes);
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

    /// Per change: where it already is, when it was found in the stream by the last search, or
    /// where a newer change of its row was found (it is then superseded and not sent).
    fn landed(&self, changes: &[PendingChange]) -> Vec<Option<(u64, u64)>> {
        let mut superseded = 0usize;
        let landed: Vec<Option<(u64, u64)>> = {
            let found = lock(&self.unsettled.found);
            let newest = lock(&self.newest);
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
                    // A newer change of this row is in the stream: count this one as landed there.
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
        landed
    }

    /// Awaits a pass's acks in order and hands the acknowledged prefix to the outbox.
    pub(super) async fn finish(&self, mut sent: Sent) -> Result<(), PublishError> {
        let (changes, failure) = (&sent.changes, &mut sent.failure);
        let mut retired: Vec<Retired> = Vec::with_capacity(changes.len());
        let done = if self.settings.publish {
            self.await_acks(
                changes,
                &sent.landed,
                &sent.shards,
                sent.acks,
                failure,
                &mut retired,
            )
            .await
        } else {
            retired.extend(changes.iter().map(|c| retired_at(c, None)));
            changes.len()
        };
        let oversize = match failure {
            Some(Failure::TooLarge(i)) if *i == done => Some(changes[*i].clone()),
            _ => None,
        };
        if done > 0 {
            self.metrics.published.inc_by(done as u64);
            if self.settings.publish {
                self.health.published_now();
            }
        }
        let new_cursor = cursor_after(changes, done, failure, &oversize, sent.last_global_id);
        self.hand_over(retired, &sent.orphans, oversize.as_ref(), new_cursor);
        self.cursor.store(new_cursor, Ordering::Relaxed);
        self.outcome(sent.failure, &sent.changes)
    }

    /// Awaits `acks` in order and records in `retired` where each change landed; stops at the
    /// first failed ack (recorded in `failure`). Returns how many changes are done with.
    async fn await_acks(
        &self,
        changes: &[PendingChange],
        landed: &[Option<(u64, u64)>],
        shards: &[u64],
        acks: Vec<Option<PublishAckFuture>>,
        failure: &mut Option<Failure>,
        retired: &mut Vec<Retired>,
    ) -> usize {
        // Highest acknowledged sequence per stream, recorded once per pass.
        let mut highest: HashMap<u64, u64> = HashMap::new();
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
                        // Later acks may have succeeded; only the prefix is retired (header).
                        *failure = Some(self.nats_failure(
                            &changes[i],
                            e.to_string(),
                            matches!(e.kind(), PublishErrorKind::StreamNotFound),
                        ));
                        break;
                    }
                },
            };
            if let Some((shard, seq)) = at {
                let high = highest.entry(shard).or_insert(seq);
                *high = (*high).max(seq);
            }
            retired.push(retired_at(&changes[i], at));
        }
        self.record_acked(&highest);
        retired.len()
    }

    fn record_acked(&self, highest: &HashMap<u64, u64>) {
        let mut acked = lock(&self.acked);
        for (shard, sequence) in highest {
            let slot = acked.entry(*shard).or_insert(0);
            *slot = (*slot).max(*sequence);
            self.metrics
                .last_published_sequence
                .with_label_values(&[shard.to_string()])
                .set(*sequence as i64);
        }
    }

    /// Hands what a pass is done with to the outbox, for the keeper to retire.
    fn hand_over(
        &self,
        retired: Vec<Retired>,
        orphans: &[i64],
        oversize: Option<&PendingChange>,
        new_cursor: i64,
    ) {
        let mut outbox = lock(&self.outbox);
        outbox.published.extend(retired);
        outbox
            .orphans
            .extend(orphans.iter().copied().filter(|&o| o <= new_cursor));
        outbox.failed.extend(oversize.map(|c| retired_at(c, None)));
    }

    /// A pass's publish error, if any; a change the server can never accept is only logged.
    fn outcome(
        &self,
        failure: Option<Failure>,
        changes: &[PendingChange],
    ) -> Result<(), PublishError> {
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

    /// Encodes one change for `shard`: (body, subject, message id). Fails only when zstd does.
    fn encode(&self, c: &PendingChange, shard: u64) -> std::io::Result<(Bytes, String, String)> {
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
            let mut slot = lock(&self.compressor);
            let compressor = match slot.as_mut() {
                Some(c) => c,
                None => slot.insert(wire::Compressor::new()?),
            };
            compressor.compress(&body)?
        } else {
            body
        };
        Ok((Bytes::from(body), self.settings.subject_name(shard), msg_id))
    }

    /// Sends `changes` in order without awaiting acks (found ones are skipped); stops at a failure.
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
                Err(e) => {
                    let message = format!("zstd compression failed: {e}");
                    return (acks, Some(self.nats_failure(c, message, false)));
                }
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
}

/// Where the read cursor goes after a pass of which the first `done` changes are done with.
fn cursor_after(
    changes: &[PendingChange],
    done: usize,
    failure: &Option<Failure>,
    oversize: &Option<PendingChange>,
    last_global_id: i64,
) -> i64 {
    // Everything below the first change not done with is done with.
    let stop = match (failure, oversize) {
        (None, _) => None,
        (Some(Failure::Paced), _) => changes.get(done).map(|c| c.global_id),
        (Some(_), Some(_)) => changes.get(done + 1).map(|c| c.global_id),
        (Some(_), None) => changes.get(done).map(|c| c.global_id),
    };
    stop.map_or(last_global_id, |g| g - 1)
}

/// `c` as done with, landed at (shard, sequence) when that is known.
fn retired_at(c: &PendingChange, landed: Option<(u64, u64)>) -> Retired {
    Retired {
        global_id: c.global_id,
        table: c.table,
        log_id: c.log_id,
        landed,
    }
}
