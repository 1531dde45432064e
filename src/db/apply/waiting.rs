//! Events waiting for the local schema to catch up.
//!
//! An event this node's schema is behind for — a table or column it does not know (yet), from a
//! node whose schema hash (`sh`) is neither this node's current nor previous one — is not
//! quarantined: it **waits for the schema**, durably in `__harmonylite__held_events`
//! (`schema_wait = 1`), and so does every later event of its row (of its table, when the table
//! is unknown), so per-row order holds while the rest of the stream goes on and the seq map
//! advances. They are tried again, in arrival order, whenever capture is reinstalled after DDL
//! ([`Applier::retry_waiting`]). Names this node renamed are followed; events for a table it
//! dropped are discarded.
//!
//! Invariants:
//! - `waiting_rows` and `waiting_tables` count exactly the events in `waiting`, which mirrors the
//!   table's `schema_wait` rows.
//! - A retried event that still cannot apply blocks every later waiting event of its row (or
//!   table) in the same pass.

use std::collections::HashSet;

use rusqlite::Connection;

use super::step::{Behind, EventError, Mode, Step, quarantine};
use super::{Applier, Incoming, Key, Outcome, State};
use crate::db::sql::{begin_guarded, commit_guarded};
use crate::db::{Error, HELD_TABLE, quote};
use crate::wire::{ChangeEvent, ReplicationEvent};

/// An event waiting for the local schema to catch up.
pub(super) struct WaitingEvent {
    pub(super) stream: String,
    pub(super) seq: u64,
    pub(super) own: bool,
    pub(super) event: ChangeEvent,
    pub(super) table: String,
    pub(super) key: Option<Key>,
}

impl Applier {
    /// Number of events waiting for the local schema to catch up.
    pub fn waiting_len(&self) -> usize {
        self.state.waiting.len()
    }

    /// Tries the events waiting for the schema again, in arrival order (after capture was
    /// reinstalled for a changed schema); returns how many applied. An event that still cannot
    /// apply keeps every later one of its row (or table) waiting.
    ///
    /// # Errors
    /// SQLite errors (rolled back; the events keep waiting).
    pub fn retry_waiting(&mut self) -> Result<usize, Error> {
        let result = self.retry_waiting_in();
        self.resync_on_error(result)
    }

    pub(super) fn retry_waiting_in(&mut self) -> Result<usize, Error> {
        if self.state.waiting.is_empty() {
            return Ok(0);
        }
        let tx = begin_guarded(&mut self.conn)?;
        Self::check_schema(self.confirmed.as_ref(), &tx)?;
        self.state.refresh(&tx)?;
        let before = self.state.waiting.len();
        let since = self.state.waiting_since;
        let applied = self.state.retry_waiting(&tx)?;
        commit_guarded(tx)?;
        let left = self.state.waiting.len();
        if left == 0 {
            let paused_for = since
                .map(|t| format!("{:?}", t.elapsed()))
                .unwrap_or_default();
            tracing::info!(events = before, applied, paused_for = %paused_for,
                "Schema now matches after recompute, resuming replication");
        } else if left < before {
            tracing::info!(
                applied,
                done = before - left,
                still_waiting = left,
                "Events waiting for the schema partly applied; the rest still waits"
            );
        } else {
            tracing::warn!(
                still_waiting = left,
                "Schema still mismatched after recompute"
            );
        }
        Ok(applied)
    }
}

impl State {
    /// Where a waiting event waits: its (lower-cased) table and, if known, its row.
    pub(super) fn waiting_place(&self, event: &ChangeEvent) -> (String, Option<Key>) {
        self.place(event, self.resolve_table(&event.table))
    }

    /// The (lower-cased) table and, if known, the row of `event`, whose local table is `t`.
    pub(super) fn place(&self, event: &ChangeEvent, t: Option<usize>) -> (String, Option<Key>) {
        match t {
            Some(t) => {
                let key = self
                    .renamed(t, event)
                    .as_ref()
                    .map_or_else(|| self.wire_key(t, event), |e| self.wire_key(t, e));
                (self.tables[t].name.to_lowercase(), key)
            }
            None => (
                self.aliases
                    .table(&event.table)
                    .unwrap_or(&event.table)
                    .to_lowercase(),
                None,
            ),
        }
    }

    /// Whether an earlier event of this row (or of its table) waits for the schema.
    pub(super) fn blocked(&self, table: &str, key: Option<&Key>) -> bool {
        if self.waiting.is_empty() {
            return false;
        }
        self.waiting_tables.contains_key(table)
            || key.is_some_and(|k| {
                self.waiting_rows
                    .contains_key(&(table.to_owned(), k.clone()))
            })
    }

    pub(super) fn add_waiting(&mut self, id: i64, w: WaitingEvent) {
        match &w.key {
            Some(k) => {
                *self
                    .waiting_rows
                    .entry((w.table.clone(), k.clone()))
                    .or_default() += 1
            }
            None => *self.waiting_tables.entry(w.table.clone()).or_default() += 1,
        }
        self.waiting_since
            .get_or_insert_with(std::time::Instant::now);
        self.waiting.insert(id, w);
    }

    pub(super) fn drop_waiting(&mut self, conn: &Connection, id: i64) -> rusqlite::Result<()> {
        conn.prepare_cached(&format!("DELETE FROM {} WHERE id = ?1", quote(HELD_TABLE)))?
            .execute([id])?;
        if let Some(w) = self.waiting.remove(&id) {
            let slot = match w.key {
                Some(k) => self
                    .waiting_rows
                    .get_mut(&(w.table.clone(), k.clone()))
                    .map(|n| (n, Some(k))),
                None => self.waiting_tables.get_mut(&w.table).map(|n| (n, None)),
            };
            if let Some((n, key)) = slot {
                *n -= 1;
                if *n == 0 {
                    match key {
                        Some(k) => {
                            self.waiting_rows.remove(&(w.table, k));
                        }
                        None => {
                            self.waiting_tables.remove(&w.table);
                        }
                    }
                }
            }
        }
        if self.waiting.is_empty() {
            self.waiting_since = None;
        }
        Ok(())
    }

    /// Records `event` as waiting for the schema (durably, in the caller's transaction).
    pub(super) fn wait(
        &mut self,
        conn: &Connection,
        incoming: &Incoming<'_>,
        event: &ChangeEvent,
        behind: Behind,
    ) -> rusqlite::Result<()> {
        let id = super::held::record(conn, incoming, event, &behind.why, true)?;
        if self.waiting.is_empty() {
            let short = |h: &str| h.get(..8).unwrap_or(h).to_owned();
            tracing::warn!(table = %event.table, stream = incoming.stream, seq = incoming.seq,
                event_hash = %short(&event.schema_hash), local_hash = %short(&self.hashes.current),
                reason = %behind.why,
                "Schema mismatch detected, pausing replication");
        } else {
            tracing::debug!(table = %event.table, seq = incoming.seq, reason = %behind.why, "event waits for the schema");
        }
        self.add_waiting(
            id,
            WaitingEvent {
                stream: incoming.stream.to_owned(),
                seq: incoming.seq,
                own: incoming.own,
                event: event.clone(),
                table: behind.table,
                key: behind.key,
            },
        );
        Ok(())
    }

    /// See [`Applier::retry_waiting`].
    pub(super) fn retry_waiting(&mut self, conn: &Connection) -> Result<usize, Error> {
        let mut applied = 0;
        let mut blocked_tables: HashSet<String> = Default::default();
        let mut blocked_rows: HashSet<(String, Key)> = Default::default();
        let ids: Vec<i64> = self.waiting.keys().copied().collect();
        for id in ids {
            let Some(w) = self.waiting.get(&id) else {
                continue;
            };
            let is_blocked = blocked_tables.contains(&w.table)
                || w.key
                    .as_ref()
                    .is_some_and(|k| blocked_rows.contains(&(w.table.clone(), k.clone())));
            let (stream, seq, own, event) = (w.stream.clone(), w.seq, w.own, w.event.clone());
            let (place_table, place_key) = (w.table.clone(), w.key.clone());
            if is_blocked {
                block(
                    &mut blocked_tables,
                    &mut blocked_rows,
                    place_table,
                    place_key,
                );
                continue;
            }
            let payload = ReplicationEvent {
                from_node_id: 0,
                event: event.clone(),
            }
            .encode();
            let incoming = Incoming {
                stream: &stream,
                seq,
                event: Ok(event),
                own,
                raw: &payload,
            };
            conn.prepare_cached("SAVEPOINT waiting")?.execute([])?;
            let result = self.step(conn, &incoming, Mode::RetryWaiting);
            if result.is_err() {
                conn.prepare_cached("ROLLBACK TO waiting")?.execute([])?;
            }
            conn.prepare_cached("RELEASE waiting")?.execute([])?;
            match result {
                Ok(Step::Done(outcome)) => {
                    self.drop_waiting(conn, id)?;
                    applied += usize::from(outcome == Outcome::Applied);
                }
                Ok(Step::NeedsWrite) => unreachable!("write modes always finish"),
                Err(EventError::Behind(b)) => {
                    block(
                        &mut blocked_tables,
                        &mut blocked_rows,
                        place_table.clone(),
                        place_key,
                    );
                    // Its place may be known better now (its table exists).
                    block(&mut blocked_tables, &mut blocked_rows, b.table, b.key);
                }
                Err(EventError::Retry(e)) => return Err(e.into()),
                Err(EventError::Poison(why)) => {
                    tracing::error!(stream = %stream, seq, error = %why,
                        "Event that waited for the schema cannot apply; quarantined in __harmonylite__dead_letter");
                    quarantine(conn, &stream, seq, &why, &payload)?;
                    self.drop_waiting(conn, id)?;
                }
            }
        }
        Ok(applied)
    }
}

/// Marks, for the rest of a retry pass, a row blocked (or its whole table, without a key): a
/// later waiting event there must not overtake an earlier one that still waits.
fn block(
    tables: &mut HashSet<String>,
    rows: &mut HashSet<(String, Key)>,
    table: String,
    key: Option<Key>,
) {
    match key {
        Some(k) => {
            rows.insert((table, k));
        }
        None => {
            tables.insert(table);
        }
    }
}
