//! Conflicts never vanish (design §15): another node's event for a row with a local change in
//! flight loses to it (ours is later in the stream and overwrites the row on every node), so its
//! image would disappear from the whole cluster (two nodes taking one auto id, or editing one row
//! at once). It is kept in `__harmonylite__conflicts` (JSON, with its operation, origin, stream
//! position and payload) in the apply transaction and reported as [`Outcome::Overruled`] (the
//! caller counts `harmonylite_conflicts`); each row's first loss is logged as a warning.
//! Invariants: recorded only on the node whose change wins (once per loss in the cluster); our own
//! older events are not conflicts (they are superseded quietly).

use rusqlite::Connection;

use super::row::describe;
use super::step::{EventError, Mode, Step};
use super::{Incoming, Key, Outcome, State};
use crate::db::sql::row_json;
use crate::db::{CONFLICTS_TABLE, quote};
use crate::wire::{ChangeEvent, Op};

impl State {
    /// Keeps another node's `event` for row `key` of table `t` as lost to a local change in flight.
    pub(super) fn overrule(
        &mut self,
        conn: &Connection,
        t: usize,
        key: &Key,
        incoming: &Incoming<'_>,
        event: &ChangeEvent,
        mode: Mode,
    ) -> Result<Step, EventError> {
        if mode == Mode::Read {
            return Ok(Step::NeedsWrite);
        }
        let table = self.tables[t].name.clone();
        let kind = match event.op {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        };
        let from = incoming.from_node.map(|n| n as i64);
        conn.prepare_cached(&format!(
            "INSERT INTO {} (table_name, kind, lost_row, from_node, stream, seq, payload, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            quote(CONFLICTS_TABLE)
        ))?
        .execute(rusqlite::params![
            table,
            kind,
            row_json(&event.row),
            from,
            incoming.stream,
            incoming.seq as i64,
            incoming.raw,
            crate::clock::unix_ms(),
        ])?;
        if self.overruled.insert((t, key.clone())) {
            tracing::warn!(table = %table, kind, from_node = ?from, stream = incoming.stream,
                seq = incoming.seq, lost_row = %describe(&event.row),
                "Another node's change lost to a concurrent change made here; its row is kept in __harmonylite__conflicts");
        }
        Ok(Step::Done(Outcome::Overruled {
            table,
            kind: kind.to_owned(),
        }))
    }
}
