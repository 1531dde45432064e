//! Embedded mode: every node runs its own supervised nats-server, and `-cluster-addr` /
//! `-cluster-peers` alone make a replicating cluster (upstream `examples/run-cluster.sh`).

use std::time::Duration;

use crate::require_nats;
use crate::support::{
    Node, REPLICATION_TIMEOUT, free_port, pids_matching, run_to_exit, wait_until,
};

fn title_count(node: &Node, title: &str) -> i64 {
    node.conn()
        .query_row(
            "SELECT count(*) FROM Books WHERE title = ?1",
            [title],
            |r| r.get(0),
        )
        .unwrap_or(0)
}

fn wait_title(nodes: &[&Node], title: &str) {
    for n in nodes {
        wait_until(
            REPLICATION_TIMEOUT * 2,
            &format!("{title:?} on node {}", n.id),
            || title_count(n, title) == 1,
        );
    }
}

/// `-cluster-addr` on loopback `port` and `-cluster-peers` (`nats://` URLs or `dns://` names).
fn cluster_args(port: u16, peers: &[String]) -> Vec<String> {
    let addr = format!("127.0.0.1:{port}");
    vec![
        "-cluster-addr".into(),
        addr,
        "-cluster-peers".into(),
        peers.join(","),
    ]
}

fn route_url(port: u16) -> String {
    format!("nats://127.0.0.1:{port}/")
}

#[test]
fn embedded_three_node_cluster_survives_a_killed_node() {
    let bin = require_nats!();
    let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let monitor_port = free_port();
    let mut nodes: Vec<Node> = (1..=3u64)
        .map(|id| {
            let extra = if id == 1 {
                // server_config is applied on top of the generated config.
                let path = std::env::temp_dir()
                    .join(format!("harmonylite-it-monitor-{monitor_port}.conf"));
                std::fs::write(&path, format!("monitor_port: {monitor_port}\n"))
                    .expect("server config");
                format!("server_config = {path:?}")
            } else {
                String::new()
            };
            Node::embedded(id, &bin, 2, 3, &extra)
        })
        .collect();
    for (i, node) in nodes.iter_mut().enumerate() {
        let peers: Vec<String> = (0..3)
            .filter(|&j| j != i)
            .map(|j| {
                if i == 2 && j == 0 {
                    // One peer found through DNS: localhost resolves to the loopback address.
                    format!("dns://localhost:{}?min=1&interval_ms=50", routes[j])
                } else {
                    route_url(routes[j])
                }
            })
            .collect();
        node.args = cluster_args(routes[i], &peers);
    }
    // Start all three before waiting: JetStream needs a quorum of the R3 cluster.
    for node in nodes.iter_mut() {
        node.spawn();
    }
    for node in nodes.iter_mut() {
        node.wait_started();
    }
    assert!(
        nodes[2].log().contains("Peers discovered"),
        "{}",
        nodes[2].log()
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", monitor_port)).is_ok(),
        "server_config's monitor_port is honoured"
    );

    // Insert, update and delete from different nodes reach all others.
    nodes[0].exec("INSERT INTO Books (id, title, author) VALUES (1, 'Embedded', 'x')");
    wait_title(&[&nodes[1], &nodes[2]], "Embedded");
    nodes[1].exec("UPDATE Books SET title = 'Embedded Updated' WHERE id = 1");
    wait_title(&[&nodes[0], &nodes[2]], "Embedded Updated");
    nodes[2].exec("DELETE FROM Books WHERE id = 1");
    for n in &nodes[..2] {
        wait_until(REPLICATION_TIMEOUT, "delete", || {
            n.query_i64("SELECT count(*) FROM Books") == 0
        });
    }

    // SIGKILL node 3: its nats-server child goes with it, the other two keep replicating.
    let conf = format!(
        "{}/nats/harmonylite-node-3.conf",
        nodes[2].dir.path().display()
    );
    assert_eq!(pids_matching(&conf).len(), 1, "node 3 runs one nats-server");
    nodes[2].kill();
    wait_until(
        Duration::from_secs(10),
        "node 3's nats-server to exit",
        || pids_matching(&conf).is_empty(),
    );
    nodes[0].exec("INSERT INTO Books (id, title, author) VALUES (2, 'While Node3 Down', 'x')");
    wait_title(&[&nodes[1]], "While Node3 Down");

    // Restarted, node 3 catches up.
    nodes[2].start();
    wait_title(&[&nodes[2]], "While Node3 Down");
    for n in &nodes[1..] {
        wait_until(REPLICATION_TIMEOUT, "checksums", || {
            n.checksum("Books") == nodes[0].checksum("Books")
        });
    }
    // `-save-snapshot` beside node 3's daemon finds its embedded server (the killed one's ports
    // file lies beside it) and asks the daemon to save.
    let (code, out) = crate::support::run_to_exit(
        &nodes[2].config,
        &["-save-snapshot"],
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("Snapshot saved by the running daemon"),
        "{out}"
    );

    // Scaling as docs/deployment.md says: a fourth node lists the running ones as peers; they
    // learn of it through the cluster's gossip, with no restart. It catches up and writes.
    let mut fourth = Node::embedded(4, &bin, 2, 3, "");
    let peers: Vec<String> = routes.iter().map(|&p| route_url(p)).collect();
    fourth.args = cluster_args(free_port(), &peers);
    fourth.start();
    wait_title(&[&fourth], "While Node3 Down");
    fourth.exec("INSERT INTO Books (id, title, author) VALUES (3, 'From Node4', 'x')");
    wait_title(&[&nodes[0], &nodes[1], &nodes[2]], "From Node4");

    // A graceful stop takes the child down too.
    assert!(nodes[0].terminate().success());
    let conf1 = format!(
        "{}/nats/harmonylite-node-1.conf",
        nodes[0].dir.path().display()
    );
    assert!(
        pids_matching(&conf1).is_empty(),
        "nats-server stopped with its node"
    );
}

/// Two embedded nodes with one node_id share a server name: nats-server then places nothing
/// ("no suitable peers"), and the node's own warning says what to check (issue 25 item 7).
#[test]
fn embedded_nodes_sharing_a_node_id_are_told_why_nothing_starts() {
    let bin = require_nats!();
    let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut nodes: Vec<Node> = [1u64, 2, 2]
        .iter()
        .map(|&id| Node::embedded(id, &bin, 1, 3, ""))
        .collect();
    for (i, node) in nodes.iter_mut().enumerate() {
        let peers: Vec<String> = (0..3)
            .filter(|&j| j != i)
            .map(|j| route_url(routes[j]))
            .collect();
        node.args = cluster_args(routes[i], &peers);
        node.spawn();
    }
    wait_until(Duration::from_secs(60), "the hint", || {
        nodes
            .iter()
            .any(|n| n.log().contains("every node must have its own node_id"))
    });
}

#[test]
fn missing_nats_server_binary_is_a_clear_error() {
    let node = Node::embedded(
        1,
        std::path::Path::new("/nonexistent/nats-server"),
        1,
        1,
        "",
    );
    let (code, out) = run_to_exit(&node.config, &[], Duration::from_secs(30));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("nats.server_binary") && out.contains("not an executable"),
        "{out}"
    );
}

#[test]
fn embedded_server_dying_stops_the_node_with_failure() {
    let bin = require_nats!();
    let mut node = Node::embedded(1, &bin, 1, 1, "");
    node.start();
    let conf = format!("{}/nats/harmonylite-node-1.conf", node.dir.path().display());
    let pids = pids_matching(&conf);
    assert_eq!(pids.len(), 1);
    let _ = std::process::Command::new("kill")
        .arg("-9")
        .arg(pids[0].to_string())
        .status();
    let status = node.wait_exit(Duration::from_secs(20));
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{}", node.log());
    assert!(node.log().contains("exited unexpectedly"), "{}", node.log());
}

/// An embedded server listening beyond the loopback interface without authorization is warned
/// about at start (loopback, as every other test binds, is not).
#[test]
fn an_open_embedded_server_is_warned_about() {
    let bin = require_nats!();
    let mut node = Node::embedded(1, &bin, 1, 1, "");
    node.edit_config(
        "bind_address = \"127.0.0.1:-1\"",
        "bind_address = \"0.0.0.0:-1\"",
    );
    node.start();
    wait_until(Duration::from_secs(30), "the warning", || {
        node.log().contains("without authorization")
    });
}
