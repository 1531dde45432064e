//! The program's modes at the top level: the daemon ([`run`]: observers and HTTP servers around
//! a [`crate::node`], which holds setup, subsystems, supervision and drain), `-cleanup`,
//! `-save-snapshot` and `-schema-status[-cluster]`.
//!
//! Invariants:
//! - The HTTP servers (metrics, health, pprof) start first, so health reports start-up, and stop
//!   last, after the node has drained.
//! - `-cleanup` takes the database lock: it refuses while a daemon runs on the database.
//!   `-save-snapshot` asks a running daemon to save (it holds the positions its database is
//!   consistent with), else takes the lock and saves itself.
//! - `-save-snapshot` succeeds (exit 0) only when the upload succeeded (Go exits 0 either way).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::db::{self, cdc};
use crate::health::HealthState;
use crate::metrics::Metrics;
use crate::node;

pub use crate::node::{Observers, StartError};

/// Removes every HarmonyLite artifact from the database (`-cleanup`).
pub fn cleanup(settings: &Settings) -> anyhow::Result<usize> {
    let _lock = db::lock(&settings.db_path)?;
    let mut conn = db::open(&settings.db_path)?;
    let dropped = cdc::remove(&mut conn).context("Unable to clean up")?;
    tracing::info!(dropped, "Cleanup complete...");
    Ok(dropped)
}

/// Saves one snapshot of the database and exits (`-save-snapshot`): asks the daemon running on
/// it, if any; else the daemon's start-up (capture, broker, streams), then a copy at the seq
/// map's positions (no daemon runs, so the database holds everything they name), uploaded.
/// Refused with `replicate = false` or `snapshot.enabled = false`.
pub async fn save_snapshot(
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<crate::snapshot::Meta> {
    if !settings.snapshot.enabled {
        anyhow::bail!("snapshot.enabled = false: there is no snapshot store to save to");
    }
    if !settings.replicate {
        anyhow::bail!(
            "replicate = false: this node does not apply the cluster's changes, so its database is not a snapshot of the cluster"
        );
    }
    match db::lock(&settings.db_path) {
        Err(db::Error::Locked(..)) => return ask_daemon_to_save(&settings, &shutdown).await,
        locked => drop(locked?),
    }
    let observers = Observers {
        metrics: Metrics::unserved(settings.node_id),
        health: HealthState::new(settings.node_id),
    };
    let Some(ready) = node::setup::setup(Arc::new(settings), observers, shutdown).await? else {
        anyhow::bail!("interrupted");
    };
    let node::setup::Ready {
        node,
        capture,
        embedded,
        lease,
        lock,
        ..
    } = ready;
    let result = async {
        let seqmap = crate::seqmap::SeqMap::open_tolerant(&node.settings.seq_map_path)?;
        let source = crate::snapshot::Source {
            db_path: node.settings.db_path.clone(),
            streams: node.streams(),
            positions: node.positions(&seqmap),
            gate: Arc::new(std::sync::Mutex::new(())),
        };
        let store = crate::snapshot::open_store(&node.settings, &node.js)
            .context("Unable to initialize snapshot storage")?;
        let id = node.settings.node_id;
        crate::snapshot::save(&source, store.as_ref(), id, &capture.hash)
            .await
            .context("Unable to save snapshot")
    }
    .await;
    if let Some(lease) = lease {
        lease.release().await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), node.client.flush()).await;
    if let Some(server) = &embedded {
        server.stop().await;
    }
    drop(lock);
    result
}

/// How long `-save-snapshot` waits for a running daemon to reach NATS, and to save.
const DAEMON_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const DAEMON_SAVE_TIMEOUT: Duration = Duration::from_secs(3600);

/// `-save-snapshot` beside a running daemon: asks it to save now ([`save_subject`]) and waits
/// for the outcome.
///
/// [`save_subject`]: crate::snapshot::scheduler::save_subject
async fn ask_daemon_to_save(
    settings: &Settings,
    shutdown: &CancellationToken,
) -> anyhow::Result<crate::snapshot::Meta> {
    let urls = if settings.nats.urls.is_empty() {
        let run_dir = crate::config::data_root_dir(&settings.db_path).join("nats");
        let url = crate::stream::embedded::running_client_url(&run_dir).with_context(|| {
            format!(
                "A daemon runs on this database, but no live embedded nats-server was found in {}",
                run_dir.display()
            )
        })?;
        vec![url]
    } else {
        settings.nats.urls.clone()
    };
    let connecting = crate::stream::connect(settings, &urls, shutdown, |_| {});
    let client = tokio::time::timeout(DAEMON_CONNECT_TIMEOUT, connecting)
        .await
        .context("Cannot reach NATS to ask the running daemon to save a snapshot")??;
    tracing::info!("A daemon runs on this database; asking it to save a snapshot");
    let subject = crate::snapshot::scheduler::save_subject(settings);
    // The daemon checks it runs on this very database (not another node's with this node_id).
    let identity = cdc::identity(&db::open(&settings.db_path)?)?;
    let request = async_nats::Request::new()
        .payload(identity.into())
        .timeout(Some(DAEMON_SAVE_TIMEOUT));
    let asked = client.send_request(subject, request);
    // A daemon that dies meanwhile never answers: its lock frees, and waiting ends.
    let gone = async {
        while db::lock(&settings.db_path).is_err() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let reply = tokio::select! {
        reply = asked => reply.map_err(|e| match e.kind() {
            async_nats::client::RequestErrorKind::NoResponders => anyhow::anyhow!(
                "No daemon answers for node_id {} (snapshots disabled there, another node_id such as -node-id, or an older version)",
                settings.node_id
            ),
            _ => anyhow::Error::new(e).context("The running daemon did not answer the save request"),
        })?,
        () = gone => anyhow::bail!("The daemon stopped before it answered; whether it saved is unknown"),
    };
    let answer: serde_json::Value =
        serde_json::from_slice(&reply.payload).context("Unreadable answer from the daemon")?;
    if let Some(error) = answer.get("error") {
        anyhow::bail!(
            "The running daemon could not save a snapshot: {}",
            error.as_str().unwrap_or_default()
        );
    }
    let meta = serde_json::from_value::<crate::snapshot::Meta>(answer)
        .context("Unreadable answer from the daemon")?;
    tracing::info!(size = meta.size, positions = ?meta.positions, "Snapshot saved by the running daemon");
    Ok(meta)
}

/// `-schema-status`: this database's schema hash and watched tables (read only; no NATS).
pub fn schema_status(settings: &Settings) -> anyhow::Result<String> {
    let conn = crate::db::open(&settings.db_path)?;
    let tables = crate::db::schema::watched_tables(&conn).context("Unable to list tables")?;
    let hash =
        crate::db::schema::schema_hash(&conn, &tables).context("Unable to compute schema hash")?;
    let names: Vec<String> = tables.into_iter().map(|t| t.name).collect();
    let id = settings.node_id;
    Ok(crate::registry::render_local(id, &hash, &names))
}

/// `-schema-status-cluster`: every node's registry entry, read through `nats.urls` or else the
/// local embedded server's address; gives up after [`STATUS_CONNECT_TIMEOUT`].
pub async fn schema_status_cluster(settings: &Settings) -> anyhow::Result<String> {
    let urls = if settings.nats.urls.is_empty() {
        let bind = &settings.nats.bind_address;
        let addr = match bind.strip_prefix(':') {
            Some(port) => format!("127.0.0.1:{port}"),
            None => bind.replace("0.0.0.0", "127.0.0.1"),
        };
        vec![format!("nats://{addr}")]
    } else {
        settings.nats.urls.clone()
    };
    let give_up = CancellationToken::new();
    let timer = {
        let t = give_up.clone();
        tokio::spawn(async move {
            tokio::time::sleep(STATUS_CONNECT_TIMEOUT).await;
            t.cancel();
        })
    };
    let client = crate::stream::connect(settings, &urls, &give_up, |_| {})
        .await
        .with_context(|| {
            format!(
                "Error retrieving cluster schema state: cannot reach NATS at {}",
                urls.join(", ")
            )
        })?;
    timer.abort();
    let js = async_nats::jetstream::new(client);
    let states = crate::registry::cluster_state(&js)
        .await
        .context("Error retrieving cluster schema state")?;
    Ok(crate::registry::render_cluster(&states))
}

/// How long `-schema-status-cluster` tries to reach NATS.
const STATUS_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the daemon until `shutdown` is cancelled, a start-up step fails or a subsystem fails.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let observers = Observers {
        metrics: Metrics::new(&settings.prometheus, settings.node_id)
            .context("invalid [prometheus] namespace or subsystem")?,
        health: HealthState::new(settings.node_id),
    };
    let limit = i64::from(settings.health_check.max_publish_held_seconds) * 1000;
    observers
        .health
        .update_catchup(|c| c.publish_held_limit_ms = limit);
    let root = shutdown.child_token();
    let servers = spawn_http_servers(&settings, &observers, &root).await;
    // The node's own token: its failure stops the node, not yet the HTTP servers.
    let ready = node::setup::setup(Arc::new(settings), observers, root.child_token()).await;
    let result = match ready {
        Ok(Some(ready)) => node::run::run(ready).await,
        other => other.map(|_| ()),
    };
    root.cancel();
    for server in servers {
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    }
    result
}

/// Starts the metrics and health servers that are enabled. A bind failure is logged and the node
/// runs on without that server, as Go does.
async fn spawn_http_servers(
    settings: &Settings,
    observers: &Observers,
    shutdown: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut servers = Vec::new();
    // Each server's name, address and router, and Go's log message when it cannot bind.
    let mut plan: Vec<(&'static str, String, axum::Router, &str)> = Vec::new();
    if settings.prometheus.enable {
        let router = crate::metrics::router(Arc::clone(&observers.metrics));
        let addr = crate::config::listen_addr(&settings.prometheus.bind);
        plan.push((
            "metrics",
            addr,
            router,
            "Unable to start controller listener",
        ));
    }
    if let Some(addr) = &settings.pprof {
        let router = crate::profiling::router();
        plan.push((
            "pprof",
            addr.clone(),
            router,
            "unable to bind profiler server",
        ));
    }
    let hc = &settings.health_check;
    if hc.enable {
        tracing::info!(bind = %hc.bind, path = %hc.path, "Starting health check server");
        let router = crate::health::router(Arc::clone(&observers.health), &hc.path, hc.detailed);
        let addr = crate::config::listen_addr(&hc.bind);
        plan.push(("health", addr, router, "Health check server error"));
    }
    for (name, addr, router, unbound) in plan {
        match tokio::net::TcpListener::bind(&addr).await {
            Ok(listener) => {
                tracing::info!(server = name, addr = %listener.local_addr().map_or(addr.clone(), |a| a.to_string()), "HTTP server listening");
                let token = shutdown.clone();
                servers.push(tokio::spawn(async move {
                    let serve = axum::serve(listener, router)
                        .with_graceful_shutdown(token.cancelled_owned());
                    if let Err(e) = serve.await {
                        tracing::error!(server = name, error = %e, "HTTP server failed");
                    }
                }));
            }
            Err(e) => tracing::error!(addr, error = %e, "{unbound}"),
        }
    }
    servers
}
