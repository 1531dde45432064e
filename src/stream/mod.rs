//! NATS and JetStream: the client connection, the per-shard streams, and the pull consumers the
//! applying side reads through. This module knows NATS and [`crate::wire`] names, not SQLite.
//!
//! Invariants:
//! - Shard streams are created with Go HarmonyLite's exact configuration (upstream-behaviour §5.4)
//!   when missing; an existing one is updated only with `update_existing` and a real difference.
//! - Consumers are ephemeral pull consumers without acks ([`pull_consumer`]) starting at the saved
//!   sequence + 1, never re-reading what this node already applied (design §3.7).
//! - Nothing gives up on a down broker: connecting and stream set-up retry until done or shutdown.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, context, stream as js_stream};
use tokio_util::sync::CancellationToken;

use crate::config::{NatsConfig, Settings};

pub mod discovery;
pub mod embedded;
pub mod lease;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to NATS at {urls}: {message}")]
    Connect { urls: String, message: String },
    #[error("stream {stream}: {message}")]
    Stream { stream: String, message: String },
    #[error(transparent)]
    Embedded(#[from] embedded::Error),
    #[error(transparent)]
    Discovery(#[from] discovery::Error),
    /// A stream's state could not be read ([`stream_range`], [`pull_consumer`]; callers retry).
    #[error(transparent)]
    StreamInfo(#[from] context::GetStreamError),
    /// An ephemeral consumer could not be created ([`pull_consumer`]); the caller retries.
    #[error(transparent)]
    CreateConsumer(#[from] js_stream::ConsumerError),
    #[error("shutdown requested")]
    Cancelled,
    #[error(transparent)]
    Credentials(#[from] Credentials),
}

/// A configured credential or certificate file that cannot be used (fatal: no retry helps).
#[derive(Debug, thiserror::Error)]
pub enum Credentials {
    #[error("cannot read {key} {path}")]
    Unreadable {
        key: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nats.seed_file {0} holds no user seed (SU…)")]
    NoSeed(String),
    #[error("{key} {path} is not a readable file")]
    NotAFile { key: &'static str, path: String },
}

/// Whether JetStream answered that the stream does not exist.
fn not_found(e: &context::GetStreamError) -> bool {
    matches!(e.kind(), context::GetStreamErrorKind::JetStream(je)
        if je.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// Connects to `urls` with the configured authentication, retrying the first connection while the
/// servers are unreachable (logs `NATS connection failed`); later the client reconnects by itself.
/// [`Error::Connect`] only for what retries cannot fix: rejected credentials, TLS, bad seed or URL.
pub async fn connect(
    settings: &Settings,
    urls: &[String],
    shutdown: &CancellationToken,
    on_state: impl Fn(bool) + Send + Sync + Clone + 'static,
) -> Result<async_nats::Client, Error> {
    use async_nats::ConnectErrorKind as Kind;
    // rustls picks a crypto provider by itself only when exactly one is compiled in; the HTTP
    // clients of the snapshot stores bring aws-lc-rs beside async-nats' ring. Choose ring (what
    // the NATS client used alone) once per process; a second call only reports it is set.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let nats = &settings.nats;
    let joined = urls.join(", ");
    let connect_err = |message: String| Error::Connect {
        urls: joined.clone(),
        message,
    };
    let addrs: Vec<async_nats::ServerAddr> = urls
        .iter()
        .map(|u| u.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|e| connect_err(format!("invalid URL in nats.urls: {e}")))?;
    let mut backoff = crate::retry::Backoff::default();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let opts = connect_options(settings, on_state.clone())?;
        match opts.connect(addrs.clone()).await {
            Ok(client) => {
                on_state(true);
                return Ok(client);
            }
            Err(e) => match e.kind() {
                Kind::Authentication | Kind::AuthorizationViolation => {
                    let hint = if !nats.seed_file.is_empty() {
                        "check nats.seed_file"
                    } else if !nats.user_name.is_empty() {
                        "check nats.user_name and nats.user_password"
                    } else {
                        "the server requires credentials: set nats.user_name/user_password or nats.seed_file"
                    };
                    return Err(connect_err(format!("authorization failed ({e}); {hint}")));
                }
                // async-nats reports certificate failures as I/O errors; no retry fixes them.
                _ if e.kind() == Kind::Tls || is_certificate_error(&e.to_string()) => {
                    return Err(connect_err(format!(
                        "TLS failed ({e}); check nats.ca_file, nats.cert_file and nats.key_file"
                    )));
                }
                Kind::ServerParse => return Err(connect_err(e.to_string())),
                _ => {
                    if attempt == 1 || attempt.is_power_of_two() {
                        tracing::warn!(attempt, error = %e, urls = %joined, "NATS connection failed");
                    }
                    if !backoff.wait(shutdown).await {
                        return Err(Error::Cancelled);
                    }
                }
            },
        }
    }
}

/// Whether an error text describes a TLS certificate or handshake rejection.
fn is_certificate_error(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    [
        "certificate",
        "unknownissuer",
        "received fatal alert",
        "handshake",
        // A TLS client answered by a server that does not speak TLS.
        "corrupt message",
    ]
    .iter()
    .any(|needle| t.contains(needle))
}

/// Client options (name, reconnects, logging, auth, TLS); `on_state` learns if it is connected.
fn connect_options(
    settings: &Settings,
    on_state: impl Fn(bool) + Send + Sync + 'static,
) -> Result<async_nats::ConnectOptions, Credentials> {
    let on_state = Arc::new(on_state);
    let nats = &settings.nats;
    let wait = Duration::from_secs(u64::from(nats.reconnect_wait_seconds.max(1)));
    let was_connected = Arc::new(AtomicBool::new(false));
    let opts = async_nats::ConnectOptions::new()
        .name(settings.node_name())
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .reconnect_delay_callback(move |attempts| {
            if attempts <= 1 {
                Duration::from_millis(100)
            } else {
                wait
            }
        })
        .event_callback(move |event| {
            let was_connected = Arc::clone(&was_connected);
            let on_state = Arc::clone(&on_state);
            async move { report_event(event, &was_connected, &*on_state) }
        });
    with_tls(with_auth(opts, nats)?, nats)
}

/// Logs a client connection event and tells `on_state` when the connection goes up or down.
fn report_event(
    event: async_nats::Event,
    was_connected: &AtomicBool,
    on_state: &(impl Fn(bool) + ?Sized),
) {
    use async_nats::Event;
    match event {
        Event::Disconnected => {
            on_state(false);
            tracing::warn!("NATS client disconnected")
        }
        Event::Connected => {
            on_state(true);
            if was_connected.swap(true, Ordering::Relaxed) {
                tracing::info!("NATS client reconnected");
            } else {
                tracing::info!("NATS client connected");
            }
        }
        Event::Closed => {
            on_state(false);
            tracing::warn!("NATS client exiting")
        }
        Event::ServerError(e) => tracing::error!(error = %e, "NATS server error"),
        Event::ClientError(e) => tracing::warn!(error = %e, "NATS client error"),
        other => tracing::debug!(event = %other, "NATS event"),
    }
}

/// User and password, then the nkey seed from `nats.seed_file`, when configured.
fn with_auth(
    mut opts: async_nats::ConnectOptions,
    nats: &NatsConfig,
) -> Result<async_nats::ConnectOptions, Credentials> {
    if !nats.user_name.is_empty() {
        opts = opts.user_and_password(nats.user_name.clone(), nats.user_password.clone());
    }
    if !nats.seed_file.is_empty() {
        let text =
            std::fs::read_to_string(&nats.seed_file).map_err(|source| Credentials::Unreadable {
                key: "nats.seed_file",
                path: nats.seed_file.clone(),
                source,
            })?;
        let seed = text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("SU"))
            .ok_or_else(|| Credentials::NoSeed(nats.seed_file.clone()))?;
        opts = opts.nkey(seed.to_owned());
    }
    Ok(opts)
}

/// The CA and client certificate, when configured; either one requires TLS.
fn with_tls(
    mut opts: async_nats::ConnectOptions,
    nats: &NatsConfig,
) -> Result<async_nats::ConnectOptions, Credentials> {
    for (key, path) in [
        ("nats.ca_file", &nats.ca_file),
        ("nats.cert_file", &nats.cert_file),
        ("nats.key_file", &nats.key_file),
    ] {
        if !path.is_empty() && !Path::new(path).is_file() {
            return Err(Credentials::NotAFile {
                key,
                path: path.clone(),
            });
        }
    }
    if !nats.ca_file.is_empty() {
        opts = opts
            .add_root_certificates(nats.ca_file.clone().into())
            .require_tls(true);
    }
    if !nats.cert_file.is_empty() {
        opts = opts
            .add_client_certificate(nats.cert_file.clone().into(), nats.key_file.clone().into())
            .require_tls(true);
    }
    Ok(opts)
}

/// Go's stream configuration for one shard (upstream-behaviour §5.4).
pub fn stream_config(settings: &Settings, shard: u64) -> js_stream::Config {
    js_stream::Config {
        name: settings.stream_name(shard),
        subjects: vec![settings.subject_name(shard)],
        discard: js_stream::DiscardPolicy::Old,
        max_messages: settings.replication.max_entries,
        storage: js_stream::StorageType::File,
        retention: js_stream::RetentionPolicy::Limits,
        allow_direct: true,
        max_consumers: -1,
        max_messages_per_subject: -1,
        max_bytes: -1,
        deny_delete: true,
        num_replicas: settings.replication.replicas,
        ..Default::default()
    }
}

/// True when an existing stream's settings differ from what we would create, ignoring fields the
/// server fills in (Go compared `Duplicates` too and so updated on every start).
fn differs(have: &js_stream::Config, want: &js_stream::Config) -> bool {
    have.subjects != want.subjects
        || have.max_messages != want.max_messages
        || have.num_replicas != want.num_replicas
        || have.discard != want.discard
        || have.storage != want.storage
        || have.allow_direct != want.allow_direct
        || have.deny_delete != want.deny_delete
}

/// Ensures every shard stream (module header); [`Error::Stream`] if JetStream rejects one.
pub async fn ensure_streams(
    js: &jetstream::Context,
    settings: &Settings,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    for shard in 1..=settings.replication.shards {
        ensure_stream(js, settings, shard, shutdown).await?;
    }
    Ok(())
}

/// Makes sure one shard's stream exists (see [`ensure_streams`]).
pub async fn ensure_stream(
    js: &jetstream::Context,
    settings: &Settings,
    shard: u64,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let want = stream_config(settings, shard);
    let mut backoff = crate::retry::Backoff::default();
    for attempt in 1u32.. {
        match ensure_one(js, settings, &want).await {
            Ok(()) => break,
            Err(EnsureError::Fatal(message)) => {
                return Err(Error::Stream {
                    stream: want.name.clone(),
                    message,
                });
            }
            Err(EnsureError::Retry(message)) => {
                if attempt == 1 || attempt.is_power_of_two() {
                    tracing::warn!(stream = %want.name, attempt, error = %message,
                        "Failed to get stream info, retrying...");
                }
                if !backoff.wait(shutdown).await {
                    return Err(Error::Cancelled);
                }
            }
        }
    }
    tracing::debug!(shard, name = %want.name, replicas = want.num_replicas, "Stream ready...");
    Ok(())
}

enum EnsureError {
    Retry(String),
    Fatal(String),
}

/// Creates the stream when missing, else updates it when asked to and it differs.
async fn ensure_one(
    js: &jetstream::Context,
    settings: &Settings,
    want: &js_stream::Config,
) -> Result<(), EnsureError> {
    use async_nats::jetstream::context::CreateStreamErrorKind;
    let mut stream = match js.get_stream(&want.name).await {
        Ok(stream) => stream,
        Err(e) if not_found(&e) => {
            tracing::debug!(name = %want.name, "Creating stream");
            let Err(ce) = js.create_stream(want.clone()).await else {
                return Ok(());
            };
            let code = match ce.kind() {
                CreateStreamErrorKind::JetStream(je) => Some(je.error_code()),
                _ => None,
            };
            return Err(match code {
                Some(jetstream::ErrorCode::STREAM_SUBJECT_OVERLAP) => EnsureError::Fatal(format!(
                    "its subject {:?} belongs to another stream; every node of a cluster \
                     must use the same replication_log.compress and nats.stream_prefix ({ce})",
                    want.subjects.first().map_or("", String::as_str)
                )),
                Some(jetstream::ErrorCode::STREAM_INVALID_CONFIG) => {
                    EnsureError::Fatal(format!("JetStream rejected its configuration: {ce}"))
                }
                // No suitable peers: the cluster lacks `replicas` servers, or two embedded
                // servers share a name (harmonylite-node-<id>), which nats-server only logs.
                Some(jetstream::ErrorCode(10005)) => EnsureError::Retry(format!(
                    "{ce} (needs replication_log.replicas servers; in embedded mode every node must \
                     have its own node_id)"
                )),
                // Another node created it first, or the cluster is still forming: look again.
                _ => EnsureError::Retry(ce.to_string()),
            });
        }
        Err(e) => return Err(EnsureError::Retry(e.to_string())),
    };
    if settings.replication.update_existing {
        let have = stream
            .info()
            .await
            .map_err(|e| EnsureError::Retry(e.to_string()))?
            .config
            .clone();
        if differs(&have, want) {
            tracing::warn!(
                "Stream configuration not same for {}, updating...",
                want.name
            );
            js.update_stream(want.clone())
                .await
                .map_err(|e| EnsureError::Fatal(format!("update failed: {e}")))?;
        }
    }
    Ok(())
}

/// Opens an ephemeral pull consumer on `stream` delivering from `start_seq` (≥ 1), without acks:
/// the caller drives fetches and tracks sequences, so nothing depends on redelivery; the server
/// removes it [`CONSUMER_INACTIVE`] after its last fetch.
pub async fn pull_consumer(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
    start_seq: u64,
) -> Result<consumer::PullConsumer, Error> {
    let s = js.get_stream_no_info(stream).await?;
    let deliver_policy = if start_seq <= 1 {
        consumer::DeliverPolicy::All
    } else {
        consumer::DeliverPolicy::ByStartSequence {
            start_sequence: start_seq,
        }
    };
    s.create_consumer(consumer::pull::Config {
        filter_subject: subject.to_owned(),
        deliver_policy,
        ack_policy: consumer::AckPolicy::None,
        replay_policy: consumer::ReplayPolicy::Instant,
        inactive_threshold: CONSUMER_INACTIVE,
        memory_storage: true,
        ..Default::default()
    })
    .await
    .map_err(Error::CreateConsumer)
}

/// How long the server keeps an ephemeral consumer nobody fetches from.
pub const CONSUMER_INACTIVE: Duration = Duration::from_secs(120);

/// `(id, seq)` of messages from `from_seq` on whose id starts with `prefix` (reads headers only).
pub async fn find_published(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
    from_seq: u64,
    prefix: &str,
) -> Result<Vec<(String, u64)>, Error> {
    use futures::StreamExt;
    let err = stream_err(stream);
    let mut s = match js.get_stream(stream).await {
        Ok(s) => s,
        Err(e) if not_found(&e) => return Ok(Vec::new()),
        Err(e) => return Err(err(&e)),
    };
    let state = s.info().await.map_err(|e| err(&e))?.state.clone();
    let from = from_seq.max(state.first_sequence).max(1);
    if state.messages == 0 || from > state.last_sequence {
        return Ok(Vec::new());
    }
    let consumer = s
        .create_consumer(consumer::pull::Config {
            filter_subject: subject.to_owned(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from,
            },
            ack_policy: consumer::AckPolicy::None,
            headers_only: true,
            inactive_threshold: Duration::from_secs(30),
            memory_storage: true,
            ..Default::default()
        })
        .await
        .map_err(|e| err(&e))?;
    let mut found = Vec::new();
    let mut seen = from.saturating_sub(1);
    while seen < state.last_sequence {
        let mut batch = consumer
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .map_err(|e| err(&e))?;
        let mut got = 0;
        while let Some(msg) = batch.next().await {
            let msg = msg.map_err(|e| err(&e))?;
            let seq = msg.info().map_err(|e| err(&e))?.stream_sequence;
            got += 1;
            seen = seen.max(seq);
            if let Some(id) = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                && id.as_str().starts_with(prefix)
            {
                found.push((id.as_str().to_owned(), seq));
            }
        }
        if got == 0 {
            // Nothing more arrives (messages past `seen` were removed meanwhile).
            break;
        }
    }
    Ok(found)
}

/// Describes, for the operator, shard streams that disagree with `replication_log.shards`: a stream
/// above the configured count, or configured shards missing beside streams holding messages, means
/// nodes disagree on the shard count (rows of shards a node does not consume never reach it).
pub async fn shard_mismatch(
    js: &jetstream::Context,
    settings: &Settings,
) -> Result<Option<String>, Error> {
    use futures::TryStreamExt;
    let base = settings.stream_name(1);
    let prefix = &base[..base.len() - 1];
    let names: Vec<String> = js
        .stream_names()
        .try_collect()
        .await
        .map_err(|e| stream_err(&base)(&e))?;
    let mut present: Vec<u64> = names
        .iter()
        .filter_map(|n| n.strip_prefix(prefix)?.parse::<u64>().ok())
        .filter(|&n| n >= 1)
        .collect();
    present.sort_unstable();
    let configured = settings.replication.shards;
    if let Some(&above) = present.iter().find(|&&n| n > configured) {
        return Ok(Some(format!(
            "replication_log.shards = {configured}, but stream {prefix}{above} exists: the cluster \
             uses {} shards (streams present: {present:?}). Every node must use the same shard count",
            present.last().copied().unwrap_or(above)
        )));
    }
    let missing: Vec<u64> = (1..=configured).filter(|n| !present.contains(n)).collect();
    if !present.is_empty() && !missing.is_empty() {
        let mut holds_messages = false;
        for n in &present {
            if let Ok(mut st) = js.get_stream(format!("{prefix}{n}")).await
                && st.info().await.is_ok_and(|i| i.state.last_sequence > 0)
            {
                holds_messages = true;
            }
        }
        if holds_messages {
            return Ok(Some(format!(
                "replication_log.shards = {configured}, but the cluster's streams are for shards \
                 {present:?}: every node must use the same shard count (to change it, stop every \
                 node, remove the {prefix}* streams and start them all with the new value)"
            )));
        }
    }
    Ok(None)
}

/// Makes [`Error::Stream`]s for `stream` from any error.
fn stream_err(stream: &str) -> impl Fn(&dyn std::fmt::Display) -> Error + '_ {
    move |e| Error::Stream {
        stream: stream.to_owned(),
        message: e.to_string(),
    }
}

/// A stream's retained range `(first sequence, last sequence)`, `None` when it does not exist.
pub async fn stream_range(
    js: &jetstream::Context,
    stream: &str,
) -> Result<Option<(u64, u64)>, Error> {
    match js.get_stream(stream).await {
        Ok(s) => {
            let st = &s.cached_info().state;
            Ok(Some((st.first_sequence, st.last_sequence)))
        }
        Err(e) if not_found(&e) => Ok(None),
        Err(e) => Err(Error::StreamInfo(e)),
    }
}

/// Opens the KV bucket `config` names, creating it if missing (the error is the creation's).
pub async fn open_or_create(
    js: &jetstream::Context,
    config: jetstream::kv::Config,
) -> Result<jetstream::kv::Store, jetstream::context::CreateKeyValueError> {
    if let Ok(store) = js.get_key_value(&config.bucket).await {
        return Ok(store);
    }
    let bucket = config.bucket.clone();
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        // Another node may have created it meanwhile.
        Err(e) => js.get_key_value(bucket).await.map_err(|_| e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_state_errors_read_as_jetstream_wrote_them() {
        // The appliers log these with `%e`; the text must stay JetStream's own.
        let inner = context::GetStreamError::with_source(
            context::GetStreamErrorKind::Request,
            std::io::Error::other("timed out"),
        );
        let text = inner.to_string();
        let e = Error::from(inner);
        assert!(matches!(e, Error::StreamInfo(_)));
        assert_eq!(e.to_string(), text);
    }
}
