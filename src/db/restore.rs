//! Restoring a snapshot into the live database, online (design §3.8, §3.11).
//!
//! The snapshot is attached read-only and merged into the live tables in one write transaction on
//! the applier's connection (capture muted). Application connections stay open and valid: no file
//! is copied under them; they wait on SQLite's lock as for any writer, then see the rows.
//!
//! Invariants:
//! - A row with a local change not yet back from the stream (pending, or published past the
//!   snapshot's position) is kept: no committed local write is overwritten; it still replicates.
//! - Our own tables (change logs, held events, identity) are never read from the snapshot.
//! - A table the snapshot lacks, or lacks a key column of, is left alone and reported.
//! - A snapshot with tables or columns this node lacks fails ([`Error::Behind`], nothing changed)
//!   until this node migrates: merged, they would be lost once positions passed their changes.
//! - A database without application tables (a new node, an empty file) is not behind: it takes
//!   the snapshot whole, schema included ([`take_whole`]), as Go does.
//! - A UNIQUE conflict while merging (rows that swapped values) falls back to replacing the
//!   table's unkept rows (a clash with a kept row skips the snapshot's); any other constraint
//!   failure (NOT NULL, CHECK: the schemas differ) fails the restore unchanged, to be retried.

use std::path::Path;

use rusqlite::Connection;

use super::changelog::ChangeLog;
use super::sql::{Bind, column};
use super::{Error, Table, on_table, quote, same_value};

/// Schema name the snapshot is attached as.
const SNAP: &str = "hl_snapshot";

/// Local changes that look in flight but may already be in the snapshot, so their rows must not
/// be kept (the snapshot's value wins; the change still goes out and, if it is new, wins later).
#[derive(Debug, Default, Clone)]
pub struct NotKept {
    /// Per table: pending changes up to this log id, captured before this process started when the
    /// stream no longer held where they could have landed: whether they were published is unknown.
    pub unknown_up_to: Vec<i64>,
    /// (table, change-log id, shard, sequence) of changes acknowledged (or found) but not marked.
    pub landed: Vec<(usize, i64, u64, u64)>,
}

/// Whether `positions` (per shard, index shard − 1) reach sequence `seq` of `shard`.
pub fn reaches(positions: &[u64], shard: u64, seq: u64) -> bool {
    positions
        .get((shard.max(1) - 1) as usize)
        .is_some_and(|&p| seq <= p)
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Restored {
    pub deleted: u64,
    pub updated: u64,
    pub inserted: u64,
    /// Rows left alone because a local change of them is still in flight.
    pub kept: u64,
    /// Tables not restored, with why.
    pub skipped: Vec<(String, String)>,
}

/// Merges the snapshot at `snapshot` into `conn`'s database (on an error nothing changes), keeping
/// our changes published past its `positions` (per shard); `check` runs first, in the transaction.
pub fn restore(
    conn: &mut Connection,
    log: &ChangeLog,
    snapshot: &Path,
    positions: &[u64],
    not_kept: &NotKept,
    check: &dyn Fn(&Connection) -> Result<(), Error>,
) -> Result<Restored, Error> {
    let uri = format!(
        "file:{}?mode=ro",
        snapshot
            .to_string_lossy()
            .replace('%', "%25")
            .replace('?', "%3f")
            .replace('#', "%23")
    );
    conn.execute("ATTACH DATABASE ?1 AS hl_snapshot", [&uri])?;
    let result = merge_all(conn, log, positions, not_kept, check);
    let detached = conn.execute_batch("DETACH DATABASE hl_snapshot");
    let restored = result?;
    detached?;
    Ok(restored)
}

fn merge_all(
    conn: &mut Connection,
    log: &ChangeLog,
    positions: &[u64],
    not_kept: &NotKept,
    check: &dyn Fn(&Connection) -> Result<(), Error>,
) -> Result<Restored, Error> {
    let mut out = Restored::default();
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // Capture must cover this schema: a just-created table's rows would be neither merged nor kept.
    check(&tx)?;
    // Without application tables the database is new: it takes the snapshot whole.
    if !app_tables(&tx, "main", "'table', 'virtual'")?.is_empty() {
        let aliases = super::ddl::Aliases::load(&tx)?;
        let lacking = lacking(&tx, log.tables(), &aliases)?;
        if !lacking.is_empty() {
            return Err(Error::Behind(lacking));
        }
        merge_tables(&tx, log, positions, not_kept, &aliases, &mut out)?;
    } else {
        take_whole(&tx, &mut out)?;
    }
    // The commit syncs the WAL (durable before the positions move); copying the pages into the
    // file (a second write, seconds per GB) is left to `checkpoint_behind`, so replication resumes.
    let every: i64 = tx.query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))?;
    tx.execute_batch("PRAGMA wal_autocheckpoint = 0")?;
    let started = std::time::Instant::now();
    let committed = tx.commit();
    conn.execute_batch(&format!("PRAGMA wal_autocheckpoint = {every}"))?;
    committed?;
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "restore committed"
    );
    if every > 0
        && let Some(path) = conn.path().filter(|p| !p.is_empty())
    {
        checkpoint_behind(std::path::PathBuf::from(path));
    }
    Ok(out)
}

fn merge_tables(
    tx: &Connection,
    log: &ChangeLog,
    positions: &[u64],
    not_kept: &NotKept,
    aliases: &super::ddl::Aliases,
    out: &mut Restored,
) -> Result<(), Error> {
    let landed: std::collections::HashMap<(usize, i64), (u64, u64)> = not_kept
        .landed
        .iter()
        .map(|&(t, id, shard, seq)| ((t, id), (shard, seq)))
        .collect();
    // A snapshot may predate this node's renames: names are followed back (`snapshot_table`).
    for (i, table) in log.tables().iter().enumerate() {
        let (snap_table, snap_cols) = snapshot_table(tx, log, aliases, table)?;
        if snap_cols.is_empty() {
            out.skipped
                .push((table.name.clone(), "the snapshot has no such table".into()));
            continue;
        }
        let find = |name: &str| {
            snap_cols
                .iter()
                .find(|c| c.eq_ignore_ascii_case(name))
                .cloned()
        };
        let snap_of = |name: &str| -> Option<String> {
            if name.eq_ignore_ascii_case("rowid") {
                return Some("rowid".into());
            }
            let old = || {
                aliases
                    .old_columns(&table.name, name)
                    .iter()
                    .filter(|o| table.column_index(o).is_none())
                    .find_map(|old| find(old))
            };
            find(name).or_else(old)
        };
        let has = |name: &str| snap_of(name).is_some();
        let keys: Vec<&str> = table
            .pk_indexes()
            .iter()
            .map(|&k| table.columns[k].name.as_str())
            .collect();
        if let Some(missing) = keys.iter().find(|k| !has(k)) {
            out.skipped.push((
                table.name.clone(),
                format!("the snapshot's table lacks key column {missing:?}"),
            ));
            continue;
        }
        let flying = in_flight(tx, log, i, positions, not_kept, &landed)?;
        keep_lost_rows(tx, table, &snap_table, &keys, &snap_of, &flying)?;
        keep_table(tx, &keys, &flying)?;
        out.kept += flying.len() as u64;
        let started = std::time::Instant::now();
        merge_table(tx, table, &snap_table, &snap_cols, &keys, &snap_of, out)
            .map_err(on_table(&table.name))?;
        tracing::debug!(table = %table.name, elapsed_ms = started.elapsed().as_millis() as u64, "table restored");
        tx.execute_batch("DROP TABLE temp.hl_keep")?;
    }
    Ok(())
}

/// Keeps in `__harmonylite__conflicts` (stream `snapshot`, seq 0, no payload) the snapshot's rows a
/// local insert in flight is about to overwrite everywhere: another node took the key meanwhile
/// (both nodes' next auto id). Only keys whose first change in flight is an insert (after an update
/// the row is likely ours); a local `INSERT OR REPLACE` of a seen row counts too (no prior image).
fn keep_lost_rows(
    tx: &Connection,
    table: &Table,
    snap_table: &str,
    keys: &[&str],
    snap_of: &dyn Fn(&str) -> Option<String>,
    flying: &[(i64, Vec<crate::wire::Value>)],
) -> Result<(), Error> {
    let log = quote(&super::change_log_name(&table.name));
    let (here, there): (Vec<String>, Vec<String>) = table
        .columns
        .iter()
        .filter(|c| !(table.rowid_key && c.name == "rowid"))
        .filter_map(|c| Some((c.name.clone(), snap_of(&c.name)?)))
        .unzip();
    let snap_keys: Vec<String> = keys
        .iter()
        .map(|k| snap_of(k).unwrap_or_default())
        .collect();
    let local_keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
    let in_snapshot = row_select(SNAP, snap_table, &there, &snap_keys);
    let in_main = row_select("main", &table.name, &here, &local_keys);
    let mut seen = std::collections::HashSet::new();
    for (id, key) in flying {
        if !seen.insert(format!("{key:?}")) {
            continue;
        }
        let sql = format!("SELECT type FROM {log} WHERE id = ?1");
        let op: String = tx.query_row(&sql, [id], |r| r.get(0))?;
        let read = |sql: &str| -> rusqlite::Result<Option<Vec<crate::wire::Value>>> {
            let mut stmt = tx.prepare_cached(sql)?;
            let mut rows = stmt.query(rusqlite::params_from_iter(key.iter().map(Bind)))?;
            rows.next()?
                .map(|r| {
                    (0..here.len())
                        .map(|n| super::changelog::value_at(r, n))
                        .collect()
                })
                .transpose()
        };
        if op != "insert" {
            continue;
        }
        let Some(lost) = read(&in_snapshot)? else {
            continue;
        };
        if read(&in_main)?.as_ref() != Some(&lost) {
            let row: Vec<_> = here.iter().cloned().zip(lost).collect();
            record_snapshot_loss(tx, &table.name, &super::sql::row_json(&row))?;
        }
    }
    Ok(())
}

/// `SELECT columns FROM schema.from WHERE key₁ IS ?1 AND …`.
fn row_select(schema: &str, from: &str, columns: &[String], keys: &[String]) -> String {
    let list: Vec<String> = columns.iter().map(|c| quote(c)).collect();
    let conds: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(n, k)| format!("{} IS ?{}", quote(k), n + 1))
        .collect();
    format!(
        "SELECT {} FROM {schema}.{} WHERE {}",
        list.join(", "),
        quote(from),
        conds.join(" AND ")
    )
}

/// Keeps a snapshot's row lost to a local insert (see [`keep_lost_rows`]).
fn record_snapshot_loss(tx: &Connection, table: &str, lost_row: &str) -> Result<(), Error> {
    tracing::warn!(
        table,
        lost_row,
        "A snapshot's row lost to a concurrent insert made here; it is kept in __harmonylite__conflicts"
    );
    tx.execute(
        &format!(
            "INSERT INTO {} (table_name, kind, lost_row, stream, seq, created_at) \
             VALUES (?1, 'insert', ?2, 'snapshot', 0, ?3)",
            quote(super::CONFLICTS_TABLE)
        ),
        rusqlite::params![table, lost_row, crate::clock::unix_ms()],
    )?;
    Ok(())
}

/// The snapshot's name and columns of local `table` (none: it lacks it), following this node's
/// renames back (the current name first; an old name another local table now has is not this one).
fn snapshot_table(
    tx: &Connection,
    log: &ChangeLog,
    aliases: &super::ddl::Aliases,
    table: &Table,
) -> Result<(String, Vec<String>), Error> {
    let olds = aliases
        .old_tables(&table.name)
        .into_iter()
        .filter(|o| !log.tables().iter().any(|t| t.name.eq_ignore_ascii_case(o)));
    for name in std::iter::once(table.name.clone()).chain(olds) {
        let cols = snapshot_columns(tx, &name)?;
        if !cols.is_empty() {
            return Ok((name, cols));
        }
    }
    Ok((table.name.clone(), Vec::new()))
}

/// The local changes of table `i` whose rows the restore keeps: (change-log id, key).
fn in_flight(
    tx: &Connection,
    log: &ChangeLog,
    i: usize,
    positions: &[u64],
    not_kept: &NotKept,
    landed: &std::collections::HashMap<(usize, i64), (u64, u64)>,
) -> Result<Vec<(i64, Vec<crate::wire::Value>)>, Error> {
    let unknown_up_to = not_kept.unknown_up_to.get(i).copied().unwrap_or(0);
    let (flying, _) = log.in_flight(tx, i, 0, Some(positions), unknown_up_to)?;
    // A known but unmarked landing decides: inside the snapshot not in flight, past it in flight.
    let landed_inside = |id: i64| {
        landed
            .get(&(i, id))
            .map(|&(shard, seq)| reaches(positions, shard, seq))
    };
    // Changes of unknown status may be inside the snapshot already: its rows win.
    Ok(flying
        .into_iter()
        .filter(|&(id, _, unknown)| landed_inside(id).map_or(!unknown, |inside| !inside))
        .map(|(id, key, _)| (id, key))
        .collect())
}

/// Checkpoints the WAL after a restore, on a thread and connection of our own, so the application's
/// automatic checkpoints skip the work (we hold the checkpoint lock); if it fails, they do it.
fn checkpoint_behind(path: std::path::PathBuf) {
    let spawned = std::thread::Builder::new()
        .name("hl-checkpoint".into())
        .spawn(move || {
            let started = std::time::Instant::now();
            let done = super::open(&path).and_then(|c| {
                c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                })
                .map_err(Error::from)
            });
            match done {
                Ok((frames, copied)) => tracing::debug!(
                    frames,
                    copied,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "checkpoint after the restore done"
                ),
                Err(e) => tracing::warn!(error = %crate::error_chain(&e),
                    "Checkpoint after a restore failed; SQLite's automatic checkpoints do it later"),
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "Cannot start the checkpoint after a restore; SQLite's automatic checkpoints do it later");
    }
}

/// Copies a snapshot table with exactly the local columns into the empty local table by SQLite's
/// transfer optimization (`INSERT … SELECT *`: records copied undecoded, ~3× faster), which needs a
/// trigger-free table: ours are dropped and recreated in our transaction, unseen by any writer.
/// False (nothing done) if not: other columns, order or triggers, a rowid key (may be renumbered).
fn copy_whole(
    conn: &Connection,
    table: &Table,
    snap_table: &str,
    snap_cols: &[String],
    out: &mut Restored,
) -> rusqlite::Result<bool> {
    let same_columns = snap_table == table.name
        && table.columns.len() == snap_cols.len()
        && table
            .columns
            .iter()
            .zip(snap_cols)
            .all(|(c, s)| c.name.eq_ignore_ascii_case(s));
    if table.rowid_key || !same_columns {
        return Ok(false);
    }
    let triggers: Vec<(String, String)> = conn
        .prepare_cached(
            "SELECT name, sql FROM main.sqlite_schema WHERE type = 'trigger' AND tbl_name = ?1",
        )?
        .query_map([&table.name], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    if triggers.iter().any(|(n, _)| !n.starts_with(super::PREFIX)) {
        return Ok(false);
    }
    for (name, _) in &triggers {
        conn.execute_batch(&format!("DROP TRIGGER main.{}", quote(name)))?;
    }
    let name = quote(&table.name);
    let sql = format!("INSERT INTO main.{name} SELECT * FROM {SNAP}.{name}");
    out.inserted += conn.execute(&sql, [])? as u64;
    for (_, sql) in &triggers {
        conn.execute_batch(sql)?;
    }
    Ok(true)
}

/// The application's tables in `schema` (`kinds`: `pragma_table_list` types).
fn app_tables(conn: &Connection, schema: &str, kinds: &str) -> Result<Vec<String>, Error> {
    let sql = format!(
        "SELECT name FROM pragma_table_list WHERE schema = '{schema}' AND type IN ({kinds}) \
         AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND substr(lower(name), 1, ?1) <> lower(?2)"
    );
    let params = rusqlite::params![super::PREFIX.len() as i64, super::PREFIX];
    Ok(column(conn, &sql, params)?)
}

/// What the snapshot has that this node lacks (renames here followed, drops left out): ordinary
/// tables (virtual and shadow ones never replicate; one unwatched here is not lacking) and columns.
fn lacking(
    conn: &Connection,
    local: &[Table],
    aliases: &super::ddl::Aliases,
) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    for name in app_tables(conn, SNAP, "'table'")? {
        let current = aliases.table(&name).unwrap_or(&name);
        let found = local
            .iter()
            .find(|t| t.name.eq_ignore_ascii_case(&name))
            .or_else(|| local.iter().find(|t| t.name.eq_ignore_ascii_case(current)));
        let Some(table) = found else {
            if !aliases.dropped(&name) && !super::has_table(conn, &name)? {
                out.push(format!("table {name:?}"));
            }
            continue;
        };
        if let Some(keys) = other_key(conn, table, &name, aliases)? {
            out.push(format!("table {name:?} keyed by ({keys})"));
        }
        for column in snapshot_columns(conn, &name)? {
            let here = table.column_index(&column).or_else(|| {
                aliases
                    .column(&table.name, &column)
                    .and_then(|c| table.column_index(c))
            });
            if here.is_none() && !aliases.dropped_column(&table.name, &column) {
                out.push(format!("column {column:?} of table {:?}", table.name));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Takes the snapshot's schema and rows into a database without application tables: tables, their
/// rows with rowids (shadow tables too: full-text indexes come as they are), AUTOINCREMENT
/// counters, `user_version`, then indexes, views and triggers (none fires for copied rows; existing
/// ones kept), then capture. Virtual tables whose module this SQLite lacks are left out (warned).
fn take_whole(conn: &Connection, out: &mut Restored) -> Result<(), Error> {
    let objects: Vec<(String, String, String)> = conn
        .prepare(&format!(
            "SELECT type, name, sql FROM {SNAP}.sqlite_schema WHERE sql IS NOT NULL \
             AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND substr(lower(name), 1, ?1) <> lower(?2) \
             AND name NOT IN (SELECT name FROM pragma_table_list WHERE schema = '{SNAP}' AND type = 'shadow') \
             AND name NOT IN (SELECT name FROM main.sqlite_schema) \
             ORDER BY type <> 'table', rowid"
        ))?
        .query_map(
            rusqlite::params![super::PREFIX.len() as i64, super::PREFIX],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?
        .collect::<Result<_, _>>()?;
    let (tables, rest): (Vec<_>, Vec<_>) = objects.into_iter().partition(|(t, ..)| t == "table");
    for (_, name, sql) in &tables {
        match conn.execute_batch(sql) {
            Err(e)
                if sql
                    .get(..14)
                    .is_some_and(|s| s.eq_ignore_ascii_case("CREATE VIRTUAL")) =>
            {
                tracing::warn!(table = %name, error = %e, "Virtual table of the snapshot left out: this SQLite cannot create it");
            }
            done => done?,
        }
    }
    for name in app_tables(conn, SNAP, "'table', 'shadow'")? {
        if super::has_table(conn, &name)? {
            out.inserted += copy_rows(conn, &name)?;
        }
    }
    let counters = conn
        .prepare(&format!("SELECT 1 FROM {SNAP}.sqlite_sequence LIMIT 0"))
        .is_ok();
    if counters {
        conn.execute_batch(&format!(
            "DELETE FROM main.sqlite_sequence WHERE name IN (SELECT name FROM {SNAP}.sqlite_sequence); \
             INSERT INTO main.sqlite_sequence SELECT * FROM {SNAP}.sqlite_sequence \
             WHERE substr(lower(name), 1, {}) <> lower('{}')",
            super::PREFIX.len(),
            super::PREFIX
        ))?;
    }
    let version: i64 = conn.query_row(&format!("PRAGMA {SNAP}.user_version"), [], |r| r.get(0))?;
    conn.execute_batch(&format!("PRAGMA main.user_version = {version}"))?;
    for (_, _, sql) in &rest {
        conn.execute_batch(sql)?;
    }
    // Capture for the new tables after their rows are in: those rows are the cluster's, and the
    // next install would publish the rows of a table without a change log as this node's writes.
    for table in super::schema::watched_tables(conn)? {
        conn.execute_batch(&super::cdc::table_ddl(&table))?;
    }
    Ok(())
}

/// Copies a table's rows from the snapshot with rowids (`INSERT … SELECT *` would renumber a table
/// without INTEGER PRIMARY KEY, whose later changes find rows by rowid), not generated columns.
fn copy_rows(conn: &Connection, name: &str) -> Result<u64, Error> {
    let q = quote(name);
    let sql =
        format!("SELECT name FROM pragma_table_xinfo(?1, '{SNAP}') WHERE hidden NOT IN (2, 3)");
    let columns: Vec<String> = column::<String>(conn, &sql, [name])?
        .iter()
        .map(|c| quote(c))
        .collect();
    let has_rowid = conn
        .prepare(&format!("SELECT rowid FROM {SNAP}.{q} LIMIT 0"))
        .is_ok();
    let list = if has_rowid {
        format!("rowid, {}", columns.join(", "))
    } else {
        columns.join(", ")
    };
    conn.execute(&format!("DELETE FROM main.{q}"), [])?;
    let sql = format!("INSERT INTO main.{q} ({list}) SELECT {list} FROM {SNAP}.{q}");
    Ok(conn.execute(&sql, [])? as u64)
}

/// Column names of a table in the snapshot (empty when it has no such table).
fn snapshot_columns(conn: &Connection, table: &str) -> Result<Vec<String>, Error> {
    let sql = format!("SELECT name FROM pragma_table_info(?1, '{SNAP}')");
    Ok(column(conn, &sql, [table])?)
}

/// The snapshot's key of its table `name` (comma-separated) when not that of local `table` (rowid
/// vs WITHOUT ROWID, or other columns): rows cannot match, so the node waits for its migration.
fn other_key(
    conn: &Connection,
    table: &Table,
    name: &str,
    aliases: &super::ddl::Aliases,
) -> Result<Option<String>, Error> {
    let sql = format!("SELECT name FROM pragma_table_info(?1, '{SNAP}') WHERE pk > 0 ORDER BY pk");
    let mut keys: Vec<String> = column(conn, &sql, [name])?;
    if keys.is_empty() {
        keys.push("rowid".into());
    }
    let local = table.pk_indexes();
    let same = local.len() == keys.len()
        && local.iter().zip(&keys).all(|(&i, snap)| {
            let here = &table.columns[i].name;
            here.eq_ignore_ascii_case(snap)
                || aliases
                    .old_columns(&table.name, here)
                    .iter()
                    .any(|o| o.eq_ignore_ascii_case(snap))
        });
    Ok((!same).then(|| keys.join(", ")))
}

/// `temp.hl_keep(k0, k1, …)`: the keys of rows not to touch.
pub(super) fn keep_table(
    conn: &Connection,
    keys: &[&str],
    flying: &[(i64, Vec<crate::wire::Value>)],
) -> Result<(), Error> {
    let cols: Vec<String> = (0..keys.len()).map(|i| format!("k{i}")).collect();
    conn.execute_batch(&format!(
        "CREATE TEMP TABLE hl_keep ({cols}); CREATE INDEX temp.hl_keep_k ON hl_keep ({cols});",
        cols = cols.join(", ")
    ))?;
    let mut insert = conn.prepare(&format!(
        "INSERT INTO temp.hl_keep VALUES ({})",
        vec!["?"; keys.len()].join(", ")
    ))?;
    for (_, key) in flying {
        let binds: Vec<Bind<'_>> = key.iter().map(Bind).collect();
        insert.execute(rusqlite::params_from_iter(binds.iter()))?;
    }
    Ok(())
}

/// The statements of one table's merge, spelled with the local names and the snapshot's.
struct MergeSql {
    /// Deletes live rows the snapshot lacks (kept rows excepted).
    delete_missing: String,
    /// Updates live rows whose values differ from the snapshot's (kept rows excepted).
    update: Option<String>,
    /// Inserts the snapshot's rows missing live (ends in a WHERE: an upsert clause may follow).
    insert: String,
    /// Copies every snapshot row (into an empty table).
    insert_all: String,
    /// Deletes every live row not kept (the UNIQUE fallback).
    delete_unkept: String,
}

impl MergeSql {
    /// `snap_of`: the snapshot's name of a local column (None: the snapshot lacks it); the
    /// caller checked that it has every key column. `m` is the live table, `s` the snapshot's.
    fn new(
        table: &Table,
        snap_table: &str,
        keys: &[&str],
        snap_of: &dyn Fn(&str) -> Option<String>,
    ) -> MergeSql {
        let name = quote(&table.name);
        let sname = quote(snap_table);
        let sq = |c: &str| quote(&snap_of(c).unwrap_or_else(|| c.to_string()));
        let key_is = keys
            .iter()
            .map(|k| same_value(&format!("m.{}", quote(k)), &format!("s.{}", sq(k))))
            .collect::<Vec<_>>()
            .join(" AND ");
        let kept = |x: &str, snapshot_side: bool| {
            let cond = keys
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    let col = if snapshot_side { sq(k) } else { quote(k) };
                    same_value(&format!("hk.k{i}"), &format!("{x}.{col}"))
                })
                .collect::<Vec<_>>()
                .join(" AND ");
            format!("EXISTS (SELECT 1 FROM temp.hl_keep AS hk WHERE {cond})")
        };
        // Real columns present in both (the synthetic rowid key is not a column).
        let common: Vec<&str> = table
            .columns
            .iter()
            .filter(|c| !(table.rowid_key && c.name == "rowid"))
            .map(|c| c.name.as_str())
            .filter(|c| snap_of(c).is_some())
            .collect();
        let values: Vec<&str> = common
            .iter()
            .copied()
            .filter(|c| !keys.iter().any(|k| k.eq_ignore_ascii_case(c)))
            .collect();
        let mut insert_cols: Vec<String> = common.iter().map(|c| quote(c)).collect();
        let mut select_cols: Vec<String> = common.iter().map(|c| format!("s.{}", sq(c))).collect();
        if table.rowid_key {
            insert_cols.insert(0, "rowid".into());
            select_cols.insert(0, "s.rowid".into());
        }
        let (insert_cols, select_cols) = (insert_cols.join(", "), select_cols.join(", "));
        let set = |f: &dyn Fn(&str) -> String, sep: &str| {
            values.iter().map(|c| f(c)).collect::<Vec<_>>().join(sep)
        };
        let differs = |c: &str| super::differs(&format!("m.{}", quote(c)), &format!("s.{}", sq(c)));
        MergeSql {
            delete_missing: format!(
                "DELETE FROM main.{name} AS m WHERE NOT EXISTS (SELECT 1 FROM {SNAP}.{sname} AS s WHERE {key_is}) AND NOT {}",
                kept("m", false)
            ),
            update: (!values.is_empty()).then(|| {
                format!(
                    "UPDATE main.{name} AS m SET {} FROM {SNAP}.{sname} AS s WHERE {key_is} AND ({}) AND NOT {}",
                    set(&|c| format!("{} = s.{}", quote(c), sq(c)), ", "),
                    set(&differs, " OR "),
                    kept("m", false)
                )
            }),
            insert: format!(
                "INSERT INTO main.{name} ({insert_cols}) SELECT {select_cols} FROM {SNAP}.{sname} AS s \
                 WHERE NOT EXISTS (SELECT 1 FROM main.{name} AS m WHERE {key_is}) AND NOT {}",
                kept("s", true)
            ),
            insert_all: format!(
                "INSERT INTO main.{name} ({insert_cols}) SELECT {select_cols} FROM {SNAP}.{sname} AS s"
            ),
            delete_unkept: format!("DELETE FROM main.{name} AS m WHERE NOT {}", kept("m", false)),
        }
    }
}

/// Merges the snapshot's rows of `table` into the live table; see [`MergeSql::new`].
fn merge_table(
    conn: &Connection,
    table: &Table,
    snap_table: &str,
    snap_cols: &[String],
    keys: &[&str],
    snap_of: &dyn Fn(&str) -> Option<String>,
    out: &mut Restored,
) -> rusqlite::Result<()> {
    let name = quote(&table.name);
    let sql = MergeSql::new(table, snap_table, keys, snap_of);
    // Empty with nothing kept (a new node; checked in our write transaction, so nobody adds a row):
    // a plain copy, no per-row probe. A kept key here is a local delete in flight: general path.
    let empty = conn
        .prepare_cached(&format!(
            "SELECT NOT EXISTS (SELECT 1 FROM main.{name}) AND NOT EXISTS (SELECT 1 FROM temp.hl_keep)"
        ))?
        .query_row([], |r| r.get::<_, bool>(0))?;
    if empty {
        if !copy_whole(conn, table, snap_table, snap_cols, out)? {
            out.inserted += conn.execute(&sql.insert_all, [])? as u64;
        }
        return Ok(());
    }
    out.deleted += conn.execute(&sql.delete_missing, [])? as u64;
    let merged = (|| -> rusqlite::Result<(u64, u64)> {
        let updated = sql.update.as_ref().map_or(Ok(0), |u| conn.execute(u, []))? as u64;
        let inserted = conn.execute(&sql.insert, [])? as u64;
        Ok((updated, inserted))
    })();
    match merged {
        Ok((u, i)) => {
            out.updated += u;
            out.inserted += i;
        }
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
        {
            // Rows swapped UNIQUE values: replace every unkept row. Not `INSERT OR IGNORE`: it
            // would drop rows failing NOT NULL or CHECK silently, while the positions move on.
            tracing::debug!(table = %table.name, "restore merge hit a UNIQUE conflict; replacing the table's rows");
            out.deleted += conn.execute(&sql.delete_unkept, [])? as u64;
            let insert = format!("{} ON CONFLICT DO NOTHING", sql.insert);
            out.inserted += conn.execute(&insert, [])? as u64;
        }
        Err(e) => return Err(e),
    }
    Ok(())
}
