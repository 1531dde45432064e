//! Applying replicated events to the local database (upstream-behaviour §4.12, design §3.2, §3.10).
//!
//! An event is applied as an upsert *by primary key* of the columns it carries, never as Go's
//! whole-row `INSERT OR REPLACE`: an existing row (matched null-safely, `IS`) is updated in place,
//! keeping its rowid and every column the event lacks; a missing row is inserted; a delete removes
//! the matching row. Nothing else is ever touched: a UNIQUE conflict with *another* row is not
//! resolved by deleting that row (REPLACE did, on the origin too) but **held**: the event waits,
//! durably, in `__harmonylite__held_events` until either row changes, then applies; a later event
//! for the same row supersedes it. A conflict that never resolves (two nodes claiming one UNIQUE
//! value on different rows at once) stays held, counted and logged with both rows.
//!
//! An event this node's schema is behind for — a table or column it does not know (yet), from a
//! node whose schema hash (`sh`) is neither this node's current nor previous one — is not
//! quarantined: it **waits for the schema**, durably in the same table (`schema_wait = 1`), and so
//! does every later event of its row (of its table, when the table is unknown), so per-row order
//! holds while the rest of the stream goes on and the seq map advances. They are tried again, in
//! arrival order, whenever capture is reinstalled after DDL ([`Applier::retry_waiting`]). Names
//! this node renamed are followed ([`super::ddl::Aliases`]); events for a table it dropped are
//! discarded.
//!
//! Events that would only roll a row back are skipped (*superseded*): while this node holds a
//! captured change of row R that has not yet come back through the stream, every event for R that
//! arrives is older in stream order (same row, same shard) — another node's, or an older one of
//! our own. The applier tracks those in-flight changes per row key: it reads newly captured
//! change-log rows in each transaction (so the application's latest commit is always seen), drops
//! an entry when our own event for it comes back, and rebuilds the set after a restart from the
//! change log and the seq map.
//!
//! A batch is first evaluated in a *read* transaction: superseded events and events whose image
//! already equals the row (normally every event of our own) need no write, and if nothing in the
//! batch needs one, no write transaction is opened at all — an application's deferred
//! read-then-write transaction fails with SQLITE_BUSY when anyone commits between its read and its
//! write. From the first event that needs a write on, the batch continues in one `BEGIN IMMEDIATE`
//! transaction: insert the guard row (our writes are not captured), apply each event in its own
//! savepoint, delete the guard row, commit. An event that cannot ever apply (unknown table or
//! column, a constraint other than UNIQUE) is rolled back to its savepoint and quarantined in
//! `__harmonylite__dead_letter` in the same transaction. Any other failure (busy, I/O, disk full)
//! rolls the whole batch back and is returned, so the caller retries the same batch: nothing is
//! skipped.
//!
//! Invariants:
//! - Table and column names from the wire are looked up in the local schema and only the local,
//!   quoted spelling reaches SQL text (an injection attempt is just an unknown table).
//! - Values are bound exactly as they arrived (type and bytes); rows are compared the same way.
//! - This connection runs `synchronous = FULL`: a batch is durable before the caller records its
//!   sequence in the seq map, so a power loss cannot leave the seq map ahead of the data.
//! - Limit (documented): several rows sharing one primary key that contains NULL (SQLite allows
//!   it in rowid tables) cannot be told apart on the wire; an update goes to the lowest rowid, a
//!   delete to a row equal to the deleted image.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use rusqlite::{Connection, ErrorCode, TransactionBehavior};

use super::changelog::{ChangeLog, value_at};
use super::sql::{Bind, begin_guarded, commit_guarded};
use super::{DEAD_LETTER_TABLE, Error, HELD_TABLE, Table, now_ms, quote};
use crate::wire::{ChangeEvent, Op, ReplicationEvent, Value};

/// Most held events of one table tried pairwise when they wait for each other.
const MAX_PAIRED_HELD: usize = 20;

/// One event to apply, with where it came from.
#[derive(Debug)]
pub struct Incoming<'a> {
    /// Stream name (for the dead-letter and held records).
    pub stream: &'a str,
    pub seq: u64,
    /// The decoded event, or why it could not be decoded.
    pub event: Result<ChangeEvent, String>,
    /// Whether this database published it (its message id carries our identity).
    pub own: bool,
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
}

/// A primary key, encoded with its storage classes so that equal keys are equal bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(Vec<u8>);

impl Key {
    /// Encodes key values (type tag, then exact bytes).
    pub fn of<'v>(values: impl IntoIterator<Item = &'v Value>) -> Key {
        let mut out = Vec::with_capacity(16);
        for v in values {
            match v {
                Value::Null => out.push(b'n'),
                Value::Integer(i) => {
                    out.push(b'i');
                    out.extend_from_slice(&i.to_be_bytes());
                }
                Value::Real(f) => {
                    out.push(b'r');
                    out.extend_from_slice(&f.to_bits().to_be_bytes());
                }
                Value::Text(t) | Value::Blob(t) => {
                    out.push(if matches!(v, Value::Text(_)) {
                        b't'
                    } else {
                        b'b'
                    });
                    out.extend_from_slice(&(t.len() as u64).to_be_bytes());
                    out.extend_from_slice(t);
                }
            }
        }
        Key(out)
    }
}

/// Exact equality of two stored values: same storage class, same bytes.
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Real(x), Value::Real(y)) => x.to_bits() == y.to_bits() || x == y,
        _ => a == b,
    }
}

/// Records an event that can never apply in the dead-letter table (in the caller's transaction).
fn quarantine(
    conn: &Connection,
    stream: &str,
    seq: u64,
    why: &str,
    payload: &[u8],
) -> rusqlite::Result<()> {
    conn.prepare_cached(&format!(
        "INSERT INTO {} (stream, seq, error, payload, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        quote(DEAD_LETTER_TABLE)
    ))?
    .execute(rusqlite::params![
        stream,
        seq as i64,
        why,
        payload,
        now_ms()
    ])?;
    Ok(())
}

/// Why one event failed inside the transaction.
enum EventError {
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
struct Behind {
    why: String,
    /// Lower-cased table name (the current one, when the event named an old one).
    table: String,
    /// The row, when the table is known and the event carries its key; `None` blocks the table.
    key: Option<Key>,
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

/// SQLite's extended codes for a UNIQUE or PRIMARY KEY conflict.
const SQLITE_CONSTRAINT_UNIQUE: i32 = 2067;
const SQLITE_CONSTRAINT_PRIMARYKEY: i32 = 1555;

/// How a failed write is handled.
enum WriteError {
    /// A UNIQUE conflict with another row: hold the event.
    Conflict(String),
    Event(EventError),
}

/// Errors tied to the event or to the local schema (a table or column dropped while running:
/// plain `SQLITE_ERROR`) repeat on every attempt, so they are poison. Busy, locked, I/O, full
/// disk and the like depend on the environment and are retried.
fn classify(e: rusqlite::Error) -> EventError {
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

fn classify_write(e: rusqlite::Error) -> WriteError {
    if let rusqlite::Error::SqliteFailure(f, _) = &e
        && matches!(
            f.extended_code,
            SQLITE_CONSTRAINT_UNIQUE | SQLITE_CONSTRAINT_PRIMARYKEY
        )
    {
        return WriteError::Conflict(e.to_string());
    }
    WriteError::Event(classify(e))
}

/// What evaluating one event decided.
enum Step {
    Done(Outcome),
    /// Only a write transaction can finish this event.
    NeedsWrite,
}

/// How an event is being processed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// In the read transaction: decide, never write.
    Read,
    /// In the write transaction.
    Write,
    /// Retrying the held event with this row id (its record stays unless it applies).
    Retry(i64),
    /// Retrying an event that waited for the schema (its caller keeps per-row order).
    RetryWaiting,
}

/// An event waiting for a UNIQUE conflict to clear.
struct HeldEvent {
    table: usize,
    key: Key,
    stream: String,
    seq: u64,
    own: bool,
    event: ChangeEvent,
}

/// An event waiting for the local schema to catch up.
struct WaitingEvent {
    stream: String,
    seq: u64,
    own: bool,
    event: ChangeEvent,
    table: String,
    key: Option<Key>,
}

/// Per table: SQL built once per set of event columns.
#[derive(Default)]
struct TableSql {
    select: HashMap<Vec<usize>, String>,
    update: HashMap<Vec<usize>, String>,
    insert: HashMap<Vec<usize>, String>,
    delete: Option<String>,
}

/// Everything but the connection (so a transaction on the connection and this can be borrowed
/// at the same time).
struct State {
    tables: Vec<Table>,
    pks: Vec<Vec<usize>>,
    by_name: HashMap<String, usize>,
    /// Lower-cased name → index, for SQLite's case-insensitive table names.
    folded: HashMap<String, usize>,
    log: Arc<ChangeLog>,
    /// Whether own events come back (this node publishes): only then is in-flight tracking
    /// meaningful.
    track: bool,
    /// Per table: key → newest change-log id of a captured change not yet come back.
    in_flight: Vec<HashMap<Key, i64>>,
    /// Per table: key → newest change-log id of a pending change of unknown publish status
    /// (captured before a restart, the stream no longer holding where it may have landed). It
    /// supersedes our own older events only: had it landed, it would be in the stream after them
    /// (a node never sends a change after a newer one of the same row), so an own event older
    /// than it that comes back can only roll the row back. Another node's event may be newer
    /// than it, so those are not held back.
    unknown: Vec<HashMap<Key, i64>>,
    /// Per table: the highest change-log id already read into `in_flight`.
    cursors: Vec<i64>,
    /// Per shard (index shard − 1): last applied stream sequence.
    applied: Vec<u64>,
    /// Per table: pending changes up to this log id have an unknown publish status and do not
    /// count as in flight (see [`super::restore::NotKept`]).
    unknown_up_to: Vec<i64>,
    /// Per table: changes up to this log id were captured before the table's columns changed
    /// (DDL); they may lack columns that other nodes' older events carry, so they supersede only
    /// our own older events (superseding another node's would lose those columns here while
    /// every other node keeps them).
    stale_up_to: Vec<i64>,
    held: BTreeMap<i64, HeldEvent>,
    held_keys: HashMap<(usize, Key), i64>,
    /// Events waiting for the schema, by held-table id (arrival order).
    waiting: BTreeMap<i64, WaitingEvent>,
    /// How many waiting events each row has, and each table has without a known row.
    waiting_rows: HashMap<(String, Key), usize>,
    waiting_tables: HashMap<String, usize>,
    /// When the first of the current waiting events began to wait.
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
    /// The schema version capture was last confirmed for (see [`super::ddl::drift`]); a
    /// transaction that sees another one waits ([`Error::SchemaChanged`]) instead of applying
    /// with stale table information.
    confirmed: Option<Arc<std::sync::atomic::AtomicI64>>,
}

/// A local row matching an event's key: its rowid (rowid tables), then the event's columns.
struct Found {
    rowid: Option<i64>,
    values: Vec<Value>,
}

impl Applier {
    /// Wraps an open connection (see [`crate::db::open`]) for the given watched tables.
    /// `applied` holds, per shard, the last applied sequence (from the seq map); `track` says
    /// whether this node's own events come back (it publishes).
    ///
    /// # Errors
    /// SQLite errors setting the connection up or reading the change logs and held events.
    pub fn new(
        conn: Connection,
        log: Arc<ChangeLog>,
        applied: Vec<u64>,
        track: bool,
    ) -> Result<Applier, Error> {
        conn.execute_batch("PRAGMA synchronous = FULL")?;
        let tables = log.tables().to_vec();
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
                waiting_rows: HashMap::new(),
                waiting_tables: HashMap::new(),
                waiting_since: None,
                hashes: SchemaHashes::default(),
                aliases: super::ddl::Aliases::default(),
                sql: (0..n).map(|_| TableSql::default()).collect(),
            },
            held_checked_version: None,
            confirmed: None,
        };
        applier.state.aliases = super::ddl::Aliases::load(&applier.conn)?;
        applier.rebuild_in_flight()?;
        applier.load_held()?;
        Ok(applier)
    }

    /// Changes up to these change-log ids (per table) were captured before the table's columns
    /// changed: they stop counting as in flight (see `stale_up_to`).
    ///
    /// # Errors
    /// SQLite errors re-reading the in-flight set.
    pub fn set_stale_up_to(&mut self, ids: Vec<i64>) -> Result<(), Error> {
        self.state.stale_up_to = ids;
        self.rebuild_in_flight()
    }

    /// The local schema's hashes, for checking the `sh` of incoming events.
    pub fn set_schema_hashes(&mut self, hashes: SchemaHashes) {
        self.state.hashes = hashes;
    }

    /// The schema version capture is confirmed for, kept current by whoever watches the schema.
    pub fn set_confirmed_schema(&mut self, confirmed: Arc<std::sync::atomic::AtomicI64>) {
        self.confirmed = Some(confirmed);
    }

    /// Fails with [`Error::SchemaChanged`] when the schema `conn` sees (inside a transaction) is
    /// not the one capture was confirmed for.
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

    /// Pending changes up to these change-log ids (per table) have an unknown publish status:
    /// they stop counting as in flight (see [`super::restore::NotKept`]).
    ///
    /// # Errors
    /// SQLite errors re-reading the in-flight set.
    pub fn set_unknown_up_to(&mut self, ids: Vec<i64>) -> Result<(), Error> {
        self.state.unknown_up_to = ids;
        self.rebuild_in_flight()
    }

    /// Records that `shard` (1-based) has been applied through `seq`.
    pub fn set_applied(&mut self, shard: usize, seq: u64) {
        if let Some(slot) = self.state.applied.get_mut(shard.wrapping_sub(1)) {
            *slot = seq;
        }
    }

    /// Forgets and re-reads the in-flight set (at start, and after the stream position jumped:
    /// changes that can no longer come back must stop holding their rows).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn rebuild_in_flight(&mut self) -> Result<(), Error> {
        for m in self
            .state
            .in_flight
            .iter_mut()
            .chain(self.state.unknown.iter_mut())
        {
            m.clear();
        }
        self.state.cursors.iter_mut().for_each(|c| *c = 0);
        let tx = self.conn.unchecked_transaction()?;
        self.state.refresh(&tx)?;
        tx.commit()?;
        Ok(())
    }

    /// Our changes acknowledged but not yet marked in the database (`landed`: table, change-log
    /// id, shard, sequence) for which `gone(shard, seq)` holds stop counting as in flight: their
    /// events will never come back (inside a restored snapshot, skipped by a gap, in a stream
    /// since recreated), and waiting for them would hold back every later event of their rows.
    /// Re-reading the in-flight set cannot tell: the database still shows them pending.
    pub fn forget_landed(
        &mut self,
        landed: &[(usize, i64, u64, u64)],
        gone: impl Fn(u64, u64) -> bool,
    ) {
        for &(t, log_id, shard, seq) in landed {
            if gone(shard, seq)
                && let Some(map) = self.state.in_flight.get_mut(t)
            {
                map.retain(|_, id| *id != log_id);
            }
        }
    }

    /// The stream of `shard` (1-based) was recreated: changes we published into the old one will
    /// never come back, so they stop counting as in flight (their landing is forgotten), and the
    /// in-flight set is read again.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn forget_published(&mut self, shard: usize) -> Result<(), Error> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        for t in &self.state.tables {
            tx.execute(
                &format!(
                    "UPDATE {} SET pub_seq = NULL WHERE state = 1 AND pub_shard = ?1",
                    quote(&super::change_log_name(&t.name))
                ),
                [shard as i64],
            )
            .map_err(super::on_table(&t.name))?;
        }
        tx.commit()?;
        self.set_applied(shard, 0);
        self.rebuild_in_flight()
    }

    /// Merges the snapshot at `file` (see [`super::restore`]), whose positions are `positions`
    /// (per shard), and makes them this applier's.
    ///
    /// # Errors
    /// SQLite errors; nothing changed then.
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
            &|c| Self::check_schema(confirmed.as_ref(), c),
        )?;
        for (i, &p) in positions.iter().enumerate() {
            self.set_applied(i + 1, p);
        }
        self.rebuild_in_flight()?;
        // Acknowledged changes of ours inside the snapshot have come back, whatever the database
        // still says of them (the keeper marks them later).
        self.forget_landed(&not_kept.landed, |shard, seq| {
            positions
                .get((shard.max(1) - 1) as usize)
                .is_some_and(|&p| seq <= p)
        });
        // Held events the snapshot's positions include are part of its rows now (or superseded
        // by them): retried later they would take rows back.
        let stale: Vec<i64> = self
            .state
            .held
            .iter()
            .filter(|(_, h)| {
                streams
                    .iter()
                    .position(|s| *s == h.stream)
                    .and_then(|i| positions.get(i))
                    .is_some_and(|&p| h.seq <= p)
            })
            .map(|(&id, _)| id)
            .collect();
        // Events waiting for the schema that the snapshot's positions include go too: replayed
        // after the migration they would take their rows back past newer events the snapshot
        // holds (and this node never received).
        let included = |stream: &str, seq: u64| {
            streams
                .iter()
                .position(|s| s == stream)
                .and_then(|i| positions.get(i))
                .is_some_and(|&p| seq <= p)
        };
        let stale_waiting: Vec<i64> = self
            .state
            .waiting
            .iter()
            .filter(|(_, w)| included(&w.stream, w.seq))
            .map(|(&id, _)| id)
            .collect();
        if !stale.is_empty() || !stale_waiting.is_empty() {
            let tx = self.conn.unchecked_transaction()?;
            for id in stale {
                self.state.drop_held(&tx, id)?;
            }
            for id in stale_waiting {
                self.state.drop_waiting(&tx, id)?;
            }
            tx.commit()?;
        }
        Ok(restored)
    }

    /// Number of captured changes not yet come back (for tests and metrics).
    pub fn in_flight_len(&self) -> usize {
        self.state.in_flight.iter().map(HashMap::len).sum()
    }

    /// Number of held events.
    pub fn held_len(&self) -> usize {
        self.state.held.len()
    }

    /// Number of events waiting for the local schema to catch up.
    pub fn waiting_len(&self) -> usize {
        self.state.waiting.len()
    }

    fn load_held(&mut self) -> Result<(), Error> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT id, stream, seq, origin, payload, schema_wait FROM {} ORDER BY id",
            quote(HELD_TABLE)
        ))?;
        type HeldRow = (i64, String, i64, Option<String>, Vec<u8>, i64);
        let rows: Vec<HeldRow> = stmt
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })?
            .collect::<Result<_, _>>()?;
        drop(stmt);
        for (id, stream, seq, origin, payload, schema_wait) in rows {
            let Ok(decoded) = ReplicationEvent::decode(&payload) else {
                tracing::warn!(id, "Held event cannot be decoded; dropping it");
                continue;
            };
            let event = decoded.event;
            if schema_wait != 0 {
                let (table, key) = self.state.waiting_place(&event);
                self.state.add_waiting(
                    id,
                    WaitingEvent {
                        stream,
                        seq: seq.max(0) as u64,
                        own: origin.as_deref() == Some("own"),
                        event,
                        table,
                        key,
                    },
                );
                continue;
            }
            let Some(t) = self.state.table_of(&event.table) else {
                continue;
            };
            let Some(key) = self.state.wire_key(t, &event) else {
                continue;
            };
            self.state.held_keys.insert((t, key.clone()), id);
            self.state.held.insert(
                id,
                HeldEvent {
                    table: t,
                    key,
                    stream,
                    seq: seq.max(0) as u64,
                    own: origin.as_deref() == Some("own"),
                    event,
                },
            );
        }
        Ok(())
    }

    /// Applies a batch and returns one outcome per event.
    ///
    /// # Errors
    /// A failure that is not the event's fault (busy, I/O, full disk): the whole batch was rolled
    /// back and should be retried.
    pub fn apply_batch(&mut self, batch: &[Incoming<'_>]) -> Result<Vec<Outcome>, Error> {
        let result = self.apply_batch_in(batch);
        self.resync_on_error(result)
    }

    /// After a rolled-back transaction the held and waiting events in memory may differ from
    /// the database (added or dropped inside it): read them again.
    fn resync_on_error<T>(&mut self, result: Result<T, Error>) -> Result<T, Error> {
        if result.is_err() {
            let s = &mut self.state;
            s.held.clear();
            s.held_keys.clear();
            s.waiting.clear();
            s.waiting_rows.clear();
            s.waiting_tables.clear();
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
        let tx = begin_guarded(&mut self.conn)?;
        Self::check_schema(self.confirmed.as_ref(), &tx)?;
        self.state.refresh(&tx)?;
        let mut wrote = false;
        for incoming in &batch[first_write..] {
            tx.prepare_cached("SAVEPOINT ev")?.execute([])?;
            let result = self.state.step(&tx, incoming, Mode::Write);
            if result.is_err() {
                tx.prepare_cached("ROLLBACK TO ev")?.execute([])?;
            }
            tx.prepare_cached("RELEASE ev")?.execute([])?;
            match result {
                Ok(Step::Done(o)) => {
                    wrote |= o == Outcome::Applied;
                    outcomes.push(o);
                }
                Ok(Step::NeedsWrite) => unreachable!("write mode always finishes"),
                Err(EventError::Retry(e)) => return Err(e.into()),
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
        commit_guarded(tx)?;
        Ok(outcomes)
    }

    /// Tries the held events again if the database changed since the last try (another row may
    /// have given up the conflicting value); returns how many applied.
    ///
    /// # Errors
    /// SQLite errors (rolled back; held events stay held).
    pub fn retry_held(&mut self) -> Result<usize, Error> {
        let result = self.retry_held_in();
        self.resync_on_error(result)
    }

    fn retry_held_in(&mut self) -> Result<usize, Error> {
        if self.state.held.is_empty() {
            return Ok(0);
        }
        let version: i64 = self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?;
        if self.held_checked_version == Some(version) {
            return Ok(0);
        }
        let tx = begin_guarded(&mut self.conn)?;
        Self::check_schema(self.confirmed.as_ref(), &tx)?;
        self.state.refresh(&tx)?;
        let applied = self.state.retry_held(&tx)?;
        commit_guarded(tx)?;
        // Our own commit changes nothing for data_version on this connection.
        self.held_checked_version = Some(
            self.conn
                .query_row("PRAGMA data_version", [], |r| r.get(0))?,
        );
        Ok(applied)
    }

    /// Tries the events waiting for the schema again, in arrival order (after capture was
    /// reinstalled for a changed schema); returns how many applied. An event that still cannot
    /// apply keeps every later one of its row (or table) waiting.
    ///
    /// # Errors
    /// SQLite errors (rolled back; the events keep waiting).
    pub fn retry_waiting(&mut self) -> Result<usize, Error> {
        let result = self.retry_waiting_in();
        self.resync_on_error(result)
    }

    fn retry_waiting_in(&mut self) -> Result<usize, Error> {
        if self.state.waiting.is_empty() {
            return Ok(0);
        }
        let tx = begin_guarded(&mut self.conn)?;
        Self::check_schema(self.confirmed.as_ref(), &tx)?;
        self.state.refresh(&tx)?;
        let before = self.state.waiting.len();
        let since = self.state.waiting_since;
        let applied = self.state.retry_waiting(&tx)?;
        commit_guarded(tx)?;
        let left = self.state.waiting.len();
        if left == 0 {
            let paused_for = since
                .map(|t| format!("{:?}", t.elapsed()))
                .unwrap_or_default();
            tracing::info!(events = before, applied, paused_for = %paused_for,
                "Schema now matches after recompute, resuming replication");
        } else if left < before {
            tracing::info!(
                applied,
                done = before - left,
                still_waiting = left,
                "Events waiting for the schema partly applied; the rest still waits"
            );
        } else {
            tracing::warn!(
                still_waiting = left,
                "Schema still mismatched after recompute"
            );
        }
        Ok(applied)
    }
}

impl State {
    fn table_of(&self, name: &str) -> Option<usize> {
        self.by_name
            .get(name)
            .or_else(|| self.folded.get(&name.to_lowercase()))
            .copied()
    }

    /// The local table an event names, following this node's renames.
    fn resolve_table(&self, name: &str) -> Option<usize> {
        self.table_of(name)
            .or_else(|| self.aliases.table(name).and_then(|n| self.table_of(n)))
    }

    /// The event with the current names of renamed columns (and of its table), if any differ.
    fn renamed(&self, t: usize, event: &ChangeEvent) -> Option<ChangeEvent> {
        let table = &self.tables[t];
        let mut copy: Option<ChangeEvent> = None;
        if event.table != table.name {
            copy = Some(event.clone());
        }
        let mut gone: Vec<usize> = Vec::new();
        for (i, (name, _)) in event.row.iter().enumerate() {
            if table.column_index(name).is_some() {
                continue;
            }
            if let Some(new) = self.aliases.column(&table.name, name) {
                let c = copy.get_or_insert_with(|| event.clone());
                c.row[i].0 = new.to_owned();
            } else if self.aliases.dropped_column(&table.name, name) {
                gone.push(i);
            }
        }
        if !gone.is_empty() {
            let c = copy.get_or_insert_with(|| event.clone());
            let mut i = 0;
            c.row.retain(|_| {
                i += 1;
                !gone.contains(&(i - 1))
            });
        }
        if let Some(c) = &mut copy {
            c.table = table.name.clone();
        }
        copy
    }

    /// Why `event` cannot apply here: it waits if its sender's schema may be ahead of ours, and
    /// is poison if the sender had our schema (it names what cannot exist).
    fn unknown(&self, event: &ChangeEvent, t: Option<usize>, why: String) -> EventError {
        if self.hashes.matches(&event.schema_hash) {
            return EventError::Poison(why);
        }
        let (table, key) = match t {
            Some(t) => (
                self.tables[t].name.to_lowercase(),
                self.renamed(t, event)
                    .as_ref()
                    .map_or_else(|| self.wire_key(t, event), |e| self.wire_key(t, e)),
            ),
            None => (
                self.aliases
                    .table(&event.table)
                    .unwrap_or(&event.table)
                    .to_lowercase(),
                None,
            ),
        };
        EventError::Behind(Behind { why, table, key })
    }

    /// Where a waiting event waits: its (lower-cased) table and, if known, its row.
    fn waiting_place(&self, event: &ChangeEvent) -> (String, Option<Key>) {
        match self.resolve_table(&event.table) {
            Some(t) => {
                let key = self
                    .renamed(t, event)
                    .as_ref()
                    .map_or_else(|| self.wire_key(t, event), |e| self.wire_key(t, e));
                (self.tables[t].name.to_lowercase(), key)
            }
            None => (
                self.aliases
                    .table(&event.table)
                    .unwrap_or(&event.table)
                    .to_lowercase(),
                None,
            ),
        }
    }

    /// Whether an earlier event of this row (or of its table) waits for the schema.
    fn blocked(&self, table: &str, key: Option<&Key>) -> bool {
        if self.waiting.is_empty() {
            return false;
        }
        self.waiting_tables.contains_key(table)
            || key.is_some_and(|k| {
                self.waiting_rows
                    .contains_key(&(table.to_owned(), k.clone()))
            })
    }

    fn add_waiting(&mut self, id: i64, w: WaitingEvent) {
        match &w.key {
            Some(k) => {
                *self
                    .waiting_rows
                    .entry((w.table.clone(), k.clone()))
                    .or_default() += 1
            }
            None => *self.waiting_tables.entry(w.table.clone()).or_default() += 1,
        }
        self.waiting_since
            .get_or_insert_with(std::time::Instant::now);
        self.waiting.insert(id, w);
    }

    fn drop_waiting(&mut self, conn: &Connection, id: i64) -> rusqlite::Result<()> {
        conn.prepare_cached(&format!("DELETE FROM {} WHERE id = ?1", quote(HELD_TABLE)))?
            .execute([id])?;
        if let Some(w) = self.waiting.remove(&id) {
            let slot = match w.key {
                Some(k) => self
                    .waiting_rows
                    .get_mut(&(w.table.clone(), k.clone()))
                    .map(|n| (n, Some(k))),
                None => self.waiting_tables.get_mut(&w.table).map(|n| (n, None)),
            };
            if let Some((n, key)) = slot {
                *n -= 1;
                if *n == 0 {
                    match key {
                        Some(k) => {
                            self.waiting_rows.remove(&(w.table, k));
                        }
                        None => {
                            self.waiting_tables.remove(&w.table);
                        }
                    }
                }
            }
        }
        if self.waiting.is_empty() {
            self.waiting_since = None;
        }
        Ok(())
    }

    /// Records `event` as waiting for the schema (durably, in the caller's transaction).
    fn wait(
        &mut self,
        conn: &Connection,
        incoming: &Incoming<'_>,
        event: &ChangeEvent,
        behind: Behind,
    ) -> rusqlite::Result<()> {
        let payload = ReplicationEvent {
            from_node_id: 0,
            event: event.clone(),
        }
        .encode();
        conn.prepare_cached(&format!(
            "INSERT INTO {} (stream, seq, origin, payload, reason, created_at, schema_wait) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1)",
            quote(HELD_TABLE)
        ))?
        .execute(rusqlite::params![
            incoming.stream,
            incoming.seq as i64,
            incoming.own.then_some("own"),
            payload,
            behind.why,
            now_ms()
        ])?;
        let id = conn.last_insert_rowid();
        if self.waiting.is_empty() {
            let short = |h: &str| h.get(..8).unwrap_or(h).to_owned();
            tracing::warn!(table = %event.table, stream = incoming.stream, seq = incoming.seq,
                event_hash = %short(&event.schema_hash), local_hash = %short(&self.hashes.current),
                reason = %behind.why,
                "Schema mismatch detected, pausing replication");
        } else {
            tracing::debug!(table = %event.table, seq = incoming.seq, reason = %behind.why, "event waits for the schema");
        }
        self.add_waiting(
            id,
            WaitingEvent {
                stream: incoming.stream.to_owned(),
                seq: incoming.seq,
                own: incoming.own,
                event: event.clone(),
                table: behind.table,
                key: behind.key,
            },
        );
        Ok(())
    }

    /// See [`Applier::retry_waiting`].
    fn retry_waiting(&mut self, conn: &Connection) -> Result<usize, Error> {
        let mut applied = 0;
        let mut blocked_tables: std::collections::HashSet<String> = Default::default();
        let mut blocked_rows: std::collections::HashSet<(String, Key)> = Default::default();
        let ids: Vec<i64> = self.waiting.keys().copied().collect();
        for id in ids {
            let Some(w) = self.waiting.get(&id) else {
                continue;
            };
            let is_blocked = blocked_tables.contains(&w.table)
                || w.key
                    .as_ref()
                    .is_some_and(|k| blocked_rows.contains(&(w.table.clone(), k.clone())));
            let (stream, seq, own, event) = (w.stream.clone(), w.seq, w.own, w.event.clone());
            let (place_table, place_key) = (w.table.clone(), w.key.clone());
            let block = |tables: &mut std::collections::HashSet<String>,
                         rows: &mut std::collections::HashSet<(String, Key)>,
                         table: String,
                         key: Option<Key>| match key {
                Some(k) => {
                    rows.insert((table, k));
                }
                None => {
                    tables.insert(table);
                }
            };
            if is_blocked {
                block(
                    &mut blocked_tables,
                    &mut blocked_rows,
                    place_table,
                    place_key,
                );
                continue;
            }
            let payload = ReplicationEvent {
                from_node_id: 0,
                event: event.clone(),
            }
            .encode();
            let incoming = Incoming {
                stream: &stream,
                seq,
                event: Ok(event),
                own,
                raw: &payload,
            };
            conn.prepare_cached("SAVEPOINT waiting")?.execute([])?;
            let result = self.step(conn, &incoming, Mode::RetryWaiting);
            if result.is_err() {
                conn.prepare_cached("ROLLBACK TO waiting")?.execute([])?;
            }
            conn.prepare_cached("RELEASE waiting")?.execute([])?;
            match result {
                Ok(Step::Done(outcome)) => {
                    self.drop_waiting(conn, id)?;
                    applied += usize::from(outcome == Outcome::Applied);
                }
                Ok(Step::NeedsWrite) => unreachable!("write modes always finish"),
                Err(EventError::Behind(b)) => {
                    block(
                        &mut blocked_tables,
                        &mut blocked_rows,
                        place_table.clone(),
                        place_key,
                    );
                    // Its place may be known better now (its table exists).
                    block(&mut blocked_tables, &mut blocked_rows, b.table, b.key);
                }
                Err(EventError::Retry(e)) => return Err(e.into()),
                Err(EventError::Poison(why)) => {
                    tracing::error!(stream = %stream, seq, error = %why,
                        "Event that waited for the schema cannot apply; quarantined in __harmonylite__dead_letter");
                    quarantine(conn, &stream, seq, &why, &payload)?;
                    self.drop_waiting(conn, id)?;
                }
            }
        }
        Ok(applied)
    }

    /// The key of `event` as it arrived, if it carries every key column.
    fn wire_key(&self, t: usize, event: &ChangeEvent) -> Option<Key> {
        let table = &self.tables[t];
        let mut values = Vec::with_capacity(self.pks[t].len());
        for &p in &self.pks[t] {
            let name = &table.columns[p].name;
            let v = event
                .row
                .iter()
                .find(|(n, _)| n == name)
                .or_else(|| event.row.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)))?;
            values.push(&v.1);
        }
        Some(Key::of(values))
    }

    /// Reads change-log rows captured since the last call into the in-flight set.
    fn refresh(&mut self, conn: &Connection) -> Result<(), Error> {
        if !self.track {
            return Ok(());
        }
        for t in 0..self.tables.len() {
            let (rows, highest) = match self.log.in_flight(
                conn,
                t,
                self.cursors[t],
                Some(&self.applied),
                self.unknown_up_to.get(t).copied().unwrap_or(0),
            ) {
                Ok(r) => r,
                // The change log was dropped under us (capture removed): nothing to track.
                Err(Error::Sqlite { source, .. })
                    if source.sqlite_error_code() == Some(ErrorCode::Unknown) =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.cursors[t] = highest;
            let stale = self.stale_up_to.get(t).copied().unwrap_or(0);
            for (id, key, unknown) in rows {
                // Captured before the columns changed: like a change of unknown fate, it holds
                // back only our own older events (which lack the same columns).
                let unknown = unknown || id <= stale;
                let map = if unknown {
                    &mut self.unknown[t]
                } else {
                    &mut self.in_flight[t]
                };
                let slot = map.entry(Key::of(&key)).or_insert(id);
                *slot = (*slot).max(id);
            }
        }
        Ok(())
    }

    /// Evaluates (and in write modes applies) one event.
    fn step(
        &mut self,
        conn: &Connection,
        incoming: &Incoming<'_>,
        mode: Mode,
    ) -> Result<Step, EventError> {
        let event = match &incoming.event {
            Ok(e) => e,
            Err(why) => return Err(EventError::Poison(why.clone())),
        };
        let Some(t) = self.resolve_table(&event.table) else {
            if self.aliases.dropped(&event.table) {
                return Ok(Step::Done(Outcome::Discarded(format!(
                    "table {:?} was dropped here",
                    event.table
                ))));
            }
            return Err(self.unknown(
                event,
                None,
                format!("no table mapping found for {:?}", event.table),
            ));
        };
        let renamed = self.renamed(t, event);
        let event = renamed.as_ref().unwrap_or(event);
        let mut cols = Vec::with_capacity(event.row.len());
        for (name, _) in &event.row {
            let idx = self.tables[t].column_index(name).ok_or_else(|| {
                self.unknown(
                    event,
                    Some(t),
                    format!("table {:?} has no column {name:?}", self.tables[t].name),
                )
            })?;
            if cols.contains(&idx) {
                return Err(EventError::Poison(format!(
                    "event for {:?} names column {name:?} twice",
                    self.tables[t].name
                )));
            }
            cols.push(idx);
        }
        // Positions of the key columns within the event's columns.
        let mut key_pos = Vec::with_capacity(self.pks[t].len());
        for &p in &self.pks[t] {
            let pos = cols.iter().position(|&c| c == p).ok_or_else(|| {
                self.unknown(
                    event,
                    Some(t),
                    format!(
                        "{} on {:?} lacks primary key column {:?}",
                        event.op.as_str(),
                        self.tables[t].name,
                        self.tables[t].columns[p].name
                    ),
                )
            })?;
            key_pos.push(pos);
        }
        let wire_key = Key::of(key_pos.iter().map(|&i| &event.row[i].1));
        // An earlier event of this row waits for the schema: this one waits behind it.
        // (Held and waiting events being retried are older than any waiting event of their row.)
        if matches!(mode, Mode::Read | Mode::Write) {
            let table = self.tables[t].name.to_lowercase();
            if self.blocked(&table, Some(&wire_key)) {
                return Err(EventError::Behind(Behind {
                    why: "an earlier event of its row waits for the schema".into(),
                    table,
                    key: Some(wire_key),
                }));
            }
        }
        let found = self.find(conn, t, &cols, &key_pos, event)?;
        let local_key = found
            .first()
            .map(|f| Key::of(key_pos.iter().map(|&i| &f.values[i])))
            .filter(|k| *k != wire_key);
        let keys: Vec<&Key> = std::iter::once(&wire_key).chain(&local_key).collect();

        // A held event for this row is older than this one: this one supersedes it.
        if !matches!(mode, Mode::Retry(_)) {
            let held: Vec<i64> = keys
                .iter()
                .filter_map(|k| self.held_keys.get(&(t, (*k).clone())).copied())
                .collect();
            if !held.is_empty() {
                if mode == Mode::Read {
                    return Ok(Step::NeedsWrite);
                }
                for id in held {
                    self.drop_held(conn, id)?;
                }
            }
        }

        if self.track {
            let flying = &self.in_flight[t];
            let newest = keys.iter().filter_map(|k| flying.get(*k).copied()).max();
            let unknown = if incoming.own {
                let maybe = &self.unknown[t];
                keys.iter().filter_map(|k| maybe.get(*k).copied()).max()
            } else {
                None
            };
            match newest.max(unknown) {
                Some(newest) if !incoming.own || newest > event.id => {
                    return Ok(Step::Done(Outcome::Superseded));
                }
                Some(_) => {
                    for k in &keys {
                        self.in_flight[t].remove(*k);
                        self.unknown[t].remove(*k);
                    }
                }
                None => {}
            }
        }

        let has_null_key = key_pos.iter().any(|&i| event.row[i].1 == Value::Null);
        let equal = |f: &Found| {
            f.values
                .iter()
                .zip(&event.row)
                .all(|(a, (_, b))| same_value(a, b))
        };
        match event.op {
            Op::Insert | Op::Update => {
                if found.iter().any(equal) {
                    return Ok(Step::Done(Outcome::Unchanged));
                }
                let non_key: Vec<usize> =
                    (0..cols.len()).filter(|i| !key_pos.contains(i)).collect();
                if !found.is_empty() && non_key.is_empty() {
                    return Ok(Step::Done(Outcome::Unchanged));
                }
                if mode == Mode::Read {
                    return Ok(Step::NeedsWrite);
                }
                let result = match found.first() {
                    Some(target) => self.update(conn, t, &cols, &non_key, &key_pos, target, event),
                    None => self.insert(conn, t, &cols, event),
                };
                self.finish_write(conn, t, wire_key, incoming, mode, result)
            }
            Op::Delete => {
                let target = if has_null_key {
                    found.iter().find(|f| equal(f))
                } else {
                    found.first()
                };
                let Some(target) = target else {
                    return Ok(Step::Done(Outcome::Unchanged));
                };
                if mode == Mode::Read {
                    return Ok(Step::NeedsWrite);
                }
                let result = self.delete(conn, t, &key_pos, target, event);
                self.finish_write(conn, t, wire_key, incoming, mode, result)
            }
        }
    }

    /// Turns a write's result into the event's outcome: applied, held, or an error.
    fn finish_write(
        &mut self,
        conn: &Connection,
        t: usize,
        key: Key,
        incoming: &Incoming<'_>,
        mode: Mode,
        result: Result<(), WriteError>,
    ) -> Result<Step, EventError> {
        match result {
            Ok(()) => {
                if let Mode::Retry(id) = mode {
                    self.drop_held(conn, id)?;
                }
                Ok(Step::Done(Outcome::Applied))
            }
            // A constraint of ours the sender's (other) schema did not have: it may be that this
            // node's schema is behind, so the event waits rather than being quarantined.
            Err(WriteError::Event(EventError::Poison(why)))
                if incoming.event.as_ref().is_ok_and(|e| {
                    !e.schema_hash.is_empty() && !self.hashes.matches(&e.schema_hash)
                }) =>
            {
                Err(EventError::Behind(Behind {
                    why,
                    table: self.tables[t].name.to_lowercase(),
                    key: Some(key),
                }))
            }
            Err(WriteError::Event(e)) => Err(e),
            Err(WriteError::Conflict(why)) => {
                if let Mode::Retry(_) = mode {
                    return Ok(Step::Done(Outcome::Held(why)));
                }
                let Ok(event) = &incoming.event else {
                    return Err(EventError::Poison(why));
                };
                let payload = ReplicationEvent {
                    from_node_id: 0,
                    event: event.clone(),
                }
                .encode();
                conn.prepare_cached(&format!(
                    "INSERT INTO {} (stream, seq, origin, payload, reason, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    quote(HELD_TABLE)
                ))?
                .execute(rusqlite::params![
                    incoming.stream,
                    incoming.seq as i64,
                    incoming.own.then_some("own"),
                    payload,
                    why,
                    now_ms()
                ])?;
                let id = conn.last_insert_rowid();
                let conflicting = self.conflicting_row(conn, t, event, &why);
                tracing::warn!(table = %self.tables[t].name, stream = incoming.stream, seq = incoming.seq,
                    event_row = %describe(&event.row), conflicting_row = %conflicting, error = %why,
                    "UNIQUE conflict with another row: event held until either row changes");
                self.held_keys.insert((t, key.clone()), id);
                self.held.insert(
                    id,
                    HeldEvent {
                        table: t,
                        key,
                        stream: incoming.stream.to_owned(),
                        seq: incoming.seq,
                        own: incoming.own,
                        event: event.clone(),
                    },
                );
                Ok(Step::Done(Outcome::Held(why)))
            }
        }
    }

    fn drop_held(&mut self, conn: &Connection, id: i64) -> rusqlite::Result<()> {
        conn.prepare_cached(&format!("DELETE FROM {} WHERE id = ?1", quote(HELD_TABLE)))?
            .execute([id])?;
        if let Some(h) = self.held.remove(&id) {
            self.held_keys.remove(&(h.table, h.key));
        }
        Ok(())
    }

    /// Applies whatever held events can apply now, until a pass makes no progress.
    fn retry_held(&mut self, conn: &Connection) -> Result<usize, Error> {
        let mut applied = 0;
        loop {
            let ids: Vec<i64> = self.held.keys().copied().collect();
            let mut progress = false;
            for id in ids {
                let Some(h) = self.held.get(&id) else {
                    continue;
                };
                let (stream, seq, own, event) = (h.stream.clone(), h.seq, h.own, h.event.clone());
                let incoming = Incoming {
                    stream: &stream,
                    seq,
                    event: Ok(event),
                    own,
                    raw: &[],
                };
                conn.prepare_cached("SAVEPOINT held")?.execute([])?;
                let result = self.step(conn, &incoming, Mode::Retry(id));
                if result.is_err() {
                    conn.prepare_cached("ROLLBACK TO held")?.execute([])?;
                }
                conn.prepare_cached("RELEASE held")?.execute([])?;
                match result {
                    Ok(Step::Done(Outcome::Held(_))) => {}
                    Ok(Step::Done(outcome)) => {
                        // Applied, or no longer needed (superseded, unchanged).
                        if self.held.contains_key(&id) {
                            self.drop_held(conn, id)?;
                        }
                        if outcome == Outcome::Applied {
                            applied += 1;
                            tracing::info!(stream = %stream, seq, "Held event applied");
                        }
                        progress = true;
                    }
                    Ok(Step::NeedsWrite) | Err(EventError::Behind(_)) => {}
                    Err(EventError::Retry(e)) => return Err(e.into()),
                    Err(EventError::Poison(why)) => {
                        tracing::error!(stream = %stream, seq, error = %why, "Held event cannot apply; dropping it");
                        if self.held.contains_key(&id) {
                            let _ = self.drop_held(conn, id);
                        }
                        progress = true;
                    }
                }
            }
            if !progress && !self.held.is_empty() {
                let together = self.apply_held_together(conn)?;
                applied += together;
                progress = together > 0;
            }
            if !progress || self.held.is_empty() {
                return Ok(applied);
            }
        }
    }

    /// Held events that wait for each other never apply one at a time: rows that swapped
    /// UNIQUE values, whose new images each conflict with the other row's old one (a swap whose
    /// intermediate step never reached this node). They are tried together, per table: the rows
    /// they target are deleted and their images inserted in one savepoint, kept only if every
    /// one applies — all the held events of the table first, then pairs. Only events that carry
    /// every column qualify (an insert must not lose columns the event lacks).
    fn apply_held_together(&mut self, conn: &Connection) -> Result<usize, Error> {
        let mut by_table: BTreeMap<usize, Vec<i64>> = BTreeMap::new();
        for (&id, h) in &self.held {
            let whole = h.event.row.len() == self.tables[h.table].columns.len();
            if whole && matches!(h.event.op, Op::Insert | Op::Update) {
                by_table.entry(h.table).or_default().push(id);
            }
        }
        let mut applied = 0;
        for (t, ids) in by_table {
            if ids.len() < 2 {
                continue;
            }
            let mut groups = vec![ids.clone()];
            if ids.len() <= MAX_PAIRED_HELD {
                for (n, &a) in ids.iter().enumerate() {
                    groups.extend(ids[n + 1..].iter().map(|&b| vec![a, b]));
                }
            }
            for group in groups {
                if group.iter().any(|id| !self.held.contains_key(id)) {
                    continue;
                }
                if !self.try_together(conn, t, &group)? {
                    continue;
                }
                for id in group {
                    if let Some(h) = self.held.get(&id) {
                        tracing::info!(stream = %h.stream, seq = h.seq, "Held event applied (with the events it waited for)");
                    }
                    self.drop_held(conn, id)?;
                    applied += 1;
                }
            }
        }
        Ok(applied)
    }

    /// One attempt of [`Self::apply_held_together`]: true if every event of `ids` applied.
    fn try_together(&mut self, conn: &Connection, t: usize, ids: &[i64]) -> Result<bool, Error> {
        let events: Vec<ChangeEvent> = ids
            .iter()
            .filter_map(|id| self.held.get(id).map(|h| h.event.clone()))
            .collect();
        conn.prepare_cached("SAVEPOINT held_group")?.execute([])?;
        let outcome = (|| -> Result<bool, EventError> {
            let mut layouts = Vec::with_capacity(events.len());
            for e in &events {
                let Some(layout) = self.layout(t, e) else {
                    return Ok(false);
                };
                let found = self.find(conn, t, &layout.0, &layout.1, e)?;
                if let Some(target) = found.first() {
                    match self.delete(conn, t, &layout.1, target, e) {
                        Ok(()) => {}
                        Err(WriteError::Conflict(_)) => return Ok(false),
                        Err(WriteError::Event(e)) => return Err(e),
                    }
                }
                layouts.push(layout);
            }
            for (e, layout) in events.iter().zip(&layouts) {
                match self.insert(conn, t, &layout.0, e) {
                    Ok(()) => {}
                    Err(WriteError::Conflict(_)) => return Ok(false),
                    Err(WriteError::Event(e)) => return Err(e),
                }
            }
            Ok(true)
        })();
        let keep = matches!(outcome, Ok(true));
        if !keep {
            conn.prepare_cached("ROLLBACK TO held_group")?.execute([])?;
        }
        conn.prepare_cached("RELEASE held_group")?.execute([])?;
        match outcome {
            Ok(done) => Ok(done),
            Err(EventError::Retry(e)) => Err(e.into()),
            // Poison shows when the event is retried alone; nothing changed here.
            Err(EventError::Poison(_) | EventError::Behind(_)) => Ok(false),
        }
    }

    /// The event's columns (local indexes) and the positions of the key columns among them;
    /// `None` when the local table lacks one.
    fn layout(&self, t: usize, event: &ChangeEvent) -> Option<(Vec<usize>, Vec<usize>)> {
        let cols: Vec<usize> = event
            .row
            .iter()
            .map(|(name, _)| self.tables[t].column_index(name))
            .collect::<Option<_>>()?;
        let key_pos: Vec<usize> = self.pks[t]
            .iter()
            .map(|&p| cols.iter().position(|&c| c == p))
            .collect::<Option<_>>()?;
        Some((cols, key_pos))
    }

    /// Local rows whose key equals the event's (null-safe), lowest rowid first.
    fn find(
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
                .map(|(n, &pos)| format!("{} IS ?{}", quote(&table.columns[cols[pos]].name), n + 1))
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
    fn update(
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
        conn.prepare_cached(sql)
            .map_err(|e| WriteError::Event(classify(e)))?
            .execute(rusqlite::params_from_iter(binds.iter()))
            .map_err(classify_write)?;
        Ok(())
    }

    fn insert(
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
        conn.prepare_cached(sql)
            .map_err(|e| WriteError::Event(classify(e)))?
            .execute(rusqlite::params_from_iter(binds.iter()))
            .map_err(classify_write)?;
        Ok(())
    }

    fn delete(
        &mut self,
        conn: &Connection,
        t: usize,
        key_pos: &[usize],
        target: &Found,
        event: &ChangeEvent,
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
        let _ = event;
        conn.prepare_cached(sql)
            .map_err(|e| WriteError::Event(classify(e)))?
            .execute(rusqlite::params_from_iter(binds.iter()))
            .map_err(classify_write)?;
        Ok(())
    }

    /// The local row that holds the value a UNIQUE conflict is about, for the log.
    fn conflicting_row(
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

/// The WHERE clause addressing one row for an UPDATE whose SET uses `?1..?n`: by rowid, or by
/// primary key for WITHOUT ROWID tables.
fn address(table: &Table, cols: &[usize], key_pos: &[usize], n: usize) -> String {
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
fn describe(row: &[(String, Value)]) -> String {
    let parts: Vec<String> = row
        .iter()
        .map(|(n, v)| {
            let text = match v {
                Value::Null => "NULL".to_owned(),
                Value::Integer(i) => i.to_string(),
                Value::Real(f) => f.to_string(),
                Value::Text(t) => format!("{:?}", String::from_utf8_lossy(&t[..t.len().min(64)])),
                Value::Blob(b) => format!("x'{}'", crate::hex(&b[..b.len().min(32)])),
            };
            format!("{n}: {text}")
        })
        .collect();
    format!("{{{}}}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::cdc;
    use crate::db::schema::watched_tables;
    use crate::db::testutil::temp_db;

    fn ev(op: Op, table: &str, row: Vec<(&str, Value)>) -> ChangeEvent {
        ChangeEvent {
            id: 1,
            op,
            table: table.into(),
            row: row.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            schema_hash: String::new(),
        }
    }

    fn incoming(event: ChangeEvent) -> Incoming<'static> {
        Incoming {
            stream: "s",
            seq: 1,
            event: Ok(event),
            own: false,
            raw: b"raw",
        }
    }

    fn own(event: ChangeEvent) -> Incoming<'static> {
        Incoming {
            own: true,
            ..incoming(event)
        }
    }

    fn setup(schema: &str) -> (tempfile::TempDir, std::path::PathBuf, Applier) {
        let (d, path) = temp_db(schema);
        let mut conn = crate::db::open(&path).expect("open");
        let tables = watched_tables(&conn).expect("tables");
        cdc::install(&mut conn, &tables, "h").expect("install");
        let log = Arc::new(ChangeLog::new(tables));
        let applier = Applier::new(conn, log, vec![0], true).expect("applier");
        (d, path, applier)
    }

    /// The events this database's triggers captured so far, as the publisher would send them.
    fn captured(path: &std::path::Path) -> Vec<ChangeEvent> {
        let conn = crate::db::open(path).expect("open");
        captured_as(path, watched_tables(&conn).expect("tables"))
    }

    /// [`captured`] by a publisher that knows `tables` (the schema at its start).
    fn captured_as(path: &std::path::Path, tables: Vec<Table>) -> Vec<ChangeEvent> {
        let conn = crate::db::open(path).expect("open");
        let log = ChangeLog::new(tables.clone());
        let scan = log.scan(&conn, 0, 100_000).expect("scan");
        scan.changes
            .into_iter()
            .map(|c| ChangeEvent {
                id: c.log_id,
                op: c.op,
                table: tables[c.table].name.clone(),
                row: tables[c.table]
                    .columns
                    .iter()
                    .map(|col| col.name.clone())
                    .zip(c.values)
                    .collect(),
                schema_hash: String::new(),
            })
            .collect()
    }

    fn rows(path: &std::path::Path, sql: &str) -> Vec<Vec<Value>> {
        let conn = Connection::open(path).expect("open");
        let mut stmt = conn.prepare(sql).expect(sql);
        let n = stmt.column_count();
        stmt.query_map([], |r| (0..n).map(|i| value_at(r, i)).collect())
            .expect(sql)
            .collect::<Result<_, _>>()
            .expect(sql)
    }

    fn text(s: &str) -> Value {
        Value::Text(s.as_bytes().to_vec())
    }

    const USERS: &str = "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT UNIQUE)";

    /// Finding 2, origin side: re-applying the first image of 144 must not delete 145 through the
    /// UNIQUE conflict (REPLACE did).
    #[test]
    fn own_events_never_delete_rows_through_unique_conflicts() {
        let (_d, path, mut a) = setup(USERS);
        let app = Connection::open(&path).expect("app");
        app.execute_batch(
            "INSERT INTO users VALUES (144, 'x11'); UPDATE users SET email = 'y11' WHERE id = 144;
             INSERT INTO users VALUES (145, 'x11');",
        )
        .expect("app writes");
        let events = captured(&path);
        assert_eq!(events.len(), 3);
        let out = a
            .apply_batch(&events.into_iter().map(own).collect::<Vec<_>>())
            .expect("apply");
        assert_eq!(
            out,
            [Outcome::Superseded, Outcome::Unchanged, Outcome::Unchanged]
        );
        assert_eq!(
            rows(&path, "SELECT id, email FROM users ORDER BY id"),
            [
                vec![Value::Integer(144), text("y11")],
                vec![Value::Integer(145), text("x11")]
            ]
        );
    }

    /// Finding 2, receiver side: shard B's insert of 145 arrives between 144's insert and update
    /// (another shard): it is held, not allowed to delete 144, and applies once 144 moves away.
    #[test]
    fn unique_conflicts_across_shards_are_held_then_resolved() {
        let (_d, origin, _) = setup(USERS);
        let app = Connection::open(&origin).expect("app");
        app.execute_batch(
            "INSERT INTO users VALUES (144, 'x11'); UPDATE users SET email = 'y11' WHERE id = 144;
             INSERT INTO users VALUES (145, 'x11');",
        )
        .expect("app writes");
        let ev = captured(&origin);
        let (_d2, receiver, mut b) = setup(USERS);
        let out = b
            .apply_batch(&[incoming(ev[0].clone()), incoming(ev[2].clone())])
            .expect("apply");
        assert!(matches!(out[1], Outcome::Held(_)), "{out:?}");
        assert_eq!(b.held_len(), 1);
        assert_eq!(
            count(&receiver, "SELECT count(*) FROM __harmonylite__held_events"),
            1
        );
        b.apply_batch(&[incoming(ev[1].clone())]).expect("apply");
        assert_eq!(b.held_len(), 0);
        assert_eq!(
            rows(&receiver, "SELECT id, email FROM users ORDER BY id"),
            rows(&origin, "SELECT id, email FROM users ORDER BY id")
        );
        assert_eq!(
            count(&receiver, "SELECT count(*) FROM __harmonylite__held_events"),
            0
        );
    }

    /// Held events survive a restart of the applier.
    #[test]
    fn held_events_are_durable() {
        let (_d, path, mut a) = setup(USERS);
        Connection::open(&path)
            .expect("app")
            .execute("INSERT INTO users VALUES (1, 'a')", [])
            .expect("app");
        let out = a
            .apply_batch(&[incoming(ev(
                Op::Insert,
                "users",
                vec![("id", Value::Integer(2)), ("email", text("a"))],
            ))])
            .expect("apply");
        assert!(matches!(out[0], Outcome::Held(_)));
        drop(a);
        let conn = crate::db::open(&path).expect("open");
        let log = Arc::new(ChangeLog::new(watched_tables(&conn).expect("tables")));
        let mut a = Applier::new(conn, log, vec![0], false).expect("applier");
        assert_eq!(a.held_len(), 1);
        Connection::open(&path)
            .expect("app")
            .execute("UPDATE users SET email = 'b' WHERE id = 1", [])
            .expect("app");
        assert_eq!(a.retry_held().expect("retry"), 1);
        assert_eq!(count(&path, "SELECT id FROM users WHERE email = 'a'"), 2);
    }

    /// Finding 3: an UPDATE of the primary key removes the old row on replicas, for INTEGER,
    /// TEXT and rowid keys.
    #[test]
    fn primary_key_changes_remove_the_old_row() {
        for (schema, update) in [
            (
                "CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)",
                "INSERT INTO t VALUES (1, 'a'); UPDATE t SET k = 5 WHERE k = 1;",
            ),
            (
                "CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT)",
                "INSERT INTO t VALUES ('one', 'a'); UPDATE t SET k = 'five' WHERE k = 'one';",
            ),
            (
                "CREATE TABLE t (v TEXT)",
                "INSERT INTO t (rowid, v) VALUES (1, 'a'); UPDATE t SET rowid = 5 WHERE rowid = 1;",
            ),
        ] {
            let (_d, origin, _) = setup(schema);
            Connection::open(&origin)
                .expect("app")
                .execute_batch(update)
                .expect(update);
            let events = captured(&origin);
            assert_eq!(
                events.iter().map(|e| e.op).collect::<Vec<_>>(),
                [Op::Insert, Op::Delete, Op::Update],
                "{schema}"
            );
            let (_d2, receiver, mut b) = setup(schema);
            b.apply_batch(&events.into_iter().map(incoming).collect::<Vec<_>>())
                .expect("apply");
            let q = "SELECT rowid, * FROM t ORDER BY rowid";
            assert_eq!(rows(&receiver, q).len(), 1, "{schema}");
            assert_eq!(rows(&receiver, q), rows(&origin, q), "{schema}");
        }
    }

    /// Finding 4: rows with NULL in a TEXT primary key do not multiply when events are applied
    /// again (own events coming back, replays).
    #[test]
    fn null_keys_do_not_multiply() {
        let schema = "CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT)";
        let (_d, origin, mut a) = setup(schema);
        Connection::open(&origin)
            .expect("app")
            .execute_batch("INSERT INTO t VALUES (NULL, 'a'); INSERT INTO t VALUES ('b', 'c');")
            .expect("app");
        let events = captured(&origin);
        let (_d2, receiver, mut b) = setup(schema);
        for _ in 0..3 {
            a.apply_batch(&events.iter().cloned().map(own).collect::<Vec<_>>())
                .expect("apply");
            b.apply_batch(&events.iter().cloned().map(incoming).collect::<Vec<_>>())
                .expect("apply");
        }
        let q = "SELECT k, v FROM t ORDER BY k";
        assert_eq!(rows(&origin, q).len(), 2);
        assert_eq!(rows(&receiver, q), rows(&origin, q));
    }

    /// Finding 5: STRICT tables with ANY columns keep every value's type through the change log.
    #[test]
    fn strict_any_values_are_not_converted() {
        let schema = "CREATE TABLE t (id INTEGER PRIMARY KEY, v ANY) STRICT";
        let (_d, origin, mut a) = setup(schema);
        Connection::open(&origin)
            .expect("app")
            .execute_batch(
                "INSERT INTO t VALUES (1, '00123'); INSERT INTO t VALUES (2, 1.0);
                 INSERT INTO t VALUES (3, '1e3'); INSERT INTO t VALUES (4, x'00');",
            )
            .expect("app");
        let events = captured(&origin);
        let (_d2, receiver, mut b) = setup(schema);
        b.apply_batch(&events.iter().cloned().map(incoming).collect::<Vec<_>>())
            .expect("apply");
        a.apply_batch(&events.into_iter().map(own).collect::<Vec<_>>())
            .expect("apply");
        let want = vec![
            vec![Value::Integer(1), text("00123")],
            vec![Value::Integer(2), Value::Real(1.0)],
            vec![Value::Integer(3), text("1e3")],
            vec![Value::Integer(4), Value::Blob(vec![0])],
        ];
        let q = "SELECT id, v FROM t ORDER BY id";
        assert_eq!(rows(&origin, q), want);
        assert_eq!(rows(&receiver, q), want);
    }

    /// Finding 6: applying events never changes a row's rowid (FTS external content and
    /// anything else keyed on rowid keep working).
    #[test]
    fn rowids_are_preserved() {
        let schema = "CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT)";
        let (_d, origin, mut a) = setup(schema);
        Connection::open(&origin)
            .expect("app")
            .execute_batch(
                "INSERT INTO t (rowid, k, v) VALUES (10, 'a', 'x'); INSERT INTO t (rowid, k, v) VALUES (20, 'b', 'y');
                 UPDATE t SET v = 'z' WHERE k = 'a';",
            )
            .expect("app");
        let q = "SELECT rowid, k, v FROM t ORDER BY k";
        let before = rows(&origin, q);
        a.apply_batch(&captured(&origin).into_iter().map(own).collect::<Vec<_>>())
            .expect("apply");
        assert_eq!(rows(&origin, q), before);
        // A foreign update keeps the rowid too.
        a.apply_batch(&[incoming(ev(
            Op::Update,
            "t",
            vec![("k", text("b")), ("v", text("w"))],
        ))])
        .expect("apply");
        assert_eq!(
            rows(&origin, "SELECT rowid FROM t WHERE k = 'b'"),
            [vec![Value::Integer(20)]]
        );
    }

    /// Finding 7: after ALTER TABLE ADD COLUMN (capture not yet reinstalled), an event lacking
    /// the new column leaves it alone.
    #[test]
    fn columns_an_event_lacks_are_left_alone() {
        let (_d, origin, mut a) = setup("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
        let before = watched_tables(&Connection::open(&origin).expect("open")).expect("tables");
        let app = Connection::open(&origin).expect("app");
        app.execute_batch(
            "ALTER TABLE t ADD COLUMN extra TEXT; INSERT INTO t VALUES (1, 'a', 'kept');",
        )
        .expect("app");
        let events = captured_as(&origin, before);
        assert_eq!(
            events[0].row.len(),
            2,
            "old triggers do not know the column"
        );
        a.apply_batch(&events.iter().cloned().map(own).collect::<Vec<_>>())
            .expect("apply");
        a.apply_batch(&[incoming(ev(
            Op::Update,
            "t",
            vec![("id", Value::Integer(1)), ("v", text("b"))],
        ))])
        .expect("apply");
        assert_eq!(
            rows(&origin, "SELECT v, extra FROM t"),
            [vec![text("b"), text("kept")]]
        );
    }

    /// Table `t` with row 1 written 'a' then 'b' by the application (neither change has come
    /// back yet); returns the events captured after the first write.
    fn row_written_twice() -> (
        tempfile::TempDir,
        std::path::PathBuf,
        Applier,
        Vec<ChangeEvent>,
    ) {
        let (d, origin, a) = setup("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
        let app = Connection::open(&origin).expect("app");
        app.execute_batch("INSERT INTO t VALUES (1, 'a')")
            .expect("app");
        let first = captured(&origin);
        app.execute_batch("UPDATE t SET v = 'b' WHERE id = 1")
            .expect("app");
        (d, origin, a, first)
    }

    /// An acknowledged change of ours whose event can no longer come back (a gap skipped, a
    /// stream recreated) stops holding its row once forgotten: later events of the row apply.
    #[test]
    fn forgotten_landings_stop_holding_their_rows() {
        let (_d, origin, mut a) = setup("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
        let app = Connection::open(&origin).expect("app");
        app.execute_batch("INSERT INTO t VALUES (1, 'mine')")
            .expect("app");
        let log_id = captured(&origin)[0].id;
        let newer = || {
            incoming(ev(
                Op::Update,
                "t",
                vec![("id", Value::Integer(1)), ("v", text("newer"))],
            ))
        };
        assert_eq!(
            a.apply_batch(&[newer()]).expect("apply"),
            [Outcome::Superseded]
        );
        // Landed at sequence 20 of shard 1: not gone while the node is at 10, gone past it.
        a.forget_landed(&[(0, log_id, 1, 20)], |_, seq| seq <= 10);
        assert_eq!(
            a.apply_batch(&[newer()]).expect("apply"),
            [Outcome::Superseded]
        );
        a.forget_landed(&[(0, log_id, 1, 20)], |_, seq| seq <= 20);
        assert_eq!(
            a.apply_batch(&[newer()]).expect("apply"),
            [Outcome::Applied]
        );
        assert_eq!(rows(&origin, "SELECT v FROM t"), [vec![text("newer")]]);
    }

    /// I1: an event for a row with a newer local change in flight is skipped, whether it is an
    /// older event of ours or another node's.
    #[test]
    fn events_older_than_a_local_change_in_flight_are_skipped() {
        let (_d, origin, mut a, first) = row_written_twice();
        let out = a
            .apply_batch(&[
                own(first[0].clone()),
                incoming(ev(
                    Op::Update,
                    "t",
                    vec![("id", Value::Integer(1)), ("v", text("other"))],
                )),
            ])
            .expect("apply");
        assert_eq!(out, [Outcome::Superseded, Outcome::Superseded]);
        assert_eq!(rows(&origin, "SELECT v FROM t"), [vec![text("b")]]);
        // Our newer change comes back: the row is free for later events again.
        let all = captured(&origin);
        a.apply_batch(&[own(all[1].clone())]).expect("apply");
        assert_eq!(a.in_flight_len(), 0);
        a.apply_batch(&[incoming(ev(
            Op::Update,
            "t",
            vec![("id", Value::Integer(1)), ("v", text("later"))],
        ))])
        .expect("apply");
        assert_eq!(rows(&origin, "SELECT v FROM t"), [vec![text("later")]]);
    }

    /// Two rows that swapped UNIQUE values, the intermediate step missing here: each event alone
    /// conflicts with the other row's old value, so both are held; together they apply.
    #[test]
    fn held_events_waiting_for_each_other_apply_together() {
        let (_d, path, mut a) = setup(USERS);
        let user = |id: i64, email: &str| {
            incoming(ev(
                Op::Update,
                "users",
                vec![("id", Value::Integer(id)), ("email", text(email))],
            ))
        };
        a.apply_batch(&[user(1, "a"), user(2, "b")]).expect("apply");
        let out = a.apply_batch(&[user(1, "b"), user(2, "a")]).expect("apply");
        assert!(matches!(out[0], Outcome::Held(_)), "{out:?}");
        a.retry_held().expect("retry");
        assert_eq!(a.held_len(), 0);
        assert_eq!(
            rows(&path, "SELECT id, email FROM users ORDER BY id"),
            [
                vec![Value::Integer(1), text("b")],
                vec![Value::Integer(2), text("a")],
            ]
        );
        // A real conflict (a third row holds the value) stays held.
        a.apply_batch(&[user(3, "c")]).expect("apply");
        let out = a.apply_batch(&[user(1, "c"), user(2, "b")]).expect("apply");
        assert!(matches!(out[0], Outcome::Held(_)), "{out:?}");
        a.retry_held().expect("retry");
        assert_eq!(a.held_len(), 2, "row 3 still holds c, so row 1 keeps b");
        assert_eq!(
            rows(&path, "SELECT id, email FROM users ORDER BY id"),
            [
                vec![Value::Integer(1), text("b")],
                vec![Value::Integer(2), text("a")],
                vec![Value::Integer(3), text("c")],
            ]
        );
    }

    /// Pending changes of unknown publish status (captured before a restart, the stream no
    /// longer holding where they may have landed) still supersede our own older events: those
    /// would take the row back to an earlier value of ours. Another node's event is not held
    /// back by them.
    #[test]
    fn changes_of_unknown_status_supersede_older_own_events_only() {
        let (_d, origin, mut a, first) = row_written_twice();
        let all = captured(&origin);
        a.set_unknown_up_to(vec![all[1].id]).expect("unknown");
        assert_eq!(
            a.apply_batch(&[own(first[0].clone())]).expect("apply"),
            [Outcome::Superseded]
        );
        assert_eq!(rows(&origin, "SELECT v FROM t"), [vec![text("b")]]);
        assert_eq!(
            a.apply_batch(&[incoming(ev(
                Op::Update,
                "t",
                vec![("id", Value::Integer(1)), ("v", text("other"))],
            ))])
            .expect("apply"),
            [Outcome::Applied]
        );
        assert_eq!(rows(&origin, "SELECT v FROM t"), [vec![text("other")]]);
    }

    /// I6: own events coming back open no write transaction, so an application transaction that
    /// read before them can still write.
    #[test]
    fn own_events_do_not_break_deferred_application_transactions() {
        let (_d, origin, mut a) = setup("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
        let app = Connection::open(&origin).expect("app");
        app.execute_batch("INSERT INTO t VALUES (1, 'a'); INSERT INTO t VALUES (2, 'b');")
            .expect("app");
        let events = captured(&origin);
        app.execute_batch("BEGIN; SELECT * FROM t;").expect("read");
        let out = a
            .apply_batch(&events.into_iter().map(own).collect::<Vec<_>>())
            .expect("apply");
        assert!(out.iter().all(|o| *o == Outcome::Unchanged), "{out:?}");
        app.execute_batch("UPDATE t SET v = 'c' WHERE id = 1; COMMIT;")
            .expect("the application's upgrade to writer must not fail");
    }

    fn count(path: &std::path::Path, sql: &str) -> i64 {
        Connection::open(path)
            .expect("open")
            .query_row(sql, [], |r| r.get(0))
            .expect(sql)
    }

    #[test]
    fn applies_without_recapturing() {
        let (_d, path, mut a) = setup("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)");
        let batch = [
            incoming(ev(
                Op::Insert,
                "t",
                vec![
                    ("id", Value::Integer(1)),
                    ("v", Value::Text(b"a\0b".to_vec())),
                ],
            )),
            incoming(ev(
                Op::Update,
                "T",
                vec![("ID", Value::Integer(1)), ("v", Value::Text(b"c".to_vec()))],
            )),
            incoming(ev(
                Op::Insert,
                "t",
                vec![("id", Value::Integer(2)), ("v", Value::Text(b"d".to_vec()))],
            )),
            incoming(ev(
                Op::Delete,
                "t",
                vec![("id", Value::Integer(2)), ("v", Value::Text(b"d".to_vec()))],
            )),
        ];
        let out = a.apply_batch(&batch).expect("applies");
        assert!(out.iter().all(|o| *o == Outcome::Applied), "{out:?}");
        assert_eq!(count(&path, "SELECT count(*) FROM t"), 1);
        assert_eq!(count(&path, "SELECT count(*) FROM t WHERE v = 'c'"), 1);
        assert_eq!(
            count(&path, "SELECT count(*) FROM __harmonylite__t_change_log"),
            0
        );
        assert_eq!(
            count(&path, "SELECT count(*) FROM __harmonylite__apply_guard"),
            0
        );
    }

    #[test]
    fn poison_is_quarantined_and_the_rest_applies() {
        let (_d, path, mut a) = setup("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)");
        // Sent with this node's schema: unknown names cannot be a newer schema, they are poison.
        a.set_schema_hashes(SchemaHashes {
            current: "h".into(),
            previous: String::new(),
        });
        let ev = |op, table, row| ChangeEvent {
            schema_hash: "h".into(),
            ..ev(op, table, row)
        };
        let batch = [
            incoming(ev(
                Op::Insert,
                "t; DROP TABLE t; --",
                vec![("id", Value::Integer(1))],
            )),
            incoming(ev(
                Op::Insert,
                "t",
                vec![("id", Value::Integer(1)), ("nope", Value::Null)],
            )),
            incoming(ev(
                Op::Insert,
                "t",
                vec![("id", Value::Integer(2)), ("v", Value::Null)],
            )),
            incoming(ev(
                Op::Insert,
                "t",
                vec![("id", Value::Text(b"x".to_vec())), ("v", Value::Null)],
            )),
            Incoming {
                stream: "s",
                seq: 9,
                event: Err("invalid CBOR".into()),
                own: false,
                raw: b"\xff",
            },
            incoming(ev(Op::Delete, "t", vec![("v", Value::Null)])),
            incoming(ev(
                Op::Insert,
                "t",
                vec![
                    ("id", Value::Integer(3)),
                    ("v", Value::Text(b"ok".to_vec())),
                ],
            )),
        ];
        let out = a.apply_batch(&batch).expect("batch commits");
        assert_eq!(out.last(), Some(&Outcome::Applied));
        assert_eq!(
            out.iter()
                .filter(|o| matches!(o, Outcome::Quarantined(_)))
                .count(),
            6,
            "{out:?}"
        );
        assert_eq!(count(&path, "SELECT count(*) FROM t"), 1);
        assert_eq!(
            count(&path, "SELECT count(*) FROM __harmonylite__dead_letter"),
            6
        );
        assert_eq!(
            count(&path, "SELECT count(*) FROM sqlite_schema WHERE name = 't'"),
            1
        );
    }

    /// Reinstalls capture for the current schema and starts a new applier, as the node does
    /// after DDL.
    fn reinstalled(path: &std::path::Path, current: &str, previous: &str) -> Applier {
        let mut conn = crate::db::open(path).expect("open");
        let tables = watched_tables(&conn).expect("tables");
        cdc::install(&mut conn, &tables, current).expect("install");
        let log = Arc::new(ChangeLog::new(tables));
        let mut a = Applier::new(conn, log, vec![0], true).expect("applier");
        a.set_schema_hashes(SchemaHashes {
            current: current.into(),
            previous: previous.into(),
        });
        a
    }

    #[test]
    fn events_of_a_newer_schema_wait_in_row_order_and_apply_once_it_is_here() {
        let (_d, path, mut a) = setup("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
        a.set_schema_hashes(SchemaHashes {
            current: "h".into(),
            previous: String::new(),
        });
        let newer = |op, table, row| ChangeEvent {
            schema_hash: "h2".into(),
            ..ev(op, table, row)
        };
        let text = |s: &str| Value::Text(s.as_bytes().to_vec());
        let batch = [
            incoming(newer(
                Op::Insert,
                "t",
                vec![
                    ("id", Value::Integer(1)),
                    ("v", text("a")),
                    ("rating", Value::Integer(5)),
                ],
            )),
            // Applicable, but behind the waiting event of its row.
            incoming(ev(
                Op::Update,
                "t",
                vec![("id", Value::Integer(1)), ("v", text("b"))],
            )),
            incoming(ev(
                Op::Insert,
                "t",
                vec![("id", Value::Integer(2)), ("v", text("c"))],
            )),
            incoming(newer(Op::Insert, "n", vec![("k", Value::Integer(1))])),
            // No hash at all (Go omits it on rows with times): may be newer too.
            incoming(ev(Op::Insert, "n", vec![("k", Value::Integer(2))])),
        ];
        let out = a.apply_batch(&batch).expect("batch commits");
        assert_eq!(out[2], Outcome::Applied, "{out:?}");
        assert_eq!(
            out.iter()
                .filter(|o| matches!(o, Outcome::Waiting(_)))
                .count(),
            4,
            "{out:?}"
        );
        assert_eq!(a.waiting_len(), 4);
        assert_eq!(count(&path, "SELECT count(*) FROM t"), 1);
        // Nothing is quarantined, and a restart keeps them waiting.
        assert_eq!(
            count(&path, "SELECT count(*) FROM __harmonylite__dead_letter"),
            0
        );
        drop(a);
        let mut a = reinstalled(&path, "h", "");
        assert_eq!(a.waiting_len(), 4);
        assert_eq!(a.retry_waiting().expect("retry"), 0);
        assert_eq!(a.waiting_len(), 4);
        // The migration reaches this node: they apply, in order.
        Connection::open(&path)
            .expect("app")
            .execute_batch(
                "ALTER TABLE t ADD COLUMN rating INTEGER; CREATE TABLE n (k INTEGER PRIMARY KEY);",
            )
            .expect("migration");
        let mut a = reinstalled(&path, "h2", "h");
        assert_eq!(a.retry_waiting().expect("retry"), 4);
        assert_eq!(a.waiting_len(), 0);
        let row: (String, i64) = Connection::open(&path)
            .expect("read")
            .query_row("SELECT v, rating FROM t WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .expect("row");
        assert_eq!(row, ("b".into(), 5));
        assert_eq!(count(&path, "SELECT count(*) FROM n"), 2);
        assert_eq!(
            count(&path, "SELECT count(*) FROM __harmonylite__held_events"),
            0
        );
        // Applied events are not captured again.
        assert_eq!(
            count(
                &path,
                "SELECT count(*) FROM __harmonylite___change_log_global"
            ),
            0
        );
    }

    #[test]
    fn a_constraint_the_senders_other_schema_lacks_waits_instead_of_quarantine() {
        let (_d, path, mut a) = setup("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)");
        a.set_schema_hashes(SchemaHashes {
            current: "h".into(),
            previous: String::new(),
        });
        let with = |sh: &str| ChangeEvent {
            schema_hash: sh.into(),
            ..ev(
                Op::Insert,
                "t",
                vec![("id", Value::Integer(1)), ("v", Value::Null)],
            )
        };
        let out = a
            .apply_batch(&[incoming(with("other")), incoming(with("h"))])
            .expect("batch commits");
        assert!(matches!(out[0], Outcome::Waiting(_)), "{out:?}");
        assert!(
            matches!(out[1], Outcome::Waiting(_)),
            "behind the waiting one: {out:?}"
        );
        let out = a
            .apply_batch(&[incoming(ChangeEvent {
                schema_hash: "h".into(),
                ..ev(
                    Op::Insert,
                    "t",
                    vec![("id", Value::Integer(2)), ("v", Value::Null)],
                )
            })])
            .expect("batch commits");
        assert!(matches!(out[0], Outcome::Quarantined(_)), "{out:?}");
        assert_eq!(
            count(&path, "SELECT count(*) FROM __harmonylite__dead_letter"),
            1
        );
    }

    #[test]
    fn columns_this_node_dropped_are_ignored_in_older_events() {
        let (_d, path, _a) = setup("CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, b TEXT)");
        Connection::open(&path)
            .expect("app")
            .execute_batch(
                "BEGIN; CREATE TABLE n (id INTEGER PRIMARY KEY, a TEXT); INSERT INTO n SELECT id, a FROM t;
                 DROP TABLE t; ALTER TABLE n RENAME TO t; COMMIT;",
            )
            .expect("rebuild without b");
        let mut a = reinstalled(&path, "h2", "");
        let out = a
            .apply_batch(&[incoming(ChangeEvent {
                schema_hash: "h0".into(),
                ..ev(
                    Op::Insert,
                    "t",
                    vec![
                        ("id", Value::Integer(1)),
                        ("a", Value::Text(b"x".to_vec())),
                        ("b", Value::Text(b"y".to_vec())),
                    ],
                )
            })])
            .expect("batch commits");
        assert_eq!(out, [Outcome::Applied]);
        assert_eq!(count(&path, "SELECT count(*) FROM t WHERE a = 'x'"), 1);
    }

    #[test]
    fn events_under_names_this_node_renamed_or_dropped() {
        let (_d, path, _a) = setup(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT); CREATE TABLE gone (id INTEGER PRIMARY KEY)",
        );
        Connection::open(&path)
            .expect("app")
            .execute_batch(
                "ALTER TABLE t RENAME COLUMN a TO b; ALTER TABLE t RENAME TO u; DROP TABLE gone;",
            )
            .expect("DDL");
        let mut a = reinstalled(&path, "h2", "h");
        let old = |op, table, row| ChangeEvent {
            schema_hash: "h".into(),
            ..ev(op, table, row)
        };
        let batch = [
            incoming(old(
                Op::Insert,
                "t",
                vec![("id", Value::Integer(1)), ("a", Value::Text(b"x".to_vec()))],
            )),
            incoming(old(Op::Insert, "gone", vec![("id", Value::Integer(1))])),
        ];
        let out = a.apply_batch(&batch).expect("batch commits");
        assert_eq!(out[0], Outcome::Applied, "{out:?}");
        assert!(matches!(out[1], Outcome::Discarded(_)), "{out:?}");
        let b: String = Connection::open(&path)
            .expect("read")
            .query_row("SELECT b FROM u WHERE id = 1", [], |r| r.get(0))
            .expect("row");
        assert_eq!(b, "x");
    }

    #[test]
    fn rowid_and_composite_keys() {
        let (_d, path, mut a) = setup(
            "CREATE TABLE r (v TEXT); CREATE TABLE c (a TEXT, b INTEGER, v, PRIMARY KEY (a, b))",
        );
        let batch = [
            incoming(ev(
                Op::Insert,
                "r",
                vec![
                    ("v", Value::Text(b"x".to_vec())),
                    ("rowid", Value::Integer(7)),
                ],
            )),
            incoming(ev(
                Op::Insert,
                "c",
                vec![
                    ("a", Value::Text(b"k".to_vec())),
                    ("b", Value::Integer(1)),
                    ("v", Value::Integer(1)),
                ],
            )),
            incoming(ev(
                Op::Insert,
                "c",
                vec![
                    ("a", Value::Text(b"k".to_vec())),
                    ("b", Value::Integer(2)),
                    ("v", Value::Integer(2)),
                ],
            )),
            incoming(ev(
                Op::Delete,
                "c",
                vec![("a", Value::Text(b"k".to_vec())), ("b", Value::Integer(1))],
            )),
        ];
        a.apply_batch(&batch).expect("applies");
        assert_eq!(count(&path, "SELECT rowid FROM r WHERE v = 'x'"), 7);
        assert_eq!(count(&path, "SELECT b FROM c"), 2);
        let del = [incoming(ev(
            Op::Delete,
            "r",
            vec![("rowid", Value::Integer(7))],
        ))];
        a.apply_batch(&del).expect("applies");
        assert_eq!(count(&path, "SELECT count(*) FROM r"), 0);
    }

    #[test]
    fn table_dropped_while_running_is_poison_not_a_stall() {
        let (_d, path, mut a) = setup(
            "CREATE TABLE t (id INTEGER PRIMARY KEY); CREATE TABLE u (id INTEGER PRIMARY KEY)",
        );
        Connection::open(&path)
            .expect("app")
            .execute_batch("DROP TABLE t")
            .expect("drop");
        let batch = [
            incoming(ev(Op::Insert, "t", vec![("id", Value::Integer(1))])),
            incoming(ev(Op::Insert, "u", vec![("id", Value::Integer(1))])),
        ];
        let out = a.apply_batch(&batch).expect("batch commits");
        assert!(matches!(out[0], Outcome::Quarantined(_)), "{out:?}");
        assert_eq!(out[1], Outcome::Applied);
    }

    #[test]
    fn busy_database_rolls_back_the_whole_batch() {
        let (_d, path, mut a) = setup("CREATE TABLE t (id INTEGER PRIMARY KEY)");
        a.conn
            .busy_timeout(std::time::Duration::from_millis(10))
            .expect("timeout");
        let blocker = Connection::open(&path).expect("blocker");
        blocker.execute_batch("BEGIN IMMEDIATE").expect("lock");
        let batch = [incoming(ev(
            Op::Insert,
            "t",
            vec![("id", Value::Integer(1))],
        ))];
        assert!(a.apply_batch(&batch).is_err());
        blocker.execute_batch("COMMIT").expect("unlock");
        assert_eq!(
            a.apply_batch(&batch).expect("retry works"),
            [Outcome::Applied]
        );
    }

    /// A snapshot file holding `rows` of table `t (id INTEGER PRIMARY KEY, v TEXT)`.
    fn snapshot_of(dir: &std::path::Path, rows: &[(i64, &str)]) -> std::path::PathBuf {
        let path = dir.join("snapshot.db");
        let conn = Connection::open(&path).expect("snapshot");
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
            .expect("schema");
        for (id, v) in rows {
            conn.execute("INSERT INTO t VALUES (?1, ?2)", rusqlite::params![id, v])
                .expect("row");
        }
        path
    }

    /// A new node (empty tables) takes the snapshot's rows as they are, rowids included, and
    /// nothing it restores is captured.
    #[test]
    fn restore_into_empty_tables_copies_every_row() {
        let (d, path, mut a) = setup("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
        let snap = snapshot_of(d.path(), &[(3, "c"), (1, "a"), (7, "g")]);
        let out = a
            .restore_snapshot(&snap, &["s".into()], &[10], &Default::default())
            .expect("restore");
        assert_eq!((out.inserted, out.deleted, out.updated), (3, 0, 0));
        assert_eq!(
            rows(&path, "SELECT id, v FROM t ORDER BY id"),
            [
                vec![Value::Integer(1), text("a")],
                vec![Value::Integer(3), text("c")],
                vec![Value::Integer(7), text("g")],
            ]
        );
        assert!(captured(&path).is_empty());
        // Capture is in place again (the fast copy drops and recreates the triggers).
        let app = Connection::open(&path).expect("app");
        app.execute_batch("UPDATE t SET v = 'x' WHERE id = 3; DELETE FROM t WHERE id = 1")
            .expect("app");
        let ops: Vec<Op> = captured(&path).into_iter().map(|e| e.op).collect();
        assert_eq!(ops, [Op::Update, Op::Delete]);
    }

    /// A node behind on a migration does not restore a snapshot of a node ahead of it (a new
    /// table, a new column): nothing changes, and it says what it waits for. Right after its
    /// own migration the same snapshot restores, and what its application wrote meanwhile is
    /// kept.
    #[test]
    fn restore_while_behind_on_a_migration_waits_for_it_and_loses_nothing() {
        let (d, path, mut a) = setup("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
        let snap = d.path().join("snapshot.db");
        Connection::open(&snap)
            .expect("snapshot")
            .execute_batch(
                "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, note TEXT);
                 INSERT INTO t VALUES (1, 'a', 'n1'), (2, 'b', NULL), (3, 'c', 'n3');
                 CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT);
                 INSERT INTO notes VALUES (1, 'x'), (2, 'y');
                 CREATE TABLE __harmonylite__internal (k);
                 CREATE VIRTUAL TABLE docs USING fts5(body); INSERT INTO docs VALUES ('never');",
            )
            .expect("snapshot rows");
        let refused = a.restore_snapshot(&snap, &["s".into()], &[10], &Default::default());
        match refused {
            Err(Error::Behind(parts)) => {
                assert_eq!(parts, ["column \"note\" of table \"t\"", "table \"notes\""])
            }
            other => panic!("expected a wait for the migration, got {other:?}"),
        }
        assert_eq!(count(&path, "SELECT count(*) FROM t"), 0);
        assert_eq!(a.state.applied[0], 0, "the positions did not move");
        drop(a);
        // The migration runs here; the application writes the new column at once.
        Connection::open(&path)
            .expect("app")
            .execute_batch(
                "ALTER TABLE t ADD COLUMN note TEXT; INSERT INTO t VALUES (3, 'c', 'mine');
                 CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT);
                 CREATE VIRTUAL TABLE docs USING fts5(body);",
            )
            .expect("migration");
        let mut a = reinstalled(&path, "h2", "h");
        let out = a
            .restore_snapshot(&snap, &["s".into()], &[10], &Default::default())
            .expect("restore after the migration");
        assert_eq!(a.state.applied[0], 10);
        assert_eq!(
            rows(&path, "SELECT id, note FROM t ORDER BY id"),
            [
                vec![Value::Integer(1), text("n1")],
                vec![Value::Integer(2), Value::Null],
                vec![Value::Integer(3), text("mine")],
            ]
        );
        assert_eq!(out.kept, 1, "{out:?}");
        assert_eq!(count(&path, "SELECT count(*) FROM notes"), 2);
    }

    /// A database without any application table (a new node, an empty file) is not behind on
    /// a migration: it takes the snapshot whole, schema included, and captures none of it.
    #[test]
    fn restore_into_a_database_without_tables_takes_the_schema_too() {
        let (d, path, mut a) = setup("");
        let snap = d.path().join("snapshot.db");
        Connection::open(&snap)
            .expect("snapshot")
            .execute_batch(
                "CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT UNIQUE);
                 INSERT INTO t (v) VALUES ('a'), ('b');
                 CREATE INDEX t_v ON t(v);
                 CREATE TABLE log (msg TEXT);
                 CREATE TRIGGER t_log AFTER INSERT ON t BEGIN INSERT INTO log VALUES (new.v); END;
                 CREATE VIEW vt AS SELECT v FROM t;",
            )
            .expect("snapshot rows");
        let out = a
            .restore_snapshot(&snap, &["s".into()], &[10], &Default::default())
            .expect("restore");
        assert_eq!(out.inserted, 2, "{out:?}");
        assert_eq!(
            rows(&path, "SELECT id, v FROM t ORDER BY id"),
            [
                vec![Value::Integer(1), text("a")],
                vec![Value::Integer(2), text("b")],
            ]
        );
        assert_eq!(
            count(&path, "SELECT count(*) FROM log"),
            0,
            "no trigger fired"
        );
        assert_eq!(count(&path, "SELECT count(*) FROM vt"), 2);
        assert_eq!(
            count(&path, "SELECT seq FROM sqlite_sequence WHERE name = 't'"),
            2
        );
        assert!(captured(&path).is_empty());
        assert_eq!(a.state.applied[0], 10);
        // Installing capture for the new schema (as the schema watcher does) publishes none of
        // the cluster's rows as this node's; the application's next write is captured.
        drop(a);
        let _a = reinstalled(&path, "h2", "h");
        assert!(captured(&path).is_empty());
        Connection::open(&path)
            .expect("app")
            .execute_batch("UPDATE t SET v = 'z' WHERE id = 1")
            .expect("app write");
        let ops: Vec<Op> = captured(&path).into_iter().map(|e| e.op).collect();
        assert_eq!(ops, [Op::Update]);
    }

    /// A snapshot of a node that has not run this node's renames yet is restored under the
    /// new names (its rows are not skipped as "no such table").
    #[test]
    fn restore_of_a_snapshot_with_old_names_follows_local_renames() {
        let (d, path, a) = setup("CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT)");
        drop(a);
        Connection::open(&path)
            .expect("app")
            .execute_batch("ALTER TABLE t RENAME COLUMN a TO b; ALTER TABLE t RENAME TO u;")
            .expect("renames");
        let mut a = reinstalled(&path, "h2", "h");
        // A row the snapshot has newer, and one it no longer has.
        for (id, v) in [(1, "old"), (3, "gone")] {
            a.apply_batch(&[incoming(ev(
                Op::Insert,
                "u",
                vec![("id", Value::Integer(id)), ("b", text(v))],
            ))])
            .expect("apply");
        }
        let snap = d.path().join("snapshot.db");
        Connection::open(&snap)
            .expect("snapshot")
            .execute_batch(
                "CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT);
                 INSERT INTO t VALUES (1, 'x'), (2, 'y');",
            )
            .expect("snapshot rows");
        let out = a
            .restore_snapshot(&snap, &["s".into()], &[10], &Default::default())
            .expect("restore");
        assert!(out.skipped.is_empty(), "{out:?}");
        assert_eq!(
            rows(&path, "SELECT id, b FROM u ORDER BY id"),
            [
                vec![Value::Integer(1), text("x")],
                vec![Value::Integer(2), text("y")],
            ]
        );
    }

    /// A table keyed by bare rowid keeps the snapshot's rowids (the fast copy could renumber
    /// them, so it is not used there).
    #[test]
    fn restore_into_an_empty_rowid_table_keeps_rowids() {
        let (d, path, mut a) = setup("CREATE TABLE t (id INTEGER, v TEXT)");
        let snap = d.path().join("snapshot.db");
        let conn = Connection::open(&snap).expect("snapshot");
        conn.execute_batch(
            "CREATE TABLE t (id INTEGER, v TEXT);
             INSERT INTO t (rowid, id, v) VALUES (5, 1, 'a'), (9, 2, 'b');",
        )
        .expect("snapshot rows");
        drop(conn);
        a.restore_snapshot(&snap, &["s".into()], &[10], &Default::default())
            .expect("restore");
        assert_eq!(
            rows(&path, "SELECT rowid, id, v FROM t ORDER BY rowid"),
            [
                vec![Value::Integer(5), Value::Integer(1), text("a")],
                vec![Value::Integer(9), Value::Integer(2), text("b")],
            ]
        );
    }

    /// A local delete still in flight survives a restore into a table it left empty: the
    /// snapshot's older copy of the row must not come back.
    #[test]
    fn restore_keeps_a_local_delete_in_flight_in_an_empty_table() {
        let (d, path, mut a) = setup("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
        let app = Connection::open(&path).expect("app");
        app.execute_batch("INSERT INTO t VALUES (1, 'a'); DELETE FROM t WHERE id = 1")
            .expect("app");
        let snap = snapshot_of(d.path(), &[(1, "a"), (2, "b")]);
        a.restore_snapshot(&snap, &["s".into()], &[10], &Default::default())
            .expect("restore");
        assert_eq!(
            rows(&path, "SELECT id, v FROM t ORDER BY id"),
            [vec![Value::Integer(2), text("b")]]
        );
    }

    /// A populated table is merged: rows the snapshot lacks go, differing rows are updated,
    /// missing rows come in, and a row with a local change in flight is left as it is.
    #[test]
    fn restore_merges_into_populated_tables() {
        let (d, path, mut a) = setup("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
        // Rows that arrived from the stream earlier (applied, not captured).
        let arrived: Vec<Incoming<'static>> = [(1, "old"), (2, "gone"), (5, "same")]
            .iter()
            .map(|&(id, v)| {
                incoming(ev(
                    Op::Insert,
                    "t",
                    vec![("id", Value::Integer(id)), ("v", text(v))],
                ))
            })
            .collect();
        a.apply_batch(&arrived).expect("apply");
        let app = Connection::open(&path).expect("app");
        app.execute_batch("INSERT INTO t VALUES (9, 'mine')")
            .expect("app");
        let snap = snapshot_of(d.path(), &[(1, "new"), (3, "c"), (5, "same")]);
        let out = a
            .restore_snapshot(&snap, &["s".into()], &[10], &Default::default())
            .expect("restore");
        assert_eq!(
            (out.deleted, out.updated, out.inserted, out.kept),
            (1, 1, 1, 1)
        );
        assert_eq!(
            rows(&path, "SELECT id, v FROM t ORDER BY id"),
            [
                vec![Value::Integer(1), text("new")],
                vec![Value::Integer(3), text("c")],
                vec![Value::Integer(5), text("same")],
                vec![Value::Integer(9), text("mine")],
            ]
        );
    }

    /// The UNIQUE fallback of a merge (rows that swapped values) skips only rows clashing with
    /// a kept row: a snapshot row this schema refuses for another reason (a CHECK the snapshot's
    /// node lacks) fails the whole restore, which changes nothing, instead of vanishing.
    #[test]
    fn restore_fallback_for_swapped_unique_values_fails_on_other_constraints() {
        let schema =
            "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT UNIQUE, n INTEGER CHECK (n > 0))";
        let (d, path, mut a) = setup(schema);
        let arrived: Vec<Incoming<'static>> = [(1, "a"), (2, "b")]
            .iter()
            .map(|&(id, v)| {
                incoming(ev(
                    Op::Insert,
                    "t",
                    vec![
                        ("id", Value::Integer(id)),
                        ("v", text(v)),
                        ("n", Value::Integer(1)),
                    ],
                ))
            })
            .collect();
        a.apply_batch(&arrived).expect("apply");
        let snapshot = |name: &str, rows: &str| {
            let file = d.path().join(name);
            let conn = Connection::open(&file).expect("snapshot");
            conn.execute_batch(&format!(
                "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT UNIQUE, n INTEGER); INSERT INTO t VALUES {rows}"
            ))
            .expect("snapshot rows");
            file
        };
        let before = rows(&path, "SELECT id, v, n FROM t ORDER BY id");
        let bad = snapshot("bad.db", "(1, 'b', 1), (2, 'a', 1), (3, 'c', -5)");
        let refused = a.restore_snapshot(&bad, &["s".into()], &[10], &Default::default());
        assert!(refused.is_err(), "{refused:?}");
        assert_eq!(rows(&path, "SELECT id, v, n FROM t ORDER BY id"), before);
        // The same swap without the offending row goes through the fallback.
        let good = snapshot("good.db", "(1, 'b', 1), (2, 'a', 1), (3, 'c', 5)");
        a.restore_snapshot(&good, &["s".into()], &[10], &Default::default())
            .expect("restore");
        assert_eq!(
            rows(&path, "SELECT id, v FROM t ORDER BY id"),
            [
                vec![Value::Integer(1), text("b")],
                vec![Value::Integer(2), text("a")],
                vec![Value::Integer(3), text("c")],
            ]
        );
    }
}
