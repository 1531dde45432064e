use super::*;
use crate::db::schema::{schema_hash, watched_tables};
use crate::db::testutil::temp_db;

fn install_all(conn: &mut Connection) -> Vec<Table> {
    let tables = watched_tables(conn).expect("tables");
    let hash = schema_hash(conn, &tables).expect("hash");
    install(conn, &tables, &hash).expect("install");
    tables
}

fn count(conn: &Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).expect(sql)
}

#[test]
fn a_new_table_publishes_only_rows_other_nodes_do_not_carry() {
    let (_d, path) = temp_db("CREATE TABLE t (id INTEGER PRIMARY KEY)");
    let mut conn = crate::db::open(&path).expect("open");
    install_all(&mut conn);
    // Another node's changes of `n` wait here: its seed row 1, and its update of row 2.
    for (seq, id, body) in [(1, 1, "seed"), (2, 2, "theirs")] {
        let event = crate::wire::ReplicationEvent {
            from_node_id: 2,
            event: crate::wire::ChangeEvent {
                id: seq,
                op: crate::wire::Op::Insert,
                table: "N".into(),
                row: vec![
                    ("id".into(), crate::wire::Value::Integer(id)),
                    ("body".into(), crate::wire::Value::Text(body.into())),
                ],
                schema_hash: "other".into(),
            },
        };
        conn.execute(
            "INSERT INTO __harmonylite__held_events \
             (stream, seq, origin, payload, reason, created_at, schema_wait) \
             VALUES ('s', ?1, NULL, ?2, 'no table', 0, 1)",
            rusqlite::params![seq, event.encode()],
        )
        .expect("waiting event");
    }
    // The migration, with this node's own writes before its triggers exist: row 1 as the
    // migration made it everywhere, row 2 and 3 written here.
    Connection::open(&path)
        .expect("app")
        .execute_batch(
            "CREATE TABLE n (id INTEGER PRIMARY KEY, body TEXT);
             INSERT INTO n VALUES (1, 'seed'), (2, 'mine'), (3, 'mine too');",
        )
        .expect("migration");
    install_all(&mut conn);
    let published: Vec<(i64, String)> = conn
        .prepare("SELECT val_id, val_body FROM __harmonylite__n_change_log ORDER BY id")
        .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .expect("log");
    // Rows 1 and 2 are the cluster's (their waiting events set them here); row 3 is only here.
    assert_eq!(published, [(3, "mine too".to_string())]);
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM __harmonylite___change_log_global WHERE table_name = 'n'"
        ),
        1
    );
}

#[test]
fn triggers_capture_application_writes_in_order() {
    let (_d, path) =
        temp_db("CREATE TABLE \"my table\" (\"select\" INTEGER PRIMARY KEY, \"v'al\" TEXT)");
    let mut conn = crate::db::open(&path).expect("open");
    install_all(&mut conn);
    let app = Connection::open(&path).expect("app");
    app.execute_batch(
        "INSERT INTO \"my table\" VALUES (1, 'a'); UPDATE \"my table\" SET \"v'al\" = 'b';
         DELETE FROM \"my table\";",
    )
    .expect("app writes");
    let types: Vec<String> = conn
        .prepare("SELECT type FROM \"__harmonylite__my table_change_log\" ORDER BY id")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .expect("types");
    assert_eq!(types, ["insert", "update", "delete"]);
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM __harmonylite___change_log_global"
        ),
        3
    );
    let name: String = conn
        .query_row(
            "SELECT table_name FROM __harmonylite___change_log_global LIMIT 1",
            [],
            |r| r.get(0),
        )
        .expect("name");
    assert_eq!(name, "my table");
}

#[test]
fn reinstall_follows_renames_added_columns_new_and_dropped_tables() {
    let (_d, path) = temp_db("CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT)");
    let mut conn = crate::db::open(&path).expect("open");
    install_all(&mut conn);
    let app = Connection::open(&path).expect("app");
    app.execute_batch(
        "INSERT INTO t VALUES (1, 'x');
         ALTER TABLE t RENAME COLUMN a TO b; ALTER TABLE t RENAME TO u;
         INSERT INTO u VALUES (2, 'y');
         ALTER TABLE u ADD COLUMN c INTEGER; INSERT INTO u VALUES (3, 'z', 7);
         UPDATE u SET c = 5 WHERE id = 1;
         CREATE TABLE v (k TEXT PRIMARY KEY, n INTEGER); INSERT INTO v VALUES ('p', 1);",
    )
    .expect("app DDL and writes");
    let (version, drifted) =
        super::super::ddl::drift(&conn, &watched_tables(&conn).expect("t"), "h", None)
            .expect("drift");
    assert!(version > 0);
    assert!(drifted.is_some());
    install_all(&mut conn);
    // Every pending change kept, under the new names, with the added column's value.
    let rows: Vec<(i64, Option<String>, Option<i64>)> = conn
        .prepare("SELECT val_id, val_b, val_c FROM __harmonylite__u_change_log ORDER BY id")
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
        })
        .expect("log");
    assert_eq!(
        rows,
        [
            (1, Some("x".into()), Some(5)),
            (2, Some("y".into()), None),
            (3, Some("z".into()), Some(7)),
            (1, Some("x".into()), Some(5)),
        ]
    );
    let names: Vec<String> = conn
        .prepare("SELECT DISTINCT table_name FROM __harmonylite___change_log_global ORDER BY 1")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .expect("global");
    assert_eq!(names, ["u", "v"]);
    assert_eq!(
        count(&conn, "SELECT count(*) FROM __harmonylite__v_change_log"),
        1
    );
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM sqlite_schema WHERE type = 'trigger'"
        ),
        // Three each, and v's text key has a UNIQUE index: its two BEFORE triggers.
        8
    );
    let aliases = super::super::ddl::Aliases::load(&conn).expect("aliases");
    assert_eq!(aliases.table("T"), Some("u"));
    assert_eq!(aliases.column("u", "a"), Some("b"));
    // One capture per write from now on.
    app.execute("INSERT INTO u VALUES (4, 'w', 1)", [])
        .expect("write");
    assert_eq!(
        count(&conn, "SELECT count(*) FROM __harmonylite__u_change_log"),
        5
    );
    // A dropped table's change log goes, and is remembered as dropped.
    app.execute_batch("DROP TABLE v").expect("drop");
    install_all(&mut conn);
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM sqlite_schema WHERE name LIKE '%v_change_log%'"
        ),
        0
    );
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM __harmonylite___change_log_global WHERE table_name = 'v'"
        ),
        0
    );
    assert!(
        super::super::ddl::Aliases::load(&conn)
            .expect("aliases")
            .dropped("v")
    );
    let tables = watched_tables(&conn).expect("tables");
    let hash = schema_hash(&conn, &tables).expect("hash");
    assert_eq!(
        super::super::ddl::drift(&conn, &tables, &hash, None)
            .expect("drift")
            .1,
        None
    );
}

/// The pending changes of `t`'s change log as (a, b) values, oldest first.
fn pending_ab(conn: &Connection, log: &str) -> Vec<(Option<String>, Option<String>)> {
    conn.prepare(&format!("SELECT val_a, val_b FROM {log} ORDER BY id"))
        .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .expect("log")
}

#[test]
fn column_swaps_and_re_added_names_follow_the_triggers() {
    let (_d, path) = temp_db("CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, b TEXT)");
    let mut conn = crate::db::open(&path).expect("open");
    install_all(&mut conn);
    let app = Connection::open(&path).expect("app");
    app.execute_batch(
        "INSERT INTO t VALUES (1, 'A', 'B');
         ALTER TABLE t RENAME COLUMN a TO tmp; ALTER TABLE t RENAME COLUMN b TO a;
         ALTER TABLE t RENAME COLUMN tmp TO b;",
    )
    .expect("swap");
    install_all(&mut conn);
    // The row now has a = 'B', b = 'A'; the pending change says the same.
    assert_eq!(
        pending_ab(&conn, "__harmonylite__t_change_log"),
        [(Some("B".into()), Some("A".into()))]
    );
    app.execute_batch("ALTER TABLE t RENAME COLUMN a TO c; ALTER TABLE t ADD COLUMN a TEXT;")
        .expect("rename and re-add");
    install_all(&mut conn);
    let row: (Option<String>, Option<String>, Option<String>) = conn
        .query_row(
            "SELECT val_a, val_b, val_c FROM __harmonylite__t_change_log",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("log");
    assert_eq!(row, (None, Some("A".into()), Some("B".into())));
}

#[test]
fn a_table_rebuilt_step_by_step_keeps_capturing_into_one_log() {
    let (_d, path) = temp_db(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT); CREATE VIEW v AS SELECT a FROM t",
    );
    let mut conn = crate::db::open(&path).expect("open");
    install_all(&mut conn);
    let app = Connection::open(&path).expect("app");
    app.execute_batch("INSERT INTO t VALUES (1, 'x'); CREATE TABLE new__t (id INTEGER PRIMARY KEY, a TEXT, b TEXT);")
        .expect("create");
    install_all(&mut conn);
    app.execute_batch(
        "INSERT INTO new__t SELECT id, a, 'y' FROM t; DROP VIEW v; DROP TABLE t;
         ALTER TABLE new__t RENAME TO t; CREATE VIEW v AS SELECT a FROM t;
         INSERT INTO t VALUES (2, 'z', 'w');",
    )
    .expect("rebuild");
    let tables = install_all(&mut conn);
    assert_eq!(
        tables.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["t"]
    );
    // The copy and the write after the rename, both pending under t.
    let rows: Vec<(i64, String)> = conn
        .prepare(
            "SELECT val_id, val_b FROM __harmonylite__t_change_log WHERE state = 0 ORDER BY id",
        )
        .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .expect("log");
    assert_eq!(rows, [(1, "y".into()), (2, "w".into())]);
    let names: Vec<String> = conn
        .prepare("SELECT DISTINCT table_name FROM __harmonylite___change_log_global")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .expect("global");
    assert_eq!(names, ["t"]);
    // A view naming a dropped table does not stop our renames.
    app.execute_batch(
        "CREATE TABLE gone (x); CREATE VIEW broken AS SELECT * FROM gone; DROP TABLE gone;
         PRAGMA legacy_alter_table = ON; ALTER TABLE t RENAME TO u;",
    )
    .expect("rename");
    install_all(&mut conn);
    assert_eq!(
        count(&conn, "SELECT count(*) FROM __harmonylite__u_change_log"),
        2
    );
}

#[test]
fn trusted_schema_off_clients_can_write() {
    let (_d, path) = temp_db("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
    let mut conn = crate::db::open(&path).expect("open");
    install_all(&mut conn);
    let app = Connection::open(&path).expect("app");
    app.execute_batch("PRAGMA trusted_schema = OFF; INSERT INTO t VALUES (1, 'x');")
        .expect("write with trusted_schema=OFF");
    assert_eq!(
        count(&conn, "SELECT count(*) FROM __harmonylite__t_change_log"),
        1
    );
}

/// The guard table of earlier versions goes at install (capture is muted on the applier's
/// connection instead), and the reinstalled triggers capture without it.
#[test]
fn the_old_guard_table_is_dropped() {
    let (_d, path) = temp_db("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
    let mut conn = crate::db::open(&path).expect("open");
    conn.execute_batch("CREATE TABLE __harmonylite__apply_guard (id INTEGER PRIMARY KEY)")
        .expect("old guard");
    install_all(&mut conn);
    assert!(!crate::db::has_table(&conn, "__harmonylite__apply_guard").expect("schema"));
    conn.execute_batch("INSERT INTO t VALUES (1, 'x')")
        .expect("write");
    assert_eq!(
        count(&conn, "SELECT count(*) FROM __harmonylite__t_change_log"),
        1
    );
}

/// A start with capture already in place writes nothing (no commit that could fail an
/// application's open transaction).
#[test]
fn reinstall_of_an_unchanged_schema_writes_nothing() {
    // `u` has UNIQUE indexes (its key's own among them), hence two more capture triggers.
    let (_d, path) = temp_db(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT); \
         CREATE TABLE u (k TEXT PRIMARY KEY, e TEXT UNIQUE)",
    );
    let mut conn = crate::db::open(&path).expect("open");
    install_all(&mut conn);
    let app = Connection::open(&path).expect("app");
    app.execute_batch("BEGIN; SELECT * FROM t;").expect("read");
    install_all(&mut conn);
    app.execute_batch("INSERT INTO t VALUES (1, 'x'); COMMIT;")
        .expect("the application's transaction survives a restart of the daemon");
    // A changed schema is installed again.
    conn.execute_batch("ALTER TABLE t ADD COLUMN w TEXT")
        .expect("alter");
    let tables = install_all(&mut conn);
    assert_eq!(tables[0].columns.len(), 3);
    assert!(
        up_to_date(&conn, &tables, &schema_hash(&conn, &tables).expect("hash")).expect("check")
    );
}

#[test]
fn reinstall_is_idempotent_and_extends_change_logs() {
    let (_d, path) = temp_db("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)");
    let mut conn = crate::db::open(&path).expect("open");
    install_all(&mut conn);
    let schema = |c: &Connection| -> Vec<String> {
        c.prepare("SELECT sql FROM sqlite_schema ORDER BY name")
            .and_then(|mut s| {
                s.query_map([], |r| r.get::<_, Option<String>>(0))?
                    .collect()
            })
            .map(|v: Vec<Option<String>>| v.into_iter().flatten().collect())
            .expect("schema")
    };
    let first = schema(&conn);
    install_all(&mut conn);
    assert_eq!(schema(&conn), first);

    conn.execute_batch("ALTER TABLE t ADD COLUMN extra INTEGER")
        .expect("alter");
    install_all(&mut conn);
    let app = Connection::open(&path).expect("app");
    app.execute("INSERT INTO t VALUES (1, 'x', 42)", [])
        .expect("write after alter");
    assert_eq!(
        count(&conn, "SELECT val_extra FROM __harmonylite__t_change_log"),
        42
    );
}

/// A Go-created change log (typed value columns) is rebuilt untyped on install, keeping its
/// pending rows and its id counter.
#[test]
fn typed_change_logs_are_migrated_keeping_pending_rows() {
    let (_d, path) = temp_db(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v ANY) STRICT;
         CREATE TABLE __harmonylite__t_change_log (id INTEGER PRIMARY KEY AUTOINCREMENT,
             val_id INTEGER, val_v ANY, type TEXT, created_at INTEGER, state INTEGER);
         INSERT INTO __harmonylite__t_change_log VALUES (7, 1, 5, 'insert', 1, 0);
         INSERT INTO __harmonylite__t_change_log VALUES (9, 2, 6, 'insert', 2, 0);
         DELETE FROM __harmonylite__t_change_log WHERE id = 9;",
    );
    let mut conn = crate::db::open(&path).expect("open");
    install_all(&mut conn);
    let types: Vec<String> = conn
        .prepare("SELECT type FROM pragma_table_info('__harmonylite__t_change_log') WHERE name LIKE 'val%'")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .expect("types");
    assert_eq!(types, ["", ""]);
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM __harmonylite__t_change_log WHERE id = 7 AND state = 0"
        ),
        1
    );
    let app = Connection::open(&path).expect("app");
    app.execute("INSERT INTO t VALUES (3, '00123')", [])
        .expect("write");
    assert_eq!(
        count(&conn, "SELECT max(id) FROM __harmonylite__t_change_log"),
        10,
        "ids never repeat"
    );
    let kept: String = conn
        .query_row(
            "SELECT typeof(val_v) FROM __harmonylite__t_change_log WHERE id = 10",
            [],
            |r| r.get(0),
        )
        .expect("value");
    assert_eq!(kept, "text");
}

#[test]
fn fts5_tables_do_not_break_install() {
    let (_d, path) = temp_db(
        "CREATE TABLE t (id INTEGER PRIMARY KEY); CREATE VIRTUAL TABLE f USING fts5(body);",
    );
    let mut conn = crate::db::open(&path).expect("open");
    let tables = install_all(&mut conn);
    assert_eq!(tables.len(), 1);
    let app = Connection::open(&path).expect("app");
    app.execute("INSERT INTO f VALUES ('hello')", [])
        .expect("fts write");
}

#[test]
fn remove_drops_every_artifact() {
    let (_d, path) =
        temp_db("CREATE TABLE t (id INTEGER PRIMARY KEY); CREATE TABLE xharmonylitex(a);");
    let mut conn = crate::db::open(&path).expect("open");
    install_all(&mut conn);
    assert!(remove(&mut conn).expect("remove") > 0);
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM sqlite_schema WHERE name LIKE '%harmonylite%'"
        ),
        1,
        "only the user's own table survives"
    );
    assert_eq!(remove(&mut conn).expect("second remove"), 0);
}

/// An application trigger created after capture fires first (SQLite fires the newest first):
/// its touch of the row would be captured before the update that fired it. The schema check
/// notices, and the reinstall makes capture the newest again, so the touch is captured last.
#[test]
fn an_application_trigger_newer_than_capture_gets_capture_reinstalled() {
    let (_d, path) = temp_db("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, seen TEXT)");
    let mut conn = crate::db::open(&path).expect("open");
    let tables = install_all(&mut conn);
    let hash = schema_hash(&conn, &tables).expect("hash");
    conn.execute_batch(
        "CREATE TRIGGER items_touch AFTER UPDATE OF name ON items
         BEGIN UPDATE items SET seen = 'touched' WHERE id = new.id; END;
         INSERT INTO items VALUES (1, 'x', 'never');",
    )
    .expect("app trigger");
    let (_, drifted) = super::super::ddl::drift(&conn, &tables, &hash, None).expect("drift");
    assert!(
        drifted.is_some_and(|d| d.what.contains("created after the capture triggers")),
        "the newer trigger is noticed"
    );
    install_all(&mut conn);
    assert_eq!(
        super::super::ddl::drift(&conn, &tables, &hash, None)
            .expect("drift")
            .1,
        None
    );
    conn.execute_batch("UPDATE items SET name = 'y' WHERE id = 1")
        .expect("update");
    let last: String = conn
        .query_row(
            "SELECT val_seen FROM __harmonylite__items_change_log ORDER BY id DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .expect("last capture");
    assert_eq!(last, "touched", "the trigger's write is captured last");
}
