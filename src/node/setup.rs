//! Start-up: everything before the subsystems run (upstream-behaviour §1 order where it matters:
//! capture is installed before anything is published, streams exist before consumers start).
//!
//! Invariants:
//! - The database lock is taken before anything touches the file, and handed to the caller, who
//!   holds it until the very end.
//! - A failure after the embedded broker started stops it before returning.
//! - Conflicts an operator must resolve (shard count, a second live node id) are
//!   [`StartError::Conflict`] (exit 2); retrying cannot fix them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use super::{Inner, Node, Observers, StartError};
use crate::config::Settings;
use crate::db::{self, cdc, schema};
use crate::stream;

/// The database side once capture is installed.
pub struct Capture {
    /// The connection capture was installed with (the keeper writes through it).
    pub conn: rusqlite::Connection,
    pub tables: Vec<db::Table>,
    /// The schema hash sent as `sh`.
    pub hash: String,
}

/// A node ready to run, and what its subsystems take over.
pub struct Ready {
    pub node: Node,
    pub capture: Capture,
    pub embedded: Option<stream::embedded::EmbeddedNats>,
    pub lease: Option<stream::lease::Lease>,
    /// Held until the node has stopped.
    pub lock: db::DbLock,
}

/// Runs start-up. `Ok(None)` when shutdown was requested meanwhile.
///
/// # Errors
/// Database, capture, broker, NATS or stream failures, with context; conflicts as
/// [`StartError::Conflict`].
pub async fn setup(
    settings: Arc<Settings>,
    observers: Observers,
    root: CancellationToken,
) -> anyhow::Result<Option<Ready>> {
    let (capture, identity, lock) = open_database(&settings).await?;
    {
        use std::sync::atomic::Ordering::Relaxed;
        let h = &observers.health;
        h.db_connected.store(true, Relaxed);
        h.cdc_installed.store(true, Relaxed);
        h.tables_tracked.store(capture.tables.len() as u64, Relaxed);
    }

    // NATS: the configured servers, or our own supervised nats-server.
    let embedded = if settings.nats.urls.is_empty() {
        match start_embedded(&settings, &root).await {
            Ok(server) => Some(server),
            Err(stream::Error::Cancelled) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    } else {
        None
    };
    let reached = reach_cluster(&settings, &observers, &root, &identity, embedded.as_ref()).await;
    let (client, js, lease) = match reached {
        Ok(Some(r)) => r,
        other => {
            if let Some(server) = &embedded {
                server.stop().await;
            }
            return other.map(|_| None);
        }
    };
    Ok(Some(Ready {
        node: Node::new(Inner {
            settings,
            identity,
            client,
            js,
            observers,
            root,
        }),
        capture,
        embedded,
        lease,
        lock,
    }))
}

/// Locks the database, lists its tables and installs capture (blocking work, off the reactor).
async fn open_database(settings: &Arc<Settings>) -> anyhow::Result<(Capture, String, db::DbLock)> {
    let s = Arc::clone(settings);
    tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let lock = db::lock(&s.db_path)?;
        crate::snapshot::sweep_work_dirs(&s.db_path);
        let mut conn = db::open(&s.db_path)?;
        tracing::info!("Listing tables to watch...");
        let tables = schema::watched_tables(&conn).context("Unable to list tables")?;
        if tables.is_empty() {
            tracing::warn!("No tables to watch; only remote changes will be applied");
        }
        let hash = schema::schema_hash(&conn, &tables).context("Unable to compute schema hash")?;
        tracing::info!(schema_hash = %format!("{}...", &hash[..16]), "Computed schema hash");
        tracing::info!("Starting change data capture pipeline...");
        cdc::install(&mut conn, &tables, &hash)
            .context("Unable to install change data capture pipeline")?;
        let identity = cdc::identity(&conn).context("Unable to read the database identity")?;
        Ok((Capture { conn, tables, hash }, identity, lock))
    })
    .await
    .context("start-up task failed")?
}

type Reached = (
    async_nats::Client,
    async_nats::jetstream::Context,
    Option<stream::lease::Lease>,
);

/// Connects, checks the shard count, makes sure the streams exist and takes the node-id lease.
async fn reach_cluster(
    settings: &Settings,
    observers: &Observers,
    root: &CancellationToken,
    identity: &str,
    embedded: Option<&stream::embedded::EmbeddedNats>,
) -> anyhow::Result<Option<Reached>> {
    let urls = match embedded {
        Some(server) => vec![server.client_url().to_owned()],
        None => settings.nats.urls.clone(),
    };
    let connected = Arc::clone(&observers.health);
    let client = match stream::connect(settings, &urls, root, move |up| {
        connected
            .nats_connected
            .store(up, std::sync::atomic::Ordering::Relaxed);
    })
    .await
    {
        Ok(c) => c,
        Err(stream::Error::Cancelled) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    // Go's JetStream request timeout; the client default (10 s) slows cluster bootstrap.
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .build(client.clone());
    match stream::shard_mismatch(&js, settings).await {
        Ok(Some(mismatch)) => return Err(StartError::Conflict(mismatch).into()),
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "Cannot list streams to check the shard count")
        }
    }
    match stream::ensure_streams(&js, settings, root).await {
        Ok(()) => {}
        Err(stream::Error::Cancelled) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    tracing::info!("Streaming ready...");
    let lease = match stream::lease::acquire(&js, settings, identity, root).await {
        Ok(lease) => lease,
        Err(stream::lease::Error::Cancelled) => return Ok(None),
        Err(e) => return Err(StartError::Conflict(e.to_string()).into()),
    };
    Ok(Some((client, js, lease)))
}

/// Starts the embedded server as Go HarmonyLite configures its in-process one.
async fn start_embedded(
    settings: &Settings,
    shutdown: &CancellationToken,
) -> Result<stream::embedded::EmbeddedNats, stream::Error> {
    use stream::embedded::{EmbeddedConfig, EmbeddedNats, find_binary};
    let binary = find_binary(&settings.nats.server_binary)?;
    let routes = stream::discovery::resolve_all(&settings.cluster.peers, shutdown).await?;
    let leaf_remotes =
        stream::discovery::resolve_all(&settings.cluster.leaf_servers, shutdown).await?;
    let data_dir = crate::config::data_root_dir(&settings.db_path).join("nats");
    let listen = match settings.nats.bind_address.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => settings.nats.bind_address.clone(),
    };
    let cfg = EmbeddedConfig {
        binary,
        server_name: settings.node_name(),
        listen,
        store_dir: data_dir.join(settings.node_name()),
        run_dir: data_dir,
        cluster_listen: settings.cluster.listen.clone(),
        routes,
        leaf_remotes,
        user_config: (!settings.nats.server_config.is_empty())
            .then(|| settings.nats.server_config.clone().into()),
    };
    Ok(EmbeddedNats::start(cfg).await?)
}
