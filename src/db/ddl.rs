//! Following the application's DDL since capture was installed, for the change logs and for events
//! naming old tables or columns (issue "schema changes", upstream-behaviour §4.5).
//!
//! SQLite rewrites our triggers when the application renames things: `ALTER TABLE t RENAME TO u`
//! moves `__harmonylite__t_change_log_on_*` onto `u` (keeping its name), and `RENAME COLUMN a TO b`
//! turns `NEW."a"` into `NEW."b"` while the change log keeps `val_a`. So they record the renames
//! exactly (no guessing from root pages or column positions); [`follow`] reads them on reinstall.
//!
//! Invariants:
//! - Pending changes survive every rename: the change log (or value column) is renamed with its
//!   table (column) and the global log's rows follow. Only a dropped table's pending changes are
//!   discarded (nothing describes them any more), logged with a count.
//! - Renames and drops are recorded in `__harmonylite__schema_aliases` ([`Aliases`]): other nodes'
//!   events under old names still apply, and those for a dropped table are discarded, not waiting.
//! - [`drift`] checks the live schema against what capture was installed for (one pragma if same).

use std::collections::{HashMap, HashSet};

use rusqlite::Connection;

pub use super::aliases::Aliases;
use super::sql::column;
use super::{ALIAS_TABLE, Error, GLOBAL_LOG, PREFIX, Table, change_log_name, has_table, quote};

/// The suffixes of our trigger names (after `<prefix><table>_change_log`).
const TRIGGER_SUFFIXES: [&str; 5] = [
    "_on_delete",
    "_on_insert",
    "_on_update",
    "_before_insert",
    "_before_update",
];

/// What [`follow`] found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Followed {
    /// (old, new) table names.
    pub renamed_tables: Vec<(String, String)>,
    /// (table, old column, new column).
    pub renamed_columns: Vec<(String, String, String)>,
    /// (table, pending changes discarded with it).
    pub dropped: Vec<(String, i64)>,
}

/// Our triggers: (trigger name, the table its name was made for, the table it is on now, SQL).
fn our_triggers(conn: &Connection) -> Result<Vec<(String, String, String, String)>, Error> {
    let mut stmt = conn.prepare(
        "SELECT name, tbl_name, sql FROM sqlite_schema WHERE type = 'trigger' \
         AND substr(name, 1, ?1) = ?2",
    )?;
    let rows: Vec<(String, String, Option<String>)> = stmt
        .query_map(rusqlite::params![PREFIX.len() as i64, PREFIX], |r| {
            r.try_into()
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows
        .into_iter()
        .filter_map(|(name, on, sql)| {
            let made_for = trigger_table(&name)?;
            Some((name, made_for, on, sql.unwrap_or_default()))
        })
        .collect())
}

/// The table a trigger name of ours was made for (`__harmonylite__<t>_change_log_on_<op>`).
fn trigger_table(name: &str) -> Option<String> {
    let rest = name.strip_prefix(PREFIX)?;
    TRIGGER_SUFFIXES.iter().find_map(|suffix| {
        rest.strip_suffix(suffix)?
            .strip_suffix("_change_log")
            .map(str::to_owned)
    })
}

/// The user table a change-log name of ours belongs to (`__harmonylite__<t>_change_log`).
fn log_table(name: &str) -> Option<&str> {
    if name == GLOBAL_LOG {
        return None;
    }
    name.strip_prefix(PREFIX)?.strip_suffix("_change_log")
}

/// Reads one SQL identifier (double-quoted, backquoted, bracketed or bare) off `s`: (it, rest).
fn identifier(s: &str) -> Option<(String, &str)> {
    let s = s.trim_start();
    let mut chars = s.char_indices();
    let (_, first) = chars.next()?;
    let close = match first {
        '"' => '"',
        '`' => '`',
        '[' => ']',
        c if c.is_alphanumeric() || c == '_' || c == '$' => {
            let end = s
                .char_indices()
                .find(|(_, c)| !(c.is_alphanumeric() || *c == '_' || *c == '$'))
                .map_or(s.len(), |(i, _)| i);
            return Some((s[..end].to_owned(), &s[end..]));
        }
        _ => return None,
    };
    let mut out = String::new();
    let mut rest = &s[1..];
    loop {
        let i = rest.find(close)?;
        out.push_str(&rest[..i]);
        rest = &rest[i + close.len_utf8()..];
        // A doubled quote is an escaped one (not for brackets).
        if close != ']' && rest.starts_with(close) {
            out.push(close);
            rest = &rest[close.len_utf8()..];
        } else {
            return Some((out, rest));
        }
    }
}

/// From an insert trigger's SQL (ours: `… SELECT NEW.…`, Go's: `… VALUES (NEW.…)`): pairs
/// (change-log column, row column it copies), e.g. `("val_a", "b")` after `a` was renamed `b`.
pub fn capture_pairs(sql: &str) -> Option<Vec<(String, String)>> {
    let upper = sql.to_ascii_uppercase();
    // The first insert into a change log (ours may insert into the global log first).
    let mut from = upper.find("BEGIN")?;
    let rest = loop {
        from += upper[from..].find("INSERT INTO")? + "INSERT INTO".len();
        let (target, rest) = identifier(&sql[from..])?;
        if target != GLOBAL_LOG {
            break rest;
        }
    };
    let mut rest = rest.trim_start().strip_prefix('(')?;
    let mut targets = Vec::new();
    loop {
        let (name, r) = identifier(rest)?;
        targets.push(name);
        let r = r.trim_start();
        if let Some(r) = r.strip_prefix(',') {
            rest = r;
        } else {
            r.strip_prefix(')')?;
            rest = r;
            break;
        }
    }
    let offset = sql.len() - rest.len();
    let upper_rest = &upper[offset..];
    let start = ["SELECT", "VALUES"]
        .iter()
        .filter_map(|k| upper_rest.find(k).map(|i| i + k.len()))
        .min()?;
    let mut rest = sql[offset + start..].trim_start();
    rest = rest.strip_prefix('(').unwrap_or(rest);
    let mut pairs = Vec::new();
    for target in targets.into_iter().filter(|t| t.starts_with("val_")) {
        let r = rest.trim_start();
        let r = r
            .strip_prefix("NEW.")
            .or_else(|| r.strip_prefix("new."))
            .or_else(|| r.strip_prefix("New."))?;
        let (column, r) = identifier(r)?;
        pairs.push((target, column));
        rest = r.trim_start().strip_prefix(',')?;
    }
    Some(pairs)
}

fn record(conn: &Connection, kind: &str, scope: &str, old: &str, new: &str) -> Result<(), Error> {
    conn.execute(
        &format!(
            "INSERT OR REPLACE INTO {} (kind, scope, old_name, new_name, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            quote(ALIAS_TABLE)
        ),
        rusqlite::params![kind, scope, old, new, crate::clock::unix_ms()],
    )?;
    Ok(())
}

/// Inside capture's install transaction, before triggers are recreated: follows table and column
/// renames (from our rewritten triggers), drops every trigger of ours (install recreates the
/// right ones: stale ones would capture twice), and retires the change logs of dropped tables.
pub fn follow(conn: &Connection, tables: &[Table]) -> Result<Followed, Error> {
    // Our own renames must not re-check the application's views and triggers (a view naming a
    // dropped table would make every rename fail, and capture could never be reinstalled).
    conn.execute_batch("PRAGMA legacy_alter_table = ON")?;
    let followed = follow_renames(conn, tables);
    conn.execute_batch("PRAGMA legacy_alter_table = OFF")?;
    let mut done = followed?;
    retire_dropped(conn, tables, &mut done)?;
    Ok(done)
}

fn log_column_names(conn: &Connection, log: &str) -> Result<Vec<String>, Error> {
    let names = column(conn, "SELECT name FROM pragma_table_info(?1)", [log])?;
    Ok(names)
}

/// Pending changes of `old` are published as changes of `new` from now on.
fn rename_in_global_log(conn: &Connection, old: &str, new: &str) -> Result<(), Error> {
    conn.execute(
        &format!(
            "UPDATE {} SET table_name = ?2 WHERE table_name = ?1",
            quote(GLOBAL_LOG)
        ),
        rusqlite::params![old, new],
    )?;
    Ok(())
}

/// Follows `ALTER TABLE … RENAME`s since our triggers were made: change logs move with tables.
fn follow_renames(conn: &Connection, tables: &[Table]) -> Result<Followed, Error> {
    let mut done = Followed::default();
    let watched: HashMap<String, &Table> =
        tables.iter().map(|t| (t.name.to_lowercase(), t)).collect();
    let triggers = our_triggers(conn)?;
    // Table renames: a trigger made for `old` now sits on `new`.
    let mut renames: Vec<(String, String)> = Vec::new();
    for (_, made_for, on, _) in &triggers {
        if made_for != on
            && watched.contains_key(&on.to_lowercase())
            && !renames.iter().any(|(o, _)| o == made_for)
        {
            renames.push((made_for.clone(), on.clone()));
        }
    }
    let insert_sql: Vec<(String, String)> = triggers
        .iter()
        .filter(|(name, ..)| name.ends_with("_on_insert"))
        .map(|(_, _, on, sql)| (on.clone(), sql.clone()))
        .collect();
    for (name, ..) in &triggers {
        conn.execute_batch(&format!("DROP TRIGGER IF EXISTS {}", quote(name)))?;
    }
    follow_table_renames(conn, renames, &mut done)?;
    follow_column_renames(conn, insert_sql, &watched, &mut done)?;
    Ok(done)
}

fn follow_table_renames(
    conn: &Connection,
    renames: Vec<(String, String)>,
    done: &mut Followed,
) -> Result<(), Error> {
    let sources: HashSet<String> = renames.iter().map(|(o, _)| o.to_lowercase()).collect();
    // Two phases (all sources to temporary names, then to targets): swaps and chains never collide.
    let mut moved: Vec<(String, String, String)> = Vec::new();
    for (i, (old, new)) in renames.into_iter().enumerate() {
        let (old_log, new_log) = (change_log_name(&old), change_log_name(&new));
        if !has_table(conn, &old_log)? {
            continue;
        }
        if old.eq_ignore_ascii_case(&new) {
            // Only the case changed: the same table for SQLite; pending changes take the new name.
            rename_in_global_log(conn, &old, &new)?;
            continue;
        }
        // The target's own log is left from a table that was dropped and replaced by this one
        // (a table rebuild: create new, copy, drop old, rename new): the copy carries its rows.
        if has_table(conn, &new_log)? && !sources.contains(&new.to_lowercase()) {
            retire_log(conn, &new, done)?;
        }
        let tmp = format!("{PREFIX}renaming_{i}_change_log");
        conn.execute_batch(&format!(
            "DROP INDEX IF EXISTS {};\nALTER TABLE {} RENAME TO {};",
            quote(&format!("{old_log}_state_index")),
            quote(&old_log),
            quote(&tmp)
        ))?;
        moved.push((old, new, tmp));
    }
    for (old, new, tmp) in moved {
        tracing::info!(from = %old, to = %new, "Table renamed; its change log follows");
        conn.execute_batch(&format!(
            "ALTER TABLE {} RENAME TO {};",
            quote(&tmp),
            quote(&change_log_name(&new))
        ))?;
        rename_in_global_log(conn, &old, &new)?;
        let alias = quote(ALIAS_TABLE);
        // Earlier names now lead here, and column renames move with the table.
        conn.execute(
            &format!("UPDATE {alias} SET new_name = ?2 WHERE kind = 'table' AND new_name = ?1"),
            rusqlite::params![old, new],
        )?;
        conn.execute(
            &format!(
                "UPDATE OR REPLACE {alias} SET scope = ?2 WHERE kind = 'column' AND scope = ?1"
            ),
            rusqlite::params![old, new],
        )?;
        record(conn, "table", "", &old, &new)?;
        done.renamed_tables.push((old, new));
    }
    Ok(())
}

/// Renames the change-log columns of columns renamed since the insert trigger (`sql`) was made.
fn follow_column_renames(
    conn: &Connection,
    insert_sql: Vec<(String, String)>,
    watched: &HashMap<String, &Table>,
    done: &mut Followed,
) -> Result<(), Error> {
    // Column renames: the insert trigger copies `val_a` from `NEW."b"`. The trigger is the
    // authority, even when a column named `a` exists again (renamed away, then re-added).
    for (on, sql) in insert_sql {
        let Some(table) = watched.get(&on.to_lowercase()) else {
            continue;
        };
        let Some(pairs) = capture_pairs(&sql) else {
            tracing::debug!(table = %on, "cannot read the columns of an old capture trigger");
            continue;
        };
        let log = change_log_name(&table.name);
        let present = log_column_names(conn, &log)?;
        let has = |c: &str| present.iter().any(|p| p.eq_ignore_ascii_case(c));
        let renamed: Vec<(String, String)> = pairs
            .into_iter()
            .filter_map(|(target, column)| {
                let old = target.strip_prefix("val_")?.to_owned();
                (old != column && has(&target)).then_some((old, column))
            })
            .collect();
        for (i, (old, _)) in renamed.iter().enumerate() {
            conn.execute_batch(&format!(
                "ALTER TABLE {} RENAME COLUMN {} TO {}",
                quote(&log),
                quote(&format!("val_{old}")),
                quote(&format!("val___harmonylite_renaming_{i}"))
            ))?;
        }
        for (i, (old, column)) in renamed.iter().enumerate() {
            tracing::info!(table = %table.name, from = %old, to = %column, "Column renamed; its change-log column follows");
            conn.execute_batch(&format!(
                "ALTER TABLE {} RENAME COLUMN {} TO {}",
                quote(&log),
                quote(&format!("val___harmonylite_renaming_{i}")),
                quote(&format!("val_{column}"))
            ))?;
            conn.execute(
                &format!(
                    "UPDATE {} SET new_name = ?3 WHERE kind = 'column' AND scope = ?1 AND new_name = ?2",
                    quote(ALIAS_TABLE)
                ),
                rusqlite::params![table.name, old, column],
            )?;
            record(conn, "column", &table.name, old, column)?;
            done.renamed_columns
                .push((table.name.clone(), old.clone(), column.clone()));
        }
    }
    Ok(())
}

/// Drops the change log, index and global-log rows of `table` (gone or replaced), counting losses.
fn retire_log(conn: &Connection, table: &str, done: &mut Followed) -> Result<(), Error> {
    let log = change_log_name(table);
    let sql = format!("SELECT count(*) FROM {} WHERE state = 0", quote(&log));
    let pending: i64 = conn.query_row(&sql, [], |r| r.get(0))?;
    if pending > 0 {
        tracing::warn!(
            table,
            changes = pending,
            "Table dropped; its unpublished changes are discarded with it"
        );
    } else {
        tracing::info!(table, "Table dropped; no longer replicated");
    }
    let sql = format!("DELETE FROM {} WHERE table_name = ?1", quote(GLOBAL_LOG));
    conn.execute(&sql, [table])?;
    conn.execute_batch(&format!(
        "DROP INDEX IF EXISTS {};\nDROP TABLE {};",
        quote(&format!("{log}_state_index")),
        quote(&log)
    ))?;
    done.dropped.push((table.to_owned(), pending));
    Ok(())
}

/// Retires the change logs of tables that are gone, and forgets aliases of names in use again.
fn retire_dropped(conn: &Connection, tables: &[Table], done: &mut Followed) -> Result<(), Error> {
    let watched: HashSet<String> = tables.iter().map(|t| t.name.to_lowercase()).collect();
    let logs: Vec<String> = column(
        conn,
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND substr(name, 1, ?1) = ?2",
        rusqlite::params![PREFIX.len() as i64, PREFIX],
    )?;
    for log in logs {
        let Some(table) = log_table(&log) else {
            continue;
        };
        if watched.contains(&table.to_lowercase()) || has_table(conn, table)? {
            continue;
        }
        retire_log(conn, table, done)?;
        record(conn, "dropped", "", table, "")?;
    }
    // Columns its change log has but a rebuilt table lost: ignored in older events, not waited for.
    for t in tables {
        let log = change_log_name(&t.name);
        for name in log_column_names(conn, &log)? {
            let Some(col) = name.strip_prefix("val_") else {
                continue;
            };
            if t.column_index(col).is_none() {
                record(conn, "dropped_column", &t.name, col, "")?;
            }
        }
        for c in &t.columns {
            conn.execute(
                &format!(
                    "DELETE FROM {} WHERE kind = 'dropped_column' AND scope = ?1 AND old_name = ?2 COLLATE NOCASE",
                    quote(ALIAS_TABLE)
                ),
                [&t.name, &c.name],
            )?;
        }
        // A name in use again is no longer an alias or a dropped table.
        conn.execute(
            &format!(
                "DELETE FROM {} WHERE kind IN ('table', 'dropped') AND old_name = ?1 COLLATE NOCASE",
                quote(ALIAS_TABLE)
            ),
            [&t.name],
        )?;
    }
    Ok(())
}

/// The events waiting for the schema (see [`super::apply`]), in arrival order.
pub fn waiting_events(conn: &Connection) -> Result<Vec<crate::wire::ChangeEvent>, Error> {
    let sql = format!(
        "SELECT payload FROM {} WHERE schema_wait = 1 ORDER BY id",
        quote(super::HELD_TABLE)
    );
    let payloads: Vec<Vec<u8>> = column(conn, &sql, [])?;
    Ok(payloads
        .iter()
        .filter_map(|p| crate::wire::ReplicationEvent::decode(p).ok())
        .map(|e| e.event)
        .collect())
}

/// Publishes a newly watched table's existing rows once, as inserts (written before its triggers,
/// they were never captured); returns how many. Not rows keyed as in `seen`, other nodes' events
/// for the table waiting here: such a row is the cluster's (a migration every node ran, or another
/// node's write), which those events set here; published, it would undo that node's later changes.
/// Other rows are this node's writes between the DDL and its triggers, which nothing else carries.
pub fn backfill(
    conn: &Connection,
    table: &Table,
    seen: &[&crate::wire::ChangeEvent],
) -> Result<i64, Error> {
    let log = change_log_name(&table.name);
    let sql = format!("SELECT coalesce(max(id), 0) FROM {}", quote(&log));
    let before: i64 = conn.query_row(&sql, [], |r| r.get(0))?;
    let targets: Vec<String> = table
        .columns
        .iter()
        .map(|c| quote(&format!("val_{}", c.name)))
        .collect();
    let sources: Vec<String> = table.columns.iter().map(|c| quote(&c.name)).collect();
    let unseen = if seen.is_empty() {
        String::new()
    } else {
        seen_images(conn, table, seen)?;
        let same: Vec<String> = table
            .pk_indexes()
            .iter()
            .map(|&i| format!("s.c{i} IS t.{}", sources[i]))
            .collect();
        format!(
            " WHERE NOT EXISTS (SELECT 1 FROM temp.hl_seen AS s WHERE {})",
            same.join(" AND ")
        )
    };
    let n = conn.execute(
        &format!(
            "INSERT INTO {} ({}, type, created_at, state) SELECT {}, 'insert', ?1, 0 FROM {} AS t{unseen}",
            quote(&log),
            targets.join(", "),
            sources
                .iter()
                .map(|c| format!("t.{c}"))
                .collect::<Vec<_>>()
                .join(", "),
            quote(&table.name)
        ),
        [crate::clock::unix_ms()],
    )?;
    if !seen.is_empty() {
        conn.execute_batch("DROP TABLE temp.hl_seen")?;
    }
    conn.execute(
        &format!(
            "INSERT INTO {} (change_table_id, table_name) SELECT id, ?2 FROM {} WHERE id > ?1 ORDER BY id",
            quote(GLOBAL_LOG),
            quote(&log)
        ),
        rusqlite::params![before, table.name],
    )?;
    Ok(n as i64)
}

/// `temp.hl_seen(c0, c1, …)`: the row images of `events` by column of `table` (lacking: NULL).
fn seen_images(
    conn: &Connection,
    table: &Table,
    events: &[&crate::wire::ChangeEvent],
) -> Result<(), Error> {
    let cols: Vec<String> = (0..table.columns.len()).map(|i| format!("c{i}")).collect();
    conn.execute_batch(&format!("CREATE TEMP TABLE hl_seen ({})", cols.join(", ")))?;
    let mut insert = conn.prepare(&format!(
        "INSERT INTO temp.hl_seen VALUES ({})",
        vec!["?"; cols.len()].join(", ")
    ))?;
    let null = crate::wire::Value::Null;
    for e in events {
        let binds = table.columns.iter().map(|c| {
            let found = e.row.iter().find(|(n, _)| n.eq_ignore_ascii_case(&c.name));
            super::sql::Bind(found.map_or(&null, |(_, v)| v))
        });
        insert.execute(rusqlite::params_from_iter(binds))?;
    }
    Ok(())
}

/// After `ALTER TABLE … ADD COLUMN`, pending changes captured without the new columns take them
/// from the row now, or a write between the DDL and the trigger reinstall replicates without them.
pub fn fill_added(conn: &Connection, table: &Table, added: &[String]) -> Result<(), Error> {
    let pks = table.pk_indexes();
    let added: Vec<&String> = added
        .iter()
        .filter(|c| table.column_index(c).is_some_and(|i| !pks.contains(&i)))
        .collect();
    if added.is_empty() {
        return Ok(());
    }
    let log = quote(&change_log_name(&table.name));
    let matches: Vec<String> = pks
        .iter()
        .map(|&i| {
            let c = &table.columns[i].name;
            format!("r.{} IS {log}.{}", quote(c), quote(&format!("val_{c}")))
        })
        .collect();
    let sets: Vec<String> = added
        .iter()
        .map(|c| {
            format!(
                "{} = (SELECT r.{} FROM {} AS r WHERE {})",
                quote(&format!("val_{c}")),
                quote(c),
                quote(&table.name),
                matches.join(" AND ")
            )
        })
        .collect();
    conn.execute_batch(&format!(
        "UPDATE {log} SET {} WHERE state = 0",
        sets.join(", ")
    ))?;
    Ok(())
}

/// How the live schema differs from what capture was installed for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}")]
pub struct Drift {
    pub what: String,
    /// A watched table lost its capture triggers (dropped, or table rebuilt): later writes missed.
    pub capture_lost: bool,
}

/// The first of `tables` with an application trigger newer than ours ([`super::triggers::outrun`]).
fn first_outrun(conn: &Connection, tables: &[Table]) -> Result<Option<String>, Error> {
    for t in tables {
        if super::triggers::outrun(conn, &t.name)? {
            return Ok(Some(t.name.clone()));
        }
    }
    Ok(None)
}

/// The `PRAGMA schema_version` looked at, and what changed since capture was installed for
/// `tables` with `hash` (`None`: nothing); with `seen` at that version nothing else is read.
pub fn drift(
    conn: &Connection,
    tables: &[Table],
    hash: &str,
    seen: Option<i64>,
) -> Result<(i64, Option<Drift>), Error> {
    let version: i64 = conn.query_row("PRAGMA schema_version", [], |r| r.get(0))?;
    if seen == Some(version) {
        return Ok((version, None));
    }
    let tx = conn.unchecked_transaction()?;
    let version: i64 = tx.query_row("PRAGMA schema_version", [], |r| r.get(0))?;
    let now = super::schema::watched_tables(&tx)?;
    let names = |ts: &[Table]| -> Vec<String> { ts.iter().map(|t| t.name.clone()).collect() };
    let mut capture_lost = false;
    let reason = if names(&now) != names(tables) {
        Some(format!(
            "watched tables changed from {:?} to {:?}",
            names(tables),
            names(&now)
        ))
    } else if let Some(t) = now.iter().zip(tables).find(|(a, b)| a != b) {
        Some(format!("the columns of table {:?} changed", t.0.name))
    } else if let Some(t) = first_outrun(&tx, tables)? {
        Some(format!(
            "an application trigger on table {t:?} was created after the capture triggers"
        ))
    } else if super::schema::schema_hash(&tx, &now)? != hash {
        Some("the schema hash changed".to_owned())
    } else {
        let expected: HashMap<String, String> =
            tables.iter().flat_map(super::triggers::triggers).collect();
        let present = our_triggers(&tx)?;
        let missing = tables.iter().find(|t| {
            let names = super::triggers::triggers(t);
            !names
                .iter()
                .all(|(n, _)| present.iter().any(|(p, ..)| p == n))
        });
        let unindexed = tables.iter().find_map(|t| {
            super::triggers::rowids_index(t)
                .filter(|i| !super::has_object(&tx, i).unwrap_or(true))
                .map(|_| t.name.clone())
        });
        if let Some(t) = missing {
            capture_lost = true;
            Some(format!(
                "the capture triggers of table {:?} were dropped by something other than harmonylite \
                 (writes made while they were missing are not replicated)",
                t.name
            ))
        } else if let Some(t) = unindexed {
            Some(format!(
                "the index that keeps the rowids of table {t:?} through VACUUM was dropped"
            ))
        } else if present.len() != expected.len() {
            Some(format!(
                "{} capture triggers found where {} belong",
                present.len(),
                expected.len()
            ))
        } else {
            present
                .iter()
                .find(|(name, _, _, sql)| expected.get(name) != Some(sql))
                .map(|(name, ..)| format!("capture trigger {name:?} differs"))
        }
    };
    tx.commit()?;
    Ok((version, reason.map(|what| Drift { what, capture_lost })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_and_gos_capture_triggers() {
        let ours = "CREATE TRIGGER \"x\"\nAFTER insert ON \"t\"\nWHEN NOT EXISTS (SELECT 1 FROM \"g\")\nBEGIN\n\
                    INSERT INTO \"__harmonylite__t_change_log\"(\"val_a\", \"val_we\"\"ird\", type, created_at, state)\n\
                    SELECT NEW.\"b\", NEW.\"we\"\"ird\", 'insert', 1, 0;\nEND";
        assert_eq!(
            capture_pairs(ours),
            Some(vec![
                ("val_a".into(), "b".into()),
                ("val_we\"ird".into(), "we\"ird".into())
            ])
        );
        let go = "CREATE TRIGGER __harmonylite__t_change_log_on_insert AFTER INSERT ON t\nBEGIN\n    \
                  INSERT INTO __harmonylite__t_change_log(val_id, val_name, type, created_at, state)\n    \
                  VALUES(NEW.id, NEW.title, 'insert', 1, 0);\nEND;";
        assert_eq!(
            capture_pairs(go),
            Some(vec![
                ("val_id".into(), "id".into()),
                ("val_name".into(), "title".into())
            ])
        );
        assert_eq!(capture_pairs("CREATE TRIGGER nonsense"), None);
        assert_eq!(
            trigger_table("__harmonylite__a_b_change_log_on_update").as_deref(),
            Some("a_b")
        );
        assert_eq!(log_table(GLOBAL_LOG), None);
        assert_eq!(log_table("__harmonylite__t_change_log"), Some("t"));
    }
}
