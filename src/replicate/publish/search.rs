//! The search of the streams for changes this database already sent: after a start or a failed
//! pass, before sending more, the publisher reads the message ids in every shard stream past the
//! last acked sequence ([`crate::stream::find_published`]); pending changes found count as sent.
//! Invariants: a pending change found in the stream is never sent again (past JetStream's 2-minute
//! duplicate window it would replay an old change over newer ones), nor an older pending change of
//! a row whose newer one was found ([`Newest`]); restores wait for it ([`Unsettled`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use crate::db;
use crate::db::changelog::{Retired, Retirement};
use crate::replicate::lock;
use crate::stream;

use super::{LocalLog, PublishError, Publisher, SharedLog};

/// Changes found in the streams: (table, change id) → (shard, stream sequence, capture time).
pub(super) type Found = HashMap<(usize, i64), (u64, u64, i64)>;

/// Per row (table, primary key): its newest pending change found (change id, shard, sequence). An
/// older one not found must never be sent: landing after it, it would roll the row back everywhere
/// (a connection dropping under a pipeline loses the dying socket's messages, not those behind).
pub(super) type Newest = HashMap<(usize, crate::db::apply::Key), (i64, u64, u64)>;

/// Where this publisher's sends landed. After a failed pass, changes sent past the acked prefix
/// stay pending until a search settles them; a restore waits for it and counts what it found as
/// landed (taken for in flight, they would keep old rows for good over the snapshot's newer ones).
#[derive(Clone)]
pub struct Unsettled {
    /// Set after a failure, cleared by a completed search.
    pub(super) must_search: Arc<std::sync::atomic::AtomicBool>,
    /// The highest global id handed to NATS by this run.
    pub(super) sent: Arc<AtomicI64>,
    /// Changes found in the stream by the last search, not to be sent again.
    pub(super) found: Arc<Mutex<Found>>,
    /// Set when a call found the publisher held (no pass runs until the hold ends), cleared at
    /// the start of every call: a pass that began before the hold may still fail its acks.
    pub(super) parked: Arc<std::sync::atomic::AtomicBool>,
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
        lock(&self.found)
            .iter()
            .map(|(&(t, id), &(shard, seq, _))| (t, id, shard, seq))
            .collect()
    }
}

impl Publisher {
    /// The search of the module header (a crash or a lost ack can leave sent messages unacked).
    pub(super) async fn search(&self) -> Result<(), PublishError> {
        let pending = self.read(|conn, log| log.pending_ids(conn)).await?;
        let found = if pending.is_empty() {
            Found::new()
        } else {
            self.find_in_streams(&pending).await?
        };
        let newest = if found.is_empty() {
            Newest::new()
        } else {
            tracing::info!(
                changes = found.len(),
                "Pending changes already in the stream (sent before a crash or a lost ack); not sending them again"
            );
            self.newest_of(&found).await?
        };
        *lock(&self.unsettled.found) = found;
        *lock(&self.newest) = newest;
        self.unsettled.must_search.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// The `pending` changes whose messages are in the streams past the newest acked sequence.
    async fn find_in_streams(
        &self,
        pending: &HashMap<(usize, i64), i64>,
    ) -> Result<Found, PublishError> {
        let mut found: Found = HashMap::new();
        let acked = lock(&self.acked).clone();
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
                let Some((table_name, id, created)) = parse_msg_id(&msg_id) else {
                    continue;
                };
                if let Some(t) = self.log.table_index(table_name)
                    && pending.contains_key(&(t, id))
                {
                    found.insert((t, id), (shard, seq, created));
                }
            }
        }
        Ok(found)
    }

    /// Per row of the changes found, the newest of them (see [`Newest`]).
    async fn newest_of(&self, found: &Found) -> Result<Newest, PublishError> {
        let mut by_table: HashMap<usize, Vec<(i64, u64, u64)>> = HashMap::new();
        for (&(t, id), &(shard, seq, _)) in found {
            by_table.entry(t).or_default().push((id, shard, seq));
        }
        self.read(move |conn, log| {
            let mut newest = Newest::new();
            for (t, changes) in by_table {
                let ids: Vec<i64> = changes.iter().map(|c| c.0).collect();
                let at: HashMap<i64, (u64, u64)> = changes
                    .iter()
                    .map(|&(id, sh, seq)| (id, (sh, seq)))
                    .collect();
                for (id, key) in log.keys_of(conn, t, &ids)? {
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
    }

    /// At start, before anything is applied: retires pending changes that already reached the
    /// streams (a crash between ack and retirement) with where they landed, so the applier knows
    /// which came back. Start-up needs it: the caller retries all but fatal errors.
    pub async fn recover(&self, writer: &SharedLog) -> Result<usize, PublishError> {
        if !self.settings.publish {
            return Ok(0);
        }
        self.search().await?;
        let found = std::mem::take(&mut *lock(&self.unsettled.found));
        if found.is_empty() {
            return Ok(0);
        }
        let (writer, log) = (Arc::clone(writer), Arc::clone(&self.log));
        let retired = tokio::task::spawn_blocking(move || -> Result<usize, db::Error> {
            let mut guard = lock(&writer);
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
}

/// (table, change id, capture time) of a message id `<node>:<identity>:<table>:<change
/// id>:<created_at>`; tables may hold ':'.
fn parse_msg_id(msg_id: &str) -> Option<(&str, i64, i64)> {
    let (rest, created) = msg_id.rsplit_once(':')?;
    let (rest, id) = rest.rsplit_once(':')?;
    let table_name = rest.splitn(3, ':').nth(2)?;
    Some((table_name, id.parse().ok()?, created.parse().ok()?))
}
