//! Schema introspection: which tables are watched, their columns and keys, and the schema hash that
//! travels in each event as `sh` (upstream-behaviour §4.4, §9.1). Invariants: watched is every
//! ordinary table of `main` but `sqlite_*`, ours, and virtual and shadow tables (no triggers on
//! those; FTS shadow tables change underneath their virtual table). The hash reproduces Go's
//! exactly (`table|col:type:notnull:pk…\n`, tables and columns sorted byte-wise,
//! `*schema.BinaryType` for an empty type, SHA-256 hex): mixed clusters agree.

use rusqlite::Connection;
use sha2::{Digest, Sha256};

use super::{Column, Error, PREFIX, Table, on_table};

/// Names we never watch, by the rules of Go's `LIKE` filters minus their wildcard accidents (`_`).
fn is_internal(name: &str) -> bool {
    name.get(..7)
        .is_some_and(|p| p.eq_ignore_ascii_case("sqlite_"))
        || name
            .get(..PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(PREFIX))
}

/// Tables reported as skipped (with why): the list is re-read often; each is worth one warning.
static SKIPPED: std::sync::Mutex<std::collections::BTreeSet<(String, String)>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// The tables to watch, sorted by name, with their columns. One without a usable key is left out
/// with a warning saying why: one odd table must not stop all replication (a systemd restart loop).
pub fn watched_tables(conn: &Connection) -> Result<Vec<Table>, Error> {
    // pragma_table_list (SQLite ≥ 3.37) tells ordinary tables from virtual and shadow ones.
    let names: Vec<String> = super::sql::column(
        conn,
        "SELECT name FROM pragma_table_list WHERE schema = 'main' AND type = 'table' \
         AND name NOT IN (SELECT name FROM sqlite_schema WHERE type = 'table' \
                          AND sql LIKE 'CREATE VIRTUAL TABLE%') \
         ORDER BY name",
        [],
    )?;
    let mut tables = Vec::new();
    for name in names.into_iter().filter(|n| !is_internal(n)) {
        match table_info(conn, &name) {
            Ok(t) => tables.push(t),
            Err(Error::Unwatchable(table, why)) => {
                let first = SKIPPED
                    .lock()
                    .map_or(true, |mut seen| seen.insert((table.clone(), why.clone())));
                if first {
                    tracing::warn!(table = %table, reason = %why, "Table skipped: it cannot be replicated");
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(tables)
}

/// Reads one table's columns (`pragma_table_info`: no generated or hidden ones, as in Go), plus a
/// synthetic `rowid` key if none is in a primary key; [`Error::Unwatchable`] without a usable key.
pub fn table_info(conn: &Connection, name: &str) -> Result<Table, Error> {
    let mut stmt = conn
        .prepare("SELECT name, type, pk FROM pragma_table_info(?1) ORDER BY cid")
        .map_err(on_table(name))?;
    let mut columns: Vec<Column> = stmt
        .query_map([name], |r| {
            Ok(Column {
                name: r.get(0)?,
                decl_type: r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                pk: r.get(2)?,
            })
        })
        .map_err(on_table(name))?
        .collect::<Result<_, _>>()
        .map_err(on_table(name))?;
    if columns.is_empty() {
        return Err(Error::Unwatchable(name.to_owned(), "no columns".into()));
    }
    let rowid_key = !columns.iter().any(|c| c.pk > 0);
    if rowid_key {
        if columns.iter().any(|c| c.name.eq_ignore_ascii_case("rowid")) {
            return Err(Error::Unwatchable(
                name.to_owned(),
                "it has no primary key and a column named rowid hides the row id".into(),
            ));
        }
        columns.push(Column {
            name: "rowid".into(),
            decl_type: "INT".into(),
            pk: 1,
        });
    }
    if let Some(why) = needs_the_application(conn, name, &columns)? {
        return Err(Error::Unwatchable(name.to_owned(), why));
    }
    let without_rowid: bool = conn
        .query_row(
            "SELECT wr FROM pragma_table_list WHERE schema = 'main' AND name = ?1",
            [name],
            |r| r.get(0),
        )
        .map_err(on_table(name))?;
    Ok(Table {
        name: name.to_owned(),
        columns,
        rowid_key,
        without_rowid,
        unique: unique_indexes(conn, name)?,
    })
}

/// See [`Table::unique`]; expression indexes are left out (a trigger cannot tell who shares them).
fn unique_indexes(conn: &Connection, name: &str) -> Result<Vec<Vec<(String, String)>>, Error> {
    let indexes: Vec<String> = super::sql::column(
        conn,
        "SELECT name FROM pragma_index_list(?1) WHERE \"unique\" ORDER BY name",
        [name],
    )
    .map_err(on_table(name))?;
    let mut stmt = conn
        .prepare("SELECT name, coll FROM pragma_index_xinfo(?1) WHERE key ORDER BY seqno")
        .map_err(on_table(name))?;
    let mut out = Vec::new();
    for index in indexes {
        let columns: Vec<(Option<String>, String)> = stmt
            .query_map([&index], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|rows| rows.collect())
            .map_err(on_table(name))?;
        let plain: Option<Vec<(String, String)>> = columns
            .into_iter()
            .map(|(c, coll)| Some((c?, coll)))
            .collect();
        out.extend(plain);
    }
    Ok(out)
}

/// Why writes to table `name` cannot be compiled on our connection (a collation of a key or index,
/// or a function a trigger calls, that only the application's connections define; a trigger naming
/// a table that is gone), or `None`. Events for such a table would all fail here.
fn needs_the_application(
    conn: &Connection,
    name: &str,
    columns: &[Column],
) -> Result<Option<String>, Error> {
    let (table, first) = (super::quote(name), super::quote(&columns[0].name));
    let writes = [
        format!("INSERT INTO main.{table} DEFAULT VALUES"),
        format!("UPDATE main.{table} SET {first} = {first}"),
        format!("DELETE FROM main.{table}"),
    ];
    for sql in writes {
        match conn.prepare(&sql) {
            Err(
                rusqlite::Error::SqlInputError { error, msg, .. }
                | rusqlite::Error::SqliteFailure(error, Some(msg)),
            ) if error.code == rusqlite::ErrorCode::Unknown => {
                return Ok(Some(format!(
                    "writes to it fail here with \"{msg}\" (a collation or function only the application defines?)"
                )));
            }
            Err(e) => return Err(on_table(name)(e)),
            Ok(_) => {}
        }
    }
    Ok(None)
}

/// Computes Go HarmonyLite's schema hash over the watched tables.
pub fn schema_hash(conn: &Connection, tables: &[Table]) -> Result<String, Error> {
    let mut names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    let mut input = String::new();
    let mut stmt = conn.prepare_cached(
        "SELECT name, type, \"notnull\", pk FROM pragma_table_xinfo(?1) ORDER BY cid",
    )?;
    for name in names {
        let mut cols: Vec<(String, String, bool, bool)> = stmt
            .query_map([name], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                    r.get::<_, i64>(2)? != 0,
                    r.get::<_, i64>(3)? != 0,
                ))
            })
            .map_err(on_table(name))?
            .collect::<Result<_, _>>()
            .map_err(on_table(name))?;
        cols.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        input.push_str(name);
        for (col, ty, notnull, pk) in cols {
            // Go: Atlas parses an empty type as *schema.BinaryType and the hash prints `%T`.
            let ty = if ty.is_empty() {
                "*schema.BinaryType"
            } else {
                ty.as_str()
            };
            input.push_str(&format!("|{col}:{ty}:{notnull}:{pk}"));
        }
        input.push('\n');
    }
    Ok(crate::hex(&Sha256::digest(input.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::testutil::temp_db;

    const BOOKS: &str = "CREATE TABLE Books (id INTEGER PRIMARY KEY AUTOINCREMENT, \
        title TEXT NOT NULL, author TEXT NOT NULL, publication_year INTEGER);";
    const AUTHORS: &str = "CREATE TABLE Authors (id INTEGER PRIMARY KEY AUTOINCREMENT, \
        name TEXT NOT NULL, birth_year INTEGER);";

    #[test]
    fn schema_hash_golden_vectors() {
        let (_d, path) = temp_db(BOOKS);
        let conn = Connection::open(&path).expect("open");
        let tables = watched_tables(&conn).expect("tables");
        assert_eq!(
            schema_hash(&conn, &tables).expect("hash"),
            "907f897c838224f10a8a6bfb1ae63396abf7f8235bad760d17af35c72470cccb"
        );
        conn.execute_batch(AUTHORS).expect("authors");
        let tables = watched_tables(&conn).expect("tables");
        assert_eq!(
            schema_hash(&conn, &tables).expect("hash"),
            "77ffca4ecf9399127b5ce2be978aaae00de8f1dc5956a16fe45bfb42c3f4117e"
        );
        assert_eq!(
            schema_hash(&conn, &[]).expect("hash"),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    /// Issue 24, finding 11: a table whose writes need the application's collation or function
    /// is left out with a warning naming it, instead of quarantining every event.
    #[test]
    fn tables_needing_the_applications_collations_or_functions_are_not_watched() {
        let (_d, path) = temp_db(
            "CREATE TABLE coll (k TEXT PRIMARY KEY COLLATE NOCASE, v);
             CREATE TABLE idx (id INTEGER PRIMARY KEY, v TEXT);
             CREATE INDEX idx_v ON idx (v COLLATE NOCASE);
             CREATE TABLE trig (id INTEGER PRIMARY KEY, v TEXT);
             CREATE TRIGGER trig_au AFTER UPDATE ON trig BEGIN SELECT app_hook(new.v); END;
             CREATE TABLE chk (id INTEGER PRIMARY KEY, v TEXT CHECK (length(v) > 0));
             CREATE TABLE expr (id INTEGER PRIMARY KEY, v TEXT);
             CREATE INDEX expr_v ON expr (lower(v));
             CREATE TABLE fine (id INTEGER PRIMARY KEY, v TEXT COLLATE RTRIM);",
        );
        let conn = Connection::open(&path).expect("open");
        // Stand-in for a collation the application registers on its own connections.
        conn.execute_batch(
            "PRAGMA writable_schema = ON;
             UPDATE sqlite_schema SET sql = replace(replace(replace(sql, 'NOCASE', 'app_order'),
                 'length(', 'app_valid('), 'lower(', 'app_fn(');
             PRAGMA writable_schema = OFF;",
        )
        .expect("schema");
        let conn = Connection::open(&path).expect("reopen");
        let names: Vec<String> = watched_tables(&conn)
            .expect("tables")
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["fine"]);
        match table_info(&conn, "coll") {
            Err(Error::Unwatchable(_, why)) => assert!(why.contains("app_order"), "{why}"),
            other => panic!("expected unwatchable, got {other:?}"),
        }
    }

    #[test]
    fn discovery_skips_internal_virtual_and_shadow_tables() {
        let (_d, path) = temp_db(
            "CREATE TABLE b(x INTEGER PRIMARY KEY); CREATE TABLE a(y);
             CREATE VIRTUAL TABLE docs USING fts5(body);
             CREATE TABLE __harmonylite__x(a); CREATE TABLE ab_harmonylite_cd(z PRIMARY KEY);
             CREATE VIEW v AS SELECT * FROM a;",
        );
        let conn = Connection::open(&path).expect("open");
        let names: Vec<String> = watched_tables(&conn)
            .expect("tables")
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["a", "ab_harmonylite_cd", "b"]);
    }

    #[test]
    fn rowid_and_composite_keys() {
        let (_d, path) = temp_db(
            "CREATE TABLE plain(a TEXT, b); CREATE TABLE comp(x, y, z, PRIMARY KEY (z, x));",
        );
        let conn = Connection::open(&path).expect("open");
        let plain = table_info(&conn, "plain").expect("plain");
        assert!(plain.rowid_key);
        assert_eq!(plain.columns.last().map(|c| c.name.as_str()), Some("rowid"));
        assert_eq!(plain.pk_indexes(), [2]);
        let comp = table_info(&conn, "comp").expect("comp");
        assert!(!comp.rowid_key);
        assert_eq!(comp.pk_indexes(), [2, 0]);
    }
}
