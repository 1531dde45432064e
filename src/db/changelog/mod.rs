//! Reading captured local changes, retiring them once published (upstream-behaviour §4.8, §4.10).
//!
//! Invariants:
//! - Changes are read in global-log id order, which is local commit order across tables.
//! - A change is marked published (`state = 1`, where it landed, global row deleted) only by
//!   [`ChangeLog::retire`], with changes JetStream acknowledged (or found in the stream after a
//!   crash); everything else stays pending. Nothing is ever dropped on error.
//! - The caller batches retiring into few, rare write transactions ([`ChangeLog::housekeep`]).
//! - A global row whose change-log row or table no longer exists cannot be published by anyone; it
//!   is reported as an orphan and removed (Go panicked or stalled forever on these).
//! - Only published rows older than the cleanup horizon are deleted, and, while this node applies
//!   its own events, only once their event has come back (see [`ChangeLog::in_flight`]).

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use super::{Error, GLOBAL_LOG, PUBLISHED_TABLE, Table, change_log_name, on_table, quote};
use crate::wire::{Op, Value};

/// One captured change waiting to be published.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingChange {
    pub global_id: i64,
    /// Index of the table in the watched-table list.
    pub table: usize,
    /// Id in the table's change log (the event `Id`).
    pub log_id: i64,
    /// Capture time, unix ms.
    pub created_at: i64,
    pub op: Op,
    /// Values in the table's column order.
    pub values: Vec<Value>,
}

#[derive(Debug, Default)]
pub struct Scan {
    pub changes: Vec<PendingChange>,
    /// Global-log ids that point at nothing publishable (with the reason, for the log).
    pub orphans: Vec<(i64, String)>,
    /// Nothing was read: the schema changed and capture is not confirmed for it yet (changes
    /// captured by stale triggers must not go out before the reinstall fixed them up).
    pub schema_changed: bool,
}

/// Reads changes of watched tables; built once, then used for every scan.
#[derive(Debug)]
pub struct ChangeLog {
    tables: Vec<Table>,
    by_name: HashMap<String, usize>,
    /// Per table: `SELECT type, created_at, val_… FROM <log> WHERE id = ?1 AND state = 0`.
    select_sql: Vec<String>,
    /// Per table: `UPDATE <log> SET state = 1, pub_shard = ?2, pub_seq = ?3 WHERE id = ?1`.
    mark_sql: Vec<String>,
    /// The schema version capture is confirmed for (see [`super::ddl::drift`]); scans read
    /// nothing while the database's differs. `None`: not checked (tests, one-shot commands).
    confirmed: Option<std::sync::Arc<std::sync::atomic::AtomicI64>>,
    /// Told when a scan finds the schema changed, so that the check runs now, not at its next
    /// tick (every millisecond without triggers for the new schema may lose a write).
    schema_poke: Option<std::sync::Arc<tokio::sync::Notify>>,
}

/// Reads a column as a wire value, keeping TEXT bytes exactly (NUL and invalid UTF-8 included).
pub fn value_at(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<Value> {
    use rusqlite::types::ValueRef;
    Ok(match row.get_ref(idx)? {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Integer(i),
        ValueRef::Real(f) => Value::Real(f),
        ValueRef::Text(t) => Value::Text(t.to_vec()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    })
}

impl ChangeLog {
    pub fn new(tables: Vec<Table>) -> ChangeLog {
        let by_name = tables
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let select_sql = tables
            .iter()
            .map(|t| {
                let cols: Vec<String> = t
                    .columns
                    .iter()
                    .map(|c| quote(&format!("val_{}", c.name)))
                    .collect();
                format!(
                    "SELECT type, created_at, {} FROM {} WHERE id = ?1 AND state = 0",
                    cols.join(", "),
                    quote(&change_log_name(&t.name))
                )
            })
            .collect();
        let mark_sql = tables
            .iter()
            .map(|t| {
                format!(
                    "UPDATE {} SET state = 1, pub_shard = ?2, pub_seq = ?3 WHERE id = ?1",
                    quote(&change_log_name(&t.name))
                )
            })
            .collect();
        ChangeLog {
            tables,
            by_name,
            select_sql,
            mark_sql,
            confirmed: None,
            schema_poke: None,
        }
    }

    /// Makes scans wait for capture to be confirmed for the current schema version.
    pub fn with_confirmed(
        mut self,
        confirmed: std::sync::Arc<std::sync::atomic::AtomicI64>,
        poke: std::sync::Arc<tokio::sync::Notify>,
    ) -> ChangeLog {
        self.confirmed = Some(confirmed);
        self.schema_poke = Some(poke);
        self
    }

    pub fn tables(&self) -> &[Table] {
        &self.tables
    }

    /// Number of changes in the global log above `after` (the publisher's done-with cursor, or 0).
    pub fn pending_count(&self, conn: &Connection, after: i64) -> Result<i64, Error> {
        // A rowid range, not a full count: rows up to `after` (maybe many) only await retirement.
        Ok(conn
            .prepare_cached(&format!(
                "SELECT count(*) FROM {} WHERE id > ?1",
                quote(GLOBAL_LOG)
            ))?
            .query_row([after], |r| r.get(0))?)
    }

    /// Reads up to `limit` pending changes above global id `after` (0: all) in commit order, in one
    /// read transaction; `after` lets a publisher read ahead while a batch is being acknowledged.
    pub fn scan(&self, conn: &Connection, after: i64, limit: u32) -> Result<Scan, Error> {
        let tx = conn.unchecked_transaction()?;
        let mut scan = Scan::default();
        if let Some(confirmed) = &self.confirmed {
            let version: i64 = tx.query_row("PRAGMA schema_version", [], |r| r.get(0))?;
            if version != confirmed.load(std::sync::atomic::Ordering::SeqCst) {
                if let Some(poke) = &self.schema_poke {
                    poke.notify_one();
                }
                scan.schema_changed = true;
                return Ok(scan);
            }
        }
        let globals: Vec<(i64, i64, String)> = tx
            .prepare_cached(&format!(
                "SELECT id, change_table_id, table_name FROM {} WHERE id > ?1 ORDER BY id LIMIT ?2",
                quote(GLOBAL_LOG)
            ))?
            .query_map(rusqlite::params![after, limit], |r| r.try_into())?
            .collect::<Result<_, _>>()?;
        for (global_id, log_id, table_name) in globals {
            self.read_change(&tx, (global_id, log_id, &table_name), &mut scan)?;
        }
        tx.commit()?;
        Ok(scan)
    }

    /// Reads change `(global id, change-log id, table)` into `scan`: pending, or orphan with why.
    fn read_change(
        &self,
        tx: &Connection,
        (global_id, log_id, table_name): (i64, i64, &str),
        scan: &mut Scan,
    ) -> Result<(), Error> {
        let Some(&table) = self.by_name.get(table_name) else {
            scan.orphans
                .push((global_id, format!("table {table_name:?} is not watched")));
            return Ok(());
        };
        let width = self.tables[table].columns.len();
        let mut stmt = match tx.prepare_cached(&self.select_sql[table]) {
            Ok(stmt) => stmt,
            // The change log (or a column) is gone: nothing can read it; retrying blocks the rest.
            Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::Unknown) => {
                scan.orphans.push((
                    global_id,
                    format!("cannot read change log of {table_name:?}: {e}"),
                ));
                return Ok(());
            }
            Err(e) => return Err(on_table(table_name)(e)),
        };
        let found = stmt
            .query_row([log_id], |r| {
                let op_text = r
                    .get_ref(0)?
                    .as_bytes_or_null()?
                    .unwrap_or_default()
                    .to_vec();
                let created_at: Option<i64> = r.get(1)?;
                let values = (0..width)
                    .map(|i| value_at(r, i + 2))
                    .collect::<Result<_, _>>()?;
                Ok((op_text, created_at.unwrap_or(0), values))
            })
            .optional()
            .map_err(on_table(table_name))?;
        match found {
            None => scan.orphans.push((
                global_id,
                format!("change log row {log_id} of table {table_name:?} is missing"),
            )),
            Some((op_text, created_at, values)) => match Op::parse(&op_text) {
                Some(op) => scan.changes.push(PendingChange {
                    global_id,
                    table,
                    log_id,
                    created_at,
                    op,
                    values,
                }),
                None => scan.orphans.push((
                    global_id,
                    format!(
                        "change log row {log_id} of table {table_name:?} has type {:?}",
                        String::from_utf8_lossy(&op_text)
                    ),
                )),
            },
        }
        Ok(())
    }

    /// Retires changes in one write transaction (an error changes nothing): `published` ones get
    /// `state = 1` and where they landed, `failed` ones `state = -1` (Go's unused "Failed" state;
    /// the row stays for inspection); theirs and `orphans`' global-log rows go. The newest landing
    /// per shard goes to `__harmonylite__published`, where a restart seeks unretired ones.
    pub fn retire(&self, conn: &mut Connection, batch: &Retirement) -> Result<(), Error> {
        if batch.is_empty() {
            return Ok(());
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        self.retire_in(&tx, batch, &|| true)?;
        tx.commit()?;
        Ok(())
    }

    /// [`ChangeLog::retire`] and [`ChangeLog::cleanup`] in one transaction; `Ok(None)`, rolled
    /// back, once `undisturbed()` says no (asked on taking the write lock, every few statements,
    /// before the commit): SQLite fails an application's deferred read-then-write transaction with
    /// SQLITE_BUSY at once (no busy timeout) while we hold the write lock, committing or not;
    /// rolling back frees it before such a reader writes (if it began before the last check).
    pub fn housekeep(
        &self,
        conn: &mut Connection,
        batch: &Retirement,
        horizon_ms: i64,
        applied: Option<&[(String, u64)]>,
        undisturbed: &dyn Fn() -> bool,
    ) -> Result<Option<usize>, Error> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if !undisturbed() || !self.retire_in(&tx, batch, undisturbed)? {
            return Ok(None);
        }
        let seqs: Option<Vec<u64>> = applied.map(|a| a.iter().map(|(_, seq)| *seq).collect());
        let Some(cleaned) = self.cleanup_in(&tx, horizon_ms, seqs.as_deref(), undisturbed)? else {
            return Ok(None);
        };
        // Commit the positions these deletes assumed (design §14): restarts start past them.
        for (stream, seq) in applied.unwrap_or_default() {
            super::record_applied(&tx, stream, *seq)?;
        }
        // Flush pages to the WAL now (unseen until the commit), so the commit only appends a frame.
        tx.cache_flush()?;
        // Yield, so the last check and commit get a fresh time slice (a preemption there costs ms).
        std::thread::yield_now();
        if !undisturbed() {
            return Ok(None);
        }
        tx.commit()?;
        Ok(Some(cleaned))
    }

    /// Writes `batch`; `Ok(false)` once `undisturbed()` (asked per [`CHECK_EVERY`] writes) says no.
    fn retire_in(
        &self,
        tx: &Connection,
        batch: &Retirement,
        undisturbed: &dyn Fn() -> bool,
    ) -> Result<bool, Error> {
        let mut statements = 0usize;
        let mut go_on = || {
            statements += 1;
            !statements.is_multiple_of(CHECK_EVERY) || undisturbed()
        };
        let mut delete_global =
            tx.prepare_cached(&format!("DELETE FROM {} WHERE id = ?1", quote(GLOBAL_LOG)))?;
        let mut newest: std::collections::BTreeMap<u64, u64> = Default::default();
        for change in &batch.published {
            let shard = change.landed.map(|(shard, _)| shard as i64);
            let seq = change.landed.map(|(_, seq)| seq as i64);
            tx.prepare_cached(&self.mark_sql[change.table])?
                .execute(rusqlite::params![change.log_id, shard, seq])
                .map_err(on_table(&self.tables[change.table].name))?;
            delete_global.execute([change.global_id])?;
            if !go_on() {
                return Ok(false);
            }
            if let Some((shard, seq)) = change.landed {
                let newest = newest.entry(shard).or_insert(seq);
                *newest = (*newest).max(seq);
            }
        }
        for change in &batch.failed {
            tx.execute(
                &format!(
                    "UPDATE {} SET state = -1 WHERE id = ?1",
                    quote(&change_log_name(&self.tables[change.table].name))
                ),
                [change.log_id],
            )
            .map_err(on_table(&self.tables[change.table].name))?;
            delete_global.execute([change.global_id])?;
            if !go_on() {
                return Ok(false);
            }
        }
        for id in &batch.orphans {
            delete_global.execute([id])?;
            if !go_on() {
                return Ok(false);
            }
        }
        let mut landed = tx.prepare_cached(&format!(
            "INSERT OR REPLACE INTO {} (shard, seq) VALUES (?1, ?2)",
            quote(PUBLISHED_TABLE)
        ))?;
        for (shard, seq) in newest {
            landed.execute(rusqlite::params![shard as i64, seq as i64])?;
        }
        Ok(true)
    }

    /// The highest global change id ever captured here (never reused; 0 before any install).
    pub fn highest_global_id(conn: &Connection) -> Result<i64, Error> {
        if !super::has_table(conn, GLOBAL_LOG)? {
            return Ok(0);
        }
        let sql = format!("SELECT coalesce(max(id), 0) FROM {}", quote(GLOBAL_LOG));
        let used: i64 = conn.query_row(&sql, [], |r| r.get(0))?;
        // AUTOINCREMENT remembers ids whose rows are gone (published changes).
        let issued: i64 = if super::has_table(conn, "sqlite_sequence")? {
            conn.query_row(
                "SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = ?1",
                [GLOBAL_LOG],
                |r| r.get(0),
            )?
        } else {
            0
        };
        Ok(used.max(issued))
    }

    /// Per shard, the stream sequence of the newest change retired as published.
    pub fn last_landed(conn: &Connection) -> Result<HashMap<u64, u64>, Error> {
        let mut stmt = conn.prepare(&format!(
            "SELECT shard, seq FROM {}",
            quote(PUBLISHED_TABLE)
        ))?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?.max(0) as u64,
                r.get::<_, i64>(1)?.max(0) as u64,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Per table, the highest change-log id of a pending change with a global id ≤ `global` (or 0).
    pub fn max_ids_up_to(&self, conn: &Connection, global: i64) -> Result<Vec<i64>, Error> {
        let mut stmt = conn.prepare(&format!(
            "SELECT coalesce(max(change_table_id), 0) FROM {} WHERE table_name = ?1 AND id <= ?2",
            quote(GLOBAL_LOG)
        ))?;
        self.tables
            .iter()
            .map(|t| {
                stmt.query_row(rusqlite::params![t.name, global], |r| r.get::<_, i64>(0))
                    .map_err(on_table(&t.name))
            })
            .collect()
    }

    /// Deletes published change-log rows captured by `horizon_ms`; returns the count. With
    /// `applied` (own events applied here: per shard, index shard − 1, the last applied sequence)
    /// a row stays until its event came back: after a restart it tells older events from newer.
    #[cfg(test)]
    pub fn cleanup(
        &self,
        conn: &mut Connection,
        horizon_ms: i64,
        applied: Option<&[u64]>,
    ) -> Result<usize, Error> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let total = self
            .cleanup_in(&tx, horizon_ms, applied, &|| true)?
            .unwrap_or(0);
        tx.commit()?;
        Ok(total)
    }

    /// [`ChangeLog::cleanup`]'s deletes; `Ok(None)` once `undisturbed()` (asked per table) says no.
    fn cleanup_in(
        &self,
        tx: &Connection,
        horizon_ms: i64,
        applied: Option<&[u64]>,
        undisturbed: &dyn Fn() -> bool,
    ) -> Result<Option<usize>, Error> {
        let came_back = match applied {
            None => String::new(),
            Some(applied) => {
                let arms: String = applied
                    .iter()
                    .enumerate()
                    .map(|(i, seq)| format!(" WHEN {} THEN {}", i + 1, seq))
                    .collect();
                format!(" AND (pub_seq IS NULL OR pub_seq <= CASE pub_shard{arms} ELSE -1 END)")
            }
        };
        let mut total = 0;
        for table in &self.tables {
            total += tx
                .execute(
                    &format!(
                        "DELETE FROM {} WHERE state = 1 AND created_at <= ?1{came_back}",
                        quote(&change_log_name(&table.name))
                    ),
                    [horizon_ms],
                )
                .map_err(on_table(&table.name))?;
            if !undisturbed() {
                return Ok(None);
            }
        }
        Ok(Some(total))
    }

    /// Captured changes of table `table` (index) with a change-log id above `after` that may not
    /// have come back through the stream: pending ones, and published ones past `applied` for their
    /// shard (`None`: all came back); pending ones up to `unknown_up_to` are flagged unknown (see
    /// [`crate::db::restore::NotKept`]). `(id, key, unknown)` in id order, and the highest id read.
    pub fn in_flight(
        &self,
        conn: &Connection,
        table: usize,
        after: i64,
        applied: Option<&[u64]>,
        unknown_up_to: i64,
    ) -> Result<InFlight, Error> {
        let t = &self.tables[table];
        let pks = t.pk_indexes();
        let sql = format!(
            "SELECT id, state, pub_shard, pub_seq, {} FROM {} WHERE id > ?1 ORDER BY id",
            key_columns(t),
            quote(&change_log_name(&t.name))
        );
        let mut stmt = conn.prepare_cached(&sql).map_err(on_table(&t.name))?;
        let mut rows = stmt.query([after]).map_err(on_table(&t.name))?;
        let mut out = Vec::new();
        let mut highest = after;
        while let Some(row) = rows.next().map_err(on_table(&t.name))? {
            let id: i64 = row.get(0).map_err(on_table(&t.name))?;
            highest = highest.max(id);
            let state: Option<i64> = row.get(1).map_err(on_table(&t.name))?;
            let shard: Option<i64> = row.get(2).map_err(on_table(&t.name))?;
            let seq: Option<i64> = row.get(3).map_err(on_table(&t.name))?;
            let (flying, unknown) = match (state, applied, shard, seq) {
                // Pending, but perhaps published before a crash where no one can tell any more.
                (Some(0), ..) => (true, id <= unknown_up_to),
                (Some(1), Some(applied), Some(shard), Some(seq)) => {
                    let pos = applied.get((shard.max(1) - 1) as usize).copied();
                    (pos.is_none_or(|p| seq as u64 > p), false)
                }
                _ => (false, false),
            };
            if !flying {
                continue;
            }
            let key = (0..pks.len())
                .map(|n| value_at(row, n + 4))
                .collect::<Result<_, _>>();
            out.push((id, key.map_err(on_table(&t.name))?, unknown));
        }
        Ok((out, highest))
    }

    /// The keys of the changes `ids` of table `table` (index) that still exist, as `(id, key)`.
    pub fn keys_of(
        &self,
        conn: &Connection,
        table: usize,
        ids: &[i64],
    ) -> Result<Vec<(i64, Vec<Value>)>, Error> {
        let t = &self.tables[table];
        let pks = t.pk_indexes();
        let sql = format!(
            "SELECT {} FROM {} WHERE id = ?1",
            key_columns(t),
            quote(&change_log_name(&t.name))
        );
        let mut stmt = conn.prepare_cached(&sql).map_err(on_table(&t.name))?;
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            let mut rows = stmt.query([id]).map_err(on_table(&t.name))?;
            if let Some(row) = rows.next().map_err(on_table(&t.name))? {
                let key = (0..pks.len())
                    .map(|n| value_at(row, n))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(on_table(&t.name))?;
                out.push((id, key));
            }
        }
        Ok(out)
    }

    /// Pending changes as (table, change-log id) → global id, to match ones found after a crash.
    pub fn pending_ids(&self, conn: &Connection) -> Result<HashMap<(usize, i64), i64>, Error> {
        let mut stmt = conn.prepare(&format!(
            "SELECT id, change_table_id, table_name FROM {}",
            quote(GLOBAL_LOG)
        ))?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        let mut out = HashMap::new();
        for row in rows {
            let (global, log_id, table): (i64, i64, String) = row?;
            if let Some(&t) = self.by_name.get(&table) {
                out.insert((t, log_id), global);
            }
        }
        Ok(out)
    }

    pub fn created_at(
        &self,
        conn: &Connection,
        table: usize,
        log_id: i64,
    ) -> Result<Option<i64>, Error> {
        let t = &self.tables[table];
        Ok(conn
            .prepare_cached(&format!(
                "SELECT created_at FROM {} WHERE id = ?1",
                quote(&change_log_name(&t.name))
            ))
            .map_err(on_table(&t.name))?
            .query_row([log_id], |r| r.get::<_, Option<i64>>(0))
            .optional()
            .map_err(on_table(&t.name))?
            .flatten())
    }

    pub fn table_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }
}

/// The change-log columns holding a table's primary key, quoted and comma-separated.
fn key_columns(t: &Table) -> String {
    t.pk_indexes()
        .iter()
        .map(|&i| quote(&format!("val_{}", t.columns[i].name)))
        .collect::<Vec<_>>()
        .join(", ")
}

pub type InFlight = (Vec<(i64, Vec<Value>, bool)>, i64);

/// Statements between reader checks while retiring (a check is one `fcntl` call; a statement, µs).
const CHECK_EVERY: usize = 16;

/// A change leaving the global log.
#[derive(Debug, Clone, PartialEq)]
pub struct Retired {
    pub global_id: i64,
    pub table: usize,
    pub log_id: i64,
    /// (shard, stream sequence) where it was stored; `None` when not sent (`publish = false`).
    pub landed: Option<(u64, u64)>,
}

/// Changes to retire in one transaction (see [`ChangeLog::retire`]).
#[derive(Debug, Default, Clone)]
pub struct Retirement {
    pub published: Vec<Retired>,
    pub failed: Vec<Retired>,
    pub orphans: Vec<i64>,
}

impl Retirement {
    pub fn is_empty(&self) -> bool {
        self.published.is_empty() && self.failed.is_empty() && self.orphans.is_empty()
    }

    /// Removes what `done` (an earlier copy of this one's front) retired; new ones only append.
    pub fn remove_front(&mut self, done: &Retirement) {
        let front = |n: usize, len: usize| ..n.min(len);
        self.published
            .drain(front(done.published.len(), self.published.len()));
        self.failed
            .drain(front(done.failed.len(), self.failed.len()));
        self.orphans
            .drain(front(done.orphans.len(), self.orphans.len()));
    }

    /// (table, change-log id, shard, sequence) of the published changes that were sent.
    pub fn landed(&self) -> impl Iterator<Item = (usize, i64, u64, u64)> + '_ {
        self.published
            .iter()
            .filter_map(|r| r.landed.map(|(shard, seq)| (r.table, r.log_id, shard, seq)))
    }

    /// How many global-log rows it removes.
    pub fn len(&self) -> usize {
        self.published.len() + self.failed.len() + self.orphans.len()
    }
}

#[cfg(test)]
mod tests;
