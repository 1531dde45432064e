use super::*;
use crate::db::cdc;
use crate::db::schema::watched_tables;
use crate::db::testutil::temp_db;

/// `changes` as published, each landed on shard 1 at the sequence of its global id.
fn published(changes: &[PendingChange]) -> Retirement {
    Retirement {
        published: changes
            .iter()
            .map(|c| Retired {
                global_id: c.global_id,
                table: c.table,
                log_id: c.log_id,
                landed: Some((1, c.global_id as u64)),
            })
            .collect(),
        ..Retirement::default()
    }
}

fn retire(log: &ChangeLog, conn: &mut Connection, changes: &[PendingChange], orphans: &[i64]) {
    let batch = Retirement {
        orphans: orphans.to_vec(),
        ..published(changes)
    };
    log.retire(conn, &batch).expect("retire");
}

#[test]
fn max_ids_up_to_a_global_id() {
    let (_d, path, conn, log) = setup("CREATE TABLE a (id INTEGER PRIMARY KEY)");
    let app = Connection::open(&path).expect("app");
    app.execute_batch(
        "INSERT INTO a VALUES (1); INSERT INTO a VALUES (2); INSERT INTO a VALUES (3);",
    )
    .expect("insert");
    assert_eq!(log.max_ids_up_to(&conn, 2).expect("ids"), [2]);
    assert_eq!(log.max_ids_up_to(&conn, 0).expect("ids"), [0]);
    assert_eq!(log.max_ids_up_to(&conn, 99).expect("ids"), [3]);
}

#[test]
fn cleanup_keeps_rows_until_their_event_came_back() {
    let (_d, path, mut conn, log) = setup("CREATE TABLE a (id INTEGER PRIMARY KEY)");
    let app = Connection::open(&path).expect("app");
    app.execute_batch("INSERT INTO a VALUES (1); INSERT INTO a VALUES (2);")
        .expect("insert");
    let scan = log.scan(&conn, 0, 10).expect("scan");
    // Landed at sequences 1 and 2 of shard 1.
    retire(&log, &mut conn, &scan.changes, &[]);
    let (flying, highest) = log
        .in_flight(&conn, 0, 0, Some(&[1]), 0)
        .expect("in flight");
    assert_eq!(highest, 2);
    assert_eq!(flying.len(), 1, "sequence 2 has not come back: {flying:?}");
    assert_eq!(
        log.cleanup(&mut conn, i64::MAX, Some(&[1]))
            .expect("cleanup"),
        1
    );
    assert_eq!(
        log.cleanup(&mut conn, i64::MAX, Some(&[2]))
            .expect("cleanup"),
        1
    );
    assert_eq!(ChangeLog::last_landed(&conn).expect("landed")[&1], 2);
}

/// An application reader appearing while housekeeping writes makes it roll back at the next
/// check, in the middle of a batch: the write lock is free again for the reader's write, and
/// nothing was retired (a later attempt does it).
#[test]
fn housekeeping_gives_up_as_soon_as_a_reader_appears() {
    let (_d, path, mut conn, log) = setup("CREATE TABLE a (id INTEGER PRIMARY KEY)");
    let app = Connection::open(&path).expect("app");
    app.execute_batch(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100)
         INSERT INTO a SELECT i FROM n",
    )
    .expect("insert");
    let scan = log.scan(&conn, 0, 1000).expect("scan");
    assert_eq!(scan.changes.len(), 100);
    let batch = published(&scan.changes);
    let asked = std::cell::Cell::new(0);
    let reader_on_third_check = || {
        asked.set(asked.get() + 1);
        asked.get() < 3
    };
    let outcome = log
        .housekeep(&mut conn, &batch, i64::MAX, None, &reader_on_third_check)
        .expect("housekeep");
    assert_eq!(outcome, None);
    assert_eq!(
        asked.get(),
        3,
        "checked every few statements, stopped at once"
    );
    app.execute_batch("BEGIN; SELECT count(*) FROM a; INSERT INTO a VALUES (1000); COMMIT")
        .expect("the application's read-then-write goes through");
    assert_eq!(log.pending_count(&conn, 0).expect("count"), 101);
    let outcome = log
        .housekeep(&mut conn, &batch, i64::MAX, None, &|| true)
        .expect("housekeep");
    assert!(outcome.is_some());
    assert_eq!(log.pending_count(&conn, 0).expect("count"), 1);
}

fn setup(schema: &str) -> (tempfile::TempDir, std::path::PathBuf, Connection, ChangeLog) {
    let (d, path) = temp_db(schema);
    let mut conn = crate::db::open(&path).expect("open");
    let tables = watched_tables(&conn).expect("tables");
    cdc::install(&mut conn, &tables, "h").expect("install");
    (d, path, conn, ChangeLog::new(tables))
}

#[test]
fn scan_reads_exact_values_in_commit_order() {
    let (_d, path, mut conn, log) = setup(
        "CREATE TABLE a (id INTEGER PRIMARY KEY, t TEXT, b BLOB, r REAL); CREATE TABLE b (x)",
    );
    let app = Connection::open(&path).expect("app");
    app.execute(
        "INSERT INTO a VALUES (1, ?1, x'00ff', 1.5)",
        ["nul\0inside"],
    )
    .expect("insert");
    app.execute("INSERT INTO b VALUES (NULL)", [])
        .expect("insert");
    app.execute("DELETE FROM a", []).expect("delete");
    let scan = log.scan(&conn, 0, 10).expect("scan");
    assert!(scan.orphans.is_empty());
    let ops: Vec<(usize, Op)> = scan.changes.iter().map(|c| (c.table, c.op)).collect();
    assert_eq!(ops, [(0, Op::Insert), (1, Op::Insert), (0, Op::Delete)]);
    assert_eq!(
        scan.changes[0].values,
        [
            Value::Integer(1),
            Value::Text(b"nul\0inside".to_vec()),
            Value::Blob(vec![0, 0xff]),
            Value::Real(1.5)
        ]
    );
    // The rowid table carries its row id as the last value.
    assert_eq!(scan.changes[1].values, [Value::Null, Value::Integer(1)]);
    assert_eq!(log.scan(&conn, 0, 2).expect("limited").changes.len(), 2);
    let after_first = log
        .scan(&conn, scan.changes[0].global_id, 10)
        .expect("cursor");
    assert_eq!(after_first.changes.len(), 2);

    retire(&log, &mut conn, &scan.changes[..2], &[]);
    let rest = log.scan(&conn, 0, 10).expect("scan");
    assert_eq!(rest.changes.len(), 1);
    assert_eq!(rest.changes[0].op, Op::Delete);
    assert_eq!(log.pending_count(&conn, 0).expect("count"), 1);

    assert_eq!(log.cleanup(&mut conn, i64::MAX, None).expect("cleanup"), 2);
    assert_eq!(
        log.cleanup(&mut conn, i64::MAX, None).expect("cleanup"),
        0,
        "pending rows stay"
    );
}

#[test]
fn dropped_change_log_does_not_block_other_tables() {
    let (_d, path, conn, log) =
        setup("CREATE TABLE a (id INTEGER PRIMARY KEY); CREATE TABLE b (id INTEGER PRIMARY KEY)");
    let app = Connection::open(&path).expect("app");
    app.execute_batch("INSERT INTO a VALUES (1); INSERT INTO b VALUES (1);")
        .expect("insert");
    conn.execute_batch("DROP TABLE __harmonylite__a_change_log")
        .expect("drop");
    let scan = log.scan(&conn, 0, 10).expect("scan");
    assert_eq!(scan.orphans.len(), 1);
    assert_eq!(scan.changes.len(), 1);
    assert_eq!(scan.changes[0].table, 1);
}

#[test]
fn orphans_are_reported_not_fatal() {
    let (_d, path, mut conn, log) = setup("CREATE TABLE a (id INTEGER PRIMARY KEY)");
    let app = Connection::open(&path).expect("app");
    app.execute("INSERT INTO a VALUES (1)", []).expect("insert");
    conn.execute_batch(
        "INSERT INTO __harmonylite___change_log_global (change_table_id, table_name) VALUES (99, 'a'), (1, 'gone');",
    )
    .expect("orphans");
    let scan = log.scan(&conn, 0, 10).expect("scan");
    assert_eq!(scan.changes.len(), 1);
    assert_eq!(scan.orphans.len(), 2);
    let ids: Vec<i64> = scan.orphans.iter().map(|o| o.0).collect();
    retire(&log, &mut conn, &scan.changes, &ids);
    assert_eq!(log.pending_count(&conn, 0).expect("count"), 0);
}
