//! Catch-up (the catch-up issue): live nodes never fall off the stream (flow control), and nodes
//! that did — new, stopped, paused — recover from a verified snapshot plus the stream tail.

use std::time::{Duration, Instant};

use crate::require_nats;
use crate::support::{BOOKS_SCHEMA, NatsServer, Node, wait_until};

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child process we started; no memory is shared.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

/// One `INSERT … SELECT` of `rows` rows into Books on `node`.
fn bulk_insert(node: &Node, rows: u64) {
    node.exec(&format!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
         INSERT INTO Books (title, author, publication_year)
         SELECT 'title ' || i, 'author ' || (i % 97), 1900 + (i % 120) FROM n"
    ));
}

/// Default settings (max_entries 1024): a 50,000-row transaction reaches every running node,
/// whole, and no node loses messages to retention — even one that stalls for a moment (here a
/// 1.5 s SIGSTOP, as a slow disk or a swapped-out process would).
#[test]
fn bulk_transaction_reaches_every_running_node_with_default_max_entries() {
    let bin = require_nats!();
    let nats = NatsServer::start(&bin);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| {
            let n = Node::new(id, &nats.url, BOOKS_SCHEMA, 1, "");
            n.set_max_entries(1024);
            n
        })
        .collect();
    for n in &mut nodes {
        n.start();
    }
    let started = Instant::now();
    let stalled = nodes[2].pid().expect("node 3 runs");
    signal(stalled, libc::SIGSTOP);
    bulk_insert(&nodes[0], 50_000);
    std::thread::sleep(Duration::from_millis(1500));
    signal(stalled, libc::SIGCONT);
    let want = nodes[0].checksum("Books");
    for n in &nodes[1..] {
        wait_until(Duration::from_secs(60), "every row on every node", || {
            n.checksum("Books") == want
        });
    }
    eprintln!("50,000 rows on 3 nodes in {:?}", started.elapsed());
    for n in &nodes {
        let log = n.log();
        assert!(
            !log.contains("Stream gap detected"),
            "node {} lost messages to retention:\n{log}",
            n.id
        );
    }
}
