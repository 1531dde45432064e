//! The upstream e2e scenarios (upstream-behaviour §15.2: 1–4 and 6–9) on a 3-node cluster with
//! two shards, in order on one cluster, as the Go suite runs them.

use std::time::Duration;

use crate::require_nats;
use crate::support::{NatsServer, Node, REPLICATION_TIMEOUT, cluster, wait_until};

fn has_title(node: &Node, title: &str) -> bool {
    node.conn()
        .query_row(
            "SELECT count(*) FROM Books WHERE title = ?1",
            [title],
            |r| r.get::<_, i64>(0),
        )
        .is_ok_and(|n| n > 0)
}

fn insert_book(node: &Node, title: &str) -> i64 {
    let conn = node.conn();
    conn.execute(
        "INSERT INTO Books (title, author, publication_year) VALUES (?1, 'Author', 2024)",
        [title],
    )
    .expect("insert");
    conn.last_insert_rowid()
}

fn wait_title(node: &Node, title: &str) {
    wait_until(
        REPLICATION_TIMEOUT,
        &format!("{title:?} on node {}", node.id),
        || has_title(node, title),
    );
}

#[test]
fn upstream_e2e_scenarios() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let mut nodes = cluster(&nats, 3, 2);

    // 1. INSERT on node 1 → visible by title on node 2 and by id on node 3.
    let id = insert_book(&nodes[0], "Test Book 1");
    wait_title(&nodes[1], "Test Book 1");
    wait_until(REPLICATION_TIMEOUT, "id on node 3", || {
        nodes[2].query_i64(&format!("SELECT count(*) FROM Books WHERE id = {id}")) == 1
    });

    // 2. UPDATE on node 1 → nodes 2 and 3.
    let id = insert_book(&nodes[0], "To Update");
    wait_title(&nodes[1], "To Update");
    nodes[0].exec(&format!(
        "UPDATE Books SET title = 'Updated Title' WHERE id = {id}"
    ));
    wait_title(&nodes[1], "Updated Title");
    wait_title(&nodes[2], "Updated Title");

    // 3. DELETE on node 1 → gone on nodes 2 and 3.
    let id = insert_book(&nodes[0], "To Delete");
    wait_title(&nodes[1], "To Delete");
    nodes[0].exec(&format!("DELETE FROM Books WHERE id = {id}"));
    for n in &nodes[1..] {
        wait_until(REPLICATION_TIMEOUT, "delete", || {
            n.query_i64(&format!("SELECT count(*) FROM Books WHERE id = {id}")) == 0
        });
    }

    // 4. Last writer wins: concurrent updates on nodes 1 and 2, node 2's 100 ms later; every
    //    node, both writers included, ends on node 2's value (self-application).
    let id = insert_book(&nodes[0], "LWW Book");
    wait_title(&nodes[1], "LWW Book");
    nodes[0].exec(&format!(
        "UPDATE Books SET title = 'Node1 Update' WHERE id = {id}"
    ));
    std::thread::sleep(Duration::from_millis(100)); // the scenario's defined gap, not a wait
    nodes[1].exec(&format!(
        "UPDATE Books SET title = 'Node2 Update' WHERE id = {id}"
    ));
    for n in &nodes {
        wait_until(REPLICATION_TIMEOUT, "LWW convergence", || {
            n.query_text(&format!("SELECT title FROM Books WHERE id = {id}"))
                .as_deref()
                == Some("Node2 Update")
        });
    }

    // 6. Failure and recovery: node 3 killed, writes continue, node 3 catches up on restart.
    insert_book(&nodes[0], "Before Kill");
    wait_title(&nodes[2], "Before Kill");
    nodes[2].kill();
    insert_book(&nodes[0], "While Down");
    wait_title(&nodes[1], "While Down");
    nodes[2].start();
    wait_title(&nodes[2], "While Down");

    // 7. Multi-table: a book and an author.
    insert_book(&nodes[0], "Multi Table Book");
    nodes[0].exec("INSERT INTO Authors (name, birth_year) VALUES ('Multi Author', 1970)");
    wait_title(&nodes[1], "Multi Table Book");
    wait_until(REPLICATION_TIMEOUT, "author on node 2", || {
        nodes[1].query_i64("SELECT count(*) FROM Authors WHERE name = 'Multi Author'") == 1
    });
    let author_id = nodes[0].query_i64("SELECT id FROM Authors WHERE name = 'Multi Author'");
    wait_until(REPLICATION_TIMEOUT, "author on node 3", || {
        nodes[2].query_i64(&format!(
            "SELECT count(*) FROM Authors WHERE id = {author_id}"
        )) == 1
    });

    // 8. Volume: 100 titles "Bulk Test " + char(i), i = 0..99 — control characters and NUL.
    let mut ids = Vec::new();
    for i in 0u32..100 {
        let title = format!("Bulk Test {}", char::from_u32(i).expect("ascii"));
        ids.push(insert_book(&nodes[0], &title));
    }
    let id_list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    for n in &nodes[1..] {
        wait_until(REPLICATION_TIMEOUT, "100 bulk rows", || {
            n.query_i64(&format!(
                "SELECT count(*) FROM Books WHERE id IN ({id_list})"
            )) == 100
        });
    }
    let nul_title: Vec<u8> = nodes[2]
        .conn()
        .query_row(
            "SELECT CAST(title AS BLOB) FROM Books WHERE id = ?1",
            [ids[0]],
            |r| r.get(0),
        )
        .expect("NUL title");
    assert_eq!(nul_title, b"Bulk Test \0", "NUL survives replication");
    for n in &nodes[1..] {
        assert_eq!(
            n.checksum("Books"),
            nodes[0].checksum("Books"),
            "node {} Books",
            n.id
        );
    }

    // 9. publish = false on node 2: its writes never leave it, but it still receives.
    nodes[1].kill();
    let normal_config = std::fs::read_to_string(&nodes[1].config).expect("config");
    std::fs::write(
        &nodes[1].config,
        format!("publish = false\n{normal_config}"),
    )
    .expect("config");
    nodes[1].start();
    insert_book(&nodes[1], "Node2 Private");
    wait_until(
        REPLICATION_TIMEOUT,
        "node 2 to retire its local change",
        || nodes[1].query_i64("SELECT count(*) FROM __harmonylite___change_log_global") == 0,
    );
    insert_book(&nodes[0], "From Node1 After");
    wait_title(&nodes[1], "From Node1 After");
    wait_title(&nodes[2], "From Node1 After");
    assert!(
        !has_title(&nodes[0], "Node2 Private"),
        "publish=false leaked to node 1"
    );
    assert!(
        !has_title(&nodes[2], "Node2 Private"),
        "publish=false leaked to node 3"
    );
    nodes[1].kill();
    std::fs::write(&nodes[1].config, normal_config).expect("config");
    nodes[1].start();
    insert_book(&nodes[1], "Node2 Public Again");
    wait_title(&nodes[0], "Node2 Public Again");
}
