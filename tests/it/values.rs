//! Value fidelity: every SQLite storage class round-trips exactly between nodes, including values
//! in DATETIME/TIMESTAMP/BOOLEAN columns (which Go converted lossily), composite and rowid keys,
//! names that need quoting, and writes from a `trusted_schema = OFF` application connection.

use rusqlite::params;

use crate::require_nats;
use crate::support::{NatsServer, Node, REPLICATION_TIMEOUT, wait_until};

const SCHEMA: &str = r#"
    CREATE TABLE vals (
        id INTEGER PRIMARY KEY,
        i INTEGER, r REAL, t TEXT, b BLOB, n NUMERIC, anything,
        created DATETIME, stamp TIMESTAMP, flag BOOLEAN, day DATE
    );
    CREATE TABLE pairs (region TEXT, seq INTEGER, v TEXT, PRIMARY KEY (region, seq)) WITHOUT ROWID;
    CREATE TABLE notes (body TEXT, score REAL);
    CREATE TABLE "order" ("group" INTEGER PRIMARY KEY, "select" TEXT, "we""ird col" TEXT,
                          "with space" BLOB);
"#;

#[test]
fn every_storage_class_round_trips_exactly() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let mut a = Node::new(1, &nats.url, SCHEMA, 2, "");
    let mut b = Node::new(2, &nats.url, SCHEMA, 2, "");
    a.start();
    b.start();

    let big: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    {
        let conn = a.conn();
        // trusted_schema = OFF must not break application writes (Go's guard did).
        conn.execute_batch("PRAGMA trusted_schema = OFF")
            .expect("pragma");
        let mut insert = conn
            .prepare("INSERT INTO vals VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)")
            .expect("prepare");
        insert
            .execute(params![
                1,
                i64::MIN,
                0.1,
                "ünïcödé ✓",
                Vec::<u8>::new(),
                1.5,
                "text",
                "2025-03-01 12:00:00.123456",
                "2025-03-01T12:00:00Z",
                1,
                "2025-03-01"
            ])
            .expect("row 1");
        insert
            .execute(params![
                2,
                i64::MAX,
                -1.0e-300,
                "nul\0inside\x01\x7f",
                big,
                10,
                42,
                1_740_830_400,
                "not a date",
                0,
                20250301
            ])
            .expect("row 2");
        insert
            .execute(params![
                3,
                None::<i64>,
                f64::MAX,
                "",
                vec![0u8; 3],
                None::<i64>,
                3.25,
                None::<String>,
                1_740_830_400_123i64,
                7,
                None::<String>
            ])
            .expect("row 3");
        conn.execute_batch(
            "INSERT INTO pairs VALUES ('eu', 1, 'a'), ('eu', 2, 'b'), ('us', 1, 'c');
             INSERT INTO notes (body, score) VALUES ('first', 1.0), ('second', NULL);
             INSERT INTO \"order\" VALUES (1, 'x', 'y', x'00ff');",
        )
        .expect("other tables");
        conn.execute(
            "UPDATE pairs SET v = 'b2' WHERE region = 'eu' AND seq = 2",
            [],
        )
        .expect("update composite");
        conn.execute("DELETE FROM pairs WHERE region = 'us'", [])
            .expect("delete composite");
        conn.execute("UPDATE notes SET score = 2.5 WHERE body = 'first'", [])
            .expect("update rowid");
        conn.execute(
            "UPDATE \"order\" SET \"we\"\"ird col\" = 'z' WHERE \"group\" = 1",
            [],
        )
        .expect("update quoted");
    }

    for table in ["vals", "pairs", "notes", "order"] {
        wait_until(REPLICATION_TIMEOUT, &format!("{table} to converge"), || {
            b.checksum(table) == a.checksum(table)
        });
    }
    // Spot-check what Go would have altered: the exact text and integers arrive untouched.
    assert_eq!(
        b.query_text("SELECT created FROM vals WHERE id = 1")
            .as_deref(),
        Some("2025-03-01 12:00:00.123456")
    );
    assert_eq!(
        b.query_text("SELECT stamp FROM vals WHERE id = 2")
            .as_deref(),
        Some("not a date")
    );
    assert_eq!(b.query_i64("SELECT flag FROM vals WHERE id = 3"), 7);
    assert_eq!(
        b.query_i64("SELECT typeof(created) = 'integer' FROM vals WHERE id = 2"),
        1
    );
    assert_eq!(
        b.query_i64("SELECT length(b) FROM vals WHERE id = 2"),
        1024 * 1024
    );
    assert_eq!(b.query_i64("SELECT count(*) FROM notes"), 2);
    assert_eq!(
        b.query_i64("SELECT count(*) FROM __harmonylite__dead_letter"),
        0
    );
}
