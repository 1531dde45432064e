//! Events held by a UNIQUE conflict with another row.
//!
//! Instead of deleting that row (Go's REPLACE did, on the origin too) the event is **held**,
//! durably in `__harmonylite__held_events`, until either row changes, then applies; a later event
//! for its row supersedes it. A conflict that never resolves (two nodes claiming one UNIQUE value
//! on different rows at once) stays held, counted and logged with both rows; events blocking each
//! other (swapped values) are tried together. Invariants: the held table and `held`/`held_keys`
//! change together in the caller's transaction, at most one held event per row (the newest);
//! retries wait for a database change (`PRAGMA data_version`). The table also stores events waiting
//! for the schema (`schema_wait = 1`), same [`Parked`] record; [`Applier::load_held`] reads both.

use std::collections::BTreeMap;

use rusqlite::Connection;

use super::row::{WriteError, describe};
use super::step::{EventError, Mode, Step};
use super::{Applier, Incoming, Key, Outcome, State};
use crate::db::{Error, HELD_TABLE, quote};
use crate::wire::{ChangeEvent, Op, ReplicationEvent};

/// Most held events of one table tried pairwise when they wait for each other.
pub(super) const MAX_PAIRED_HELD: usize = 20;

/// An event parked in the held-events table, with where it waits: `(local table, row)` when held
/// after a UNIQUE conflict, a [`super::waiting::Place`] when waiting for the schema.
#[derive(Clone)]
pub(super) struct Parked<P> {
    pub(super) stream: String,
    pub(super) seq: u64,
    pub(super) own: bool,
    pub(super) event: ChangeEvent,
    pub(super) place: P,
}

/// An event held by a UNIQUE conflict: its local table and row.
pub(super) type HeldEvent = Parked<(usize, Key)>;

impl<P> Parked<P> {
    /// The event as it arrived (`raw`: its payload, for the dead-letter table).
    pub(super) fn incoming<'a>(&'a self, raw: &'a [u8]) -> Incoming<'a> {
        Incoming {
            stream: &self.stream,
            seq: self.seq,
            event: Ok(self.event.clone()),
            own: self.own,
            from_node: None,
            raw,
        }
    }
}

impl Applier {
    pub fn held_len(&self) -> usize {
        self.state.held.len()
    }

    pub(super) fn load_held(&mut self) -> Result<(), Error> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT id, stream, seq, origin, payload, schema_wait FROM {} ORDER BY id",
            quote(HELD_TABLE)
        ))?;
        type HeldRow = (i64, String, i64, Option<String>, Vec<u8>, i64);
        let rows: Vec<HeldRow> = stmt
            .query_map([], |r| r.try_into())?
            .collect::<Result<_, _>>()?;
        drop(stmt);
        for (id, stream, seq, origin, payload, schema_wait) in rows {
            let Ok(decoded) = ReplicationEvent::decode(&payload) else {
                tracing::warn!(id, "Held event cannot be decoded; dropping it");
                continue;
            };
            let (seq, own, event) = (
                seq.max(0) as u64,
                origin.as_deref() == Some("own"),
                decoded.event,
            );
            if schema_wait != 0 {
                let place = self.state.waiting_place(&event);
                let parked = Parked {
                    stream,
                    seq,
                    own,
                    event,
                    place,
                };
                self.state.add_waiting(id, parked);
            } else if let Some(t) = self.state.table_of(&event.table)
                && let Some(key) = self.state.wire_key(t, &event)
            {
                self.state.held_keys.insert((t, key.clone()), id);
                let parked = Parked {
                    stream,
                    seq,
                    own,
                    event,
                    place: (t, key),
                };
                self.state.held.insert(id, parked);
            }
        }
        Ok(())
    }

    /// Retries held events if the database changed (a row may free the value); counts applied.
    pub fn retry_held(&mut self) -> Result<usize, Error> {
        let result = self.retry_held_in();
        self.resync_on_error(result)
    }

    pub(super) fn retry_held_in(&mut self) -> Result<usize, Error> {
        if self.state.held.is_empty() {
            return Ok(0);
        }
        let version: i64 = self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?;
        if self.held_checked_version == Some(version) {
            return Ok(0);
        }
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        Self::check_schema(self.confirmed.as_ref(), &tx)?;
        self.state.refresh(&tx)?;
        let applied = self.state.retry_held(&tx)?;
        tx.commit()?;
        // Our own commit changes nothing for data_version on this connection.
        self.held_checked_version = Some(
            self.conn
                .query_row("PRAGMA data_version", [], |r| r.get(0))?,
        );
        Ok(applied)
    }
}

pub(super) fn parked<P>(incoming: &Incoming<'_>, event: &ChangeEvent, place: P) -> Parked<P> {
    Parked {
        stream: incoming.stream.to_owned(),
        seq: incoming.seq,
        own: incoming.own,
        event: event.clone(),
        place,
    }
}

/// The ids of `parked` events a snapshot at `positions` (per stream of `streams`) includes.
pub(super) fn included<P>(
    parked: &BTreeMap<i64, Parked<P>>,
    streams: &[String],
    positions: &[u64],
) -> Vec<i64> {
    let position = |stream: &str| streams.iter().position(|s| s == stream);
    parked
        .iter()
        .filter(|(_, p)| {
            position(&p.stream)
                .and_then(|i| positions.get(i))
                .is_some_and(|&at| p.seq <= at)
        })
        .map(|(&id, _)| id)
        .collect()
}

/// Deletes the held-events record `id` (in the caller's transaction).
pub(super) fn forget(conn: &Connection, id: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(&format!("DELETE FROM {} WHERE id = ?1", quote(HELD_TABLE)))?
        .execute([id])?;
    Ok(())
}

/// Records `event` durably (caller's transaction) as held or, with `schema_wait`, waiting; its id.
pub(super) fn record(
    conn: &Connection,
    incoming: &Incoming<'_>,
    event: &ChangeEvent,
    why: &str,
    schema_wait: bool,
) -> rusqlite::Result<i64> {
    let payload = ReplicationEvent {
        from_node_id: 0,
        event: event.clone(),
    }
    .encode();
    conn.prepare_cached(&format!(
        "INSERT INTO {} (stream, seq, origin, payload, reason, created_at, schema_wait) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        quote(HELD_TABLE)
    ))?
    .execute(rusqlite::params![
        incoming.stream,
        incoming.seq as i64,
        incoming.own.then_some("own"),
        payload,
        why,
        crate::clock::unix_ms(),
        schema_wait,
    ])?;
    Ok(conn.last_insert_rowid())
}

impl State {
    /// A newer event of a held row supersedes its held events (of the row under any of `keys`):
    /// they are dropped. True when that needs a write and `mode` is [`Mode::Read`].
    pub(super) fn supersede_held(
        &mut self,
        conn: &Connection,
        t: usize,
        keys: &[&Key],
        mode: Mode,
    ) -> Result<bool, EventError> {
        let held: Vec<i64> = keys
            .iter()
            .filter_map(|k| self.held_keys.get(&(t, (*k).clone())).copied())
            .collect();
        if !held.is_empty() {
            if mode == Mode::Read {
                return Ok(true);
            }
            for id in held {
                self.drop_held(conn, id)?;
            }
        }
        Ok(false)
    }

    /// Holds `event` after a UNIQUE conflict with another row (`why`), durably; logs both rows.
    pub(super) fn hold(
        &mut self,
        conn: &Connection,
        t: usize,
        key: Key,
        incoming: &Incoming<'_>,
        event: &ChangeEvent,
        why: String,
    ) -> Result<Step, EventError> {
        let id = record(conn, incoming, event, &why, false)?;
        let conflicting = self.conflicting_row(conn, t, event, &why);
        tracing::warn!(table = %self.tables[t].name, stream = incoming.stream, seq = incoming.seq,
            event_row = %describe(&event.row), conflicting_row = %conflicting, error = %why,
            "UNIQUE conflict with another row: event held until either row changes");
        self.held_keys.insert((t, key.clone()), id);
        self.held.insert(id, parked(incoming, event, (t, key)));
        Ok(Step::Done(Outcome::Held(why)))
    }

    pub(super) fn drop_held(&mut self, conn: &Connection, id: i64) -> rusqlite::Result<()> {
        forget(conn, id)?;
        if let Some(h) = self.held.remove(&id) {
            self.held_keys.remove(&h.place);
        }
        Ok(())
    }

    /// Steps `incoming` in a savepoint of its own, rolled back if the step fails.
    pub(super) fn step_or_undo(
        &mut self,
        conn: &Connection,
        incoming: &Incoming<'_>,
        mode: Mode,
    ) -> rusqlite::Result<Result<Step, EventError>> {
        conn.prepare_cached("SAVEPOINT step")?.execute([])?;
        let result = self.step(conn, incoming, mode);
        if result.is_err() {
            conn.prepare_cached("ROLLBACK TO step")?.execute([])?;
        }
        conn.prepare_cached("RELEASE step")?.execute([])?;
        Ok(result)
    }

    /// Applies whatever held events can apply now, until a pass makes no progress.
    pub(super) fn retry_held(&mut self, conn: &Connection) -> Result<usize, Error> {
        let mut applied = 0;
        loop {
            let ids: Vec<i64> = self.held.keys().copied().collect();
            let mut progress = false;
            for id in ids {
                let Some(h) = self.held.get(&id).cloned() else {
                    continue;
                };
                let (stream, seq) = (&h.stream, h.seq);
                match self.step_or_undo(conn, &h.incoming(&[]), Mode::Retry(id))? {
                    Ok(Step::Done(Outcome::Held(_))) => {}
                    Ok(Step::Done(outcome)) => {
                        // Applied, or no longer needed (superseded, unchanged).
                        if self.held.contains_key(&id) {
                            self.drop_held(conn, id)?;
                        }
                        if outcome == Outcome::Applied {
                            applied += 1;
                            tracing::info!(stream = %stream, seq, "Held event applied");
                        }
                        progress = true;
                    }
                    Ok(Step::NeedsWrite) | Err(EventError::Behind(_)) => {}
                    Err(EventError::Retry(e)) => return Err(e.into()),
                    Err(EventError::Poison(why)) => {
                        tracing::error!(stream = %stream, seq, error = %why, "Held event cannot apply; dropping it");
                        if self.held.contains_key(&id) {
                            let _ = self.drop_held(conn, id);
                        }
                        progress = true;
                    }
                }
            }
            if !progress && !self.held.is_empty() {
                let together = self.apply_held_together(conn)?;
                applied += together;
                progress = together > 0;
            }
            if !progress || self.held.is_empty() {
                return Ok(applied);
            }
        }
    }

    /// Held events waiting for each other (rows that swapped UNIQUE values, each new image
    /// conflicting with the other's old one: the swap's middle step never reached this node) are
    /// tried together per table, all then pairs: target rows deleted and images inserted in one
    /// savepoint, kept if all apply. Only whole-row events qualify (inserts must not lose columns).
    pub(super) fn apply_held_together(&mut self, conn: &Connection) -> Result<usize, Error> {
        let mut by_table: BTreeMap<usize, Vec<i64>> = BTreeMap::new();
        for (&id, h) in &self.held {
            let whole = h.event.row.len() == self.tables[h.place.0].columns.len();
            if whole && matches!(h.event.op, Op::Insert | Op::Update) {
                by_table.entry(h.place.0).or_default().push(id);
            }
        }
        let mut applied = 0;
        for (t, ids) in by_table {
            if ids.len() < 2 {
                continue;
            }
            let mut groups = vec![ids.clone()];
            if ids.len() <= MAX_PAIRED_HELD {
                for (n, &a) in ids.iter().enumerate() {
                    groups.extend(ids[n + 1..].iter().map(|&b| vec![a, b]));
                }
            }
            for group in groups {
                if group.iter().any(|id| !self.held.contains_key(id)) {
                    continue;
                }
                if !self.try_together(conn, t, &group)? {
                    continue;
                }
                for id in group {
                    if let Some(h) = self.held.get(&id) {
                        tracing::info!(stream = %h.stream, seq = h.seq, "Held event applied (with the events it waited for)");
                    }
                    self.drop_held(conn, id)?;
                    applied += 1;
                }
            }
        }
        Ok(applied)
    }

    /// One attempt of [`Self::apply_held_together`]: true if every event of `ids` applied.
    pub(super) fn try_together(
        &mut self,
        conn: &Connection,
        t: usize,
        ids: &[i64],
    ) -> Result<bool, Error> {
        let events: Vec<ChangeEvent> = ids
            .iter()
            .filter_map(|id| self.held.get(id).map(|h| h.event.clone()))
            .collect();
        conn.prepare_cached("SAVEPOINT held_group")?.execute([])?;
        let outcome = (|| -> Result<bool, EventError> {
            let mut layouts = Vec::with_capacity(events.len());
            for e in &events {
                let Some(layout) = self.layout(t, e) else {
                    return Ok(false);
                };
                let found = self.find(conn, t, &layout.0, &layout.1, e)?;
                if let Some(target) = found.first() {
                    match self.delete(conn, t, &layout.1, target) {
                        Ok(()) => {}
                        Err(WriteError::Conflict(_)) => return Ok(false),
                        Err(WriteError::Event(e)) => return Err(e),
                    }
                }
                layouts.push(layout);
            }
            for (e, layout) in events.iter().zip(&layouts) {
                match self.insert(conn, t, &layout.0, e) {
                    Ok(()) => {}
                    Err(WriteError::Conflict(_)) => return Ok(false),
                    Err(WriteError::Event(e)) => return Err(e),
                }
            }
            Ok(true)
        })();
        let keep = matches!(outcome, Ok(true));
        if !keep {
            conn.prepare_cached("ROLLBACK TO held_group")?.execute([])?;
        }
        conn.prepare_cached("RELEASE held_group")?.execute([])?;
        match outcome {
            Ok(done) => Ok(done),
            Err(EventError::Retry(e)) => Err(e.into()),
            // Poison shows when the event is retried alone; nothing changed here.
            Err(EventError::Poison(_) | EventError::Behind(_)) => Ok(false),
        }
    }
}
