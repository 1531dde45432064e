//! Phases of the convergence test that play what operators do and live through: database files
//! handled by hand (1c) and cluster-wide events (1d).

use super::*;

/// Runs one transaction of `w`, which must not fail (I6: no other node writes meanwhile).
fn write(w: &mut Writer, seed: u64, what: &str) {
    if let Err(e) = w.transaction(seed, 20) {
        panic!("seed {seed}: I6 violated {what}: {e}");
    }
}

/// Phase 1c: what operators do with database files.
/// - Node 2's file is restored from a backup taken a few transactions earlier, with changes
///   still pending in it; it must catch up (positions live in the database) without sending
///   those old changes again over newer ones.
/// - Node 1 is stopped, its application writes, its file is copied to a new node 4 (its own
///   `node_id`), node 1 restarts and its application writes on; the copy must not resend node
///   1's pending changes as its own (which would roll node 1's later writes back).
pub(super) fn file_phase(
    cluster: &mut Cluster,
    writers: &mut [Writer],
    seed: u64,
    shards: u64,
    max_entries: Option<u64>,
) {
    settle(cluster, seed);
    let dir = crate::support::tempdir();
    let backup = dir.path().join("node-2-backup.db");
    write(&mut writers[1], seed, "before the backup");
    writers[1].copy_to(&backup);
    for _ in 0..3 {
        write(&mut writers[1], seed, "after the backup");
    }
    settle(cluster, seed);
    cluster.nodes[1].terminate();
    writers[1].restore_from(&backup);
    cluster.nodes[1].start();
    settle(cluster, seed);
    eprintln!("seed {seed}: node 2 restored from a backup and caught up");

    cluster.nodes[0].terminate();
    for _ in 0..3 {
        write(&mut writers[0], seed, "while node 1 was stopped");
    }
    let mut copy = new_node(4, &cluster.nats.url, "", shards, max_entries);
    writers[0].copy_to(&copy.db);
    cluster.nodes[0].start();
    for _ in 0..3 {
        write(&mut writers[0], seed, "after node 1's file was copied");
    }
    copy.start();
    cluster.nodes.push(copy);
    cluster.stopped.push(None);
    settle(cluster, seed);
    eprintln!("seed {seed}: a copy of node 1's file joined as node 4");
}

/// Phase 1d, with faults on:
/// - All of JetStream is lost (store wiped, server restarted) under the running nodes: they
///   recreate streams and buckets, publish what their applications write, and converge (not in
///   the small-retention test, see below).
/// - The snapshot leader is killed while another node writes, and restarted.
/// - A node's daemon is stopped (SIGTERM or SIGKILL, from the seed) while its own application
///   and another node's write; in the small-retention test the streams move on meanwhile, so on
///   restart it restores a snapshot, which must keep what its application wrote (checked by the
///   model and, live, by its writer's I1 check).
pub(super) fn operations_phase(
    cluster: &mut Cluster,
    writers: &mut [Writer],
    seed: u64,
    rng: &mut Rng,
    small_retention: bool,
) {
    // Not with streams of a few dozen messages: until every consumer has noticed the new
    // streams (up to a fetch's 5 s), publishers are not paced by them, and retention can drop
    // what nobody has read yet (docs/limits.md).
    if !small_retention {
        settle(cluster, seed);
        cluster.nats.stop();
        std::fs::remove_dir_all(cluster.nats.dir().join("js")).expect("wipe JetStream");
        cluster.nats.restart();
        for w in writers.iter_mut() {
            write(w, seed, "after JetStream was wiped");
        }
        settle(cluster, seed);
        eprintln!("seed {seed}: JetStream wiped; the cluster recovered");
    }

    let leads = |n: &Node| {
        let log = n.log();
        log.rfind("Became snapshot leader") > log.rfind("Lost snapshot leadership")
    };
    let mut leader = None;
    let found = happens_within(Duration::from_secs(60), || {
        leader = cluster.nodes.iter().position(leads);
        leader.is_some()
    });
    assert!(found, "seed {seed}: no snapshot leader");
    let leader = leader.unwrap_or_default();
    // A writer on another node (node 4, the copy, has none).
    let other = (leader + 1 + rng.below(2) as usize) % 3;
    write(&mut writers[other], seed, "before the leader was killed");
    cluster.nodes[leader].kill();
    for _ in 0..3 {
        write(&mut writers[other], seed, "while the leader was down");
    }
    cluster.nodes[leader].start();
    settle(cluster, seed);
    eprintln!(
        "seed {seed}: snapshot leader node {} killed during writes",
        leader + 1
    );

    let down = rng.below(3) as usize;
    let graceful = rng.chance(50);
    if graceful {
        cluster.nodes[down].terminate();
    } else {
        cluster.nodes[down].kill();
    }
    let busy = (down + 1) % 3;
    for _ in 0..3 {
        write(&mut writers[down], seed, "while its daemon was down");
        for _ in 0..4 {
            write(&mut writers[busy], seed, "while another daemon was down");
        }
    }
    cluster.nodes[down].start();
    settle(cluster, seed);
    eprintln!(
        "seed {seed}: node {} restarted after downtime (graceful: {graceful})",
        down + 1
    );
}
