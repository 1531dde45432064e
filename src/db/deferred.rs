//! Parts of a restored snapshot that this node's schema cannot hold yet (issue "schema
//! changes"): a node behind on a migration that restores a snapshot of a node ahead of it gets
//! tables and columns it does not have. The restore moves every position past the changes that
//! made those rows, so dropping them would lose them for good once this node migrates too.
//!
//! Instead, [`defer`] copies them, in the restore's own transaction, into tables of ours
//! (`__harmonylite__deferred_<id>`, listed in `__harmonylite__deferred_parts`), and
//! [`merge_ready`] merges them once the local schema has the table or column — right after capture
//! was reinstalled for it, before the events that waited for that schema are retried (they are
//! newer than the snapshot).
//!
//! Invariants:
//! - A deferred part never overwrites a change this node published or will publish: a whole
//!   table sets the rows of its keys that have no local change in flight (a row written before
//!   the triggers existed, under a key the cluster has, is not published by the backfill and
//!   takes the cluster's values); a column only fills rows where it still holds its default
//!   (the value `ADD COLUMN` gave it) and no change captured since the column existed is in
//!   flight, and pending older changes of those rows then carry the filled value.
//! - A whole table merged into a local table that lacks some of its columns leaves those
//!   columns as a column part, for the next migration.
//! - A newer restore replaces the parts whose table (and columns) it has; others stay (the newer
//!   snapshot cannot carry rows its maker could not hold either).
//! - Each part merges in its own savepoint, with UNIQUE and CHECK clashes skipped (local rows
//!   win): one part never holds back the events waiting behind it.
//! - While parts are deferred this node's database lacks cluster data, so it does not lead or
//!   save snapshots (like with events waiting for the schema).
//! - Tables and columns this node renamed are followed ([`super::ddl::Aliases`]); parts of
//!   tables or columns it dropped are not kept.

use rusqlite::Connection;

use super::changelog::ChangeLog;
use super::ddl::Aliases;
use super::{Error, PREFIX, Table, quote};

/// The catalog of deferred parts.
pub const PARTS_TABLE: &str = "__harmonylite__deferred_parts";
/// The column of a copy holding the snapshot row's rowid (tables that have one).
pub(super) const ROWID: &str = "__harmonylite_rowid";

/// The copy table of part `id`.
fn copy_name(id: i64) -> String {
    format!("{PREFIX}deferred_{id}")
}

/// One deferred part: a whole table, or some columns of a table this node has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub id: i64,
    /// The table's name in the snapshot.
    pub table: String,
    /// Empty for a whole table; else the columns this node lacked.
    pub columns: Vec<String>,
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.columns.is_empty() {
            write!(f, "table {:?}", self.table)
        } else {
            write!(f, "columns {:?} of table {:?}", self.columns, self.table)
        }
    }
}

fn ensure_catalog(conn: &Connection) -> Result<(), Error> {
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {} (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             table_name TEXT NOT NULL,
             columns TEXT NOT NULL,
             created_at INTEGER NOT NULL
         )",
        quote(PARTS_TABLE)
    ))?;
    Ok(())
}

/// The deferred parts, oldest first (none when the catalog does not exist).
///
/// # Errors
/// SQLite errors.
pub fn parts(conn: &Connection) -> Result<Vec<Part>, Error> {
    if !super::has_table(conn, PARTS_TABLE)? {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(&format!(
        "SELECT id, table_name, columns FROM main.{} ORDER BY id",
        quote(PARTS_TABLE)
    ))?;
    let rows: Vec<(i64, String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    Ok(rows
        .into_iter()
        .map(|(id, table, columns)| Part {
            id,
            table,
            columns: serde_json::from_str(&columns).unwrap_or_default(),
        })
        .collect())
}

fn drop_part(conn: &Connection, id: i64) -> Result<(), Error> {
    conn.execute_batch(&format!(
        "DROP TABLE IF EXISTS main.{}",
        quote(&copy_name(id))
    ))?;
    conn.execute(
        &format!("DELETE FROM main.{} WHERE id = ?1", quote(PARTS_TABLE)),
        [id],
    )?;
    Ok(())
}

/// The copy of a whole table deferred under `name` (the table's name in the snapshot), with the
/// copy's columns: the cluster's rows of a table this node creates now.
///
/// # Errors
/// SQLite errors.
pub fn whole_copy(conn: &Connection, name: &str) -> Result<Option<(String, Vec<String>)>, Error> {
    let Some(part) = parts(conn)?
        .into_iter()
        .find(|p| p.columns.is_empty() && p.table.eq_ignore_ascii_case(name))
    else {
        return Ok(None);
    };
    let copy = copy_name(part.id);
    let columns = columns_of(conn, "main", &copy)?;
    Ok(Some((copy, columns)))
}

/// Column names of `table` in schema `schema` (empty when there is no such table).
fn columns_of(conn: &Connection, schema: &str, table: &str) -> Result<Vec<String>, Error> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info(?1, ?2)")?;
    let names = stmt
        .query_map([table, schema], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(names)
}

/// The local table a snapshot's table `name` is (by name, or renamed here since).
fn local_table<'t>(local: &'t [Table], aliases: &Aliases, name: &str) -> Option<&'t Table> {
    let current = aliases.table(name).unwrap_or(name);
    local
        .iter()
        .find(|t| t.name.eq_ignore_ascii_case(name))
        .or_else(|| local.iter().find(|t| t.name.eq_ignore_ascii_case(current)))
}

/// The local column a column `name` of `table` (local) is, by name or renamed here since.
fn local_column(table: &Table, aliases: &Aliases, name: &str) -> Option<usize> {
    table.column_index(name).or_else(|| {
        aliases
            .column(&table.name, name)
            .and_then(|c| table.column_index(c))
    })
}

/// In the restore's transaction, with the snapshot attached as `snap`: copies the snapshot's
/// tables this node does not have, and the columns its tables lack, into deferred parts.
/// Returns what was deferred.
///
/// # Errors
/// SQLite errors (the restore then changes nothing).
pub fn defer(
    conn: &Connection,
    snap: &str,
    local: &[Table],
    aliases: &Aliases,
) -> Result<Vec<Part>, Error> {
    // Ordinary tables only, as watched (virtual and shadow tables never replicate), and none
    // this node has under that name, watched or not (an unwatchable table would never take
    // the part).
    let mut stmt = conn.prepare(&format!(
        "SELECT name FROM pragma_table_list WHERE schema = '{snap}' AND type = 'table' \
         AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND substr(lower(name), 1, ?1) <> lower(?2) \
         AND name NOT IN (SELECT name FROM {snap}.sqlite_schema WHERE type = 'table' \
                          AND sql LIKE 'CREATE VIRTUAL TABLE%')"
    ))?;
    let tables: Vec<String> = stmt
        .query_map(rusqlite::params![PREFIX.len() as i64, PREFIX], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    drop(stmt);
    // A newer snapshot's rows replace what an older one left, where it has them: the table of
    // a whole part, every column of a column part (merged above, or deferred again below).
    for old in parts(conn)? {
        let Some(name) = tables.iter().find(|t| t.eq_ignore_ascii_case(&old.table)) else {
            continue;
        };
        let cols = columns_of(conn, snap, name)?;
        if old
            .columns
            .iter()
            .all(|c| cols.iter().any(|x| x.eq_ignore_ascii_case(c)))
        {
            drop_part(conn, old.id)?;
        }
    }
    let mut out = Vec::new();
    for name in tables {
        let snap_cols = columns_of(conn, snap, &name)?;
        let (columns, copied): (Vec<String>, Vec<String>) = match local_table(local, aliases, &name)
        {
            None if aliases.dropped(&name) || super::has_table(conn, &name)? => continue,
            None => (Vec::new(), snap_cols.clone()),
            Some(t) => {
                let lacking: Vec<String> = snap_cols
                    .iter()
                    .filter(|c| {
                        local_column(t, aliases, c).is_none() && !aliases.dropped_column(&t.name, c)
                    })
                    .cloned()
                    .collect();
                if lacking.is_empty() {
                    continue;
                }
                // The key to find the rows by later, then the columns.
                let keys: Vec<String> = t
                    .pk_indexes()
                    .iter()
                    .filter(|&&k| !(t.rowid_key && t.columns[k].name == "rowid"))
                    .map(|&k| t.columns[k].name.clone())
                    .collect();
                let Some(keys) = keys
                    .iter()
                    .map(|k| {
                        snap_cols
                            .iter()
                            .find(|c| c.eq_ignore_ascii_case(k))
                            .cloned()
                    })
                    .collect::<Option<Vec<String>>>()
                else {
                    tracing::warn!(table = %name, "The snapshot's table lacks this node's key columns; its extra columns are not kept");
                    continue;
                };
                let copied = keys.into_iter().chain(lacking.iter().cloned()).collect();
                (lacking, copied)
            }
        };
        ensure_catalog(conn)?;
        conn.execute(
            &format!(
                "INSERT INTO main.{} (table_name, columns, created_at) VALUES (?1, ?2, ?3)",
                quote(PARTS_TABLE)
            ),
            rusqlite::params![
                name,
                serde_json::to_string(&columns).unwrap_or_else(|_| "[]".into()),
                super::now_ms()
            ],
        )?;
        let id = conn.last_insert_rowid();
        let has_rowid = conn
            .prepare(&format!(
                "SELECT rowid FROM {snap}.{} LIMIT 0",
                quote(&name)
            ))
            .is_ok();
        let mut targets: Vec<String> = copied.iter().map(|c| quote(c)).collect();
        let mut sources: Vec<String> = copied.iter().map(|c| format!("s.{}", quote(c))).collect();
        if has_rowid {
            targets.insert(0, quote(ROWID));
            sources.insert(0, "s.rowid".into());
        }
        // Untyped columns: values are kept exactly as the snapshot stores them.
        conn.execute_batch(&format!(
            "CREATE TABLE main.{copy} ({cols}); INSERT INTO main.{copy} SELECT {sources} FROM {snap}.{name} AS s",
            copy = quote(&copy_name(id)),
            cols = targets.join(", "),
            sources = sources.join(", "),
            name = quote(&name),
        ))?;
        out.push(Part {
            id,
            table: name,
            columns,
        });
    }
    Ok(out)
}

/// What [`merge_ready`] did with one part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    pub part: Part,
    /// Rows inserted (whole table) or cells filled (columns).
    pub rows: u64,
    /// Columns still missing here (the part stays for them).
    pub still_missing: Vec<String>,
}

/// Merges the deferred parts the local schema can hold now, in the caller's (guarded) write
/// transaction. `applied`: per shard, the last applied sequence (to tell the in-flight local
/// changes, which win); `stale_up_to`: per table, changes up to this id were captured before the
/// table's columns changed.
///
/// # Errors
/// SQLite errors (the caller rolls back; the parts stay).
pub fn merge_ready(
    conn: &Connection,
    log: &ChangeLog,
    applied: &[u64],
    stale_up_to: &[i64],
) -> Result<Vec<Merged>, Error> {
    let parts = parts(conn)?;
    if parts.is_empty() {
        return Ok(Vec::new());
    }
    let aliases = Aliases::load(conn)?;
    let mut out = Vec::new();
    for part in parts {
        // Each part on its own: one that cannot merge (a constraint of the new schema) must
        // not hold back the events waiting behind it.
        conn.execute_batch("SAVEPOINT hl_part")?;
        match merge_part(conn, log, applied, stale_up_to, &aliases, part.clone()) {
            Ok(merged) => {
                conn.execute_batch("RELEASE hl_part")?;
                out.extend(merged);
            }
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => {
                conn.execute_batch("ROLLBACK TO hl_part; RELEASE hl_part")?;
                tracing::warn!(part = %part, error = %crate::error_chain(&e),
                    "Cannot merge snapshot rows kept for this schema; they stay and are tried again after the next schema change");
            }
        }
    }
    Ok(out)
}

fn merge_part(
    conn: &Connection,
    log: &ChangeLog,
    applied: &[u64],
    stale_up_to: &[i64],
    aliases: &Aliases,
    part: Part,
) -> Result<Option<Merged>, Error> {
    let local = log.tables();
    {
        let Some((t, table)) = local_table(local, aliases, &part.table)
            .and_then(|t| local.iter().position(|l| l.name == t.name).map(|i| (i, t)))
        else {
            if aliases.dropped(&part.table) || super::has_table(conn, &part.table)? {
                // Dropped here, or created here in a form that cannot be replicated.
                tracing::warn!(part = %part, "Snapshot rows kept for a table this node dropped or cannot replicate; discarding them");
                drop_part(conn, part.id)?;
            }
            return Ok(None);
        };
        let copy = quote(&copy_name(part.id));
        let copy_cols = columns_of(conn, "main", &copy_name(part.id))?;
        // A local column in the copy: by its name, or by a name it had before a rename here
        // since the restore.
        let find = |c: &str| copy_cols.iter().find(|x| x.eq_ignore_ascii_case(c));
        let in_copy = |c: &str| {
            find(c)
                .or_else(|| {
                    aliases
                        .old_columns(&table.name, c)
                        .iter()
                        .filter(|o| table.column_index(o).is_none())
                        .find_map(|o| find(o))
                })
                .map(|x| quote(x))
        };
        // The copy's expression for each key column of the local table.
        let keys: Option<Vec<(String, String)>> = table
            .pk_indexes()
            .iter()
            .map(|&k| {
                let c = &table.columns[k].name;
                if table.rowid_key && c == "rowid" {
                    in_copy(ROWID).map(|s| ("rowid".to_string(), s))
                } else {
                    in_copy(c).map(|s| (quote(c), s))
                }
            })
            .collect();
        let Some(keys) = keys else {
            tracing::warn!(part = %part, table = %table.name, "Deferred snapshot rows lack this node's key columns; dropping them");
            drop_part(conn, part.id)?;
            return Ok(None);
        };
        let key_match = |m: &str, s: &str| {
            keys.iter()
                .map(|(l, c)| format!("{m}.{l} IS {s}.{c}"))
                .collect::<Vec<_>>()
                .join(" AND ")
        };
        let whole = part.columns.is_empty();
        let (flying, _) = log.in_flight(conn, t, 0, Some(applied), 0)?;
        // A whole table's rows: any local change of the row wins. A column: only changes
        // captured since the column existed carry it.
        let stale = stale_up_to.get(t).copied().unwrap_or(0);
        let flying: Vec<(i64, Vec<crate::wire::Value>)> = flying
            .into_iter()
            .filter(|(id, _, _)| whole || *id > stale)
            .map(|(id, key, _)| (id, key))
            .collect();
        let key_names: Vec<&str> = keys.iter().map(|(l, _)| l.as_str()).collect();
        super::restore::keep_table(conn, &key_names, &flying)?;
        let kept = |x: &str, cols: &dyn Fn(usize) -> String| {
            let cond = (0..keys.len())
                .map(|i| format!("hk.k{i} IS {x}.{}", cols(i)))
                .collect::<Vec<_>>()
                .join(" AND ");
            format!("EXISTS (SELECT 1 FROM temp.hl_keep AS hk WHERE {cond})")
        };
        let name = quote(&table.name);
        let mut rows = 0u64;
        let mut still_missing = Vec::new();
        if whole {
            let common: Vec<(String, String)> = table
                .columns
                .iter()
                .filter(|c| !(table.rowid_key && c.name == "rowid"))
                .filter_map(|c| in_copy(&c.name).map(|s| (quote(&c.name), s)))
                .collect();
            let mut targets: Vec<String> = common.iter().map(|(l, _)| l.clone()).collect();
            let mut sources: Vec<String> = common.iter().map(|(_, s)| format!("s.{s}")).collect();
            if table.rowid_key
                && let Some(r) = in_copy(ROWID)
            {
                targets.insert(0, "rowid".into());
                sources.insert(0, format!("s.{r}"));
            }
            // The snapshot's row is the cluster's: a local row of that key that is not in flight
            // was written before the triggers existed and never published (see
            // `ddl::backfill`), so it takes the cluster's values. OR IGNORE: a row clashing with
            // a local row on a UNIQUE value loses.
            let values: Vec<&(String, String)> = common
                .iter()
                .filter(|(l, _)| !keys.iter().any(|(k, _)| k == l))
                .collect();
            if !values.is_empty() {
                rows += conn.execute(
                    &format!(
                        "UPDATE OR IGNORE main.{name} AS m SET {} FROM main.{copy} AS s WHERE {} AND ({}) AND NOT {}",
                        values
                            .iter()
                            .map(|(l, c)| format!("{l} = s.{c}"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        key_match("m", "s"),
                        values
                            .iter()
                            .map(|(l, c)| format!("m.{l} IS NOT s.{c} OR typeof(m.{l}) IS NOT typeof(s.{c})"))
                            .collect::<Vec<_>>()
                            .join(" OR "),
                        kept("m", &|i| keys[i].0.clone()),
                    ),
                    [],
                )? as u64;
            }
            // Columns the snapshot has and this table does not yet: they wait as a column part.
            still_missing = copy_cols
                .iter()
                .filter(|c| *c != ROWID)
                .filter(|c| {
                    local_column(table, aliases, c).is_none()
                        && !aliases.dropped_column(&table.name, c)
                })
                .cloned()
                .collect();
            rows += conn.execute(
                &format!(
                    "INSERT OR IGNORE INTO main.{name} ({}) SELECT {} FROM main.{copy} AS s \
                     WHERE NOT EXISTS (SELECT 1 FROM main.{name} AS m WHERE {}) AND NOT {}",
                    targets.join(", "),
                    sources.join(", "),
                    key_match("m", "s"),
                    kept("s", &|i| keys[i].1.clone()),
                ),
                [],
            )? as u64;
        } else {
            let defaults: Vec<(String, Option<String>)> = conn
                .prepare("SELECT name, dflt_value FROM pragma_table_info(?1, 'main')")?
                .query_map([&table.name], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            for col in &part.columns {
                let Some(i) = local_column(table, aliases, col) else {
                    if !aliases.dropped_column(&table.name, col) {
                        still_missing.push(col.clone());
                    }
                    continue;
                };
                let Some(src) = in_copy(col) else { continue };
                let local_col = &table.columns[i].name;
                let default = defaults
                    .iter()
                    .find(|(n, _)| n == local_col)
                    .and_then(|(_, d)| d.clone())
                    .unwrap_or_else(|| "NULL".into());
                let q = quote(local_col);
                rows += conn.execute(
                    &format!(
                        "UPDATE OR IGNORE main.{name} AS m SET {q} = s.{src} FROM main.{copy} AS s \
                         WHERE {} AND m.{q} IS ({default}) AND s.{src} IS NOT m.{q} AND NOT {}",
                        key_match("m", "s"),
                        kept("m", &|i| keys[i].0.clone()),
                    ),
                    [],
                )? as u64;
                // Pending changes captured before the column existed publish the row as it is
                // now, not the default `fill_added` gave them.
                super::ddl::fill_added(conn, table, std::slice::from_ref(local_col))?;
            }
        }
        conn.execute_batch("DROP TABLE temp.hl_keep")?;
        if still_missing.is_empty() {
            drop_part(conn, part.id)?;
        } else {
            conn.execute(
                &format!(
                    "UPDATE main.{} SET columns = ?2 WHERE id = ?1",
                    quote(PARTS_TABLE)
                ),
                rusqlite::params![
                    part.id,
                    serde_json::to_string(&still_missing).unwrap_or_else(|_| "[]".into())
                ],
            )?;
        }
        Ok(Some(Merged {
            part,
            rows,
            still_missing,
        }))
    }
}
