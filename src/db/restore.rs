//! Restoring a snapshot into the live database, online (design §3.8, §3.11).
//!
//! The snapshot is attached read-only and its rows are merged into the live tables in one write
//! transaction of ours (the apply guard set before its first write that fires capture triggers,
//! so nothing is captured): rows the snapshot lacks are deleted, rows that differ are updated in
//! place, missing rows are inserted. Application
//! connections stay open and valid throughout — nothing copies files under them; they wait on
//! SQLite's lock like for any other writer and then see the restored rows.
//!
//! Invariants:
//! - A row with a local change that has not come back from the stream yet (pending, or published
//!   past the snapshot's position) is left as it is: the snapshot never overwrites a committed
//!   local write, and the change still replicates (the change logs are not touched).
//! - Our own tables (change logs, held events, identity) are never read from the snapshot.
//! - A table the snapshot lacks, or lacks a key column of, is left alone and reported.
//! - Tables and columns of the snapshot that this node does not have (it is behind on a
//!   migration) are kept aside in the same transaction ([`super::deferred`]) and merged once the
//!   local schema has them.
//! - The snapshot may still be downloading: it is then attached through [`super::arriving`],
//!   whose reads wait for the bytes, so that the merge runs beside the download.
//! - Nothing of the snapshot commits before `verified` (the checks of the complete file, run
//!   beside the merge so that a restore takes the longer of the two, not both) has passed; a
//!   merge that fails while those checks fail (or the download failed) reports them (the bad
//!   file is the likely cause, not this database), as [`Error::NotVerified`]. Our write lock is
//!   held for the longer of the merge and the rest of the download plus the checks (the merge,
//!   in practice: the catch-up starts it only once the download should end first).
//! - The snapshot is always detached again, even after a failed restore (a file left attached
//!   would fail every later one); one left attached anyway is detached before the next.
//! - A UNIQUE conflict while merging (rows that swapped values) falls back to replacing the
//!   table's rows that are not kept; a conflict with a kept row skips the snapshot's row. Any
//!   other constraint failure (NOT NULL, CHECK: the schemas differ) fails the whole restore,
//!   which changes nothing and is retried.

use std::path::Path;

use rusqlite::Connection;

use super::apply::{Bind, commit_guarded, set_guard};
use super::arriving::SnapshotFile;
use super::changelog::ChangeLog;
use super::{Error, Table, on_table, quote};

/// Schema name the snapshot is attached as.
const SNAP: &str = "hl_snapshot";

/// Local changes that look in flight but may already be in the snapshot, so their rows must not
/// be kept (the snapshot's value wins; the change still goes out and, if it is new, wins later).
#[derive(Debug, Default, Clone)]
pub struct NotKept {
    /// Per table: pending changes with a change-log id up to this were captured before this
    /// process started while the stream no longer held the range where they could have landed:
    /// whether they were published is unknown.
    pub unknown_up_to: Vec<i64>,
    /// (table, change-log id, shard, sequence) of changes acknowledged (or found in the streams)
    /// but not yet marked in the database.
    pub landed: Vec<(usize, i64, u64, u64)>,
}

/// What a restore did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Restored {
    pub deleted: u64,
    pub updated: u64,
    pub inserted: u64,
    /// Rows left alone because a local change of them is still in flight.
    pub kept: u64,
    /// Tables not restored, with why.
    pub skipped: Vec<(String, String)>,
    /// Tables and columns of the snapshot this node's schema lacks, kept for when it has them
    /// (see [`super::deferred`]).
    pub deferred: Vec<String>,
}

/// Merges the snapshot at `snapshot` into the database of `conn`. `positions` (per shard, index
/// shard − 1) are the snapshot's: changes of ours published past them are kept. `check` runs
/// first inside the write transaction (the schema is still the one capture was installed for);
/// `verified` waits for the snapshot's checks, before the commit.
///
/// # Errors
/// SQLite errors, or [`Error::NotVerified`]; nothing is changed then.
pub fn restore(
    conn: &mut Connection,
    log: &ChangeLog,
    snapshot: &SnapshotFile,
    positions: &[u64],
    not_kept: &NotKept,
    check: &dyn Fn(&Connection) -> Result<(), Error>,
    verified: &dyn Fn() -> Result<(), String>,
) -> Result<Restored, Error> {
    let (uri, _registered) = snapshot.uri().map_err(Error::Attach)?;
    // A restore whose DETACH failed left its file attached: every later ATTACH would fail.
    let stale: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_database_list WHERE name = 'hl_snapshot')",
        [],
        |r| r.get(0),
    )?;
    if stale {
        conn.execute_batch("DETACH DATABASE hl_snapshot")
            .map_err(|e| Error::Attach(format!("a previous snapshot is still attached: {e}")))?;
    }
    // Whatever failed, a file that fails its checks is the reason to give (and not one that
    // stops the node: SQLite calls a corrupt attached file corrupt too).
    // Only an error that would stop the node waits for the checks (and so for the rest of the
    // download); any other is retried anyway.
    let or_not_verified = |e: Error| {
        if e.is_fatal() {
            verified().err().map_or(e, Error::NotVerified)
        } else {
            e
        }
    };
    conn.execute("ATTACH DATABASE ?1 AS hl_snapshot", [&uri])
        .map_err(|e| or_not_verified(e.into()))?;
    let result = merge_all(conn, log, positions, not_kept, check, verified);
    let detached = conn.execute_batch("DETACH DATABASE hl_snapshot");
    if let (Err(e), Err(_)) = (&detached, &result) {
        tracing::warn!(error = %e, "Cannot detach the snapshot after a failed restore; retried before the next one");
    }
    let restored = result.map_err(or_not_verified)?;
    detached?;
    Ok(restored)
}

fn merge_all(
    conn: &mut Connection,
    log: &ChangeLog,
    positions: &[u64],
    not_kept: &NotKept,
    check: &dyn Fn(&Connection) -> Result<(), Error>,
    verified: &dyn Fn() -> Result<(), String>,
) -> Result<Restored, Error> {
    let mut out = Restored::default();
    let writeback = conn
        .path()
        .filter(|p| !p.is_empty())
        .map(|p| WalWriteback::start(std::path::Path::new(p)));
    // The guard row is set only before the first write that fires capture triggers (see
    // `merge_table`), not here: a page written this early and again at the commit (where the
    // guard row goes) makes SQLite re-checksum every WAL frame written in between — two seconds
    // of commit per restored GB — while a copy into an empty table drops the triggers and needs
    // no guard.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // Capture must be installed for the schema merged into: a table the application created a
    // moment ago is not watched yet, and its rows in the snapshot would be neither merged nor
    // kept aside.
    check(&tx)?;
    let aliases = super::ddl::Aliases::load(&tx)?;
    let landed: std::collections::HashMap<(usize, i64), (u64, u64)> = not_kept
        .landed
        .iter()
        .map(|&(t, id, shard, seq)| ((t, id), (shard, seq)))
        .collect();
    // A snapshot of a node that has not run this node's renames yet has the old names. The
    // current name wins where the snapshot has it (an old name may since name another table or
    // column there).
    for (i, table) in log.tables().iter().enumerate() {
        let mut snap_table = table.name.clone();
        let mut snap_cols = snapshot_columns(&tx, &table.name)?;
        if snap_cols.is_empty() {
            // An old name now used by another local table means that table's rows.
            for old in aliases
                .old_tables(&table.name)
                .into_iter()
                .filter(|o| !log.tables().iter().any(|t| t.name.eq_ignore_ascii_case(o)))
            {
                let cols = snapshot_columns(&tx, &old)?;
                if !cols.is_empty() {
                    (snap_table, snap_cols) = (old, cols);
                    break;
                }
            }
        }
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
        // The snapshot's name of a local column.
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
        let unknown_up_to = not_kept.unknown_up_to.get(i).copied().unwrap_or(0);
        let (flying, _) = log.in_flight(&tx, i, 0, Some(positions), unknown_up_to)?;
        // Where the change landed, when that is known and not marked yet: inside the snapshot
        // it is not in flight; past it, it is, whatever else is said of it.
        let landed_inside = |id: i64| {
            landed.get(&(i, id)).map(|&(shard, seq)| {
                positions
                    .get((shard.max(1) - 1) as usize)
                    .is_some_and(|&p| seq <= p)
            })
        };
        // Changes of unknown status may be inside the snapshot already: its rows win.
        let flying: Vec<(i64, Vec<crate::wire::Value>)> = flying
            .into_iter()
            .filter(|&(id, _, unknown)| landed_inside(id).map_or(!unknown, |inside| !inside))
            .map(|(id, key, _)| (id, key))
            .collect();
        keep_table(&tx, &keys, &flying)?;
        out.kept += flying.len() as u64;
        let started = std::time::Instant::now();
        merge_table(
            &tx,
            table,
            &snap_table,
            &snap_cols,
            &keys,
            &snap_of,
            &mut out,
        )
        .map_err(on_table(&table.name))?;
        tracing::debug!(table = %table.name, elapsed_ms = started.elapsed().as_millis() as u64, "table restored");
        tx.execute_batch("DROP TABLE temp.hl_keep")?;
    }
    // What this node's schema cannot hold yet (it is behind on a migration) waits in our
    // tables: the positions move past the changes that made those rows.
    let aliases = super::ddl::Aliases::load(&tx)?;
    out.deferred = super::deferred::defer(&tx, SNAP, log.tables(), &aliases)?
        .iter()
        .map(ToString::to_string)
        .collect();
    let started = std::time::Instant::now();
    // Rolled back (the transaction dropped) unless the file passed its checks.
    verified().map_err(Error::NotVerified)?;
    let verify_wait_ms = started.elapsed().as_millis() as u64;
    // The commit syncs the WAL (the restore is durable before the positions move); copying the
    // restored pages from the WAL into the database file — writing them a second time, seconds
    // per GB — is left to a thread of its own (see `checkpoint_behind`), so replication resumes
    // meanwhile.
    let every: i64 = tx.query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))?;
    tx.execute_batch("PRAGMA wal_autocheckpoint = 0")?;
    drop(writeback);
    let committed = commit_guarded(tx);
    conn.execute_batch(&format!("PRAGMA wal_autocheckpoint = {every}"))?;
    committed?;
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        verify_wait_ms,
        "restore committed"
    );
    if every > 0
        && let Some(path) = conn.path().filter(|p| !p.is_empty())
    {
        checkpoint_behind(std::path::PathBuf::from(path));
    }
    Ok(out)
}

/// Has the kernel start writing the WAL to disk every [`WRITEBACK_EVERY`] while a restore fills
/// it, so that the commit's fsync finds it mostly written: the disk works while SQLite copies
/// rows, instead of after (the kernel would otherwise hold gigabytes dirty until that fsync —
/// about 2 s of commit per GB, down to almost nothing). Dropping it stops the thread. Best
/// effort: without it the commit only takes longer.
struct WalWriteback {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const WRITEBACK_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

impl WalWriteback {
    fn start(db_path: &Path) -> WalWriteback {
        let mut wal = db_path.as_os_str().to_owned();
        wal.push("-wal");
        let wal = std::path::PathBuf::from(wal);
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("hl-wal-writeback".into())
            .spawn(move || {
                use std::os::fd::AsRawFd as _;
                // SQLite takes no POSIX lock on the WAL file itself, so this descriptor may be
                // closed (unlike one of the database or `-shm` file).
                let mut file = None;
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(WRITEBACK_EVERY)
                {
                    if file.is_none() {
                        file = std::fs::File::open(&wal).ok();
                    }
                    if let Some(f) = &file {
                        // SAFETY: a valid descriptor; the call only starts writeback of the
                        // file's dirty pages and never touches memory of ours.
                        unsafe {
                            libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
                        };
                    }
                }
            })
            .ok();
        WalWriteback {
            stop: Some(stop),
            thread,
        }
    }
}

impl Drop for WalWriteback {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Checkpoints the WAL into the database file from a connection and thread of our own, right
/// after a restore committed. While it runs it holds SQLite's checkpoint lock, so the automatic
/// checkpoints of other commits (the application's among them) skip instead of doing this work
/// in their own commit. A failure only leaves the work to SQLite's next automatic checkpoint.
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

/// Copies a table the snapshot has with exactly the local columns into the empty local table
/// with SQLite's transfer optimization (`INSERT INTO t SELECT * FROM s.t` copies records
/// without decoding them, about three times faster than row by row), which only runs when the
/// table has no triggers: our capture triggers are dropped and recreated around it, inside our
/// transaction, so no application write ever sees the table without them. Returns false (nothing
/// done) when the case does not fit: other columns or order, other triggers, or a table keyed
/// by bare rowid (the transfer may renumber those rowids).
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
    out.inserted += conn.execute(
        &format!("INSERT INTO main.{name} SELECT * FROM {SNAP}.{name}"),
        [],
    )? as u64;
    for (_, sql) in &triggers {
        conn.execute_batch(sql)?;
    }
    Ok(true)
}

/// Column names of a table in the snapshot (empty when it has no such table).
fn snapshot_columns(conn: &Connection, table: &str) -> Result<Vec<String>, Error> {
    let mut stmt = conn.prepare(&format!("SELECT name FROM pragma_table_info(?1, '{SNAP}')"))?;
    let names = stmt
        .query_map([table], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(names)
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

/// `snap_of`: the snapshot's name of a local column (None: the snapshot lacks it). The caller
/// checked that it has every key column.
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
    let sname = quote(snap_table);
    // A local column as the snapshot calls it.
    let sq = |c: &str| quote(&snap_of(c).unwrap_or_else(|| c.to_string()));
    // `m`: the live table, `s`: the snapshot's.
    let key_is = |m: &str, s: &str| {
        keys.iter()
            .map(|k| format!("{m}.{} IS {s}.{}", quote(k), sq(k)))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let kept = |x: &str, snapshot_side: bool| {
        let cond = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let col = if snapshot_side { sq(k) } else { quote(k) };
                format!("hk.k{i} IS {x}.{col}")
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
    let delete_missing = format!(
        "DELETE FROM main.{name} AS m WHERE NOT EXISTS (SELECT 1 FROM {SNAP}.{sname} AS s WHERE {}) AND NOT {}",
        key_is("m", "s"),
        kept("m", false)
    );
    let update = (!values.is_empty()).then(|| {
        format!(
            "UPDATE main.{name} AS m SET {} FROM {SNAP}.{sname} AS s WHERE {} AND ({}) AND NOT {}",
            values
                .iter()
                .map(|c| format!("{} = s.{}", quote(c), sq(c)))
                .collect::<Vec<_>>()
                .join(", "),
            key_is("m", "s"),
            values
                .iter()
                .map(|c| format!(
                    "m.{q} IS NOT s.{r} COLLATE BINARY OR typeof(m.{q}) IS NOT typeof(s.{r})",
                    q = quote(c),
                    r = sq(c)
                ))
                .collect::<Vec<_>>()
                .join(" OR "),
            kept("m", false)
        )
    });
    // `upsert` is an upsert clause for the UNIQUE fallback below: `ON CONFLICT DO NOTHING` skips
    // only rows that clash with a kept row, where `INSERT OR IGNORE` would also drop rows failing
    // NOT NULL or CHECK — silently, while the positions move past them.
    let insert = |upsert: &str| {
        format!(
            "INSERT INTO main.{name} ({}) SELECT {} FROM {SNAP}.{sname} AS s \
             WHERE NOT EXISTS (SELECT 1 FROM main.{name} AS m WHERE {}) AND NOT {} {upsert}",
            insert_cols.join(", "),
            select_cols.join(", "),
            key_is("m", "s"),
            kept("s", true)
        )
    };
    // An empty table with nothing kept (a new node): a plain copy in the snapshot's order,
    // without probing the live table for every row. Checked inside our write transaction, so
    // nobody adds a row in between. (A kept key in an empty table is a local delete in flight:
    // the snapshot's row must not come back, so that case takes the general path.)
    let empty = conn
        .prepare_cached(&format!(
            "SELECT NOT EXISTS (SELECT 1 FROM main.{name}) AND NOT EXISTS (SELECT 1 FROM temp.hl_keep)"
        ))?
        .query_row([], |r| r.get::<_, bool>(0))?;
    if empty && copy_whole(conn, table, snap_table, snap_cols, out)? {
        return Ok(());
    }
    // Every write below fires the capture triggers.
    set_guard(conn)?;
    if empty {
        out.inserted += conn.execute(
            &format!(
                "INSERT INTO main.{name} ({}) SELECT {} FROM {SNAP}.{sname} AS s",
                insert_cols.join(", "),
                select_cols.join(", ")
            ),
            [],
        )? as u64;
        return Ok(());
    }
    out.deleted += conn.execute(&delete_missing, [])? as u64;
    let merged = (|| -> rusqlite::Result<(u64, u64)> {
        let updated = match &update {
            Some(sql) => conn.execute(sql, [])? as u64,
            None => 0,
        };
        let inserted = conn.execute(&insert(""), [])? as u64;
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
            // Rows swapped UNIQUE values: replace every row that is not kept.
            tracing::debug!(table = %table.name, "restore merge hit a UNIQUE conflict; replacing the table's rows");
            out.deleted += conn.execute(
                &format!(
                    "DELETE FROM main.{name} AS m WHERE NOT {}",
                    kept("m", false)
                ),
                [],
            )? as u64;
            out.inserted += conn.execute(&insert("ON CONFLICT DO NOTHING"), [])? as u64;
        }
        Err(e) => return Err(e),
    }
    Ok(())
}
