//! Installs and removes change-data capture: per-table change logs, the global log, and the
//! `AFTER INSERT/UPDATE/DELETE` triggers that fill them (upstream-behaviour §4.3, §4.5, §4.7).
//!
//! Invariants:
//! - Names match Go's (`__harmonylite__<t>_change_log`, `…_state_index`, `…_on_<op>`,
//!   `__harmonylite___change_log_global`): each one's `-cleanup` removes the other's objects.
//! - Installing is one idempotent transaction (run at every start). Triggers are recreated; change
//!   logs created if missing and migrated in place, pending rows kept: missing `val_<col>` columns
//!   are added (Go never altered them: after `ALTER TABLE … ADD COLUMN` every application write
//!   failed), and typed value columns (Go copied the declared types) are rebuilt untyped.
//! - Value columns are untyped, so without affinity: the log holds exactly what the row held (a
//!   STRICT table's `ANY` column keeps `'00123'` as text; Go's typed copy made it 123).
//! - An UPDATE changing the key is captured as a delete and an update (see `triggers.rs`).
//! - Capture triggers have no condition (the applier mutes them: [`super::apply`]), so connections
//!   with `trusted_schema = OFF` can write (Go's `pragma_function_list` guard failed them).
//! - A random identity made at first install (`__harmonylite__node_identity`) tells our events
//!   from a clone's with our node id; it changes after `-cleanup` (change-log ids restart).

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use super::triggers::{rowids_index, trigger_names, triggers};
use super::{
    ALIAS_TABLE, APPLIED_TABLE, CONFLICTS_TABLE, DEAD_LETTER_TABLE, Error, GLOBAL_LOG, GUARD_TABLE,
    HELD_TABLE, IDENTITY_TABLE, PREFIX, PUBLISHED_TABLE, SCHEMA_VERSION_TABLE, Table,
    change_log_name, on_table, quote,
};

/// The version string Go writes into `__harmonylite__schema_version` (hard-coded `"dev"` there).
const SCHEMA_VERSION_TAG: &str = "dev";

/// Where a change landed (shard, stream seq; beyond Go's layout): a restart knows what came back.
const PUB_COLUMNS: [&str; 2] = ["pub_shard", "pub_seq"];

fn base_ddl() -> String {
    format!(
        "DROP TABLE IF EXISTS {guard};
         CREATE TABLE IF NOT EXISTS {global} (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             change_table_id INTEGER,
             table_name TEXT
         );
         CREATE TABLE IF NOT EXISTS {schema_version} (
             id INTEGER PRIMARY KEY CHECK (id = 1),
             schema_hash TEXT NOT NULL,
             updated_at INTEGER NOT NULL,
             harmonylite_version TEXT
         );
         CREATE TABLE IF NOT EXISTS {dead} (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             stream TEXT NOT NULL,
             seq INTEGER NOT NULL,
             error TEXT NOT NULL,
             payload BLOB,
             created_at INTEGER NOT NULL
         );
         CREATE TABLE IF NOT EXISTS {conflicts} (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             table_name TEXT NOT NULL,
             kind TEXT NOT NULL,
             lost_row TEXT NOT NULL,
             from_node INTEGER,
             stream TEXT NOT NULL,
             seq INTEGER NOT NULL,
             payload BLOB,
             created_at INTEGER NOT NULL
         );
         CREATE TABLE IF NOT EXISTS {identity} (
             id INTEGER PRIMARY KEY CHECK (id = 1),
             uuid TEXT NOT NULL,
             created_at INTEGER NOT NULL
         );
         CREATE TABLE IF NOT EXISTS {held} (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             stream TEXT NOT NULL,
             seq INTEGER NOT NULL,
             origin TEXT,
             payload BLOB NOT NULL,
             reason TEXT NOT NULL,
             created_at INTEGER NOT NULL
         );
         CREATE TABLE IF NOT EXISTS {applied} (
             stream TEXT PRIMARY KEY,
             seq INTEGER NOT NULL
         );
         CREATE TABLE IF NOT EXISTS {published} (
             shard INTEGER PRIMARY KEY,
             seq INTEGER NOT NULL
         );
         CREATE TABLE IF NOT EXISTS {aliases} (
             kind TEXT NOT NULL,
             scope TEXT NOT NULL,
             old_name TEXT NOT NULL,
             new_name TEXT NOT NULL,
             created_at INTEGER NOT NULL,
             PRIMARY KEY (kind, scope, old_name)
         );",
        guard = quote(GUARD_TABLE),
        global = quote(GLOBAL_LOG),
        schema_version = quote(SCHEMA_VERSION_TABLE),
        dead = quote(DEAD_LETTER_TABLE),
        conflicts = quote(CONFLICTS_TABLE),
        identity = quote(IDENTITY_TABLE),
        held = quote(HELD_TABLE),
        published = quote(PUBLISHED_TABLE),
        applied = quote(APPLIED_TABLE),
        aliases = quote(ALIAS_TABLE),
    )
}

/// Held-table column (added after the first release): 1 waits for the schema, 0 a UNIQUE conflict.
const HELD_SCHEMA_COLUMN: &str = "schema_wait";

fn has_column(conn: &Connection, table: &str, column: &str) -> Result<bool, Error> {
    Ok(conn.query_row(
        "SELECT count(*) FROM pragma_table_info(?1) WHERE name = ?2",
        [table, column],
        |r| r.get::<_, i64>(0),
    )? > 0)
}

/// `CREATE TABLE` for a change log named `name` (value columns untyped).
fn change_log_create(name: &str, table: &Table) -> String {
    let col_defs: String = table
        .columns
        .iter()
        .map(|c| format!("    {},\n", quote(&format!("val_{}", c.name))))
        .collect();
    format!(
        "CREATE TABLE IF NOT EXISTS {} (\n    id INTEGER PRIMARY KEY AUTOINCREMENT,\n\
         {col_defs}    type TEXT,\n    created_at INTEGER,\n    state INTEGER,\n    \
         pub_shard INTEGER,\n    pub_seq INTEGER\n);\n",
        quote(name)
    )
}

/// DDL for one table's change log, index and triggers. A table without a primary key is replicated
/// by rowid, which VACUUM renumbers in a table with no index; so it gets an empty partial index
/// (`WHERE 0`: no write cost) whose mere existence makes VACUUM keep rowids, the rows' identity.
pub(super) fn table_ddl(table: &Table) -> String {
    let log = change_log_name(&table.name);
    let mut sql = change_log_create(&log, table);
    sql.push_str(&format!(
        "CREATE INDEX IF NOT EXISTS {index} ON {qlog} (state);\n",
        index = quote(&format!("{log}_state_index")),
        qlog = quote(&log),
    ));
    if let Some(index) = rowids_index(table) {
        sql.push_str(&format!(
            "CREATE INDEX IF NOT EXISTS {} ON {} (1) WHERE 0;\n",
            quote(&index),
            quote(&table.name)
        ));
    }
    for name in trigger_names(&table.name) {
        sql.push_str(&format!("DROP TRIGGER IF EXISTS {};\n", quote(&name)));
    }
    for (_, create) in triggers(table) {
        sql.push_str(&format!("{create};\n"));
    }
    sql
}

/// Whether capture is already installed exactly as [`install`] would leave it, so a start can
/// skip its write transaction (any commit of ours can fail an open application transaction).
fn up_to_date(conn: &Connection, tables: &[Table], schema_hash: &str) -> Result<bool, Error> {
    for base in [
        GLOBAL_LOG,
        SCHEMA_VERSION_TABLE,
        DEAD_LETTER_TABLE,
        CONFLICTS_TABLE,
        IDENTITY_TABLE,
        HELD_TABLE,
        PUBLISHED_TABLE,
        APPLIED_TABLE,
        ALIAS_TABLE,
    ] {
        if !super::has_object(conn, base)? {
            tracing::debug!(table = base, "missing; reinstalling");
            return Ok(false);
        }
    }
    let recorded = recorded_hash(conn)?;
    let sql = format!("SELECT count(*) FROM {}", quote(IDENTITY_TABLE));
    let identified: i64 = conn.query_row(&sql, [], |r| r.get(0))?;
    if recorded.as_deref() != Some(schema_hash)
        || identified != 1
        || !has_column(conn, HELD_TABLE, HELD_SCHEMA_COLUMN)?
    {
        tracing::debug!("schema hash, identity or layout changed; reinstalling");
        return Ok(false);
    }
    // Exactly our triggers and change logs: stale ones (renamed or dropped tables) go.
    let ours = |kind: &str| -> Result<i64, Error> {
        Ok(conn.query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = ?1 AND substr(name, 1, ?2) = ?3 \
             AND name LIKE '%\\_change\\_log%' ESCAPE '\\' AND name <> ?4",
            rusqlite::params![kind, PREFIX.len() as i64, PREFIX, GLOBAL_LOG],
            |r| r.get(0),
        )?)
    };
    let triggers: usize = tables
        .iter()
        .map(|t| super::triggers::triggers(t).len())
        .sum();
    if ours("trigger")? != triggers as i64 || ours("table")? != tables.len() as i64 {
        tracing::debug!("capture triggers or change logs of other tables found; reinstalling");
        return Ok(false);
    }
    for table in tables {
        if !table_up_to_date(conn, table)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether `table`'s change log and capture triggers are exactly what [`install`] makes.
fn table_up_to_date(conn: &Connection, table: &Table) -> Result<bool, Error> {
    let log = change_log_name(&table.name);
    let columns = log_columns(conn, table)?;
    let has = |col: &str| columns.iter().any(|(n, _)| n == col);
    let layout_ok = table
        .columns
        .iter()
        .all(|c| has(&format!("val_{}", c.name)))
        && PUB_COLUMNS.iter().all(|c| has(c))
        && columns
            .iter()
            .all(|(n, ty)| !n.starts_with("val_") || ty.is_empty());
    let indexed = rowids_index(table).map_or(Ok(true), |i| super::has_object(conn, &i))?;
    if !layout_ok || !indexed || !super::has_object(conn, &format!("{log}_state_index"))? {
        tracing::debug!(table = %table.name, "change log layout differs; reinstalling");
        return Ok(false);
    }
    if super::triggers::outrun(conn, &table.name)? {
        tracing::debug!(table = %table.name, "application trigger newer than capture; reinstalling");
        return Ok(false);
    }
    for (name, create) in triggers(table) {
        let stored: Option<String> = conn
            .query_row(
                "SELECT sql FROM sqlite_schema WHERE type = 'trigger' AND name = ?1",
                [&name],
                |r| r.get(0),
            )
            .optional()?;
        if stored.as_deref() != Some(create.as_str()) {
            tracing::debug!(trigger = %name, "capture trigger differs; reinstalling");
            return Ok(false);
        }
    }
    Ok(true)
}

/// The columns of a table's change log, `(name, declared type)` in order (empty: no change log).
fn log_columns(conn: &Connection, table: &Table) -> Result<Vec<(String, String)>, Error> {
    conn.prepare("SELECT name, type FROM pragma_table_info(?1) ORDER BY cid")
        .and_then(|mut s| {
            s.query_map([change_log_name(&table.name)], |r| {
                Ok((
                    r.get(0)?,
                    r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                ))
            })?
            .collect()
        })
        .map_err(on_table(&table.name))
}

/// Migrates an existing change log in place, keeping its rows and id counter (ids never repeat).
fn migrate_change_log(conn: &Connection, table: &Table) -> Result<Vec<String>, Error> {
    let log = change_log_name(&table.name);
    let existing = log_columns(conn, table)?;
    if existing.is_empty() {
        return Ok(Vec::new());
    }
    let has = |col: &str| existing.iter().any(|(n, _)| n.eq_ignore_ascii_case(col));
    let added: Vec<String> = table
        .columns
        .iter()
        .filter(|c| !has(&format!("val_{}", c.name)))
        .map(|c| c.name.clone())
        .collect();
    let typed = existing
        .iter()
        .any(|(n, ty)| n.starts_with("val_") && !ty.is_empty());
    if typed {
        tracing::info!(table = %table.name, "Rebuilding change log with untyped value columns");
        let tmp = format!("{log}__migrating");
        let seq: Option<i64> = conn
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = ?1",
                [&log],
                |r| r.get(0),
            )
            .optional()
            .map_err(on_table(&table.name))?;
        // Copy the columns both layouts have; new ones start NULL.
        let mut keep: Vec<String> = vec!["id".into()];
        keep.extend(
            table
                .columns
                .iter()
                .map(|c| format!("val_{}", c.name))
                .filter(|c| has(c)),
        );
        keep.extend(
            ["type", "created_at", "state"]
                .into_iter()
                .chain(PUB_COLUMNS)
                .filter(|c| has(c))
                .map(str::to_owned),
        );
        let cols: Vec<String> = keep.iter().map(|c| quote(c)).collect();
        let cols = cols.join(", ");
        conn.execute_batch(&format!(
            "DROP TABLE IF EXISTS {qtmp};\n{create}\
             INSERT INTO {qtmp} ({cols}) SELECT {cols} FROM {qlog};\n\
             DROP TABLE {qlog};\nALTER TABLE {qtmp} RENAME TO {qlog};",
            qtmp = quote(&tmp),
            create = change_log_create(&tmp, table),
            qlog = quote(&log),
        ))
        .map_err(on_table(&table.name))?;
        if let Some(seq) = seq {
            conn.execute(
                "UPDATE sqlite_sequence SET seq = max(seq, ?2) WHERE name = ?1",
                rusqlite::params![log, seq],
            )
            .map_err(on_table(&table.name))?;
        }
        return Ok(added);
    }
    let missing = table
        .columns
        .iter()
        .map(|c| format!("val_{}", c.name))
        .chain(PUB_COLUMNS.map(str::to_owned))
        .filter(|c| !has(c));
    for col in missing {
        tracing::info!(table = %table.name, column = %col, "Adding column to change log");
        conn.execute_batch(&format!(
            "ALTER TABLE {} ADD COLUMN {}",
            quote(&log),
            quote(&col)
        ))
        .map_err(on_table(&table.name))?;
    }
    Ok(added)
}

/// Installs capture for `tables` and records `schema_hash` in the schema version table, in one
/// transaction, following the application's DDL since the last install ([`super::ddl`]); a table
/// watched for the first time (when capture existed before) has its existing rows published once.
pub fn install(conn: &mut Connection, tables: &[Table], schema_hash: &str) -> Result<(), Error> {
    if up_to_date(conn, tables, schema_hash)? {
        tracing::info!("Change data capture already installed and up to date");
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // DDL since the tables were listed would give triggers on gone columns (failing every write).
    if super::schema::watched_tables(&tx)? != tables {
        return Err(Error::SchemaChanged);
    }
    // Capture existed before: tables without a change log are new to it.
    let installed_before = super::has_table(&tx, GLOBAL_LOG)?;
    tracing::info!("Creating global change log table");
    tx.execute_batch(&base_ddl())?;
    if !has_column(&tx, HELD_TABLE, HELD_SCHEMA_COLUMN)? {
        tx.execute_batch(&format!(
            "ALTER TABLE {} ADD COLUMN {HELD_SCHEMA_COLUMN} INTEGER NOT NULL DEFAULT 0",
            quote(HELD_TABLE)
        ))?;
    }
    let now_secs = crate::clock::unix_secs();
    tx.execute(
        &format!(
            "INSERT OR REPLACE INTO {} (id, schema_hash, updated_at, harmonylite_version) \
             VALUES (1, ?1, ?2, ?3)",
            quote(SCHEMA_VERSION_TABLE)
        ),
        rusqlite::params![schema_hash, now_secs, SCHEMA_VERSION_TAG],
    )?;
    tx.execute(
        &format!(
            "INSERT OR IGNORE INTO {} (id, uuid, created_at) VALUES (1, ?1, ?2)",
            quote(IDENTITY_TABLE)
        ),
        rusqlite::params![uuid::Uuid::new_v4().simple().to_string(), now_secs],
    )?;
    // Renames first: a change log must be renamed before the triggers that write it are made.
    super::ddl::follow(&tx, tables)?;
    // Another node's changes of these tables wait here: it has them, and its rows are on their
    // way; ours, published now, would land after its later changes and undo them.
    let waiting = super::ddl::waiting_events(&tx)?;
    for table in tables {
        tracing::info!("Creating trigger for {}", table.name);
        let new = log_columns(&tx, table)?.is_empty();
        let added = migrate_change_log(&tx, table)?;
        tx.execute_batch(&table_ddl(table))
            .map_err(on_table(&table.name))?;
        if !added.is_empty() {
            super::ddl::fill_added(&tx, table, &added)?;
        }
        if new && installed_before {
            let seen: Vec<_> = waiting
                .iter()
                .filter(|e| e.table.eq_ignore_ascii_case(&table.name))
                .collect();
            let rows = super::ddl::backfill(&tx, table, &seen)?;
            if seen.is_empty() {
                tracing::info!(table = %table.name, rows, "New table watched; publishing its existing rows once");
            } else {
                tracing::info!(table = %table.name, rows, "New table watched; its rows come from the nodes that had it first, except local writes, published now");
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// The schema hash recorded by the last install, if any (Go's too).
pub fn recorded_hash(conn: &Connection) -> Result<Option<String>, Error> {
    if !super::has_table(conn, SCHEMA_VERSION_TABLE)? {
        return Ok(None);
    }
    let table = quote(SCHEMA_VERSION_TABLE);
    let sql = format!("SELECT schema_hash FROM {table} WHERE id = 1");
    Ok(conn.query_row(&sql, [], |r| r.get(0)).optional()?)
}

/// This database's identity (made by [`install`]; an error if capture was removed under us).
pub fn identity(conn: &Connection) -> Result<String, Error> {
    let sql = format!("SELECT uuid FROM {} WHERE id = 1", quote(IDENTITY_TABLE));
    Ok(conn.query_row(&sql, [], |r| r.get(0))?)
}

/// How a database's identity relates to the node starting on it (see [`bind_identity`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Binding {
    /// This node's own database (or one not bound yet).
    Own,
    /// The same file, started under another node id: the operator renumbered the node.
    Renumbered { from: u64 },
    /// Another node's database copied here: its unpublished changes (`dropped`) are not sent.
    CopyOf { node_id: u64, dropped: usize },
}

/// Binds this database's identity to `node_id` and `file` (machine, device, inode). One bound to
/// another node id *and* file is a copy of that node's: its pending changes are that node's to
/// publish (resent from here they would land after its later changes and undo them everywhere), and
/// its published ones would count as in flight here, holding back their rows. So the copy's change
/// log is emptied and it gets its own identity (message ids, sent marks). Writes only on a change.
pub fn bind_identity(
    conn: &mut Connection,
    tables: &[Table],
    node_id: u64,
    file: &str,
) -> Result<Binding, Error> {
    let ident = quote(IDENTITY_TABLE);
    let bound: (Option<i64>, Option<String>) = if has_column(conn, IDENTITY_TABLE, "file")? {
        conn.query_row(
            &format!("SELECT node_id, file FROM {ident} WHERE id = 1"),
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?
    } else {
        (None, None)
    };
    if bound == (Some(node_id as i64), Some(file.to_owned())) {
        return Ok(Binding::Own);
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for column in ["node_id INTEGER", "file TEXT"] {
        let name = column.split(' ').next().unwrap_or(column);
        if !has_column(&tx, IDENTITY_TABLE, name)? {
            tx.execute_batch(&format!("ALTER TABLE {ident} ADD COLUMN {column}"))?;
        }
    }
    let binding = match bound {
        (Some(was), Some(was_file)) if was as u64 != node_id && was_file != file => {
            let dropped = tx.execute(&format!("DELETE FROM {}", quote(GLOBAL_LOG)), [])?;
            for t in tables {
                let sql = format!("DELETE FROM {}", quote(&change_log_name(&t.name)));
                tx.execute(&sql, []).map_err(on_table(&t.name))?;
            }
            tx.execute(&format!("DELETE FROM {}", quote(PUBLISHED_TABLE)), [])?;
            tx.execute(
                &format!("UPDATE {ident} SET uuid = ?1 WHERE id = 1"),
                [uuid::Uuid::new_v4().simple().to_string()],
            )?;
            Binding::CopyOf {
                node_id: was as u64,
                dropped,
            }
        }
        (Some(was), _) if was as u64 != node_id => Binding::Renumbered { from: was as u64 },
        _ => Binding::Own,
    };
    tx.execute(
        &format!("UPDATE {ident} SET node_id = ?1, file = ?2 WHERE id = 1"),
        rusqlite::params![node_id as i64, file],
    )?;
    tx.commit()?;
    Ok(binding)
}

/// Drops every trigger, index and table named `__harmonylite__*` (Go `RemoveCDC`); how many.
pub fn remove(conn: &mut Connection) -> Result<usize, Error> {
    tracing::info!("Uninstalling all CDC triggers...");
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut dropped = 0;
    for kind in ["trigger", "index", "table"] {
        let names: Vec<String> = super::sql::column(
            &tx,
            "SELECT name FROM sqlite_schema WHERE type = ?1 AND substr(name, 1, ?2) = ?3",
            rusqlite::params![kind, PREFIX.len() as i64, PREFIX],
        )?;
        for name in names {
            let sql = format!("DROP {} IF EXISTS {}", kind.to_uppercase(), quote(&name));
            tx.execute_batch(&sql)?;
            dropped += 1;
        }
    }
    tx.commit()?;
    Ok(dropped)
}

#[cfg(test)]
mod tests;
