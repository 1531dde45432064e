//! The snapshot side of a node as one subsystem: store, save source (if it applies), scheduler.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;

use super::Node;
use super::Subsystems;
use crate::snapshot::{self, scheduler::Snapshots};

/// The snapshot side, when snapshots are enabled.
pub(super) fn snapshots(
    node: &Node,
    positions: &Arc<[AtomicU64]>,
    gate: &Arc<Mutex<()>>,
    schema_hash: String,
    recovering: Arc<AtomicBool>,
) -> anyhow::Result<Option<Arc<Snapshots>>> {
    let settings = &node.settings;
    if !settings.snapshot.enabled {
        return Ok(None);
    }
    let store = snapshot::open_store(settings, &node.js)
        .context("Unable to initialize snapshot storage")?;
    let source = settings.replicate.then(|| snapshot::Source {
        db_path: settings.db_path.clone(),
        streams: node.streams(),
        positions: Arc::clone(positions),
        gate: Arc::clone(gate),
    });
    Ok(Some(Snapshots::new(
        node,
        store,
        source,
        schema_hash,
        recovering,
    )))
}

/// Snapshot leader election and save triggers.
pub(super) fn spawn_snapshots(tasks: &mut Subsystems, node: &Node, snapshots: &Arc<Snapshots>) {
    let run = Arc::clone(snapshots).run(node.root.clone());
    super::spawn_forever(tasks, "snapshot scheduler", run);
    let saves = Arc::clone(snapshots).serve_saves(node.root.clone());
    super::spawn_forever(tasks, "snapshot save requests", saves);
}
