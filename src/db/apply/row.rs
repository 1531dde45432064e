//! The SQL that reads and writes one row, and how its errors are classified.
//!
//! An existing row (matched by key null-safely, as bytes and type: [`crate::db::same_value`]) is
//! updated in place, keeping its rowid and the columns the event lacks; a missing row is inserted;
//! a delete removes the matching row. Invariants: only local, quoted names reach SQL text; values
//! are bound exactly as they arrived (`Bind`). A row is addressed by rowid (rowid tables) or
//! primary key (WITHOUT ROWID), so an update never moves it to another rowid. Limit (documented):
//! of rows sharing a primary key that contains NULL, an update goes to the lowest rowid, a delete
//! to one equal to the deleted image. Errors ([`classify_write`]): conflicts held until the
//! database changes, repeating ones poison, the rest retried.

use std::collections::HashMap;

use rusqlite::{Connection, ErrorCode};

use super::State;
use crate::db::changelog::value_at;
use crate::db::sql::Bind;
use crate::db::{Table, quote, same_value};
use crate::wire::{ChangeEvent, Value};

/// SQLite's extended codes for a UNIQUE or PRIMARY KEY conflict and a trigger's `RAISE(ABORT)`
/// (a validation trigger looking at other rows, which may still be on their way on another shard).
pub(super) const SQLITE_CONSTRAINT_UNIQUE: i32 = 2067;
pub(super) const SQLITE_CONSTRAINT_PRIMARYKEY: i32 = 1555;
pub(super) const SQLITE_CONSTRAINT_TRIGGER: i32 = 1811;

pub(super) enum WriteError {
    /// A UNIQUE or PRIMARY KEY conflict, or a trigger's `RAISE(ABORT)`: hold the event.
    Conflict(String),
    Event(EventError),
}

/// Errors tied to the event or the local schema (a table or column dropped meanwhile: plain
/// `SQLITE_ERROR`) repeat on every attempt: poison. Busy, locked, I/O, full disk…: retried.
pub(super) fn classify(e: rusqlite::Error) -> EventError {
    match e.sqlite_error_code() {
        Some(
            ErrorCode::ConstraintViolation
            | ErrorCode::TypeMismatch
            | ErrorCode::TooBig
            | ErrorCode::ParameterOutOfRange
            | ErrorCode::Unknown,
        ) => EventError::Poison(e.to_string()),
        _ => EventError::Retry(e),
    }
}

pub(super) fn classify_write(e: rusqlite::Error) -> WriteError {
    if let rusqlite::Error::SqliteFailure(f, _) = &e
        && matches!(
            f.extended_code,
            SQLITE_CONSTRAINT_UNIQUE | SQLITE_CONSTRAINT_PRIMARYKEY | SQLITE_CONSTRAINT_TRIGGER
        )
    {
        return WriteError::Conflict(e.to_string());
    }
    WriteError::Event(classify(e))
}

fn execute(conn: &Connection, sql: &str, binds: &[Bind<'_>]) -> Result<(), WriteError> {
    conn.prepare_cached(sql)
        .map_err(|e| WriteError::Event(classify(e)))?
        .execute(rusqlite::params_from_iter(binds.iter()))
        .map_err(classify_write)?;
    Ok(())
}

/// Per table: SQL built once per set of event columns.
#[derive(Default)]
pub(super) struct TableSql {
    select: HashMap<Vec<usize>, String>,
    update: HashMap<Vec<usize>, String>,
    insert: HashMap<Vec<usize>, String>,
    delete: Option<String>,
}

/// A local row matching an event's key: its rowid (rowid tables), then the event's columns.
pub(super) struct Found {
    pub(super) rowid: Option<i64>,
    pub(super) values: Vec<Value>,
}

impl State {
    /// Local rows whose key equals the event's (null-safe), lowest rowid first.
    pub(super) fn find(
        &mut self,
        conn: &Connection,
        t: usize,
        cols: &[usize],
        key_pos: &[usize],
        event: &ChangeEvent,
    ) -> Result<Vec<Found>, EventError> {
        let table = &self.tables[t];
        let rowid = !table.without_rowid;
        let sql = self.sql[t].select.entry(cols.to_vec()).or_insert_with(|| {
            let mut list: Vec<String> = Vec::with_capacity(cols.len() + 1);
            if rowid {
                list.push("rowid".into());
            }
            list.extend(cols.iter().map(|&i| quote(&table.columns[i].name)));
            let conds: Vec<String> = key_pos
                .iter()
                .enumerate()
                .map(|(n, &pos)| {
                    same_value(
                        &quote(&table.columns[cols[pos]].name),
                        &format!("?{}", n + 1),
                    )
                })
                .collect();
            format!(
                "SELECT {} FROM {} WHERE {}{} LIMIT 16",
                list.join(", "),
                quote(&table.name),
                conds.join(" AND "),
                if rowid { " ORDER BY rowid" } else { "" }
            )
        });
        let mut stmt = conn.prepare_cached(sql).map_err(classify)?;
        let binds: Vec<Bind<'_>> = key_pos.iter().map(|&i| Bind(&event.row[i].1)).collect();
        let mut rows = stmt
            .query(rusqlite::params_from_iter(binds.iter()))
            .map_err(classify)?;
        let mut found = Vec::new();
        let offset = usize::from(rowid);
        while let Some(row) = rows.next().map_err(classify)? {
            let rowid = if rowid {
                Some(row.get::<_, i64>(0).map_err(classify)?)
            } else {
                None
            };
            let mut values = Vec::with_capacity(cols.len());
            for i in 0..cols.len() {
                values.push(value_at(row, i + offset).map_err(classify)?);
            }
            found.push(Found { rowid, values });
        }
        Ok(found)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn update(
        &mut self,
        conn: &Connection,
        t: usize,
        cols: &[usize],
        non_key: &[usize],
        key_pos: &[usize],
        target: &Found,
        event: &ChangeEvent,
    ) -> Result<(), WriteError> {
        let table = &self.tables[t];
        let sql = self.sql[t].update.entry(cols.to_vec()).or_insert_with(|| {
            let sets: Vec<String> = non_key
                .iter()
                .enumerate()
                .map(|(n, &pos)| format!("{} = ?{}", quote(&table.columns[cols[pos]].name), n + 1))
                .collect();
            let cond = address(table, cols, key_pos, non_key.len());
            format!(
                "UPDATE {} SET {} WHERE {cond}",
                quote(&table.name),
                sets.join(", ")
            )
        });
        let mut binds: Vec<Bind<'_>> = non_key.iter().map(|&i| Bind(&event.row[i].1)).collect();
        let rowid_value;
        match target.rowid {
            Some(r) => {
                rowid_value = Value::Integer(r);
                binds.push(Bind(&rowid_value));
            }
            None => binds.extend(key_pos.iter().map(|&i| Bind(&target.values[i]))),
        }
        execute(conn, sql, &binds)
    }

    pub(super) fn insert(
        &mut self,
        conn: &Connection,
        t: usize,
        cols: &[usize],
        event: &ChangeEvent,
    ) -> Result<(), WriteError> {
        let table = &self.tables[t];
        let sql = self.sql[t].insert.entry(cols.to_vec()).or_insert_with(|| {
            let names: Vec<String> = cols
                .iter()
                .map(|&i| quote(&table.columns[i].name))
                .collect();
            let params: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
            format!(
                "INSERT INTO {} ({}) VALUES ({})",
                quote(&table.name),
                names.join(", "),
                params.join(", ")
            )
        });
        let binds: Vec<Bind<'_>> = event.row.iter().map(|(_, v)| Bind(v)).collect();
        execute(conn, sql, &binds)
    }

    pub(super) fn delete(
        &mut self,
        conn: &Connection,
        t: usize,
        key_pos: &[usize],
        target: &Found,
    ) -> Result<(), WriteError> {
        let table = &self.tables[t];
        let pks = &self.pks[t];
        let sql = self.sql[t].delete.get_or_insert_with(|| {
            let cond = if table.without_rowid {
                let conds: Vec<String> = pks
                    .iter()
                    .enumerate()
                    .map(|(n, &p)| format!("{} = ?{}", quote(&table.columns[p].name), n + 1))
                    .collect();
                conds.join(" AND ")
            } else {
                "rowid = ?1".to_owned()
            };
            format!("DELETE FROM {} WHERE {cond}", quote(&table.name))
        });
        let rowid_value;
        let binds: Vec<Bind<'_>> = match target.rowid {
            Some(r) => {
                rowid_value = Value::Integer(r);
                vec![Bind(&rowid_value)]
            }
            None => key_pos.iter().map(|&i| Bind(&target.values[i])).collect(),
        };
        execute(conn, sql, &binds)
    }

    /// The local row that holds the value a UNIQUE conflict is about, for the log.
    pub(super) fn conflicting_row(
        &self,
        conn: &Connection,
        t: usize,
        event: &ChangeEvent,
        why: &str,
    ) -> String {
        let table = &self.tables[t];
        // SQLite: "UNIQUE constraint failed: t.a, t.b".
        let Some(list) = why.split("failed: ").nth(1) else {
            return "?".into();
        };
        let mut conds = Vec::new();
        let mut binds = Vec::new();
        for qualified in list.split(", ") {
            let col = qualified.rsplit('.').next().unwrap_or(qualified).trim();
            let Some((_, v)) = event.row.iter().find(|(n, _)| n.eq_ignore_ascii_case(col)) else {
                return "?".into();
            };
            conds.push(format!("{} IS ?{}", quote(col), conds.len() + 1));
            binds.push(Bind(v));
        }
        let cols: Vec<String> = table.columns.iter().map(|c| quote(&c.name)).collect();
        let sql = format!(
            "SELECT {} FROM {} WHERE {} LIMIT 1",
            cols.join(", "),
            quote(&table.name),
            conds.join(" AND ")
        );
        let found = conn.query_row(&sql, rusqlite::params_from_iter(binds.iter()), |r| {
            let mut row = Vec::new();
            for (i, c) in table.columns.iter().enumerate() {
                row.push((c.name.clone(), value_at(r, i)?));
            }
            Ok(row)
        });
        match found {
            Ok(row) => describe(&row),
            Err(_) => "?".into(),
        }
    }
}

/// The WHERE clause for an UPDATE whose SET uses `?1..?n`: by rowid, or by key (WITHOUT ROWID).
pub(super) fn address(table: &Table, cols: &[usize], key_pos: &[usize], n: usize) -> String {
    if table.without_rowid {
        let conds: Vec<String> = key_pos
            .iter()
            .enumerate()
            .map(|(k, &pos)| format!("{} = ?{}", quote(&table.columns[cols[pos]].name), n + k + 1))
            .collect();
        conds.join(" AND ")
    } else {
        format!("rowid = ?{}", n + 1)
    }
}

/// A row for log lines: `{col: value, …}`, long values cut.
pub(super) fn describe(row: &[(String, Value)]) -> String {
    let parts: Vec<String> = row
        .iter()
        .map(|(n, v)| {
            let text = match v {
                Value::Null => "NULL".to_owned(),
                Value::Integer(i) => i.to_string(),
                Value::Real(f) => format!("{f:?}"),
                Value::Text(t) => format!("{:?}", String::from_utf8_lossy(&t[..t.len().min(64)])),
                Value::Blob(b) => format!("x'{}'", crate::hex(&b[..b.len().min(32)])),
            };
            format!("{n}: {text}")
        })
        .collect();
    format!("{{{}}}", parts.join(", "))
}

/// Why one event failed inside the transaction.
pub(super) enum EventError {
    /// Will fail the same way every time: quarantine.
    Poison(String),
    /// This node's schema does not know what the event names (yet): wait.
    Behind(Behind),
    /// Environment trouble: roll the batch back and retry it.
    Retry(rusqlite::Error),
}

impl From<rusqlite::Error> for EventError {
    fn from(e: rusqlite::Error) -> Self {
        EventError::Retry(e)
    }
}

/// An event that waits for the local schema: why, and what it blocks.
pub(super) struct Behind {
    pub(super) why: String,
    /// Lower-cased table name (the current one, when the event named an old one).
    pub(super) table: String,
    /// The row, when the table is known and the event carries its key; `None` blocks the table.
    pub(super) key: Option<super::Key>,
}
