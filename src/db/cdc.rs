//! Installs and removes change-data capture: per-table change logs, the global log, and the
//! `AFTER INSERT/UPDATE/DELETE` triggers that fill them (upstream-behaviour §4.3, §4.5, §4.7).
//!
//! Invariants:
//! - Names match Go HarmonyLite (`__harmonylite__<t>_change_log`, `…_state_index`,
//!   `…_on_insert|update|delete`, `__harmonylite___change_log_global`), so a Go node's `-cleanup`
//!   removes our artifacts and vice versa.
//! - Installation is one transaction and idempotent: running it again (every start) leaves the same
//!   schema. Triggers are recreated; change logs are created if missing and *extended* with any
//!   `val_<col>` column the table gained (Go never altered them, so after `ALTER TABLE … ADD
//!   COLUMN` every application write failed).
//! - Trigger condition: `NOT EXISTS (SELECT 1 FROM __harmonylite__apply_guard)` — a plain table
//!   read, so application connections with `PRAGMA trusted_schema = OFF` can still write
//!   (Go's `pragma_function_list` guard made those writes fail).

use rusqlite::{Connection, TransactionBehavior};

use super::{
    DEAD_LETTER_TABLE, Error, GLOBAL_LOG, GUARD_TABLE, PREFIX, SCHEMA_VERSION_TABLE, Table,
    change_log_name, on_table, quote, quote_literal,
};

/// The version string Go writes into `__harmonylite__schema_version` (hard-coded `"dev"` there).
const SCHEMA_VERSION_TAG: &str = "dev";

/// Unix milliseconds in trigger SQL, exactly as Go computes `created_at`.
const NOW_MS_SQL: &str = "CAST((strftime('%s','now') || substr(strftime('%f','now'),4)) AS INT)";

fn base_ddl() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {guard} (id INTEGER PRIMARY KEY);
         DELETE FROM {guard};
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
         );",
        guard = quote(GUARD_TABLE),
        global = quote(GLOBAL_LOG),
        schema_version = quote(SCHEMA_VERSION_TABLE),
        dead = quote(DEAD_LETTER_TABLE),
    )
}

/// DDL for one table's change log, index and triggers.
fn table_ddl(table: &Table) -> String {
    let log = change_log_name(&table.name);
    let qlog = quote(&log);
    let qtable = quote(&table.name);
    let val_cols: Vec<String> = table
        .columns
        .iter()
        .map(|c| quote(&format!("val_{}", c.name)))
        .collect();
    let col_defs: String = table
        .columns
        .iter()
        .zip(&val_cols)
        .map(|(c, v)| format!("    {v} {},\n", c.decl_type))
        .collect();
    let mut sql = format!(
        "CREATE TABLE IF NOT EXISTS {qlog} (\n    id INTEGER PRIMARY KEY AUTOINCREMENT,\n\
         {col_defs}    type TEXT,\n    created_at INTEGER,\n    state INTEGER\n);\n\
         CREATE INDEX IF NOT EXISTS {index} ON {qlog} (state);\n",
        index = quote(&format!("{log}_state_index")),
    );
    // Go renders the triggers in sorted key order: delete, insert, update.
    for (op, row) in [("delete", "OLD"), ("insert", "NEW"), ("update", "NEW")] {
        let trigger = quote(&format!("{log}_on_{op}"));
        let values: String = table
            .columns
            .iter()
            .map(|c| format!("{row}.{}, ", quote(&c.name)))
            .collect();
        sql.push_str(&format!(
            "DROP TRIGGER IF EXISTS {trigger};\n\
             CREATE TRIGGER {trigger}\nAFTER {op} ON {qtable}\n\
             WHEN NOT EXISTS (SELECT 1 FROM {guard})\nBEGIN\n\
             INSERT INTO {qlog}({cols}, type, created_at, state)\n\
             VALUES ({values}'{op}', {NOW_MS_SQL}, 0);\n\
             INSERT INTO {global} (change_table_id, table_name)\n\
             VALUES (last_insert_rowid(), {name});\nEND;\n",
            guard = quote(GUARD_TABLE),
            cols = val_cols.join(", "),
            global = quote(GLOBAL_LOG),
            name = quote_literal(&table.name),
        ));
    }
    sql
}

/// Adds `val_<col>` columns that an existing change log lacks (the table gained columns).
fn extend_change_log(conn: &Connection, table: &Table) -> Result<(), Error> {
    let log = change_log_name(&table.name);
    let existing: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info(?1)")
        .and_then(|mut s| s.query_map([&log], |r| r.get(0))?.collect())
        .map_err(on_table(&table.name))?;
    if existing.is_empty() {
        return Ok(());
    }
    for c in &table.columns {
        let col = format!("val_{}", c.name);
        if !existing.iter().any(|e| e.eq_ignore_ascii_case(&col)) {
            tracing::info!(table = %table.name, column = %c.name, "Adding column to change log");
            conn.execute_batch(&format!(
                "ALTER TABLE {} ADD COLUMN {} {}",
                quote(&log),
                quote(&col),
                c.decl_type
            ))
            .map_err(on_table(&table.name))?;
        }
    }
    Ok(())
}

/// Installs capture for `tables` and records `schema_hash` in the schema version table.
///
/// # Errors
/// SQLite errors (the transaction is rolled back, leaving the previous state).
pub fn install(conn: &mut Connection, tables: &[Table], schema_hash: &str) -> Result<(), Error> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tracing::info!("Creating global change log table");
    tx.execute_batch(&base_ddl())?;
    let now_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    tx.execute(
        &format!(
            "INSERT OR REPLACE INTO {} (id, schema_hash, updated_at, harmonylite_version) \
             VALUES (1, ?1, ?2, ?3)",
            quote(SCHEMA_VERSION_TABLE)
        ),
        rusqlite::params![schema_hash, now_secs, SCHEMA_VERSION_TAG],
    )?;
    for table in tables {
        tracing::info!("Creating trigger for {}", table.name);
        extend_change_log(&tx, table)?;
        tx.execute_batch(&table_ddl(table))
            .map_err(on_table(&table.name))?;
    }
    tx.commit()?;
    Ok(())
}

/// Drops every trigger and table whose name starts with `__harmonylite__` (Go `RemoveCDC`),
/// returning how many objects were dropped.
///
/// # Errors
/// SQLite errors (rolled back).
pub fn remove(conn: &mut Connection) -> Result<usize, Error> {
    tracing::info!("Uninstalling all CDC triggers...");
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut dropped = 0;
    for kind in ["trigger", "index", "table"] {
        let names: Vec<String> = tx
            .prepare("SELECT name FROM sqlite_schema WHERE type = ?1 AND substr(name, 1, ?2) = ?3")?
            .query_map(rusqlite::params![kind, PREFIX.len() as i64, PREFIX], |r| {
                r.get(0)
            })?
            .collect::<Result<_, _>>()?;
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
mod tests {
    use super::*;
    use crate::db::schema::{schema_hash, watched_tables};
    use crate::db::testutil::temp_db;

    fn install_all(conn: &mut Connection) -> Vec<Table> {
        let tables = watched_tables(conn).expect("tables");
        let hash = schema_hash(conn, &tables).expect("hash");
        install(conn, &tables, &hash).expect("install");
        tables
    }

    fn count(conn: &Connection, sql: &str) -> i64 {
        conn.query_row(sql, [], |r| r.get(0)).expect(sql)
    }

    #[test]
    fn triggers_capture_application_writes_in_order() {
        let (_d, path) =
            temp_db("CREATE TABLE \"my table\" (\"select\" INTEGER PRIMARY KEY, \"v'al\" TEXT)");
        let mut conn = crate::db::open(&path).expect("open");
        install_all(&mut conn);
        let app = Connection::open(&path).expect("app");
        app.execute_batch(
            "INSERT INTO \"my table\" VALUES (1, 'a'); UPDATE \"my table\" SET \"v'al\" = 'b';
             DELETE FROM \"my table\";",
        )
        .expect("app writes");
        let types: Vec<String> = conn
            .prepare("SELECT type FROM \"__harmonylite__my table_change_log\" ORDER BY id")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .expect("types");
        assert_eq!(types, ["insert", "update", "delete"]);
        assert_eq!(
            count(
                &conn,
                "SELECT count(*) FROM __harmonylite___change_log_global"
            ),
            3
        );
        let name: String = conn
            .query_row(
                "SELECT table_name FROM __harmonylite___change_log_global LIMIT 1",
                [],
                |r| r.get(0),
            )
            .expect("name");
        assert_eq!(name, "my table");
    }

    #[test]
    fn trusted_schema_off_clients_can_write() {
        let (_d, path) = temp_db("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
        let mut conn = crate::db::open(&path).expect("open");
        install_all(&mut conn);
        let app = Connection::open(&path).expect("app");
        app.execute_batch("PRAGMA trusted_schema = OFF; INSERT INTO t VALUES (1, 'x');")
            .expect("write with trusted_schema=OFF");
        assert_eq!(
            count(&conn, "SELECT count(*) FROM __harmonylite__t_change_log"),
            1
        );
    }

    #[test]
    fn guard_row_suppresses_capture() {
        let (_d, path) = temp_db("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
        let mut conn = crate::db::open(&path).expect("open");
        install_all(&mut conn);
        conn.execute_batch(
            "BEGIN IMMEDIATE; INSERT INTO __harmonylite__apply_guard VALUES (1);
             INSERT INTO t VALUES (1, 'x'); DELETE FROM __harmonylite__apply_guard; COMMIT;",
        )
        .expect("guarded write");
        assert_eq!(
            count(&conn, "SELECT count(*) FROM __harmonylite__t_change_log"),
            0
        );
    }

    #[test]
    fn reinstall_is_idempotent_and_extends_change_logs() {
        let (_d, path) = temp_db("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
        let mut conn = crate::db::open(&path).expect("open");
        install_all(&mut conn);
        let schema = |c: &Connection| -> Vec<String> {
            c.prepare("SELECT sql FROM sqlite_schema ORDER BY name")
                .and_then(|mut s| {
                    s.query_map([], |r| r.get::<_, Option<String>>(0))?
                        .collect()
                })
                .map(|v: Vec<Option<String>>| v.into_iter().flatten().collect())
                .expect("schema")
        };
        let first = schema(&conn);
        install_all(&mut conn);
        assert_eq!(schema(&conn), first);

        conn.execute_batch("ALTER TABLE t ADD COLUMN extra INTEGER")
            .expect("alter");
        install_all(&mut conn);
        let app = Connection::open(&path).expect("app");
        app.execute("INSERT INTO t VALUES (1, 'x', 42)", [])
            .expect("write after alter");
        assert_eq!(
            count(&conn, "SELECT val_extra FROM __harmonylite__t_change_log"),
            42
        );
    }

    #[test]
    fn fts5_tables_do_not_break_install() {
        let (_d, path) = temp_db(
            "CREATE TABLE t (id INTEGER PRIMARY KEY); CREATE VIRTUAL TABLE f USING fts5(body);",
        );
        let mut conn = crate::db::open(&path).expect("open");
        let tables = install_all(&mut conn);
        assert_eq!(tables.len(), 1);
        let app = Connection::open(&path).expect("app");
        app.execute("INSERT INTO f VALUES ('hello')", [])
            .expect("fts write");
    }

    #[test]
    fn remove_drops_every_artifact() {
        let (_d, path) =
            temp_db("CREATE TABLE t (id INTEGER PRIMARY KEY); CREATE TABLE xharmonylitex(a);");
        let mut conn = crate::db::open(&path).expect("open");
        install_all(&mut conn);
        assert!(remove(&mut conn).expect("remove") > 0);
        assert_eq!(
            count(
                &conn,
                "SELECT count(*) FROM sqlite_schema WHERE name LIKE '%harmonylite%'"
            ),
            1,
            "only the user's own table survives"
        );
        assert_eq!(remove(&mut conn).expect("second remove"), 0);
    }
}
