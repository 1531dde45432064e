//! Tests of restores through the applier: merges, waits for a migration, whole snapshots.

use super::*;

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

/// A table of the same name keyed otherwise in the snapshot (rowid here, WITHOUT ROWID there)
/// cannot be merged row by row: the node waits for its migration instead of failing inside
/// the merge on every attempt; once its table has the cluster's key, the snapshot restores.
#[test]
fn restore_of_a_table_keyed_otherwise_waits_for_the_migration() {
    let (d, path, mut a) = setup("CREATE TABLE wr (k TEXT, v INT)");
    let snap = d.path().join("snapshot.db");
    Connection::open(&snap)
        .expect("snapshot")
        .execute_batch(
            "CREATE TABLE wr (k TEXT PRIMARY KEY, v INT) WITHOUT ROWID;
                 INSERT INTO wr VALUES ('a', 1), ('b', 2);",
        )
        .expect("snapshot rows");
    match a.restore_snapshot(&snap, &["s".into()], &[10], &Default::default()) {
        Err(Error::Behind(parts)) => assert_eq!(parts, ["table \"wr\" keyed by (k)"]),
        other => panic!("expected a wait for the migration, got {other:?}"),
    }
    assert_eq!(a.state.applied[0], 0, "the positions did not move");
    drop(a);
    Connection::open(&path)
        .expect("app")
        .execute_batch("DROP TABLE wr; CREATE TABLE wr (k TEXT PRIMARY KEY, v INT) WITHOUT ROWID;")
        .expect("migration");
    let mut a = reinstalled(&path, "h2", "h");
    a.restore_snapshot(&snap, &["s".into()], &[10], &Default::default())
        .expect("restore after the migration");
    assert_eq!(count(&path, "SELECT count(*) FROM wr"), 2);
}

/// A database without any application table (a new node, an empty file) is not behind on
/// a migration: it takes the snapshot whole, schema included, and captures none of it.
#[test]
fn restore_into_a_database_without_tables_takes_the_schema_too() {
    // A view of its own does not make a database one with tables; it is kept.
    let (d, path, mut a) = setup("CREATE VIEW vt AS SELECT 'mine' AS v");
    let snap = d.path().join("snapshot.db");
    Connection::open(&snap)
        .expect("snapshot")
        .execute_batch(
            "CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT UNIQUE);
                 INSERT INTO t (v) VALUES ('a'), ('b'), ('c'); DELETE FROM t WHERE v = 'c';
                 CREATE INDEX t_v ON t(v);
                 CREATE TABLE bare (k TEXT, g AS (upper(k)));
                 INSERT INTO bare (k) VALUES ('r1'), ('r2'), ('r3'), ('r4');
                 DELETE FROM bare WHERE k IN ('r1', 'r2');
                 PRAGMA user_version = 7;
                 CREATE TABLE log (msg TEXT);
                 CREATE TRIGGER t_log AFTER INSERT ON t BEGIN INSERT INTO log VALUES (new.v); END;
                 CREATE VIEW vt AS SELECT v FROM t;",
        )
        .expect("snapshot rows");
    let out = a
        .restore_snapshot(&snap, &["s".into()], &[10], &Default::default())
        .expect("restore");
    assert_eq!(out.inserted, 4, "{out:?}");
    // Rowids kept (the cluster's later changes of `bare` find rows by rowid), deleted
    // AUTOINCREMENT ids not handed out again, the application's schema version carried.
    assert_eq!(
        rows(&path, "SELECT rowid, k, g FROM bare ORDER BY rowid"),
        [
            vec![Value::Integer(3), text("r3"), text("R3")],
            vec![Value::Integer(4), text("r4"), text("R4")],
        ]
    );
    assert_eq!(
        count(
            &path,
            "SELECT count(*) FROM sqlite_sequence WHERE name = 't' AND seq = 3"
        ),
        1
    );
    assert_eq!(count(&path, "PRAGMA user_version"), 7);
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
    assert_eq!(count(&path, "SELECT count(*) FROM vt WHERE v = 'mine'"), 1);
    assert_eq!(
        count(&path, "SELECT seq FROM sqlite_sequence WHERE name = 't'"),
        3
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

/// Issue 24: a local insert in flight keeps its row over the snapshot's row of the same key —
/// another node's, which this node never saw (two nodes took the same auto id) and which the
/// insert will overwrite everywhere. The snapshot's row is kept in the conflicts table; a
/// local update in flight of a row the snapshot has is the ordinary case and is not.
#[test]
fn restore_keeps_the_snapshot_row_a_local_insert_overwrites_as_a_conflict() {
    let (d, path, mut a) = setup("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
    a.apply_batch(&[incoming(ev(
        Op::Insert,
        "t",
        vec![("id", Value::Integer(1)), ("v", text("old"))],
    ))])
    .expect("apply");
    let app = Connection::open(&path).expect("app");
    app.execute_batch("INSERT INTO t VALUES (9, 'mine'); UPDATE t SET v = 'edited' WHERE id = 1")
        .expect("app");
    let snap = snapshot_of(d.path(), &[(1, "old"), (9, "theirs")]);
    let out = a
        .restore_snapshot(&snap, &["s".into()], &[10], &Default::default())
        .expect("restore");
    assert_eq!(out.kept, 2);
    assert_eq!(
        rows(&path, "SELECT id, v FROM t ORDER BY id"),
        [
            vec![Value::Integer(1), text("edited")],
            vec![Value::Integer(9), text("mine")],
        ]
    );
    assert_eq!(
        rows(
            &path,
            "SELECT table_name, kind, lost_row, stream FROM __harmonylite__conflicts"
        ),
        [vec![
            text("t"),
            text("insert"),
            text(r#"{"id":9,"v":"theirs"}"#),
            text("snapshot")
        ]]
    );
}

/// The UNIQUE fallback of a merge (rows that swapped values) skips only rows clashing with
/// a kept row: a snapshot row this schema refuses for another reason (a CHECK the snapshot's
/// node lacks) fails the whole restore, which changes nothing, instead of vanishing.
#[test]
fn restore_fallback_for_swapped_unique_values_fails_on_other_constraints() {
    let schema = "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT UNIQUE, n INTEGER CHECK (n > 0))";
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
