//! Keys are identities (design §13, issue 24 findings 1 and 2): key values compare as bytes and
//! type in capture, apply and restore, never through a collation or numeric equality.

use super::*;

const NOCASE: &str = "CREATE TABLE t (k TEXT PRIMARY KEY COLLATE NOCASE, v TEXT)";
const UNTYPED: &str = "CREATE TABLE t (k PRIMARY KEY, v TEXT)";

fn write(path: &std::path::Path, sql: &str) {
    Connection::open(path)
        .expect("app")
        .execute_batch(sql)
        .expect(sql);
}

/// The events captured after the first `skip`.
fn captured_after(path: &std::path::Path, skip: usize) -> Vec<ChangeEvent> {
    captured(path).into_iter().skip(skip).collect()
}

/// Finding 1, origin side: re-spelling a key in one transaction (delete 'k1', insert 'K1'; or
/// 1.0 and 1) must not lose the row when the two events come back in the other order (they
/// travel on different shards).
#[test]
fn a_respelled_key_survives_its_own_events_in_any_order() {
    for (schema, old, new) in [(NOCASE, "'k1'", "'K1'"), (UNTYPED, "1.0", "1")] {
        let (_d, origin, mut a) = setup(schema);
        write(&origin, &format!("INSERT INTO t VALUES ({old}, 'a')"));
        let first = captured(&origin);
        a.apply_batch(&first.into_iter().map(own).collect::<Vec<_>>())
            .expect("own insert");
        write(
            &origin,
            &format!(
                "BEGIN; DELETE FROM t WHERE k = {old}; INSERT INTO t VALUES ({new}, 'b'); COMMIT"
            ),
        );
        let events = captured_after(&origin, 1);
        assert_eq!(
            events.iter().map(|e| e.op).collect::<Vec<_>>(),
            [Op::Delete, Op::Insert]
        );
        let reversed: Vec<_> = events.into_iter().rev().map(own).collect();
        a.apply_batch(&reversed).expect("apply");
        let want = rows(&origin, &format!("SELECT {new}, 'b'"));
        assert_eq!(rows(&origin, "SELECT k, v FROM t"), want, "{schema}");
    }
}

/// Origin and replica of `schema` holding row `old`; the origin runs `change` and its events
/// reach the replica in the other order (they may travel on different shards). The replica
/// must end equal to the origin, bytes and types, with nothing held. Returns the captured ops.
fn change_on_replica(schema: &str, old: &str, change: &str) -> Vec<Op> {
    let (_o, origin, _) = setup(schema);
    let (_r, replica, mut b) = setup(schema);
    write(&origin, &format!("INSERT INTO t VALUES ({old}, 'a')"));
    let first: Vec<_> = captured(&origin).into_iter().map(incoming).collect();
    b.apply_batch(&first).expect("first");
    write(&origin, change);
    let events = captured_after(&origin, 1);
    let ops = events.iter().map(|e| e.op).collect();
    for event in events.into_iter().rev() {
        b.apply_batch(&[incoming(event)]).expect("apply");
    }
    b.retry_held().expect("retry");
    let all = "SELECT k, v, typeof(k) FROM t";
    assert_eq!(
        rows(&replica, all),
        rows(&origin, all),
        "{schema}: {change}"
    );
    assert_eq!(b.held_len(), 0);
    ops
}

/// Finding 1, receiver side: the new spelling arrives before the old one's delete; it waits
/// for it (the two rows collide under the column's collation) and then applies.
#[test]
fn a_respelled_key_replaces_the_old_spelling_on_replicas() {
    for (schema, old, new) in [(NOCASE, "'k1'", "'K1'"), (UNTYPED, "1.0", "1")] {
        let change = format!(
            "BEGIN; DELETE FROM t WHERE k = {old}; INSERT INTO t VALUES ({new}, 'b'); COMMIT"
        );
        assert_eq!(
            change_on_replica(schema, old, &change),
            [Op::Delete, Op::Insert]
        );
    }
}

/// Finding 2: a key changed only in case or numeric type is a key change everywhere.
#[test]
fn a_key_changed_in_case_or_type_reaches_replicas() {
    for (schema, old, new) in [(NOCASE, "'u0'", "'U0'"), (UNTYPED, "1.0", "1")] {
        let change = format!("UPDATE t SET k = {new} WHERE k = {old}");
        assert_eq!(
            change_on_replica(schema, old, &change),
            [Op::Delete, Op::Update]
        );
    }
}

/// A restore matches rows by key bytes too: a local 'k1' the snapshot has as 'K1' takes the
/// snapshot's spelling.
#[test]
fn a_restore_takes_the_snapshots_spelling_of_a_key() {
    for (schema, old, new) in [(NOCASE, "'k1'", "'K1'"), (UNTYPED, "1.0", "1")] {
        let (d, path, mut a) = setup(schema);
        a.apply_batch(&[incoming(ev(
            Op::Insert,
            "t",
            vec![
                ("k", rows(&path, &format!("SELECT {old}"))[0][0].clone()),
                ("v", text("a")),
            ],
        ))])
        .expect("a row from another node");
        let snap = d.path().join("snapshot.db");
        write(
            &snap,
            &format!("{schema}; INSERT INTO t VALUES ({new}, 'b')"),
        );
        a.restore_snapshot(&snap, &["s".into()], &[10], &Default::default())
            .expect("restore");
        let want = rows(&snap, "SELECT k, v, typeof(k) FROM t");
        assert_eq!(
            rows(&path, "SELECT k, v, typeof(k) FROM t"),
            want,
            "{schema}"
        );
    }
}

/// Finding 5: two nodes take the same auto id at once. The stream orders B's insert first, so
/// A's (later) wins everywhere; B's row is not gone without a trace: A, whose change was in
/// flight when B's arrived, keeps it in `__harmonylite__conflicts`.
#[test]
fn two_nodes_taking_one_auto_id_keep_the_losing_row() {
    let schema = "CREATE TABLE people (id INTEGER PRIMARY KEY, email TEXT)";
    let (_a, node_a, mut a) = setup(schema);
    let (_b, node_b, mut b) = setup(schema);
    write(&node_a, "INSERT INTO people (email) VALUES ('a@x')");
    write(&node_b, "INSERT INTO people (email) VALUES ('b@x')");
    let (from_a, from_b) = (captured(&node_a), captured(&node_b));
    assert_eq!(from_a[0].row[0].1, from_b[0].row[0].1, "both took id 1");
    // Stream order: B's insert, then A's.
    let at_a = a
        .apply_batch(&[incoming(from_b[0].clone()), own(from_a[0].clone())])
        .expect("apply at A");
    assert_eq!(
        at_a,
        [
            Outcome::Overruled {
                table: "people".into(),
                kind: "insert".into()
            },
            Outcome::Unchanged
        ]
    );
    let at_b = b
        .apply_batch(&[own(from_b[0].clone()), incoming(from_a[0].clone())])
        .expect("apply at B");
    assert_eq!(at_b, [Outcome::Unchanged, Outcome::Applied]);
    let all = "SELECT id, email FROM people";
    assert_eq!(rows(&node_a, all), rows(&node_b, all));
    assert_eq!(
        rows(
            &node_a,
            "SELECT table_name, kind, lost_row, from_node FROM __harmonylite__conflicts"
        ),
        [vec![
            text("people"),
            text("insert"),
            text(r#"{"email":"b@x","id":1}"#),
            Value::Integer(2)
        ]]
    );
}
