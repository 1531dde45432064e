//! Tests of application triggers on a node that applies (issue 24, finding 4): what they wrote
//! to replicated tables on the origin arrives as events and is not written twice; what they
//! keep locally (an FTS index) follows the applied rows.

use super::*;

/// Notes with a touch trigger (`version + 1` on every body change, `AFTER UPDATE OF`), an audit
/// trigger into an AUTOINCREMENT table, and an external-content FTS5 index kept by the
/// standard triggers.
const NOTES: &str = "
    CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT, version INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, note INTEGER, what TEXT);
    CREATE VIRTUAL TABLE notes_fts USING fts5(body, content='notes', content_rowid='id');
    CREATE TRIGGER notes_ai AFTER INSERT ON notes BEGIN
        INSERT INTO notes_fts(rowid, body) VALUES (new.id, new.body);
        INSERT INTO audit(note, what) VALUES (new.id, 'insert');
    END;
    CREATE TRIGGER notes_ad AFTER DELETE ON notes BEGIN
        INSERT INTO notes_fts(notes_fts, rowid, body) VALUES ('delete', old.id, old.body);
        INSERT INTO audit(note, what) VALUES (old.id, 'delete');
    END;
    CREATE TRIGGER notes_au AFTER UPDATE OF body ON notes BEGIN
        INSERT INTO notes_fts(notes_fts, rowid, body) VALUES ('delete', old.id, old.body);
        INSERT INTO notes_fts(rowid, body) VALUES (new.id, new.body);
        UPDATE notes SET version = version + 1 WHERE id = new.id;
        INSERT INTO audit(note, what) VALUES (new.id, 'update');
    END;";

const WRITES: &str = "
    INSERT INTO notes(id, body) VALUES (1, 'apple pie'), (2, 'banana bread'), (3, 'cherry tart');
    UPDATE notes SET body = 'apple crumble' WHERE id = 1;
    UPDATE notes SET body = 'apple strudel' WHERE id = 1;
    DELETE FROM notes WHERE id = 2;";

/// Everything a node's application can read: the rows, the audit trail and FTS answers.
fn state(path: &std::path::Path) -> Vec<Vec<Vec<Value>>> {
    [
        "SELECT id, body, version FROM notes ORDER BY id",
        "SELECT id, note, what FROM audit ORDER BY id",
        "SELECT name, seq FROM sqlite_sequence WHERE substr(name, 1, 2) <> '__'",
        "SELECT rowid FROM notes_fts WHERE notes_fts MATCH 'apple' ORDER BY rowid",
        "SELECT rowid FROM notes_fts WHERE notes_fts MATCH 'crumble OR banana OR pie'",
        "SELECT rowid FROM notes_fts WHERE notes_fts MATCH 'strudel OR cherry' ORDER BY rowid",
    ]
    .iter()
    .map(|sql| rows(path, sql))
    .collect()
}

#[test]
fn applied_events_do_not_fire_triggers_into_replicated_tables() {
    let (_a, origin, _) = setup(NOTES);
    Connection::open(&origin)
        .expect("app")
        .execute_batch(WRITES)
        .expect("writes");
    let (_b, replica, mut b) = setup(NOTES);
    let events: Vec<_> = captured(&origin).into_iter().map(incoming).collect();
    let out = b.apply_batch(&events).expect("apply");
    assert!(out.iter().all(|o| *o == Outcome::Applied), "{out:?}");
    let want = state(&origin);
    assert_eq!(
        want[0][0],
        vec![Value::Integer(1), text("apple strudel"), Value::Integer(2)]
    );
    assert_eq!(
        want[1].len(),
        6,
        "three inserts, two updates, one delete audited"
    );
    assert_eq!(state(&replica), want);
    let integrity = "INSERT INTO notes_fts(notes_fts, rank) VALUES ('integrity-check', 1)";
    Connection::open(&replica)
        .expect("replica")
        .execute_batch(integrity)
        .expect("the replica's FTS index matches its rows");
}

/// A snapshot merged into a node (its tables exist, so the rows are merged one by one): the
/// triggers add no audit rows for the merged rows, and the FTS index answers for them.
#[test]
fn restored_rows_do_not_fire_triggers_into_replicated_tables() {
    let (d, origin, _) = setup(NOTES);
    Connection::open(&origin)
        .expect("app")
        .execute_batch(WRITES)
        .expect("writes");
    let snap = d.path().join("snapshot.db");
    Connection::open(&origin)
        .expect("origin")
        .execute("VACUUM INTO ?1", [snap.to_string_lossy()])
        .expect("snapshot");
    let (_b, replica, mut b) = setup(NOTES);
    let out = b
        .restore_snapshot(&snap, &["s".into()], &[100], &Default::default())
        .expect("restore");
    assert_eq!(out.inserted, 8, "two notes and six audit rows merged");
    assert_eq!(state(&replica), state(&origin));
}
