//! Applying replicated events to the local database (upstream-behaviour §4.12, design §3.2, §3.5).
//!
//! A batch of events is applied in one write transaction: `BEGIN IMMEDIATE`, insert the guard row
//! (so our writes are not captured again), apply each event inside its own savepoint, delete the
//! guard row, `COMMIT`. An event that cannot be applied for a reason that will not go away
//! (unknown table or column, constraint violation, datatype mismatch) is rolled back to its
//! savepoint and recorded in `__harmonylite__dead_letter` in the same transaction, so the batch —
//! and replication — goes on. Any other failure (busy, I/O, disk full) rolls the whole batch back
//! and is returned, so the caller retries the same batch later: nothing is skipped.
//!
//! Invariants:
//! - Table and column names from the wire are looked up in the local schema and only the local,
//!   quoted spelling reaches SQL text (an injection attempt is just an unknown table).
//! - `insert` and `update` are a whole-row `INSERT OR REPLACE`; `delete` deletes by the local
//!   primary key (`IS ?`, so a NULL key matches as Go's `IS NULL` did).
//! - This connection runs `synchronous = FULL`: a batch is durable before the caller records its
//!   sequence in the seq map, so a power loss cannot leave the seq map ahead of the data.

use std::collections::HashMap;

use rusqlite::types::{ToSql, ToSqlOutput, ValueRef};
use rusqlite::{Connection, ErrorCode, TransactionBehavior};

use super::{DEAD_LETTER_TABLE, Error, GUARD_TABLE, Table, quote};
use crate::wire::{ChangeEvent, Op, Value};

/// One event to apply, with where it came from (for the dead-letter record).
#[derive(Debug)]
pub struct Incoming<'a> {
    pub stream: &'a str,
    pub seq: u64,
    /// The decoded event, or why it could not be decoded.
    pub event: Result<ChangeEvent, String>,
    /// The raw message body, kept for quarantine.
    pub raw: &'a [u8],
}

/// What happened to one event of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Recorded in the dead-letter table with this reason.
    Quarantined(String),
}

/// Applies events; owns its connection.
pub struct Applier {
    conn: Connection,
    tables: HashMap<String, Table>,
    /// Lower-cased name → exact name, for SQLite's case-insensitive table names.
    folded: HashMap<String, String>,
    /// (table, column indexes) → upsert SQL; avoids rebuilding SQL text per row.
    upsert_sql: HashMap<(String, Vec<usize>), String>,
    delete_sql: HashMap<String, String>,
}

struct Bind<'a>(&'a Value);

impl ToSql for Bind<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self.0 {
            Value::Null => ValueRef::Null,
            Value::Integer(i) => ValueRef::Integer(*i),
            Value::Real(f) => ValueRef::Real(*f),
            // Bound with an explicit length: NUL bytes and non-UTF-8 text survive.
            Value::Text(t) => ValueRef::Text(t),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

/// Why one event failed inside the transaction.
enum EventError {
    /// Will fail the same way every time: quarantine.
    Poison(String),
    /// Environment trouble: roll the batch back and retry it.
    Retry(rusqlite::Error),
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

impl Applier {
    /// Wraps an open connection (see [`crate::db::open`]) for the given watched tables.
    ///
    /// # Errors
    /// SQLite errors setting the connection up.
    pub fn new(conn: Connection, tables: &[Table]) -> Result<Applier, Error> {
        conn.execute_batch("PRAGMA synchronous = FULL")?;
        let folded = tables
            .iter()
            .map(|t| (t.name.to_lowercase(), t.name.clone()))
            .collect();
        Ok(Applier {
            conn,
            tables: tables.iter().map(|t| (t.name.clone(), t.clone())).collect(),
            folded,
            upsert_sql: HashMap::new(),
            delete_sql: HashMap::new(),
        })
    }

    /// Applies a batch in one transaction and returns one outcome per event.
    ///
    /// # Errors
    /// A failure that is not the event's fault (busy, I/O, full disk): the whole batch was rolled
    /// back and should be retried.
    pub fn apply_batch(&mut self, batch: &[Incoming<'_>]) -> Result<Vec<Outcome>, Error> {
        let mut outcomes = Vec::with_capacity(batch.len());
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.prepare_cached(&format!(
            "INSERT OR IGNORE INTO {} (id) VALUES (1)",
            quote(GUARD_TABLE)
        ))?
        .execute([])?;
        for incoming in batch {
            let result = match &incoming.event {
                Err(why) => Err(EventError::Poison(why.clone())),
                Ok(event) => {
                    // Cached statements: parsing these per event showed up in profiles.
                    tx.prepare_cached("SAVEPOINT ev")?.execute([])?;
                    let r = apply_one(
                        &tx,
                        &self.tables,
                        &self.folded,
                        &mut self.upsert_sql,
                        &mut self.delete_sql,
                        event,
                    );
                    if r.is_err() {
                        tx.prepare_cached("ROLLBACK TO ev")?.execute([])?;
                    }
                    tx.prepare_cached("RELEASE ev")?.execute([])?;
                    r
                }
            };
            match result {
                Ok(()) => outcomes.push(Outcome::Applied),
                Err(EventError::Retry(e)) => return Err(e.into()),
                Err(EventError::Poison(why)) => {
                    tx.prepare_cached(&format!(
                        "INSERT INTO {} (stream, seq, error, payload, created_at) \
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                        quote(DEAD_LETTER_TABLE)
                    ))?
                    .execute(rusqlite::params![
                        incoming.stream,
                        incoming.seq as i64,
                        why,
                        incoming.raw,
                        now_ms()
                    ])?;
                    outcomes.push(Outcome::Quarantined(why));
                }
            }
        }
        tx.prepare_cached(&format!("DELETE FROM {}", quote(GUARD_TABLE)))?
            .execute([])?;
        tx.commit()?;
        Ok(outcomes)
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn apply_one(
    conn: &Connection,
    tables: &HashMap<String, Table>,
    folded: &HashMap<String, String>,
    upsert_sql: &mut HashMap<(String, Vec<usize>), String>,
    delete_sql: &mut HashMap<String, String>,
    event: &ChangeEvent,
) -> Result<(), EventError> {
    let table = tables
        .get(&event.table)
        .or_else(|| {
            folded
                .get(&event.table.to_lowercase())
                .and_then(|n| tables.get(n))
        })
        .ok_or_else(|| {
            EventError::Poison(format!("no table mapping found for {:?}", event.table))
        })?;
    match event.op {
        Op::Insert | Op::Update => {
            let mut idxs = Vec::with_capacity(event.row.len());
            for (name, _) in &event.row {
                let idx = table.column_index(name).ok_or_else(|| {
                    EventError::Poison(format!("table {:?} has no column {name:?}", table.name))
                })?;
                idxs.push(idx);
            }
            let key = (table.name.clone(), idxs);
            let sql = upsert_sql.entry(key).or_insert_with_key(|(_, idxs)| {
                let cols: Vec<String> = idxs
                    .iter()
                    .map(|&i| quote(&table.columns[i].name))
                    .collect();
                let params: Vec<String> = (1..=idxs.len()).map(|i| format!("?{i}")).collect();
                format!(
                    "INSERT OR REPLACE INTO {} ({}) VALUES ({})",
                    quote(&table.name),
                    cols.join(", "),
                    params.join(", ")
                )
            });
            let mut stmt = conn.prepare_cached(sql).map_err(classify)?;
            let binds: Vec<Bind<'_>> = event.row.iter().map(|(_, v)| Bind(v)).collect();
            stmt.execute(rusqlite::params_from_iter(binds.iter()))
                .map_err(classify)?;
        }
        Op::Delete => {
            let pks = table.pk_indexes();
            let mut values = Vec::with_capacity(pks.len());
            for &i in &pks {
                let name = &table.columns[i].name;
                let v = event
                    .row
                    .iter()
                    .find(|(n, _)| n == name)
                    .or_else(|| event.row.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)))
                    .map(|(_, v)| v)
                    .ok_or_else(|| {
                        EventError::Poison(format!(
                            "delete on {:?} lacks primary key column {name:?}",
                            table.name
                        ))
                    })?;
                values.push(Bind(v));
            }
            let sql = delete_sql.entry(table.name.clone()).or_insert_with(|| {
                let conds: Vec<String> = pks
                    .iter()
                    .enumerate()
                    .map(|(n, &i)| format!("{} IS ?{}", quote(&table.columns[i].name), n + 1))
                    .collect();
                format!(
                    "DELETE FROM {} WHERE {}",
                    quote(&table.name),
                    conds.join(" AND ")
                )
            });
            conn.prepare_cached(sql)
                .map_err(classify)?
                .execute(rusqlite::params_from_iter(values.iter()))
                .map_err(classify)?;
        }
    }
    Ok(())
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
            raw: b"raw",
        }
    }

    fn setup(schema: &str) -> (tempfile::TempDir, std::path::PathBuf, Applier) {
        let (d, path) = temp_db(schema);
        let mut conn = crate::db::open(&path).expect("open");
        let tables = watched_tables(&conn).expect("tables");
        cdc::install(&mut conn, &tables, "h").expect("install");
        let applier = Applier::new(conn, &tables).expect("applier");
        (d, path, applier)
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
}
