//! Tests of events made under another schema: newer ones wait, renamed and dropped names are
//! followed.

use super::*;

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

/// Events for tables this node lacks wait only up to the cap: past it the batch fails
/// (nothing applied, nothing recorded, so the stream keeps the rest) until a migration here
/// lets the waiting ones apply.
#[test]
fn events_waiting_for_the_schema_are_capped() {
    let (_d, path, mut a) = setup("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
    a.set_schema_hashes(SchemaHashes {
        current: "h".into(),
        previous: String::new(),
    });
    a.set_waiting_cap(2);
    let unknown = |k: i64| {
        incoming(ChangeEvent {
            schema_hash: "h2".into(),
            ..ev(Op::Insert, "n", vec![("k", Value::Integer(k))])
        })
    };
    let known = || incoming(ev(Op::Insert, "t", vec![("id", Value::Integer(1))]));
    let out = a
        .apply_batch(&[unknown(1), unknown(2)])
        .expect("two may wait");
    assert!(
        out.iter().all(|o| matches!(o, Outcome::Waiting(_))),
        "{out:?}"
    );
    let err = a
        .apply_batch(&[known(), unknown(3)])
        .expect_err("a third may not");
    assert!(matches!(err, Error::WaitingFull(2)), "{err}");
    assert!(!err.is_fatal());
    assert_eq!(a.waiting_len(), 2);
    assert_eq!(
        count(&path, "SELECT count(*) FROM t"),
        0,
        "the batch rolled back"
    );
    assert_eq!(
        count(&path, "SELECT count(*) FROM __harmonylite__held_events"),
        2
    );
    // The migration: the waiting events apply, and so does the batch.
    let conn = rusqlite::Connection::open(&path).expect("open");
    conn.execute_batch("CREATE TABLE n (k INTEGER PRIMARY KEY)")
        .expect("migrate");
    let mut a = reinstalled(&path, "h2", "h");
    a.set_waiting_cap(2);
    assert_eq!(a.retry_waiting().expect("retry"), 2);
    let out = a.apply_batch(&[known(), unknown(3)]).expect("batch");
    assert_eq!(out, [Outcome::Applied, Outcome::Applied]);
    assert_eq!(count(&path, "SELECT count(*) FROM n"), 3);
}
