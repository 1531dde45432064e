//! Start-up, before the subsystems run: lock and open the database, install capture, start or reach
//! the broker, connect, check the streams, take the node-id lease (upstream-behaviour §1 order
//! where it matters: capture before publishing, streams before consumers).
//!
//! Invariants:
//! - The database lock is taken before anything touches the file; the caller holds it to the end.
//! - A failure after the embedded broker started stops it before returning.
//! - Operator-only conflicts (shard count, second live node id): [`StartError::Conflict`], exit 2.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
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
    /// The hash before the last schema change, if known (events may still carry it).
    pub previous_hash: String,
    /// Per table: changes up to this change-log id were captured before its columns changed
    /// (see [`crate::db::apply::Applier::set_stale_up_to`]); 0 at start.
    pub stale_up_to: Vec<i64>,
}

/// A node ready to run, and what its subsystems take over.
pub struct Ready {
    pub node: Node,
    pub capture: Capture,
    pub embedded: Option<stream::embedded::EmbeddedNats>,
    pub lease: Option<stream::lease::Lease>,
    /// Held until the node has stopped.
    pub lock: db::DbLock,
    /// The highest global change id an earlier run may have handed to NATS: its sent mark, else
    /// every change captured before we took the database lock (later ones cannot have been sent).
    pub sent_before_start: i64,
}

/// Runs start-up; `Ok(None)` on shutdown meanwhile; conflicts are [`StartError::Conflict`].
pub async fn setup(
    settings: Arc<Settings>,
    observers: Observers,
    root: CancellationToken,
) -> anyhow::Result<Option<Ready>> {
    let (capture, identity, lock, captured_before) = open_database(&settings).await?;
    let sent_before_start = crate::replicate::publish::SentMark::read(&settings.db_path, &identity)
        .unwrap_or(captured_before);
    let h = &observers.health;
    h.db_connected.store(true, Relaxed);
    h.cdc_installed.store(true, Relaxed);
    h.tables_tracked.store(capture.tables.len() as u64, Relaxed);

    // NATS: the configured servers, or our own supervised nats-server.
    let embedded = if settings.nats.urls.is_empty() {
        let Some(server) = unless_cancelled(start_embedded(&settings, &root).await)? else {
            return Ok(None);
        };
        Some(server)
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
        sent_before_start,
    }))
}

/// Locks the database, lists its tables and installs capture (off the reactor), and returns the
/// highest global change id captured before (under the lock no other run of ours sends more).
async fn open_database(
    settings: &Arc<Settings>,
) -> anyhow::Result<(Capture, String, db::DbLock, i64)> {
    let s = Arc::clone(settings);
    tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let lock = db::lock(&s.db_path)?;
        crate::snapshot::sweep_work_dirs(&s.db_path);
        let before = db::open(&s.db_path)?;
        let captured_before = db::changelog::ChangeLog::highest_global_id(&before)
            .context("Unable to read the change logs")?;
        let logged = logged_columns(&before)?;
        drop(before);
        let mut capture = install_capture(&s)?;
        // Columns changed while stopped: those tables' earlier changes may lack some. Only those:
        // other tables' pending changes must still hold back (and overrule) older remote events.
        if !capture.previous_hash.is_empty() {
            for (i, t) in capture.tables.iter().enumerate() {
                let same = logged.get(&db::change_log_name(&t.name)).is_some_and(|l| {
                    l.iter()
                        .map(String::as_str)
                        .eq(t.columns.iter().map(|c| c.name.as_str()))
                });
                if !same {
                    capture.stale_up_to[i] = max_log_id(&capture.conn, t)?;
                }
            }
        }
        let file = file_identity(&s.db_path);
        let binding = cdc::bind_identity(&mut capture.conn, &capture.tables, s.node_id, &file)
            .context("Unable to bind the database identity")?;
        match binding {
            cdc::Binding::Own => {}
            cdc::Binding::Renumbered { from } => {
                tracing::info!(from, to = s.node_id, "The database was bound to another node id; it now belongs to this one");
            }
            cdc::Binding::CopyOf { node_id, dropped } => {
                tracing::warn!(copy_of = node_id, not_sent = dropped,
                    "This database is a copy of another node's: its unpublished changes are that node's to publish and are not sent from here");
            }
        }
        let identity =
            cdc::identity(&capture.conn).context("Unable to read the database identity")?;
        adopt_positions(&capture.conn, &s)?;
        Ok((capture, identity, lock, captured_before))
    })
    .await
    .context("start-up task failed")?
}

/// `machine:device:inode` of the file (machine: `/etc/machine-id` or host name): a copy differs.
fn file_identity(path: &std::path::Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let machine = ["/etc/machine-id", "/proc/sys/kernel/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let (dev, ino) = std::fs::metadata(path)
        .map(|m| (m.dev(), m.ino()))
        .unwrap_or_default();
    format!("{machine}:{dev}:{ino}")
}

/// Positions live with the data (design §14): a run starts where the database records it applied,
/// whatever the seq map (Go's file; rewritten to match) says. A database restored from an old
/// backup thus replays what it lacks instead of skipping it; a lost seq map costs nothing.
fn adopt_positions(conn: &rusqlite::Connection, s: &Settings) -> anyhow::Result<()> {
    let recorded = db::applied_positions(conn).context("Unable to read the applied positions")?;
    let mut seqmap = crate::seqmap::SeqMap::open_tolerant(&s.seq_map_path)?;
    let streams: Vec<String> = (1..=s.replication.shards)
        .map(|shard| s.stream_name(shard))
        .collect();
    let moved: Vec<(&str, u64)> = streams
        .iter()
        .filter_map(|stream| Some((stream.as_str(), *recorded.get(stream)?)))
        .filter(|&(stream, seq)| seqmap.get(stream) != seq)
        .collect();
    if moved.is_empty() {
        return Ok(());
    }
    for &(stream, seq) in &moved {
        tracing::info!(
            stream,
            from_seq_map = seqmap.get(stream),
            from_database = seq,
            "Starting from the position the database records"
        );
    }
    seqmap
        .reset_all(moved)
        .context("Unable to save the sequence map")?;
    Ok(())
}

/// Installs capture again on a running node, for the schema after the application's DDL.
pub async fn reinstall(
    settings: &Arc<Settings>,
    before: Vec<db::Table>,
    before_stale: Vec<i64>,
) -> anyhow::Result<Capture> {
    let s = Arc::clone(settings);
    tokio::task::spawn_blocking(move || {
        let mut capture = install_capture(&s)?;
        let aliases =
            db::ddl::Aliases::load(&capture.conn).context("Unable to read schema aliases")?;
        for (i, t) in capture.tables.iter().enumerate() {
            let old = before.iter().position(|b| {
                b.name.eq_ignore_ascii_case(&t.name)
                    || aliases
                        .table(&b.name)
                        .is_some_and(|n| n.eq_ignore_ascii_case(&t.name))
            });
            // New tables too: their backfilled rows are older than what others may have sent.
            let changed = old.is_none_or(|o| before[o].columns != t.columns);
            let carried = old.and_then(|o| before_stale.get(o).copied()).unwrap_or(0);
            let now = if changed {
                max_log_id(&capture.conn, t)?
            } else {
                0
            };
            capture.stale_up_to[i] = carried.max(now);
        }
        Ok(capture)
    })
    .await
    .context("reinstall task failed")?
}

/// Per change log, the columns it records (no `val_` prefix), read before capture is reinstalled.
fn logged_columns(
    conn: &rusqlite::Connection,
) -> anyhow::Result<std::collections::HashMap<String, Vec<String>>> {
    let mut out: std::collections::HashMap<String, Vec<String>> = Default::default();
    let mut stmt = conn
        .prepare(
            "SELECT m.name, substr(p.name, 5) FROM sqlite_schema AS m, pragma_table_info(m.name) AS p \
             WHERE m.type = 'table' AND m.name LIKE '\\_\\_harmonylite\\_\\_%\\_change\\_log' ESCAPE '\\' \
             AND p.name LIKE 'val\\_%' ESCAPE '\\' ORDER BY m.name, p.cid",
        )
        .context("Unable to read the change logs")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .context("Unable to read the change logs")?;
    for row in rows {
        let (log, column) = row.context("Unable to read the change logs")?;
        out.entry(log).or_default().push(column);
    }
    Ok(out)
}

/// The highest change id in a table's change log (0 when empty).
fn max_log_id(conn: &rusqlite::Connection, table: &db::Table) -> anyhow::Result<i64> {
    let log = db::quote(&db::change_log_name(&table.name));
    let sql = format!("SELECT coalesce(max(id), 0) FROM {log}");
    conn.query_row(&sql, [], |r| r.get(0))
        .context("Unable to read the change logs")
}

/// Lists tables, hashes the schema, installs capture; retried while the schema changes meanwhile.
fn install_capture(settings: &Settings) -> anyhow::Result<Capture> {
    for _ in 1..20 {
        match install_once(settings) {
            Err(e) if is_schema_change(&e) => {
                tracing::debug!("schema changed while installing capture; again");
            }
            other => return other,
        }
    }
    install_once(settings)
}

fn is_schema_change(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| matches!(c.downcast_ref(), Some(db::Error::SchemaChanged)))
}

fn install_once(settings: &Settings) -> anyhow::Result<Capture> {
    let mut conn = db::open(&settings.db_path)?;
    tracing::info!("Listing tables to watch...");
    let tables = schema::watched_tables(&conn).context("Unable to list tables")?;
    if tables.is_empty() {
        tracing::warn!("No tables to watch; only remote changes will be applied");
    }
    let hash = schema::schema_hash(&conn, &tables).context("Unable to compute schema hash")?;
    tracing::info!(schema_hash = %format!("{}...", &hash[..16]), "Computed schema hash");
    let recorded = cdc::recorded_hash(&conn).context("Unable to read the schema version")?;
    let previous_hash = recorded.filter(|r| *r != hash).unwrap_or_default();
    if !previous_hash.is_empty() {
        tracing::info!(schema_hash = %format!("{}...", &hash[..16]),
            previous_hash = %format!("{}...", previous_hash.get(..16).unwrap_or(&previous_hash)),
            "Updated schema hash");
    }
    tracing::info!("Starting change data capture pipeline...");
    cdc::install(&mut conn, &tables, &hash)
        .context("Unable to install change data capture pipeline")?;
    Ok(Capture {
        conn,
        stale_up_to: vec![0; tables.len()],
        tables,
        hash,
        previous_hash,
    })
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
    let connecting = stream::connect(settings, &urls, root, move |up| {
        connected.nats_connected.store(up, Relaxed);
    });
    let Some(client) = unless_cancelled(connecting.await)? else {
        return Ok(None);
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
    if unless_cancelled(stream::ensure_streams(&js, settings, root).await)?.is_none() {
        return Ok(None);
    }
    tracing::info!("Streaming ready...");
    let lease = match stream::lease::acquire(&js, settings, identity, root).await {
        Ok(lease) => lease,
        Err(stream::lease::Error::Cancelled) => return Ok(None),
        Err(e) => return Err(StartError::Conflict(e.to_string()).into()),
    };
    Ok(Some((client, js, lease)))
}

/// `None` when `result` is a shutdown request.
fn unless_cancelled<T>(result: Result<T, stream::Error>) -> anyhow::Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(stream::Error::Cancelled) => Ok(None),
        Err(e) => Err(e.into()),
    }
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
    let listen = crate::config::listen_addr(&settings.nats.bind_address);
    let host = listen.rsplit_once(':').map_or("", |(host, _)| host);
    let ip = host.trim_matches(['[', ']']).parse::<std::net::IpAddr>();
    let loopback = ip.is_ok_and(|ip| ip.is_loopback());
    if !loopback && settings.nats.server_config.is_empty() {
        tracing::warn!(listen = %listen,
            "The embedded nats-server accepts clients on this address without authorization: whoever reaches it can read and write the replicated changes. Set nats.bind_address = \"127.0.0.1:-1\", or add authorization through nats.server_config");
    }
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
