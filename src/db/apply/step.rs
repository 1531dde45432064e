//! One event, evaluated and, in the write modes, applied (`State::step`).
//!
//! Resolved against the local schema, its row found: an event supersedes its row's (older) held
//! one; one older than a local change in flight is superseded; one equal to the row is unchanged;
//! else the row is updated, inserted or deleted (a failed write: [`State::finish_write`]).
//! Invariants: [`Mode::Read`] writes nothing (an event that would write returns
//! [`Step::NeedsWrite`]); the write modes always finish with [`Step::Done`] or an [`EventError`].
//! An event naming what this node lacks waits if its sender's schema may be ahead
//! ([`EventError::Behind`]), else it is poison, dead-lettered ([`quarantine`]) in-transaction.
//! Per-row order: while an earlier event of a row waits for the schema, later ones wait behind it.

use rusqlite::Connection;

use super::key::same_value;
pub(super) use super::row::{Behind, EventError};
use super::row::{Found, WriteError};
use super::{Incoming, Key, Outcome, State};
use crate::db::{DEAD_LETTER_TABLE, quote};
use crate::wire::{ChangeEvent, Op, Value};

/// Records an event that can never apply in the dead-letter table (in the caller's transaction).
pub(super) fn quarantine(
    conn: &Connection,
    stream: &str,
    seq: u64,
    why: &str,
    payload: &[u8],
) -> rusqlite::Result<()> {
    conn.prepare_cached(&format!(
        "INSERT INTO {} (stream, seq, error, payload, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        quote(DEAD_LETTER_TABLE)
    ))?
    .execute(rusqlite::params![
        stream,
        seq as i64,
        why,
        payload,
        crate::clock::unix_ms()
    ])?;
    Ok(())
}

/// What evaluating one event decided.
pub(super) enum Step {
    Done(Outcome),
    /// Only a write transaction can finish this event.
    NeedsWrite,
}

/// An event resolved against local table `t`: its columns' local indexes, key positions, wire key.
struct Resolved {
    t: usize,
    cols: Vec<usize>,
    key_pos: Vec<usize>,
    wire_key: Key,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// In the read transaction: decide, never write.
    Read,
    Write,
    /// Retrying the held event with this row id (its record stays unless it applies).
    Retry(i64),
    /// Retrying an event that waited for the schema (its caller keeps per-row order).
    RetryWaiting,
}

impl State {
    /// Why `event` cannot apply here: [`EventError::Behind`] or poison (see the module header).
    pub(super) fn unknown(&self, event: &ChangeEvent, t: Option<usize>, why: String) -> EventError {
        if self.hashes.matches(&event.schema_hash) {
            return EventError::Poison(why);
        }
        let (table, key) = self.place(event, t);
        EventError::Behind(Behind { why, table, key })
    }

    pub(super) fn step(
        &mut self,
        conn: &Connection,
        incoming: &Incoming<'_>,
        mode: Mode,
    ) -> Result<Step, EventError> {
        let event = match &incoming.event {
            Ok(e) => e,
            Err(why) => return Err(EventError::Poison(format!("undecodable event: {why}"))),
        };
        let Some(t) = self.resolve_table(&event.table) else {
            return self.no_table(event);
        };
        let renamed = self.renamed(t, event);
        let event = renamed.as_ref().unwrap_or(event);
        let r = self.resolve(t, event)?;
        // Behind an earlier waiting event of this row (retried events are older than any such).
        if matches!(mode, Mode::Read | Mode::Write) {
            let table = self.tables[t].name.to_lowercase();
            if self.blocked(&table, Some(&r.wire_key)) {
                return Err(EventError::Behind(Behind {
                    why: "an earlier event of its row waits for the schema".into(),
                    table,
                    key: Some(r.wire_key),
                }));
            }
        }
        let found = self.find(conn, t, &r.cols, &r.key_pos, event)?;
        let local_key = found
            .first()
            .map(|f| Key::of(r.key_pos.iter().map(|&i| &f.values[i])))
            .filter(|k| *k != r.wire_key);
        let keys: Vec<&Key> = std::iter::once(&r.wire_key).chain(&local_key).collect();

        // A held event for this row is older than this one: this one supersedes it.
        if !matches!(mode, Mode::Retry(_)) && self.supersede_held(conn, t, &keys, mode)? {
            return Ok(Step::NeedsWrite);
        }

        if self.track && self.superseded(conn, t, &keys, incoming.own, event.id)? {
            if incoming.own {
                return Ok(Step::Done(Outcome::Superseded));
            }
            // Nothing is lost if the row stays as it is: both nodes deleted it, or wrote it alike.
            let unchanged = match event.op {
                Op::Delete => found.is_empty(),
                Op::Insert | Op::Update => found.first().is_some_and(|f| {
                    f.values.len() == event.row.len()
                        && f.values.iter().zip(&event.row).all(|(a, (_, b))| a == b)
                }),
            };
            if unchanged {
                return Ok(Step::Done(Outcome::Superseded));
            }
            return self.overrule(conn, r.t, &r.wire_key, incoming, event, mode);
        }

        self.apply_op(conn, incoming, event, mode, r, &found)
    }

    /// For a table this node lacks: discarded if this node dropped it, else [`Self::unknown`].
    fn no_table(&self, event: &ChangeEvent) -> Result<Step, EventError> {
        if self.aliases.dropped(&event.table) {
            return Ok(Step::Done(Outcome::Discarded(format!(
                "table {:?} was dropped here",
                event.table
            ))));
        }
        Err(self.unknown(
            event,
            None,
            format!("no table mapping found for {:?}", event.table),
        ))
    }

    /// Resolves `event` (in table `t`, names already current): see [`Resolved`].
    fn resolve(&self, t: usize, event: &ChangeEvent) -> Result<Resolved, EventError> {
        let mut cols = Vec::with_capacity(event.row.len());
        for (name, _) in &event.row {
            let idx = self.tables[t].column_index(name).ok_or_else(|| {
                self.unknown(
                    event,
                    Some(t),
                    format!("table {:?} has no column {name:?}", self.tables[t].name),
                )
            })?;
            if cols.contains(&idx) {
                return Err(EventError::Poison(format!(
                    "event for {:?} names column {name:?} twice",
                    self.tables[t].name
                )));
            }
            cols.push(idx);
        }
        let mut key_pos = Vec::with_capacity(self.pks[t].len());
        for &p in &self.pks[t] {
            let pos = cols.iter().position(|&c| c == p).ok_or_else(|| {
                self.unknown(
                    event,
                    Some(t),
                    format!(
                        "{} on {:?} lacks primary key column {:?}",
                        event.op.as_str(),
                        self.tables[t].name,
                        self.tables[t].columns[p].name
                    ),
                )
            })?;
            key_pos.push(pos);
        }
        let wire_key = Key::of(key_pos.iter().map(|&i| &event.row[i].1));
        Ok(Resolved {
            t,
            cols,
            key_pos,
            wire_key,
        })
    }

    /// The event's op on rows `found`: unchanged, [`Step::NeedsWrite`] in [`Mode::Read`], or done.
    fn apply_op(
        &mut self,
        conn: &Connection,
        incoming: &Incoming<'_>,
        event: &ChangeEvent,
        mode: Mode,
        r: Resolved,
        found: &[Found],
    ) -> Result<Step, EventError> {
        let Resolved {
            t,
            cols,
            key_pos,
            wire_key,
        } = r;
        let has_null_key = key_pos.iter().any(|&i| event.row[i].1 == Value::Null);
        let equal = |f: &Found| {
            f.values
                .iter()
                .zip(&event.row)
                .all(|(a, (_, b))| same_value(a, b))
        };
        match event.op {
            Op::Insert | Op::Update => {
                if found.iter().any(equal) {
                    return Ok(Step::Done(Outcome::Unchanged));
                }
                let non_key: Vec<usize> =
                    (0..cols.len()).filter(|i| !key_pos.contains(i)).collect();
                if !found.is_empty() && non_key.is_empty() {
                    return Ok(Step::Done(Outcome::Unchanged));
                }
                if mode == Mode::Read {
                    return Ok(Step::NeedsWrite);
                }
                let result = match found.first() {
                    Some(target) => self.update(conn, t, &cols, &non_key, &key_pos, target, event),
                    None => self.insert(conn, t, &cols, event),
                };
                self.finish_write(conn, t, wire_key, incoming, mode, result)
            }
            Op::Delete => {
                let target = if has_null_key {
                    found.iter().find(|f| equal(f))
                } else {
                    found.first()
                };
                let Some(target) = target else {
                    return Ok(Step::Done(Outcome::Unchanged));
                };
                if mode == Mode::Read {
                    return Ok(Step::NeedsWrite);
                }
                let result = self.delete(conn, t, &key_pos, target);
                self.finish_write(conn, t, wire_key, incoming, mode, result)
            }
        }
    }

    /// Turns a write's result into the event's outcome: applied, held, or an error.
    pub(super) fn finish_write(
        &mut self,
        conn: &Connection,
        t: usize,
        key: Key,
        incoming: &Incoming<'_>,
        mode: Mode,
        result: Result<(), WriteError>,
    ) -> Result<Step, EventError> {
        match result {
            Ok(()) => {
                if let Mode::Retry(id) = mode {
                    self.drop_held(conn, id)?;
                }
                Ok(Step::Done(Outcome::Applied))
            }
            // A constraint the sender's (other) schema lacked: ours may be behind, so wait.
            Err(WriteError::Event(EventError::Poison(why)))
                if incoming.event.as_ref().is_ok_and(|e| {
                    !e.schema_hash.is_empty() && !self.hashes.matches(&e.schema_hash)
                }) =>
            {
                Err(EventError::Behind(Behind {
                    why,
                    table: self.tables[t].name.to_lowercase(),
                    key: Some(key),
                }))
            }
            Err(WriteError::Event(e)) => Err(e),
            Err(WriteError::Conflict(why)) => {
                if let Mode::Retry(_) = mode {
                    return Ok(Step::Done(Outcome::Held(why)));
                }
                let Ok(event) = &incoming.event else {
                    return Err(EventError::Poison(why));
                };
                self.hold(conn, t, key, incoming, event, why)
            }
        }
    }
}
