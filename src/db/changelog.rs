//! Reading captured local changes and retiring them once published (upstream-behaviour §4.8, §4.10).
//!
//! Invariants:
//! - Changes are read in global-log id order, which is local commit order across tables.
//! - A change is marked published (`state = 1`, global row deleted) only by [`mark_published`],
//!   which the publisher calls with the prefix of a scan that JetStream acknowledged; everything
//!   else stays pending and is read again by the next scan. Nothing is ever dropped on error.
//! - A global row whose change-log row or table no longer exists cannot be published by anyone; it
//!   is reported as an orphan and removed (Go panicked or stalled forever on these).
//! - Only published rows older than the cleanup horizon are deleted.

use std::collections::HashMap;

use rusqlite::{Connection, TransactionBehavior};

use super::{Error, GLOBAL_LOG, Table, change_log_name, on_table, quote};
use crate::wire::{Op, Value};

/// One captured change waiting to be published.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingChange {
    /// Id in the global log.
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

/// The result of one scan.
#[derive(Debug, Default)]
pub struct Scan {
    pub changes: Vec<PendingChange>,
    /// Global-log ids that point at nothing publishable (with the reason, for the log).
    pub orphans: Vec<(i64, String)>,
}

/// Reads changes of watched tables; built once, then used for every scan.
#[derive(Debug)]
pub struct ChangeLog {
    tables: Vec<Table>,
    by_name: HashMap<String, usize>,
    /// Per table: `SELECT type, created_at, val_… FROM <log> WHERE id = ?1 AND state = 0`.
    select_sql: Vec<String>,
    /// Per table: `UPDATE <log> SET state = 1 WHERE id = ?1`.
    mark_sql: Vec<String>,
    /// Per table: cleanup statement.
    cleanup_sql: Vec<String>,
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
    /// Prepares the SQL for the given watched tables.
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
                    "UPDATE {} SET state = 1 WHERE id = ?1",
                    quote(&change_log_name(&t.name))
                )
            })
            .collect();
        let cleanup_sql = tables
            .iter()
            .map(|t| {
                format!(
                    "DELETE FROM {} WHERE state = 1 AND created_at <= ?1",
                    quote(&change_log_name(&t.name))
                )
            })
            .collect();
        ChangeLog {
            tables,
            by_name,
            select_sql,
            mark_sql,
            cleanup_sql,
        }
    }

    /// The watched tables, in index order.
    pub fn tables(&self) -> &[Table] {
        &self.tables
    }

    /// Number of changes waiting in the global log.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn pending_count(&self, conn: &Connection) -> Result<i64, Error> {
        Ok(conn
            .prepare_cached(&format!("SELECT count(*) FROM {}", quote(GLOBAL_LOG)))?
            .query_row([], |r| r.get(0))?)
    }

    /// Reads up to `limit` pending changes with a global id above `after`, in commit order, in
    /// one read transaction. `after` lets a publisher read the next batch while the previous one
    /// is still being acknowledged; pass 0 to start from the oldest pending change.
    ///
    /// # Errors
    /// SQLite errors (the scan is then simply retried later).
    pub fn scan(&self, conn: &Connection, after: i64, limit: u32) -> Result<Scan, Error> {
        let tx = conn.unchecked_transaction()?;
        let mut scan = Scan::default();
        let globals: Vec<(i64, i64, String)> = tx
            .prepare_cached(&format!(
                "SELECT id, change_table_id, table_name FROM {} WHERE id > ?1 ORDER BY id LIMIT ?2",
                quote(GLOBAL_LOG)
            ))?
            .query_map(rusqlite::params![after, limit], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<Result<_, _>>()?;
        for (global_id, log_id, table_name) in globals {
            let Some(&table) = self.by_name.get(&table_name) else {
                scan.orphans
                    .push((global_id, format!("table {table_name:?} is not watched")));
                continue;
            };
            let width = self.tables[table].columns.len();
            let mut stmt = match tx.prepare_cached(&self.select_sql[table]) {
                Ok(stmt) => stmt,
                // The change log (or a column of it) was dropped while we run: nothing can ever
                // read this change, and retrying would block every later one.
                Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::Unknown) => {
                    scan.orphans.push((
                        global_id,
                        format!("cannot read change log of {table_name:?}: {e}"),
                    ));
                    continue;
                }
                Err(e) => return Err(on_table(&table_name)(e)),
            };
            let found = stmt
                .query_row([log_id], |r| {
                    let op_text = r
                        .get_ref(0)?
                        .as_bytes_or_null()?
                        .unwrap_or_default()
                        .to_vec();
                    let created_at: Option<i64> = r.get(1)?;
                    let mut values = Vec::with_capacity(width);
                    for i in 0..width {
                        values.push(value_at(r, i + 2)?);
                    }
                    Ok((op_text, created_at.unwrap_or(0), values))
                })
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })
                .map_err(on_table(&table_name))?;
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
        }
        tx.commit()?;
        Ok(scan)
    }

    /// Marks `published` changes published and removes `orphans` from the global log, in one
    /// write transaction.
    ///
    /// # Errors
    /// SQLite errors; nothing is changed then, and the rows are published again (deduplicated by
    /// their `Nats-Msg-Id`).
    pub fn mark_published(
        &self,
        conn: &mut Connection,
        published: &[PendingChange],
        orphans: &[i64],
    ) -> Result<(), Error> {
        if published.is_empty() && orphans.is_empty() {
            return Ok(());
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut delete_global =
                tx.prepare_cached(&format!("DELETE FROM {} WHERE id = ?1", quote(GLOBAL_LOG)))?;
            for change in published {
                tx.prepare_cached(&self.mark_sql[change.table])?
                    .execute([change.log_id])
                    .map_err(on_table(&self.tables[change.table].name))?;
                delete_global.execute([change.global_id])?;
            }
            for id in orphans {
                delete_global.execute([id])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Marks a change that can never be published as failed (`state = -1`, Go's declared but
    /// unused "Failed" state) and removes it from the global log, so later changes can proceed.
    /// The row stays in its change log for inspection.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn mark_failed(&self, conn: &mut Connection, change: &PendingChange) -> Result<(), Error> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            &format!(
                "UPDATE {} SET state = -1 WHERE id = ?1",
                quote(&change_log_name(&self.tables[change.table].name))
            ),
            [change.log_id],
        )
        .map_err(on_table(&self.tables[change.table].name))?;
        tx.execute(
            &format!("DELETE FROM {} WHERE id = ?1", quote(GLOBAL_LOG)),
            [change.global_id],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Deletes published change-log rows captured at or before `horizon_ms`; returns the count.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn cleanup(&self, conn: &mut Connection, horizon_ms: i64) -> Result<usize, Error> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut total = 0;
        for (i, sql) in self.cleanup_sql.iter().enumerate() {
            total += tx
                .prepare_cached(sql)?
                .execute([horizon_ms])
                .map_err(on_table(&self.tables[i].name))?;
        }
        tx.commit()?;
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::cdc;
    use crate::db::schema::watched_tables;
    use crate::db::testutil::temp_db;

    fn setup(schema: &str) -> (tempfile::TempDir, std::path::PathBuf, Connection, ChangeLog) {
        let (d, path) = temp_db(schema);
        let mut conn = crate::db::open(&path).expect("open");
        let tables = watched_tables(&conn).expect("tables");
        cdc::install(&mut conn, &tables, "h").expect("install");
        (d, path, conn, ChangeLog::new(tables))
    }

    #[test]
    fn scan_reads_exact_values_in_commit_order() {
        let (_d, path, mut conn, log) = setup(
            "CREATE TABLE a (id INTEGER PRIMARY KEY, t TEXT, b BLOB, r REAL); CREATE TABLE b (x)",
        );
        let app = Connection::open(&path).expect("app");
        app.execute(
            "INSERT INTO a VALUES (1, ?1, x'00ff', 1.5)",
            ["nul\0inside"],
        )
        .expect("insert");
        app.execute("INSERT INTO b VALUES (NULL)", [])
            .expect("insert");
        app.execute("DELETE FROM a", []).expect("delete");
        let scan = log.scan(&conn, 0, 10).expect("scan");
        assert!(scan.orphans.is_empty());
        let ops: Vec<(usize, Op)> = scan.changes.iter().map(|c| (c.table, c.op)).collect();
        assert_eq!(ops, [(0, Op::Insert), (1, Op::Insert), (0, Op::Delete)]);
        assert_eq!(
            scan.changes[0].values,
            [
                Value::Integer(1),
                Value::Text(b"nul\0inside".to_vec()),
                Value::Blob(vec![0, 0xff]),
                Value::Real(1.5)
            ]
        );
        // The rowid table carries its row id as the last value.
        assert_eq!(scan.changes[1].values, [Value::Null, Value::Integer(1)]);
        assert_eq!(log.scan(&conn, 0, 2).expect("limited").changes.len(), 2);
        let after_first = log
            .scan(&conn, scan.changes[0].global_id, 10)
            .expect("cursor");
        assert_eq!(after_first.changes.len(), 2);

        log.mark_published(&mut conn, &scan.changes[..2], &[])
            .expect("mark");
        let rest = log.scan(&conn, 0, 10).expect("scan");
        assert_eq!(rest.changes.len(), 1);
        assert_eq!(rest.changes[0].op, Op::Delete);
        assert_eq!(log.pending_count(&conn).expect("count"), 1);

        assert_eq!(log.cleanup(&mut conn, i64::MAX).expect("cleanup"), 2);
        assert_eq!(
            log.cleanup(&mut conn, i64::MAX).expect("cleanup"),
            0,
            "pending rows stay"
        );
    }

    #[test]
    fn dropped_change_log_does_not_block_other_tables() {
        let (_d, path, conn, log) = setup(
            "CREATE TABLE a (id INTEGER PRIMARY KEY); CREATE TABLE b (id INTEGER PRIMARY KEY)",
        );
        let app = Connection::open(&path).expect("app");
        app.execute_batch("INSERT INTO a VALUES (1); INSERT INTO b VALUES (1);")
            .expect("insert");
        conn.execute_batch("DROP TABLE __harmonylite__a_change_log")
            .expect("drop");
        let scan = log.scan(&conn, 0, 10).expect("scan");
        assert_eq!(scan.orphans.len(), 1);
        assert_eq!(scan.changes.len(), 1);
        assert_eq!(scan.changes[0].table, 1);
    }

    #[test]
    fn orphans_are_reported_not_fatal() {
        let (_d, path, mut conn, log) = setup("CREATE TABLE a (id INTEGER PRIMARY KEY)");
        let app = Connection::open(&path).expect("app");
        app.execute("INSERT INTO a VALUES (1)", []).expect("insert");
        conn.execute_batch(
            "INSERT INTO __harmonylite___change_log_global (change_table_id, table_name) VALUES (99, 'a'), (1, 'gone');",
        )
        .expect("orphans");
        let scan = log.scan(&conn, 0, 10).expect("scan");
        assert_eq!(scan.changes.len(), 1);
        assert_eq!(scan.orphans.len(), 2);
        let ids: Vec<i64> = scan.orphans.iter().map(|o| o.0).collect();
        log.mark_published(&mut conn, &scan.changes, &ids)
            .expect("mark");
        assert_eq!(log.pending_count(&conn).expect("count"), 0);
    }
}
