//! `INSERT OR REPLACE` / `UPDATE OR REPLACE` over a UNIQUE column (issue 24, finding 3): the
//! rows SQLite deletes for them (without delete triggers) are captured as deletes, and writes
//! that did not replace capture nothing extra.

use super::*;

const SCHEMA: &str = "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT UNIQUE, \
    handle TEXT, org INTEGER, UNIQUE (org, handle COLLATE NOCASE))";

const SEED: &str = "INSERT INTO users VALUES (0, 'u0@x', 'a', 1), (1, 'u1@x', 'b', 1), \
    (2, 'u2@x', 'c', 1), (3, 'u3@x', 'd', 1), (4, 'u4@x', 'e', 1)";

fn replica_of(origin: &std::path::Path) -> (tempfile::TempDir, std::path::PathBuf, Applier) {
    let (d, path, mut b) = setup(SCHEMA);
    b.apply_batch(
        &captured(origin)
            .into_iter()
            .map(incoming)
            .collect::<Vec<_>>(),
    )
    .expect("seed");
    (d, path, b)
}

const ALL: &str = "SELECT id, email, handle, org FROM users ORDER BY id";

#[test]
fn rows_replaced_through_unique_indexes_are_deleted_on_replicas() {
    let (_o, origin, _) = setup(SCHEMA);
    let app = Connection::open(&origin).expect("app");
    app.execute_batch(SEED).expect("seed");
    let (_r, replica, mut b) = replica_of(&origin);
    let seeded = captured(&origin).len();
    app.execute_batch(
        "INSERT OR REPLACE INTO users VALUES (100, 'u0@x', 'z', 2);
         UPDATE OR REPLACE users SET email = 'u1@x' WHERE id = 2;
         REPLACE INTO users VALUES (101, 'new@x', 'D', 1);
         INSERT OR IGNORE INTO users VALUES (102, 'u4@x', 'y', 3);
         INSERT INTO users VALUES (103, 'u4@x', 'x', 3) ON CONFLICT (email) DO NOTHING;
         INSERT INTO users VALUES (104, 'other@x', 'w', 3)
             ON CONFLICT (email) DO UPDATE SET handle = 'never';",
    )
    .expect("writes");
    assert!(
        app.execute("INSERT INTO users VALUES (105, 'u4@x', 'v', 3)", [])
            .is_err(),
        "a plain conflicting insert fails"
    );
    let events: Vec<ChangeEvent> = captured(&origin).into_iter().skip(seeded).collect();
    let ops: Vec<(Op, Value)> = events.iter().map(|e| (e.op, e.row[0].1.clone())).collect();
    use Value::Integer as I;
    assert_eq!(
        ops,
        [
            (Op::Delete, I(0)),
            (Op::Insert, I(100)),
            (Op::Delete, I(1)),
            (Op::Update, I(2)),
            (Op::Delete, I(3)),
            (Op::Insert, I(101)),
            (Op::Insert, I(104)),
        ],
        "one delete per replaced row, nothing for writes that did not replace"
    );
    // The shards may deliver them in any order: the replica converges either way.
    for event in events.into_iter().rev() {
        b.apply_batch(&[incoming(event)]).expect("apply");
    }
    b.retry_held().expect("retry");
    assert_eq!(rows(&replica, ALL), rows(&origin, ALL));
    assert_eq!(b.held_len(), 0);
    let left = "SELECT count(*) FROM __harmonylite__users_change_log WHERE state = -2";
    assert_eq!(count(&origin, left), 0);
    app.execute(
        "INSERT OR IGNORE INTO users VALUES (106, 'u4@x', 'u', 4)",
        [],
    )
    .expect("ignored write");
    assert_eq!(
        count(&origin, left),
        1,
        "an ignored write leaves its candidate"
    );
    assert_eq!(captured(&origin).len(), seeded + 7, "unpublished");
    app.execute("INSERT INTO users VALUES (107, 'last@x', 'u', 4)", [])
        .expect("write");
    assert_eq!(
        count(&origin, left),
        0,
        "the next write to the table drops it"
    );
}

/// A validation trigger that looks at other rows (`RAISE(ABORT)` when the parent is missing, or
/// when children remain) holds the event until the database changes, instead of quarantining it:
/// a transaction's rows may arrive on different shards in any order.
#[test]
fn validation_triggers_hold_events_until_the_rows_they_need_arrive() {
    let schema = "CREATE TABLE parent (id INTEGER PRIMARY KEY);
        CREATE TABLE child (id INTEGER PRIMARY KEY, parent INTEGER);
        CREATE TRIGGER child_chk BEFORE INSERT ON child
            WHEN NOT EXISTS (SELECT 1 FROM parent WHERE id = new.parent)
            BEGIN SELECT RAISE(ABORT, 'no parent'); END;
        CREATE TRIGGER parent_chk BEFORE DELETE ON parent
            WHEN EXISTS (SELECT 1 FROM child WHERE parent = old.id)
            BEGIN SELECT RAISE(ABORT, 'has children'); END;";
    let (_o, origin, _) = setup(schema);
    let (_r, replica, mut b) = setup(schema);
    let app = Connection::open(&origin).expect("app");
    app.execute_batch("INSERT INTO parent VALUES (1); INSERT INTO child VALUES (10, 1);")
        .expect("insert");
    let inserts = captured(&origin);
    app.execute_batch("DELETE FROM child WHERE id = 10; DELETE FROM parent WHERE id = 1;")
        .expect("delete");
    let deletes: Vec<ChangeEvent> = captured(&origin).into_iter().skip(2).collect();
    // Each pair arrives child-first and parent-first respectively (other shards).
    for event in inserts.into_iter().rev() {
        b.apply_batch(&[incoming(event)]).expect("apply");
    }
    assert_eq!(count(&replica, "SELECT count(*) FROM child"), 1);
    for event in deletes.into_iter().rev() {
        b.apply_batch(&[incoming(event)]).expect("apply");
    }
    b.retry_held().expect("retry");
    let all = "SELECT (SELECT count(*) FROM parent), (SELECT count(*) FROM child), \
               (SELECT count(*) FROM __harmonylite__dead_letter)";
    assert_eq!(
        rows(&replica, all),
        [vec![
            Value::Integer(0),
            Value::Integer(0),
            Value::Integer(0)
        ]]
    );
    assert_eq!(b.held_len(), 0);
}

/// `INSERT OR REPLACE` whose new key equals an old one only under the key's collation or
/// numeric comparison ('K1' for 'k1' under NOCASE, 1.0 for 1): the old row's delete is captured
/// too, so neither replicas nor the writer (whose own insert comes back) keep it.
#[test]
fn replacing_a_key_spelled_otherwise_deletes_the_old_spelling_everywhere() {
    let schema = "CREATE TABLE nc (k TEXT PRIMARY KEY COLLATE NOCASE, v);
        CREATE TABLE un (k PRIMARY KEY, v)";
    let (_o, origin, mut a) = setup(schema);
    let (_r, replica, mut b) = setup(schema);
    let app = Connection::open(&origin).expect("app");
    app.execute_batch("INSERT INTO nc VALUES ('k1', 1); INSERT INTO un VALUES (1, 1);")
        .expect("seed");
    let seed = captured(&origin);
    b.apply_batch(&seed.iter().cloned().map(incoming).collect::<Vec<_>>())
        .expect("seed");
    app.execute_batch(
        "INSERT OR REPLACE INTO nc VALUES ('K1', 2); INSERT OR REPLACE INTO un VALUES (1.0, 2);
         INSERT INTO nc VALUES ('k2', 1); INSERT OR REPLACE INTO nc VALUES ('K2', 2);
         DELETE FROM nc WHERE k = 'K2';",
    )
    .expect("replace");
    // Each key's events in order (one shard each), the keys in another order than captured:
    // 'K1' sorts before 'k1', so the new spelling arrives before the old one's delete.
    let mut all = captured(&origin);
    all.sort_by_key(|e| format!("{:?}", e.row[0].1));
    let seeded = |e: &ChangeEvent| seed.iter().any(|s| s.id == e.id && s.table == e.table);
    for event in all.iter().filter(|e| !seeded(e)) {
        b.apply_batch(&[incoming(event.clone())]).expect("apply");
    }
    b.retry_held().expect("retry");
    // The writer's own events come back in the same order.
    for event in all {
        a.apply_batch(&[own(event)]).expect("own");
    }
    let state =
        "SELECT 'nc', k, typeof(k), v FROM nc UNION ALL SELECT 'un', k, typeof(k), v FROM un";
    let want = rows(&origin, state);
    assert_eq!(want.len(), 2, "K1 and 1.0 only: {want:?}");
    assert_eq!(rows(&replica, state), want);
    assert_eq!(b.held_len(), 0);
}
