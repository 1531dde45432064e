//! Tests of the applier: whole batches against a real database with capture installed.

use super::*;
use crate::db::cdc;
use crate::db::changelog::value_at;
use crate::db::schema::watched_tables;
use crate::db::testutil::temp_db;
use crate::wire::{Op, Value};

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
        from_node: Some(2),
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

/// Another node's event of table `t` lost to a local change in flight.
fn overruled(kind: &str) -> Outcome {
    Outcome::Overruled {
        table: "t".into(),
        kind: kind.into(),
    }
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
        [overruled("update")]
    );
    // Landed at sequence 20 of shard 1: not gone while the node is at 10, gone past it.
    a.forget_landed(&[(0, log_id, 1, 20)], |_, seq| seq <= 10);
    assert_eq!(
        a.apply_batch(&[newer()]).expect("apply"),
        [overruled("update")]
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
    assert_eq!(out, [Outcome::Superseded, overruled("update")]);
    assert_eq!(
        rows(
            &origin,
            "SELECT table_name, kind, lost_row FROM __harmonylite__conflicts"
        ),
        [vec![
            text("t"),
            text("update"),
            text(r#"{"id":1,"v":"other"}"#)
        ]],
        "the other node's image is kept; our own older event is not a conflict"
    );
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

/// Two nodes doing the same thing to a row at once lose nothing: another node's event that
/// would leave the row as this node's change in flight has it (the same values, or both
/// deleted) is superseded without a conflict record.
#[test]
fn concurrent_identical_changes_are_not_conflicts() {
    let (_d, origin, mut a, _) = row_written_twice();
    let same = ev(
        Op::Update,
        "t",
        vec![("id", Value::Integer(1)), ("v", text("b"))],
    );
    assert_eq!(
        a.apply_batch(&[incoming(same)]).expect("apply"),
        [Outcome::Superseded]
    );
    let app = Connection::open(&origin).expect("app");
    app.execute("DELETE FROM t WHERE id = 1", [])
        .expect("delete");
    let gone = ev(
        Op::Delete,
        "t",
        vec![("id", Value::Integer(1)), ("v", text("b"))],
    );
    assert_eq!(
        a.apply_batch(&[incoming(gone)]).expect("apply"),
        [Outcome::Superseded]
    );
    assert_eq!(
        count(&origin, "SELECT count(*) FROM __harmonylite__conflicts"),
        0
    );
}

/// Issue 24, finding 10: a change marked failed (too large to publish) never comes back, so
/// once marked it no longer holds its row: another node's later change applies.
#[test]
fn a_failed_change_releases_its_row() {
    let (_d, origin, mut a, _) = row_written_twice();
    let other = |v: &str| {
        incoming(ev(
            Op::Update,
            "t",
            vec![("id", Value::Integer(1)), ("v", text(v))],
        ))
    };
    assert_eq!(
        a.apply_batch(&[other("early")]).expect("apply"),
        [overruled("update")]
    );
    Connection::open(&origin)
        .expect("publisher")
        .execute_batch("UPDATE __harmonylite__t_change_log SET state = -1 WHERE id = 2")
        .expect("mark failed");
    assert_eq!(
        a.apply_batch(&[other("later")]).expect("apply"),
        [Outcome::Applied]
    );
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
        count(
            &path,
            "SELECT count(*) FROM __harmonylite___change_log_global"
        ),
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
            event: Err(crate::wire::DecodeError::MissingField("Payload")),
            own: false,
            from_node: None,
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
fn rowid_and_composite_keys() {
    let (_d, path, mut a) =
        setup("CREATE TABLE r (v TEXT); CREATE TABLE c (a TEXT, b INTEGER, v, PRIMARY KEY (a, b))");
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
    let (_d, path, mut a) =
        setup("CREATE TABLE t (id INTEGER PRIMARY KEY); CREATE TABLE u (id INTEGER PRIMARY KEY)");
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

mod keys;
mod replace;
mod restore;
mod schema;
mod triggers;
