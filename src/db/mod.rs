//! Everything touching the SQLite file: connection policy, table discovery, capture triggers and
//! change logs, reading pending and applying remote changes; SQLite and [`crate::wire`], not NATS.
//!
//! Invariants:
//! - Every connection uses WAL, `busy_timeout = 5000`, `synchronous = NORMAL`, and
//!   `foreign_keys = OFF` (rusqlite's bundled SQLite turns them on; REPLACE must not cascade).
//! - SQL identifiers are [`quote`]d; wire names are used only after matching the local schema.
//! - Loop prevention: the applier's connection mutes trigger writes to our tables ([`apply`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

mod aliases;
pub mod apply;
pub mod cdc;
pub mod changelog;
pub mod ddl;
pub mod restore;
pub mod schema;
mod sql;
mod triggers;

/// Prefix of every object we create in the user's database (Go `HarmonyLitePrefix`).
pub const PREFIX: &str = "__harmonylite__";
/// The global change log (three underscores: prefix + `_change_log_global`).
pub const GLOBAL_LOG: &str = "__harmonylite___change_log_global";
pub const SCHEMA_VERSION_TABLE: &str = "__harmonylite__schema_version";
/// The loop-prevention guard table of earlier versions (design §3.4), dropped at install.
pub const GUARD_TABLE: &str = "__harmonylite__apply_guard";
/// Events that could not be applied (design §3.2).
pub const DEAD_LETTER_TABLE: &str = "__harmonylite__dead_letter";
/// Other nodes' row images that lost to a concurrent local change (see `apply/conflict.rs`).
pub const CONFLICTS_TABLE: &str = "__harmonylite__conflicts";
/// This database's random identity (tells its own events from a clone's with the same node id).
pub const IDENTITY_TABLE: &str = "__harmonylite__node_identity";
/// Events waiting for a UNIQUE conflict with another row to go away (see [`apply`]).
pub const HELD_TABLE: &str = "__harmonylite__held_events";
/// Renames and drops of tables and columns this node followed (see [`ddl`]).
pub const ALIAS_TABLE: &str = "__harmonylite__schema_aliases";
/// Per shard, the stream sequence of the last change marked published.
pub const PUBLISHED_TABLE: &str = "__harmonylite__published";
/// Per stream: the last sequence applied here, committed with the rows (design §14).
pub const APPLIED_TABLE: &str = "__harmonylite__applied";
/// How long a statement waits for a lock before failing with SQLITE_BUSY (Go: 5000 ms).
pub const BUSY_TIMEOUT: Duration = Duration::from_millis(5000);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "database file {0} does not exist; HarmonyLite is meant to replicate an existing database"
    )]
    Missing(PathBuf),
    #[error("cannot open database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("sqlite error{}", table.as_ref().map(|t| format!(" on table {t:?}")).unwrap_or_default())]
    Sqlite {
        table: Option<String>,
        #[source]
        source: rusqlite::Error,
    },
    #[error("table {0:?} cannot be watched: {1}")]
    Unwatchable(String, String),
    #[error(
        "another harmonylite process is using {0} (it holds {1}); stop it first — two daemons on \
         one database, or -cleanup under a running one, would lose changes"
    )]
    Locked(PathBuf, PathBuf),
    #[error("cannot create the lock file {0}")]
    LockFile(PathBuf, #[source] std::io::Error),
    /// The schema changed and capture is not yet reinstalled (done within a second): retry.
    #[error("the database schema changed; waiting for capture to be reinstalled")]
    SchemaChanged,
    /// A snapshot has tables or columns this node lacks: it waits for the migration ([`restore`]).
    #[error("waiting for this node's migration to restore: snapshot has {}", .0.join(", "))]
    Behind(Vec<String>),
    /// Nothing is lost: the rest stay in the stream until a migration here lets them apply.
    #[error(
        "{0} events wait for this node's schema, the most kept: applying pauses until this node \
         runs the migration they need"
    )]
    WaitingFull(usize),
}

impl Error {
    /// Whether the database is unusable, so the node must stop rather than retry: disk full,
    /// read-only (or the file moved away), corrupt, I/O failure, cannot open, permission denied.
    pub fn is_fatal(&self) -> bool {
        use rusqlite::ErrorCode as C;
        let source = match self {
            Error::Missing(_) | Error::Open { .. } => return true,
            Error::Sqlite { source, .. } => source,
            // Listed, not `_`: a new variant must be classified on purpose.
            Error::Unwatchable(..)
            | Error::Locked(..)
            | Error::LockFile(..)
            | Error::SchemaChanged
            | Error::Behind(_)
            | Error::WaitingFull(_) => return false,
        };
        matches!(
            source.sqlite_error_code(),
            Some(
                C::DiskFull
                    | C::ReadOnly
                    | C::DatabaseCorrupt
                    | C::NotADatabase
                    | C::SystemIoFailure
                    | C::CannotOpen
                    | C::PermissionDenied
            )
        )
    }

    /// Whether another connection (a restore, say) held the lock past our timeout: retry quietly.
    pub fn is_busy(&self) -> bool {
        matches!(self, Error::Sqlite { source, .. }
            if matches!(source.sqlite_error_code(), Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)))
    }
}

/// Whether the main database has a table `name` (case-insensitive, as SQLite resolves names).
pub fn has_table(conn: &Connection, name: &str) -> Result<bool, Error> {
    use rusqlite::OptionalExtension;
    Ok(conn
        .query_row(
            "SELECT 1 FROM main.sqlite_schema WHERE type = 'table' AND name = ?1 COLLATE NOCASE",
            [name],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// Whether `sqlite_schema` holds an object (table, index, trigger) named exactly `name`.
pub(crate) fn has_object(conn: &Connection, name: &str) -> Result<bool, Error> {
    Ok(conn.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE name = ?1",
        [name],
        |r| r.get::<_, i64>(0),
    )? == 1)
}

impl From<rusqlite::Error> for Error {
    fn from(source: rusqlite::Error) -> Self {
        Error::Sqlite {
            table: None,
            source,
        }
    }
}

pub(crate) fn on_table(table: &str) -> impl FnOnce(rusqlite::Error) -> Error + '_ {
    move |source| Error::Sqlite {
        table: Some(table.to_owned()),
        source,
    }
}

/// Quotes an identifier for SQL text: `"name"` with embedded quotes doubled.
pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// SQL true when `a` and `b` are identical (keys: the same identity): equal bytes of the same type
/// (design §13), not merely equal by collation (`NOCASE`: 'k1', 'K1') or number (1 and 1.0). The
/// plain `a IS b` comes first so an index with the column's collation still finds candidates.
pub fn same_value(a: &str, b: &str) -> String {
    format!("{a} IS {b} AND {a} IS {b} COLLATE BINARY AND typeof({a}) IS typeof({b})")
}

/// The negation of [`same_value`] (without its index-finding term).
pub fn differs(a: &str, b: &str) -> String {
    format!("({a} IS NOT {b} COLLATE BINARY OR typeof({a}) IS NOT typeof({b}))")
}

/// Records, in the caller's write transaction, that this database applied `stream` through `seq`;
/// it may move back (a recreated stream restarts sequences; in-flight rules make replays safe).
pub(crate) fn record_applied(conn: &Connection, stream: &str, seq: u64) -> rusqlite::Result<()> {
    conn.prepare_cached(&format!(
        "INSERT INTO {} (stream, seq) VALUES (?1, ?2) \
         ON CONFLICT (stream) DO UPDATE SET seq = excluded.seq",
        quote(APPLIED_TABLE)
    ))?
    .execute(rusqlite::params![stream, seq as i64])?;
    Ok(())
}

/// What this database records it has applied, per stream (empty before any apply or capture).
pub fn applied_positions(
    conn: &Connection,
) -> Result<std::collections::BTreeMap<String, u64>, Error> {
    if !has_table(conn, APPLIED_TABLE)? {
        return Ok(Default::default());
    }
    let mut stmt = conn.prepare(&format!("SELECT stream, seq FROM {}", quote(APPLIED_TABLE)))?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Quotes a string literal: `'text'` with embedded quotes doubled.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

pub fn change_log_name(table: &str) -> String {
    format!("{PREFIX}{table}_change_log")
}

/// An exclusive advisory lock beside the database, held for the life of the daemon (or `-cleanup`)
/// so another daemon, or a cleanup under a running one, refuses to start (freed at any exit).
#[derive(Debug)]
pub struct DbLock {
    _file: nix::fcntl::Flock<std::fs::File>,
}

/// Tells whether another process has a read transaction open (housekeeping commits wait for none:
/// [`changelog::ChangeLog::housekeep`]), from the WAL read-mark locks in `<db>-shm` (shared `fcntl`
/// locks, one per reader slot). The descriptor is never closed (closing drops every POSIX lock the
/// process holds on the file, SQLite's too): [`ReaderProbe::open`] shares one per `-shm` file.
pub struct ReaderProbe {
    shm: std::mem::ManuallyDrop<std::fs::File>,
}

/// First WAL read-mark lock byte in the `-shm` file (`UNIX_SHM_BASE + WAL_READ_LOCK(0)`).
const SHM_READ_LOCK_FIRST: i64 = 120 + 3;
/// Number of read-mark lock bytes (`WAL_NREADER`).
const SHM_READ_LOCKS: i64 = 5;

impl ReaderProbe {
    /// The shared probe on `<db>-shm` (new with a new file); `None` without such a file (not WAL).
    pub fn open(db_path: &Path) -> Option<std::sync::Arc<ReaderProbe>> {
        use std::os::unix::fs::MetadataExt;
        static OPEN: std::sync::Mutex<Vec<(PathBuf, std::sync::Arc<ReaderProbe>)>> =
            std::sync::Mutex::new(Vec::new());
        let name = beside(db_path, "-shm");
        let now = std::fs::metadata(&name).ok()?;
        let same = |p: &ReaderProbe| {
            p.shm
                .metadata()
                .is_ok_and(|m| (m.dev(), m.ino()) == (now.dev(), now.ino()))
        };
        let mut open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, probe)) = open.iter().find(|(n, p)| *n == name && same(p)) {
            return Some(std::sync::Arc::clone(probe));
        }
        let shm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&name)
            .ok()?;
        let probe = std::sync::Arc::new(ReaderProbe {
            shm: std::mem::ManuallyDrop::new(shm),
        });
        open.retain(|(n, _)| *n != name);
        open.push((name, std::sync::Arc::clone(&probe)));
        Some(probe)
    }

    pub fn others_reading(&self) -> bool {
        let mut lock = libc::flock {
            l_type: libc::F_WRLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: SHM_READ_LOCK_FIRST,
            l_len: SHM_READ_LOCKS,
            l_pid: 0,
        };
        let asked = nix::fcntl::fcntl(&*self.shm, nix::fcntl::FcntlArg::F_GETLK(&mut lock));
        asked.is_ok() && lock.l_type != libc::F_UNLCK as libc::c_short
    }

    /// Polls until no other process has been in a read transaction for `sustained` (a pause in
    /// the application's work, not the gap between two of its transactions); false after `limit`.
    pub fn wait_quiet_for(&self, sustained: Duration, limit: Duration) -> bool {
        let start = std::time::Instant::now();
        let mut quiet_since: Option<std::time::Instant> = None;
        loop {
            if self.others_reading() {
                quiet_since = None;
            } else {
                let since = *quiet_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= sustained {
                    return true;
                }
            }
            if start.elapsed() >= limit {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// `<db>-harmonylite.sent`: how far [`crate::replicate::publish`] handed changes to NATS.
pub fn sent_mark_path(db_path: &Path) -> PathBuf {
    beside(db_path, "-harmonylite.sent")
}

/// The file `<db><suffix>` (the lock file is `<db>-harmonylite.lock`).
fn beside(db_path: &Path, suffix: &str) -> PathBuf {
    let mut name = db_path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Takes the advisory lock without waiting ([`Error::Locked`] if held, else [`Error::LockFile`]).
pub fn lock(db_path: &Path) -> Result<DbLock, Error> {
    let path = beside(db_path, "-harmonylite.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::LockFile(path.clone(), e))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(file) => Ok(DbLock { _file: file }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(Error::Locked(db_path.to_owned(), path)),
        Err((_, errno)) => Err(Error::LockFile(path, errno.into())),
    }
}

/// Opens an existing file with the module header's policy ([`Error::Missing`], [`Error::Open`]).
pub fn open(path: &Path) -> Result<Connection, Error> {
    if !path.exists() {
        return Err(Error::Missing(path.to_owned()));
    }
    let open_err = |source| Error::Open {
        path: path.to_owned(),
        source,
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    // journal_mode answers with a row; it is persistent in the file, as in Go.
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(mode, "database did not switch to WAL journal mode");
    }
    conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = OFF;")
        .map_err(open_err)?;
    // SQLite reads an unknown "double-quoted" name as a string: a column missing from a change log
    // would replicate its name as the value. Make it an error (we never double-quote strings).
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_DQS_DML, false)
        .map_err(open_err)?;
    conn.set_prepared_statement_cache_capacity(256);
    Ok(conn)
}

/// One column of a watched table as the change log sees it (`pragma_table_info`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// The declared type, verbatim (may be empty).
    pub decl_type: String,
    /// Position in the primary key (1-based), 0 when not part of it.
    pub pk: u32,
}

/// A watched table: columns in `cid` order, plus a synthetic `rowid` key if no primary key (as Go).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub name: String,
    pub columns: Vec<Column>,
    /// True when the key is the synthetic `rowid` column (the last entry of `columns`).
    pub rowid_key: bool,
    /// True for `WITHOUT ROWID` tables (rows are addressed by their primary key only).
    pub without_rowid: bool,
    /// The UNIQUE indexes, the primary key's own included (not an INTEGER PRIMARY KEY, which has
    /// none), as (column, collation) lists (indexes on expressions left out): an `INSERT/UPDATE
    /// OR REPLACE` may delete rows through them, the key's too when only bytes differ ('K1'/'k1').
    pub unique: Vec<Vec<(String, String)>>,
}

impl Table {
    /// Indexes of the primary-key columns in `columns`, in key order.
    pub fn pk_indexes(&self) -> Vec<usize> {
        let mut pks: Vec<usize> = (0..self.columns.len())
            .filter(|&i| self.columns[i].pk > 0)
            .collect();
        pks.sort_by_key(|&i| self.columns[i].pk);
        pks
    }

    /// Index of a column by name (exact, then case-insensitive as SQLite resolves names).
    pub fn column_index(&self, name: &str) -> Option<usize> {
        let find = |f: &dyn Fn(&Column) -> bool| self.columns.iter().position(f);
        find(&|c| c.name == name).or_else(|| find(&|c| c.name.eq_ignore_ascii_case(name)))
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    /// A fresh database file in a temp dir with the given schema.
    pub fn temp_db(schema: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("test.db");
        let conn = Connection::open(&path).expect("create db");
        conn.execute_batch(schema).expect("schema");
        (dir, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote("a"), "\"a\"");
        assert_eq!(quote("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    /// One probe (one descriptor, never closed) per `-shm` file, however often it is asked
    /// for (a publisher restarts on every schema change); a recreated file gets a new one.
    #[test]
    fn reader_probes_are_shared_and_follow_a_recreated_shm_file() {
        let (_dir, path) = testutil::temp_db("CREATE TABLE t(a)");
        let conn = open(&path).expect("open");
        conn.execute_batch("INSERT INTO t VALUES (1)")
            .expect("write");
        let first = ReaderProbe::open(&path).expect("probe");
        let again = ReaderProbe::open(&path).expect("probe");
        assert!(std::sync::Arc::ptr_eq(&first, &again));
        assert!(!first.others_reading());
        drop(conn);
        let mut shm = path.as_os_str().to_owned();
        shm.push("-shm");
        let _ = std::fs::remove_file(&shm);
        let conn = open(&path).expect("reopen");
        conn.execute_batch("INSERT INTO t VALUES (2)")
            .expect("write");
        let renewed = ReaderProbe::open(&path).expect("probe");
        assert!(!std::sync::Arc::ptr_eq(&first, &renewed));
    }

    #[test]
    fn open_applies_policy_and_refuses_missing_files() {
        let (_dir, path) = testutil::temp_db("CREATE TABLE t(a)");
        let conn = open(&path).expect("opens");
        let fk: i64 = conn
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .expect("fk");
        assert_eq!(fk, 0);
        let jm: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("jm");
        assert_eq!(jm, "wal");
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .expect("sync");
        assert_eq!(sync, 1);
        assert!(matches!(
            open(&path.with_extension("nope")),
            Err(Error::Missing(_))
        ));
    }
}
