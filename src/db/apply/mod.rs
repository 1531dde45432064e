//! Applying replicated events to the local database (upstream-behaviour §4.12, design §3.2, §3.10).
//!
//! An event is an upsert *by primary key* of the columns it carries (never Go's whole-row `INSERT
//! OR REPLACE`), touching only its row; else it is held (`held.rs`), waits for the schema
//! (`waiting.rs`), is superseded (`in_flight.rs`) or quarantined (dead letter).
//!
//! The [`Applier`] (connection plus `State`, which the submodules work on) evaluates a batch first
//! in a *read* transaction: superseded events and images equal to the row (normally all our own)
//! need no write, and if none does no write transaction opens (an application's deferred
//! read-then-write transaction fails with SQLITE_BUSY if anyone commits in between). From the first
//! event needing a write, the batch runs in one `BEGIN IMMEDIATE` transaction, a savepoint per
//! event: one that can never apply (unknown table or column, a non-UNIQUE constraint) is rolled
//! back to it and quarantined; other failures (busy, I/O, disk full) roll the batch back for the
//! caller to retry. Invariants: `synchronous = FULL` makes a batch durable before the caller
//! records its sequence in the seq map (a power loss cannot leave that ahead of the data); after a
//! rollback, held and waiting events are re-read, so memory never shows one the database lacks.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use rusqlite::Connection;

use super::changelog::ChangeLog;
use super::{Error, Table};
use crate::wire::ChangeEvent;

mod conflict;
mod held;
mod in_flight;
mod key;
mod row;
mod step;
mod waiting;

use held::HeldEvent;
pub use key::Key;
use row::TableSql;
use step::{EventError, Mode, Step, quarantine};
use waiting::WaitingEvent;

/// On this connection, triggers skip their inserts and updates of replicated tables and ours:
/// nothing written here is captured, and application triggers don't redo what the origin captured
/// as events of its own (an audit row twice, `version + 1` twice). Their other writes run, so
/// derived state (FTS index, virtual or unwatched table) follows. The authorizer cannot skip a
/// DELETE: trigger deletes run (ours delete only their statement's rows; the app's, the origin's).
fn mute_trigger_writes(conn: &Connection, tables: &[Table]) {
    use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
    let replicated: std::collections::HashSet<String> =
        tables.iter().map(|t| t.name.to_lowercase()).collect();
    conn.authorizer(Some(move |ctx: AuthContext<'_>| {
        let table = match ctx.action {
            AuthAction::Insert { table_name } => table_name,
            AuthAction::Update { table_name, .. } => table_name,
            _ => return Authorization::Allow,
        };
        let main = ctx.database_name.is_none_or(|d| d == "main");
        let ours = table
            .get(..super::PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(super::PREFIX));
        if ctx.accessor.is_some() && main && (ours || replicated.contains(&table.to_lowercase())) {
            Authorization::Ignore
        } else {
            Authorization::Allow
        }
    }));
}

/// One event to apply, with where it came from.
#[derive(Debug)]
pub struct Incoming<'a> {
    /// Stream name (for the dead-letter and held records).
    pub stream: &'a str,
    pub seq: u64,
    pub event: Result<ChangeEvent, crate::wire::DecodeError>,
    /// Whether this database published it (its message id carries our identity).
    pub own: bool,
    /// The node that sent it, when decoded.
    pub from_node: Option<u64>,
    /// The raw message body, kept for quarantine.
    pub raw: &'a [u8],
}

/// What happened to one event of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The row was inserted, updated or deleted.
    Applied,
    /// The row already was what the event says.
    Unchanged,
    /// A newer local change of the row has not come back yet; the event would roll it back.
    Superseded,
    /// A UNIQUE conflict with another row: the event waits (reason attached).
    Held(String),
    /// Recorded in the dead-letter table with this reason.
    Quarantined(String),
    /// This node's schema is behind the event's: it waits until the schema catches up.
    Waiting(String),
    /// For a table this node dropped: nothing to apply it to.
    Discarded(String),
    /// Another node's change lost to a local change of its row still in flight (`kind`: its op).
    Overruled { table: String, kind: String },
}

/// The local schema's hashes an event's `sh` is checked against (Go keeps one previous hash).
#[derive(Debug, Clone, Default)]
pub struct SchemaHashes {
    pub current: String,
    pub previous: String,
}

impl SchemaHashes {
    fn matches(&self, sh: &str) -> bool {
        !sh.is_empty() && (sh == self.current || (!self.previous.is_empty() && sh == self.previous))
    }
}

/// Everything but the connection, so a transaction on it and this can be borrowed together.
struct State {
    tables: Vec<Table>,
    pks: Vec<Vec<usize>>,
    by_name: HashMap<String, usize>,
    /// Lower-cased name → index, for SQLite's case-insensitive table names.
    folded: HashMap<String, usize>,
    log: Arc<ChangeLog>,
    /// Whether own events come back (this node publishes); in-flight tracking needs it.
    track: bool,
    /// Per table: key → newest change-log id of a captured change not yet come back.
    in_flight: Vec<HashMap<Key, i64>>,
    /// Per table: key → newest change-log id of a pending change of unknown publish status (from
    /// before a restart, its possible landing no longer in the stream). It supersedes only our
    /// older events (had it landed, it would follow them: a node sends a row's changes in order).
    unknown: Vec<HashMap<Key, i64>>,
    /// Per table: the highest change-log id already read into `in_flight`.
    cursors: Vec<i64>,
    /// Per shard (index shard − 1): last applied stream sequence.
    applied: Vec<u64>,
    /// Per table: pending changes up to this log id have an unknown publish status (see `unknown`).
    unknown_up_to: Vec<i64>,
    /// Per table: changes up to this log id predate a column change (DDL): they may lack columns
    /// others' older events carry, so they supersede only ours.
    stale_up_to: Vec<i64>,
    held: BTreeMap<i64, HeldEvent>,
    held_keys: HashMap<(usize, Key), i64>,
    /// Events waiting for the schema, by held-table id (arrival order).
    waiting: BTreeMap<i64, WaitingEvent>,
    /// How many waiting events each place (row, or table without a known row) has.
    waiting_places: HashMap<waiting::Place, usize>,
    /// Rows whose lost image was logged already (one warning per row).
    overruled: std::collections::HashSet<(usize, Key)>,
    waiting_since: Option<std::time::Instant>,
    hashes: SchemaHashes,
    aliases: super::ddl::Aliases,
    sql: Vec<TableSql>,
}

/// Applies events; owns its connection.
pub struct Applier {
    conn: Connection,
    state: State,
    /// `PRAGMA data_version` at the last retry of held events (retry only after a change).
    held_checked_version: Option<i64>,
    /// The schema version capture was last confirmed for; another waits ([`Error::SchemaChanged`]).
    confirmed: Option<Arc<std::sync::atomic::AtomicI64>>,
    /// Most events kept waiting for the schema ([`MAX_WAITING`]; tests lower it).
    waiting_cap: usize,
}

/// Most events kept waiting for this node's schema; past it applying pauses (anyone who can
/// publish to the subjects could otherwise grow the held-events table without bound).
pub const MAX_WAITING: usize = 100_000;

impl Applier {
    /// Wraps an open connection ([`crate::db::open`]); `applied`: per shard, the last applied
    /// sequence (from the seq map); `track`: whether this node's own events come back (publishing).
    pub fn new(
        conn: Connection,
        log: Arc<ChangeLog>,
        applied: Vec<u64>,
        track: bool,
    ) -> Result<Applier, Error> {
        conn.execute_batch("PRAGMA synchronous = FULL")?;
        let tables = log.tables().to_vec();
        mute_trigger_writes(&conn, &tables);
        let by_name = tables
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let folded = tables
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.to_lowercase(), i))
            .collect();
        let n = tables.len();
        let mut applier = Applier {
            conn,
            state: State {
                pks: tables.iter().map(Table::pk_indexes).collect(),
                tables,
                by_name,
                folded,
                log,
                track,
                in_flight: vec![HashMap::new(); n],
                unknown: vec![HashMap::new(); n],
                cursors: vec![0; n],
                applied,
                unknown_up_to: Vec::new(),
                stale_up_to: Vec::new(),
                held: BTreeMap::new(),
                held_keys: HashMap::new(),
                waiting: BTreeMap::new(),
                waiting_places: HashMap::new(),
                overruled: Default::default(),
                waiting_since: None,
                hashes: SchemaHashes::default(),
                aliases: super::ddl::Aliases::default(),
                sql: (0..n).map(|_| TableSql::default()).collect(),
            },
            held_checked_version: None,
            confirmed: None,
            waiting_cap: MAX_WAITING,
        };
        applier.state.aliases = super::ddl::Aliases::load(&applier.conn)?;
        applier.rebuild_in_flight()?;
        applier.load_held()?;
        Ok(applier)
    }

    #[cfg(test)]
    pub(crate) fn set_waiting_cap(&mut self, cap: usize) {
        self.waiting_cap = cap;
    }

    pub fn set_schema_hashes(&mut self, hashes: SchemaHashes) {
        self.state.hashes = hashes;
    }

    /// The schema version capture is confirmed for, kept current by whoever watches the schema.
    pub fn set_confirmed_schema(&mut self, confirmed: Arc<std::sync::atomic::AtomicI64>) {
        self.confirmed = Some(confirmed);
    }

    /// [`Error::SchemaChanged`] unless `conn` (in a transaction) sees the confirmed schema version.
    fn check_schema(
        confirmed: Option<&Arc<std::sync::atomic::AtomicI64>>,
        conn: &Connection,
    ) -> Result<(), Error> {
        let Some(confirmed) = confirmed else {
            return Ok(());
        };
        let version: i64 = conn.query_row("PRAGMA schema_version", [], |r| r.get(0))?;
        if version == confirmed.load(std::sync::atomic::Ordering::SeqCst) {
            Ok(())
        } else {
            Err(Error::SchemaChanged)
        }
    }

    /// Merges the snapshot at `file` ([`super::restore`]), taking its per-shard `positions`.
    pub fn restore_snapshot(
        &mut self,
        file: &std::path::Path,
        streams: &[String],
        positions: &[u64],
        not_kept: &super::restore::NotKept,
    ) -> Result<super::restore::Restored, Error> {
        // Changes of ours published past the snapshot's positions are in flight again.
        let confirmed = self.confirmed.clone();
        let restored = super::restore::restore(
            &mut self.conn,
            &self.state.log,
            file,
            positions,
            not_kept,
            &|c| {
                Self::check_schema(confirmed.as_ref(), c)?;
                for (stream, &seq) in streams.iter().zip(positions) {
                    super::record_applied(c, stream, seq)?;
                }
                Ok(())
            },
        )?;
        for (i, &p) in positions.iter().enumerate() {
            self.set_applied(i + 1, p);
        }
        self.rebuild_in_flight()?;
        // Our acknowledged changes inside the snapshot came back, whatever the database says yet.
        self.forget_landed(&not_kept.landed, |shard, seq| {
            crate::db::restore::reaches(positions, shard, seq)
        });
        // Held and waiting events the snapshot includes are in its rows: retried, they undo it.
        let held = held::included(&self.state.held, streams, positions);
        let waiting = held::included(&self.state.waiting, streams, positions);
        if !held.is_empty() || !waiting.is_empty() {
            let tx = self.conn.unchecked_transaction()?;
            for id in held {
                self.state.drop_held(&tx, id)?;
            }
            for id in waiting {
                self.state.drop_waiting(&tx, id)?;
            }
            tx.commit()?;
        }
        Ok(restored)
    }

    /// Applies a batch, one outcome per event; on an error (busy, I/O…) it was rolled back: retry.
    pub fn apply_batch(&mut self, batch: &[Incoming<'_>]) -> Result<Vec<Outcome>, Error> {
        let result = self.apply_batch_in(batch);
        self.resync_on_error(result)
    }

    /// Re-reads the held and waiting events after a rolled-back transaction (module invariant).
    fn resync_on_error<T>(&mut self, result: Result<T, Error>) -> Result<T, Error> {
        if result.is_err() {
            let s = &mut self.state;
            s.held.clear();
            s.held_keys.clear();
            s.waiting.clear();
            s.waiting_places.clear();
            let since = s.waiting_since.take();
            if let Err(e) = self.load_held() {
                tracing::warn!(error = %crate::error_chain(&e), "Cannot re-read held events");
            }
            if !self.state.waiting.is_empty() {
                self.state.waiting_since = since.or(self.state.waiting_since);
            }
        }
        result
    }

    fn apply_batch_in(&mut self, batch: &[Incoming<'_>]) -> Result<Vec<Outcome>, Error> {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut first_write = batch.len();
        {
            let tx = self.conn.unchecked_transaction()?;
            Self::check_schema(self.confirmed.as_ref(), &tx)?;
            self.state.refresh(&tx)?;
            for (i, incoming) in batch.iter().enumerate() {
                match self.state.step(&tx, incoming, Mode::Read) {
                    Ok(Step::Done(o)) => outcomes.push(o),
                    Ok(Step::NeedsWrite) | Err(EventError::Poison(_) | EventError::Behind(_)) => {
                        first_write = i;
                        break;
                    }
                    Err(EventError::Retry(e)) => return Err(e.into()),
                }
            }
            tx.commit()?;
        }
        if first_write == batch.len() {
            return Ok(outcomes);
        }
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        Self::check_schema(self.confirmed.as_ref(), &tx)?;
        self.state.refresh(&tx)?;
        let mut wrote = false;
        for incoming in &batch[first_write..] {
            match self.state.step_or_undo(&tx, incoming, Mode::Write)? {
                Ok(Step::Done(o)) => {
                    wrote |= o == Outcome::Applied;
                    outcomes.push(o);
                }
                Ok(Step::NeedsWrite) => unreachable!("write mode always finishes"),
                Err(EventError::Retry(e)) => return Err(e.into()),
                Err(EventError::Behind(_)) if self.state.waiting.len() >= self.waiting_cap => {
                    return Err(Error::WaitingFull(self.state.waiting.len()));
                }
                Err(EventError::Behind(behind)) => {
                    let Ok(event) = &incoming.event else {
                        unreachable!("only decoded events can wait")
                    };
                    let why = behind.why.clone();
                    self.state.wait(&tx, incoming, event, behind)?;
                    outcomes.push(Outcome::Waiting(why));
                }
                Err(EventError::Poison(why)) => {
                    quarantine(&tx, incoming.stream, incoming.seq, &why, incoming.raw)?;
                    outcomes.push(Outcome::Quarantined(why));
                }
            }
        }
        if wrote && !self.state.held.is_empty() {
            self.state.retry_held(&tx)?;
        }
        // Where the batch ends, with its rows; read-only events before it are covered (seqs grow).
        let mut ends: HashMap<&str, u64> = HashMap::new();
        for incoming in batch {
            let end = ends.entry(incoming.stream).or_default();
            *end = (*end).max(incoming.seq);
        }
        for (stream, seq) in ends {
            super::record_applied(&tx, stream, seq)?;
        }
        tx.commit()?;
        Ok(outcomes)
    }
}

#[cfg(test)]
mod tests;
