//! Events waiting for the local schema to catch up.
//!
//! An event this node's schema is behind for (naming a table or column unknown here, from a node
//! whose schema hash `sh` is neither our current nor previous one) is not quarantined: it **waits
//! for the schema**, durably in `__harmonylite__held_events` (`schema_wait = 1`), and so does every
//! later event of its row (its table, if unknown): per-row order holds while the stream goes on and
//! the seq map advances. They are retried in arrival order on each capture reinstall after DDL
//! ([`Applier::retry_waiting`]); renamed names are followed, dropped tables' events discarded.
//! Invariants: `waiting` mirrors the table's `schema_wait` rows, `waiting_places` counts them per
//! place; a retried event that still cannot apply blocks later ones of its row (table) that pass.

use std::collections::HashSet;

use rusqlite::Connection;

use super::held::{Parked, forget, parked};
use super::step::{Behind, EventError, Mode, Step, quarantine};
use super::{Applier, Incoming, Key, Outcome, State};
use crate::db::Error;
use crate::wire::{ChangeEvent, ReplicationEvent};

/// Where an event waits: its lower-cased table and, when known, its row (else the whole table).
pub(super) type Place = (String, Option<Key>);

pub(super) type WaitingEvent = Parked<Place>;

impl Applier {
    pub fn waiting_len(&self) -> usize {
        self.state.waiting.len()
    }

    /// Retries the waiting events in arrival order (after capture was reinstalled); counts applied.
    pub fn retry_waiting(&mut self) -> Result<usize, Error> {
        let result = self.retry_waiting_in();
        self.resync_on_error(result)
    }

    pub(super) fn retry_waiting_in(&mut self) -> Result<usize, Error> {
        if self.state.waiting.is_empty() {
            return Ok(0);
        }
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        Self::check_schema(self.confirmed.as_ref(), &tx)?;
        self.state.refresh(&tx)?;
        let before = self.state.waiting.len();
        let since = self.state.waiting_since;
        let applied = self.state.retry_waiting(&tx)?;
        tx.commit()?;
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
    pub(super) fn waiting_place(&self, event: &ChangeEvent) -> Place {
        self.place(event, self.resolve_table(&event.table))
    }

    pub(super) fn place(&self, event: &ChangeEvent, t: Option<usize>) -> Place {
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
        !self.waiting.is_empty() && behind(|p| self.waiting_places.contains_key(p), table, key)
    }

    pub(super) fn add_waiting(&mut self, id: i64, w: WaitingEvent) {
        *self.waiting_places.entry(w.place.clone()).or_default() += 1;
        self.waiting_since
            .get_or_insert_with(std::time::Instant::now);
        self.waiting.insert(id, w);
    }

    pub(super) fn drop_waiting(&mut self, conn: &Connection, id: i64) -> rusqlite::Result<()> {
        forget(conn, id)?;
        if let Some(w) = self.waiting.remove(&id)
            && let Some(n) = self.waiting_places.get_mut(&w.place)
        {
            *n -= 1;
            if *n == 0 {
                self.waiting_places.remove(&w.place);
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
        self.add_waiting(id, parked(incoming, event, (behind.table, behind.key)));
        Ok(())
    }

    /// See [`Applier::retry_waiting`].
    pub(super) fn retry_waiting(&mut self, conn: &Connection) -> Result<usize, Error> {
        let mut applied = 0;
        // Places where an event still waits: a later event there must not overtake it.
        let mut blocked: HashSet<Place> = HashSet::new();
        let ids: Vec<i64> = self.waiting.keys().copied().collect();
        for id in ids {
            let Some(w) = self.waiting.get(&id).cloned() else {
                continue;
            };
            if behind(|p| blocked.contains(p), &w.place.0, w.place.1.as_ref()) {
                blocked.insert(w.place);
                continue;
            }
            let payload = ReplicationEvent {
                from_node_id: 0,
                event: w.event.clone(),
            }
            .encode();
            match self.step_or_undo(conn, &w.incoming(&payload), Mode::RetryWaiting)? {
                Ok(Step::Done(outcome)) => {
                    self.drop_waiting(conn, id)?;
                    applied += usize::from(outcome == Outcome::Applied);
                }
                Ok(Step::NeedsWrite) => unreachable!("write modes always finish"),
                Err(EventError::Behind(b)) => {
                    blocked.insert(w.place);
                    // Its place may be known better now (its table exists).
                    blocked.insert((b.table, b.key));
                }
                Err(EventError::Retry(e)) => return Err(e.into()),
                Err(EventError::Poison(why)) => {
                    tracing::error!(stream = %w.stream, seq = w.seq, error = %why,
                        "Event that waited for the schema cannot apply; quarantined in __harmonylite__dead_letter");
                    quarantine(conn, &w.stream, w.seq, &why, &payload)?;
                    self.drop_waiting(conn, id)?;
                }
            }
        }
        Ok(applied)
    }
}

/// Whether `table`'s place, or its row `key`'s, is among the places `waits` holds.
fn behind(waits: impl Fn(&Place) -> bool, table: &str, key: Option<&Key>) -> bool {
    waits(&(table.to_owned(), None))
        || key.is_some_and(|k| waits(&(table.to_owned(), Some(k.clone()))))
}
