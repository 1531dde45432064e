//! The daemon: opens the database, installs capture, connects to NATS, and runs the publisher,
//! the per-shard consumers, the apply thread and the cleanup loop until shutdown.
//!
//! Invariants:
//! - Start-up order follows Go (upstream-behaviour §1) where it matters: capture is installed
//!   before anything is published, and streams exist before consumers start.
//! - One root [`CancellationToken`]; every task watches it. A task that fails trips it, and
//!   [`run`] returns that failure after everything has stopped.
//! - Shutdown (design §3.9): stop intake, let the publisher finish its in-flight pass and the
//!   apply thread its batch and seq-map save, then return. Nothing is left running.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::db::{self, apply::Applier, cdc, changelog::ChangeLog, schema};
use crate::health::HealthState;
use crate::metrics::Metrics;
use crate::replicate::apply::{self as applying, ApplyObservers};
use crate::replicate::publish::{self, Outbox};
use crate::replicate::publish::{LocalLog, Publisher};
use crate::replicate::watch;
use crate::seqmap::SeqMap;
use crate::stream;

/// Start-up refusals that a restart cannot fix (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The cluster disagrees with this node's configuration or identity.
    #[error("{0}")]
    Conflict(String),
}

/// How long shutdown waits for tasks to finish their current work.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Removes every HarmonyLite artifact from the database (`-cleanup`).
///
/// # Errors
/// The database is missing or SQLite refuses.
pub fn cleanup(settings: &Settings) -> anyhow::Result<usize> {
    let _lock = db::lock(&settings.db_path)?;
    let mut conn = db::open(&settings.db_path)?;
    let dropped = cdc::remove(&mut conn).context("Unable to clean up")?;
    tracing::info!(dropped, "Cleanup complete...");
    Ok(dropped)
}

/// What a running node reports to the outside: metrics and the health endpoint's state.
#[derive(Clone)]
pub struct Observers {
    pub metrics: Arc<Metrics>,
    pub health: Arc<HealthState>,
}

/// Runs the daemon until `shutdown` is cancelled or a subsystem fails.
///
/// # Errors
/// Start-up failures (database, capture install, NATS configuration, streams) and any subsystem
/// failure while running, with context.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let observers = Observers {
        metrics: Metrics::new(&settings.prometheus, settings.node_id)
            .context("invalid [prometheus] namespace or subsystem")?,
        health: HealthState::new(settings.node_id),
    };
    let root = shutdown.child_token();
    let servers = spawn_http_servers(&settings, &observers, &root).await;
    let result = run_observed(settings, root.clone(), observers).await;
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
    let mut plan: Vec<(&'static str, String, axum::Router)> = Vec::new();
    if settings.prometheus.enable {
        plan.push((
            "metrics",
            crate::metrics::listen_addr(&settings.prometheus.bind),
            crate::metrics::router(Arc::clone(&observers.metrics)),
        ));
    }
    if let Some(addr) = &settings.pprof {
        plan.push(("pprof", addr.clone(), crate::profiling::router()));
    }
    let hc = &settings.health_check;
    if hc.enable {
        tracing::info!(bind = %hc.bind, path = %hc.path, "Starting health check server");
        plan.push((
            "health",
            crate::metrics::listen_addr(&hc.bind),
            crate::health::router(Arc::clone(&observers.health), &hc.path, hc.detailed),
        ));
    }
    for (name, addr, router) in plan {
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
            Err(e) => match name {
                "metrics" => {
                    tracing::error!(addr, error = %e, "Unable to start controller listener")
                }
                "pprof" => tracing::error!(addr, error = %e, "unable to bind profiler server"),
                _ => tracing::error!(addr, error = %e, "Health check server error"),
            },
        }
    }
    servers
}

/// [`run`] with the observers and shutdown token already set up.
///
/// # Errors
/// As [`run`].
pub async fn run_observed(
    settings: Settings,
    shutdown: CancellationToken,
    observers: Observers,
) -> anyhow::Result<()> {
    let settings = Arc::new(settings);
    let root = shutdown.child_token();

    // Database and capture (blocking work, done before anything async depends on it).
    let s = Arc::clone(&settings);
    let (conn, tables, hash, identity, lock) =
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let lock = db::lock(&s.db_path)?;
            let mut conn = db::open(&s.db_path)?;
            tracing::info!("Listing tables to watch...");
            let tables = schema::watched_tables(&conn).context("Unable to list tables")?;
            if tables.is_empty() {
                tracing::warn!("No tables to watch; only remote changes will be applied");
            }
            let hash =
                schema::schema_hash(&conn, &tables).context("Unable to compute schema hash")?;
            tracing::info!(schema_hash = %format!("{}...", &hash[..16]), "Computed schema hash");
            tracing::info!("Starting change data capture pipeline...");
            cdc::install(&mut conn, &tables, &hash)
                .context("Unable to install change data capture pipeline")?;
            let identity = cdc::identity(&conn).context("Unable to read the database identity")?;
            Ok((conn, tables, hash, identity, lock))
        })
        .await
        .context("start-up task failed")??;
    {
        use std::sync::atomic::Ordering::Relaxed;
        observers.health.db_connected.store(true, Relaxed);
        observers.health.cdc_installed.store(true, Relaxed);
        observers
            .health
            .tables_tracked
            .store(tables.len() as u64, Relaxed);
    }

    // NATS: the configured servers, or our own supervised nats-server.
    let embedded = if settings.nats.urls.is_empty() {
        match start_embedded(&settings, &root).await {
            Ok(server) => Some(server),
            Err(stream::Error::Cancelled) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    } else {
        None
    };
    let urls = match &embedded {
        Some(server) => vec![server.client_url().to_owned()],
        None => settings.nats.urls.clone(),
    };
    let connected = Arc::clone(&observers.health);
    let client = match stream::connect(&settings, &urls, &root, move |up| {
        connected
            .nats_connected
            .store(up, std::sync::atomic::Ordering::Relaxed);
    })
    .await
    {
        Ok(c) => c,
        Err(e) => {
            if let Some(server) = &embedded {
                server.stop().await;
            }
            return match e {
                stream::Error::Cancelled => Ok(()),
                e => Err(e.into()),
            };
        }
    };
    let result = run_connected(
        settings,
        root,
        observers,
        Capture {
            conn,
            tables,
            hash,
            identity,
        },
        client,
        embedded.as_ref(),
    )
    .await;
    drop(lock);
    if let Some(server) = &embedded {
        tracing::info!("Stopping embedded nats-server");
        server.stop().await;
    }
    result
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

/// The database side once capture is installed.
struct Capture {
    conn: rusqlite::Connection,
    tables: Vec<db::Table>,
    hash: String,
    identity: String,
}

/// Everything after the NATS connection exists.
async fn run_connected(
    settings: Arc<Settings>,
    root: CancellationToken,
    observers: Observers,
    capture: Capture,
    client: async_nats::Client,
    embedded: Option<&stream::embedded::EmbeddedNats>,
) -> anyhow::Result<()> {
    let Capture {
        conn,
        tables,
        hash,
        identity,
    } = capture;
    // Go's JetStream request timeout; the client default (10 s) slows cluster bootstrap.
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .build(client.clone());
    match stream::shard_mismatch(&js, &settings).await {
        Ok(Some(mismatch)) => return Err(StartError::Conflict(mismatch).into()),
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "Cannot list streams to check the shard count")
        }
    }
    if let Err(e) = stream::ensure_streams(&js, &settings, &root).await {
        if matches!(e, stream::Error::Cancelled) {
            return Ok(());
        }
        return Err(e.into());
    }
    tracing::info!("Streaming ready...");
    let lease = match stream::lease::acquire(&js, &settings, &identity, &root).await {
        Ok(lease) => lease,
        Err(stream::lease::Error::Cancelled) => return Ok(()),
        Err(e) => return Err(StartError::Conflict(e.to_string()).into()),
    };

    let mut tasks: JoinSet<(&'static str, anyhow::Result<()>)> = JoinSet::new();
    let log = Arc::new(ChangeLog::new(tables));
    let streams: Vec<String> = (1..=settings.replication.shards)
        .map(|shard| settings.stream_name(shard))
        .collect();
    let seqmap = SeqMap::open_tolerant(&settings.seq_map_path)?;
    let positions: Arc<[AtomicU64]> = streams
        .iter()
        .map(|s| AtomicU64::new(seqmap.get(s)))
        .collect();
    // Own events come back (and must be told apart) only when we both publish and apply.
    let track = settings.publish && settings.replicate;
    let acked = ChangeLog::last_landed(&conn).context("Unable to read publish state")?;
    let max_event_bytes = max_event_bytes(&client);

    // Publishing side.
    let outbox = Outbox::default();
    let shared = Arc::new(Mutex::new(LocalLog {
        conn,
        log: Arc::clone(&log),
    }));
    let wake = Arc::new(Notify::new());
    let _watcher = match watch::watch(&settings.db_path, Arc::clone(&wake)) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "Cannot watch database files; relying on periodic scans");
            None
        }
    };
    let publisher = Publisher::new(
        Arc::clone(&shared),
        db::open(&settings.db_path)?,
        js.clone(),
        Arc::clone(&settings),
        hash,
        identity.clone(),
        Arc::clone(&outbox),
        acked,
        Arc::clone(&observers.metrics),
        Arc::clone(&observers.health),
    );
    // Before anything is applied: changes that reached the stream before a crash are retired
    // with where they landed (the applier must know which of ours have come back).
    let mut delay = Duration::from_millis(200);
    loop {
        match publisher.recover(&shared).await {
            Ok(0) => break,
            Ok(n) => {
                tracing::info!(changes = n, "Recovered published changes from the stream");
                break;
            }
            Err(e) if e.is_fatal() => {
                return Err(anyhow::Error::new(e).context("Unable to recover published changes"));
            }
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "Cannot check the streams for changes sent before the restart; retrying");
                tokio::select! {
                    biased;
                    _ = root.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = stream::next_backoff(delay);
            }
        }
    }

    // Applying side.
    if settings.replicate {
        let applied: Vec<u64> = streams.iter().map(|s| seqmap.get(s)).collect();
        let applier = Applier::new(
            db::open(&settings.db_path)?,
            Arc::clone(&log),
            applied,
            track,
        )
        .context("Unable to start the applier")?;
        let (tx, rx) = mpsc::channel(applying::CHANNEL_DEPTH);
        for (idx, name) in streams.iter().enumerate() {
            let start = seqmap.get(name) + 1;
            tracing::info!(stream = %name, from_seq = start, "Starting consumer");
            let spec = applying::ConsumerSpec {
                js: js.clone(),
                settings: Arc::clone(&settings),
                shard: idx as u64 + 1,
                start_seq: start,
                health: Arc::clone(&observers.health),
            };
            let (tx, token) = (tx.clone(), root.clone());
            tasks.spawn(async move {
                applying::run_consumer(spec, tx, token).await;
                ("consumer", Ok(()))
            });
        }
        drop(tx);
        let thread = applying::spawn_apply_thread(
            applying::ApplyThread {
                applier,
                seqmap,
                streams: streams.clone(),
                compressed: settings.replication.compress,
                max_event_bytes,
                identity: identity.clone(),
                observers: ApplyObservers {
                    metrics: Arc::clone(&observers.metrics),
                    health: Arc::clone(&observers.health),
                },
                positions: Arc::clone(&positions),
            },
            rx,
            root.clone(),
        )?;
        tasks.spawn(async move {
            let joined = tokio::task::spawn_blocking(move || thread.join()).await;
            let result = match joined {
                Ok(Ok(Ok(()))) => Ok(()),
                Ok(Ok(Err(e))) => Err(anyhow::Error::new(e)),
                Ok(Err(_)) | Err(_) => Err(anyhow::anyhow!("the apply thread panicked")),
            };
            ("apply thread", result)
        });
    } else {
        tracing::info!("replicate = false: remote changes will not be applied");
    }

    let token = root.clone();
    let w = Arc::clone(&wake);
    // The keeper outlives the publisher by one final retirement, so it gets its own token.
    let keeper_stop = CancellationToken::new();
    let publisher_done = keeper_stop.clone();
    tasks.spawn(async move {
        let result = publisher.run(w, token).await;
        publisher_done.cancel();
        ("publisher", result.map_err(anyhow::Error::new))
    });
    let s = Arc::clone(&settings);
    let keeper_positions = track.then(|| Arc::clone(&positions));
    tasks.spawn(async move {
        let result = publish::keep(shared, outbox, s, keeper_positions, keeper_stop).await;
        ("change-log keeper", result.map_err(anyhow::Error::new))
    });
    if let Some(lease) = lease {
        let token = root.clone();
        tasks.spawn(async move {
            let result = lease
                .run(token)
                .await
                .map_err(|e| anyhow::Error::new(StartError::Conflict(e.to_string())));
            ("node-id lease", result)
        });
    }
    let token = root.clone();
    let path = settings.db_path.clone();
    tasks.spawn(async move { ("database watchdog", watch_database_file(path, token).await) });
    tracing::info!(shards = settings.replication.shards, "Replication running");
    crate::systemd::notify("READY=1");

    // Run until shutdown, the first task that ends on its own, or the broker dying under us.
    let mut failure: Option<anyhow::Error> = None;
    let broker_exit = async {
        match embedded {
            Some(server) => server.exited().await,
            None => std::future::pending().await,
        }
    };
    let sleep_timeout = settings.sleep_timeout;
    let idle = async {
        match sleep_timeout {
            Some(timeout) => observers.health.idle_for(timeout).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        _ = root.cancelled() => {}
        _ = idle => {
            tracing::info!("No more events to process, initiating shutdown");
        }
        status = broker_exit => {
            failure = Some(anyhow::anyhow!(
                "embedded nats-server exited unexpectedly ({status}); stopping rather than running without a broker"
            ));
        }
        Some(done) = tasks.join_next() => {
            // Tasks end by themselves once shutdown has begun; only an early end is a failure.
            if !root.is_cancelled() {
            failure = Some(match done {
                Ok((name, Ok(()))) => anyhow::anyhow!("{name} stopped unexpectedly"),
                Ok((name, Err(e))) => e.context(format!("{name} failed")),
                Err(e) => anyhow::anyhow!("task panicked: {e}"),
            });
            }
        }
    }
    if let Some(e) = &failure {
        tracing::error!("{e:#}; shutting down");
    }
    crate::systemd::notify("STOPPING=1");
    root.cancel();
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(done) = tasks.join_next().await {
            if let Ok((name, Err(e))) = done {
                tracing::warn!(task = name, error = %format!("{e:#}"), "task failed during shutdown");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("some tasks did not stop in time; aborting them");
        tasks.abort_all();
    }
    // Bounded: with the broker gone, a flush would wait for a reconnect that never comes.
    match tokio::time::timeout(Duration::from_secs(2), client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "NATS flush on shutdown failed"),
        Err(_) => tracing::debug!("NATS flush on shutdown timed out"),
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Stops the node when the database file it opened is deleted or replaced: SQLite would go on
/// writing into the unlinked file, and the application (which opens the path) would never see it.
async fn watch_database_file(path: PathBuf, shutdown: CancellationToken) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let identity = |m: std::fs::Metadata| (m.dev(), m.ino());
    let opened = std::fs::metadata(&path)
        .map(identity)
        .with_context(|| format!("cannot stat database file {}", path.display()))?;
    let mut tick = tokio::time::interval(DB_FILE_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        match std::fs::metadata(&path).map(identity) {
            Ok(now) if now == opened => {}
            Ok(_) => anyhow::bail!(
                "database file {} was replaced by another file; stopping (restart to use the new one)",
                path.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
                "database file {} was deleted; stopping rather than replicating into a file nobody sees",
                path.display()
            ),
            Err(_) => {}
        }
    }
}

/// How often the database file's identity is checked.
const DB_FILE_CHECK: Duration = Duration::from_secs(1);

/// Largest decompressed event accepted: 16 × the server's `max_payload` (a compressed message
/// must fit in one payload; zstd rarely does better than 16:1 on real rows), at least 16 MiB.
fn max_event_bytes(client: &async_nats::Client) -> usize {
    let payload = client.server_info().max_payload;
    payload.saturating_mul(16).max(16 * 1024 * 1024)
}
