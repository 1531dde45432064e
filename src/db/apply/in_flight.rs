//! Local changes in flight: captured here, not yet come back through the stream.
//!
//! While such a change of row R is in flight, every event for R that arrives is older in stream
//! order (same row, same shard) and would only roll R back: it is skipped (*superseded*). Tracked
//! per row key (only when this node publishes, so its events come back): new change-log rows are
//! read in each transaction (`State::refresh`, seeing the latest commit); an entry goes when our
//! event for it comes back; a restart rebuilds the set from the change log and the seq map.
//! Invariants: a change of unknown publish status, or captured before its table's columns changed,
//! supersedes only our own older events. One that can never come back (stream recreated, inside a
//! restored snapshot) stops counting, so it cannot hold its row back forever.

use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior};

use super::{Applier, Key, State};
use crate::db::{Error, change_log_name, on_table, quote};

impl Applier {
    /// Per table: changes up to these log ids predate a column change (see `State::stale_up_to`).
    pub fn set_stale_up_to(&mut self, ids: Vec<i64>) -> Result<(), Error> {
        self.state.stale_up_to = ids;
        self.rebuild_in_flight()
    }

    /// Per table: pending changes up to these ids have unknown publish status (`State::unknown`).
    pub fn set_unknown_up_to(&mut self, ids: Vec<i64>) -> Result<(), Error> {
        self.state.unknown_up_to = ids;
        self.rebuild_in_flight()
    }

    /// Records that `shard` (1-based) has been applied through `seq`.
    pub fn set_applied(&mut self, shard: usize, seq: u64) {
        if let Some(slot) = self.state.applied.get_mut(shard.wrapping_sub(1)) {
            *slot = seq;
        }
    }

    /// Re-reads the in-flight set (at start; after a position jump, so lost changes stop blocking).
    pub fn rebuild_in_flight(&mut self) -> Result<(), Error> {
        for m in self
            .state
            .in_flight
            .iter_mut()
            .chain(self.state.unknown.iter_mut())
        {
            m.clear();
        }
        self.state.cursors.iter_mut().for_each(|c| *c = 0);
        let tx = self.conn.unchecked_transaction()?;
        self.state.refresh(&tx)?;
        tx.commit()?;
        Ok(())
    }

    /// Stops counting as in flight our acknowledged, unmarked changes (`landed`: table, log id,
    /// shard, seq) where `gone(shard, seq)`: they never come back (restored snapshot, gap, stream
    /// recreated) and would block their rows; re-reading can't tell (they still look pending).
    pub fn forget_landed(
        &mut self,
        landed: &[(usize, i64, u64, u64)],
        gone: impl Fn(u64, u64) -> bool,
    ) {
        for &(t, log_id, shard, seq) in landed {
            if gone(shard, seq)
                && let Some(map) = self.state.in_flight.get_mut(t)
            {
                map.retain(|_, id| *id != log_id);
            }
        }
    }

    /// Stream `shard` (1-based) was recreated: our changes in it never come back, so forget them.
    pub fn forget_published(&mut self, shard: usize) -> Result<(), Error> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        for t in &self.state.tables {
            tx.execute(
                &format!(
                    "UPDATE {} SET pub_seq = NULL WHERE state = 1 AND pub_shard = ?1",
                    quote(&change_log_name(&t.name))
                ),
                [shard as i64],
            )
            .map_err(on_table(&t.name))?;
        }
        tx.commit()?;
        self.set_applied(shard, 0);
        self.rebuild_in_flight()
    }

    #[cfg(test)]
    pub fn in_flight_len(&self) -> usize {
        self.state
            .in_flight
            .iter()
            .map(std::collections::HashMap::len)
            .sum()
    }
}

impl State {
    /// Whether a local change in flight of the row (any of `keys`) makes this event stale (rolling
    /// the row back); our own event (`own`, log `id`) no older than all such changes ends their
    /// tracking. A newest change marked failed (too large to publish) never comes back: ignored.
    pub(super) fn superseded(
        &mut self,
        conn: &Connection,
        t: usize,
        keys: &[&Key],
        own: bool,
        id: i64,
    ) -> rusqlite::Result<bool> {
        let flying = &self.in_flight[t];
        let mut newest = keys.iter().filter_map(|k| flying.get(*k).copied()).max();
        if let Some(newest_id) = newest
            && self.failed(conn, t, newest_id)?
        {
            for k in keys {
                self.in_flight[t].remove(*k);
            }
            newest = None;
        }
        let unknown = if own {
            let maybe = &self.unknown[t];
            keys.iter().filter_map(|k| maybe.get(*k).copied()).max()
        } else {
            None
        };
        Ok(match newest.max(unknown) {
            Some(newest) if !own || newest > id => true,
            Some(_) => {
                for k in keys {
                    self.in_flight[t].remove(*k);
                    self.unknown[t].remove(*k);
                }
                false
            }
            None => false,
        })
    }

    /// Whether the change-log row `id` of table `t` is marked failed (`state = -1`).
    fn failed(&self, conn: &Connection, t: usize, id: i64) -> rusqlite::Result<bool> {
        let sql = format!(
            "SELECT state = -1 FROM {} WHERE id = ?1",
            quote(&change_log_name(&self.tables[t].name))
        );
        let failed = conn
            .prepare_cached(&sql)?
            .query_row([id], |r| r.get::<_, bool>(0))
            .optional()?;
        Ok(failed == Some(true))
    }

    /// Reads change-log rows captured since the last call into the in-flight set.
    pub(super) fn refresh(&mut self, conn: &Connection) -> Result<(), Error> {
        if !self.track {
            return Ok(());
        }
        for t in 0..self.tables.len() {
            let (rows, highest) = match self.log.in_flight(
                conn,
                t,
                self.cursors[t],
                Some(&self.applied),
                self.unknown_up_to.get(t).copied().unwrap_or(0),
            ) {
                Ok(r) => r,
                // The change log was dropped under us (capture removed): nothing to track.
                Err(Error::Sqlite { source, .. })
                    if source.sqlite_error_code() == Some(ErrorCode::Unknown) =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.cursors[t] = highest;
            let stale = self.stale_up_to.get(t).copied().unwrap_or(0);
            for (id, key, unknown) in rows {
                // Captured before the columns changed: holds back only our own older events.
                let unknown = unknown || id <= stale;
                let map = if unknown {
                    &mut self.unknown[t]
                } else {
                    &mut self.in_flight[t]
                };
                let slot = map.entry(Key::of(&key)).or_insert(id);
                *slot = (*slot).max(id);
            }
        }
        Ok(())
    }
}
