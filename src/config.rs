//! Configuration in two layers: [`FileConfig`] mirrors Go HarmonyLite's TOML exactly (same keys,
//! same units, Go's defaults from `cfg/config.go`), and [`Settings`] is the validated, typed view
//! the rest of the program uses.
//!
//! Invariants:
//! - Any config file the Go binary accepts loads unchanged. Keys we do not know are warned about
//!   by path (Go ignored them silently), never fatal.
//! - Every rejection is a [`ConfigError`] whose message names the offending key; nothing here
//!   panics on input.
//! - CLI overrides (`-node-id`) are applied in one place, [`FileConfig::validate`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::wire;

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// The TOML file, key for key. Field names are the TOML keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct FileConfig {
    pub db_path: String,
    pub node_id: Option<u64>,
    pub seq_map_path: String,
    pub publish: bool,
    pub replicate: bool,
    pub scan_max_changes: u32,
    pub cleanup_interval: u32,
    pub sleep_timeout: u32,
    pub polling_interval: u32,
    pub snapshot: SnapshotConfig,
    pub replication_log: ReplicationLogConfig,
    pub nats: NatsConfig,
    pub logging: LoggingConfig,
    pub prometheus: PrometheusConfig,
    pub health_check: HealthCheckConfig,
}

/// Go computes default paths from `os.TempDir()` at process start (honours `$TMPDIR`).
fn temp_dir_path(name: &str) -> String {
    std::env::temp_dir()
        .join(name)
        .to_string_lossy()
        .into_owned()
}

impl Default for FileConfig {
    // Go: cfg/config.go `var Config = &Configuration{…}`.
    fn default() -> Self {
        FileConfig {
            db_path: temp_dir_path("harmonylite.db"),
            node_id: None,
            seq_map_path: temp_dir_path("seq-map.cbor"),
            publish: true,
            replicate: true,
            scan_max_changes: 512,
            cleanup_interval: 5000,
            sleep_timeout: 0,
            polling_interval: 0,
            snapshot: SnapshotConfig::default(),
            replication_log: ReplicationLogConfig::default(),
            nats: NatsConfig::default(),
            logging: LoggingConfig::default(),
            prometheus: PrometheusConfig::default(),
            health_check: HealthCheckConfig::default(),
        }
    }
}

/// `[snapshot]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SnapshotConfig {
    pub enabled: bool,
    pub interval: u32,
    pub leader_ttl: u32,
    pub store: String,
    pub nats: SnapshotNatsConfig,
    pub s3: SnapshotS3Config,
    pub webdav: UrlConfig,
    pub sftp: SftpConfig,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            enabled: true,
            interval: 0,
            leader_ttl: 0,
            store: "nats".into(),
            nats: SnapshotNatsConfig::default(),
            s3: SnapshotS3Config::default(),
            webdav: UrlConfig::default(),
            sftp: SftpConfig::default(),
        }
    }
}

/// `[snapshot.nats]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SnapshotNatsConfig {
    pub replicas: i64,
    pub bucket: String,
}

impl Default for SnapshotNatsConfig {
    fn default() -> Self {
        SnapshotNatsConfig {
            replicas: 1,
            bucket: String::new(),
        }
    }
}

/// `[snapshot.s3]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SnapshotS3Config {
    pub path: String,
    pub endpoint: String,
    pub access_key: String,
    pub secret: String,
    pub session_token: String,
    pub bucket: String,
    pub use_ssl: bool,
    /// Ours (a docs-only key in Go): signing region; empty = `AWS_REGION` or `us-east-1`.
    pub region: String,
    /// Ours (docs-only in Go): path-style addressing; unset = on with a custom endpoint.
    pub force_path_style: Option<bool>,
}

/// `[snapshot.webdav]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct UrlConfig {
    pub url: String,
}

/// `[snapshot.sftp]`: Go's `url`, plus (ours) key authentication and host-key checking.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SftpConfig {
    pub url: String,
    /// Private key file for public-key authentication (tried before the URL's password).
    pub key_file: String,
    pub key_passphrase: String,
    /// OpenSSH known_hosts file the server's host key must be in; empty = accept any key (Go's
    /// behaviour), with a warning.
    pub known_hosts: String,
}

/// `[replication_log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ReplicationLogConfig {
    pub shards: u64,
    pub max_entries: i64,
    pub replicas: i64,
    pub compress: bool,
    pub update_existing: bool,
    /// Ours (not in Go): largest decompressed event accepted, bytes; 0 = 16 × the server's
    /// `max_payload`, at least 16 MiB.
    pub max_event_bytes: u64,
}

impl Default for ReplicationLogConfig {
    fn default() -> Self {
        ReplicationLogConfig {
            shards: 1,
            max_entries: 1024,
            replicas: 1,
            compress: true,
            update_existing: false,
            max_event_bytes: 0,
        }
    }
}

/// `[nats]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct NatsConfig {
    pub urls: Vec<String>,
    pub subject_prefix: String,
    pub stream_prefix: String,
    pub server_config: String,
    /// Rust-only: path of the `nats-server` executable for embedded mode (else `PATH`).
    pub server_binary: String,
    pub seed_file: String,
    pub user_name: String,
    pub user_password: String,
    pub ca_file: String,
    pub cert_file: String,
    pub key_file: String,
    pub bind_address: String,
    pub connect_retries: u32,
    pub reconnect_wait_seconds: u32,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            urls: Vec::new(),
            subject_prefix: "harmonylite-change-log".into(),
            stream_prefix: "harmonylite-changes".into(),
            server_config: String::new(),
            server_binary: String::new(),
            seed_file: String::new(),
            user_name: String::new(),
            user_password: String::new(),
            ca_file: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
            bind_address: ":-1".into(),
            connect_retries: 5,
            reconnect_wait_seconds: 2,
        }
    }
}

/// `[logging]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LoggingConfig {
    pub verbose: bool,
    pub format: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            verbose: false,
            format: "console".into(),
        }
    }
}

/// `[prometheus]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct PrometheusConfig {
    pub enable: bool,
    pub bind: String,
    pub namespace: String,
    pub subsystem: String,
}

impl Default for PrometheusConfig {
    fn default() -> Self {
        PrometheusConfig {
            enable: false,
            bind: ":3010".into(),
            namespace: "harmonylite".into(),
            subsystem: String::new(),
        }
    }
}

/// `[health_check]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct HealthCheckConfig {
    pub enable: bool,
    pub bind: String,
    pub path: String,
    pub detailed: bool,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            enable: false,
            bind: "0.0.0.0:8090".into(),
            path: "/health".into(),
            detailed: true,
        }
    }
}

/// A parsed file plus the keys it had that we do not know (to warn about once logging is up).
#[derive(Debug, Clone)]
pub struct Parsed {
    pub config: FileConfig,
    pub unknown_keys: Vec<String>,
}

/// Parses TOML text. `origin` names the source in messages.
///
/// # Errors
/// [`ConfigError::Parse`] for TOML syntax and type errors, naming the key path.
pub fn parse(text: &str, origin: &Path) -> Result<Parsed, ConfigError> {
    let mut unknown_keys = Vec::new();
    let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Parse {
        path: origin.to_owned(),
        message: one_line(&e.to_string()),
    })?;
    let mut on_unknown = |path: serde_ignored::Path<'_>| unknown_keys.push(path.to_string());
    let ignored = serde_ignored::Deserializer::new(de, &mut on_unknown);
    let config: FileConfig = serde_path_to_error::deserialize(ignored).map_err(|e| {
        let key = e.path().to_string();
        ConfigError::Parse {
            path: origin.to_owned(),
            message: format!("key `{key}`: {}", one_line(&e.into_inner().to_string())),
        }
    })?;
    Ok(Parsed {
        config,
        unknown_keys,
    })
}

/// toml's messages span several lines with a source excerpt; keep the gist on one line.
fn one_line(msg: &str) -> String {
    msg.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.chars().all(|c| c == '^'))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Loads a config file. An empty path means built-in defaults (as Go does); a path that does not
/// exist is an error (Go silently used defaults, which hid typos in `-config`).
///
/// # Errors
/// [`ConfigError::Read`] or [`ConfigError::Parse`].
pub fn load(path: Option<&Path>) -> Result<Parsed, ConfigError> {
    let Some(path) = path.filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(Parsed {
            config: FileConfig::default(),
            unknown_keys: Vec::new(),
        });
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// Values given on the command line that override or extend the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `-node-id`; 0 means "not given", as in Go.
    pub node_id: u64,
    /// `-cluster-addr`: the embedded server's route listener.
    pub cluster_addr: String,
    /// `-cluster-peers`: comma-separated route URLs.
    pub cluster_peers: String,
    /// `-leaf-servers`: comma-separated leaf remote URLs.
    pub leaf_servers: String,
    /// `-pprof`: profiler listen address; empty = off.
    pub pprof: String,
}

/// The embedded server's clustering, from the command line (Go has no config keys for these).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterSettings {
    /// Route listen `host:port`; `None` = no cluster listener.
    pub listen: Option<String>,
    /// Route URLs (`nats://…` or `dns://…`), as given.
    pub peers: Vec<String>,
    /// Leaf remote URLs, as given.
    pub leaf_servers: Vec<String>,
}

/// Splits a comma-separated flag value (Go `RoutesFromStr`: split on `,`, trimmed, empty dropped).
fn split_urls(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Checks a `host:port` address; `allow_random` accepts Go's port `-1` (pick one).
fn check_host_port(key: &'static str, v: &str, allow_random: bool) -> Result<(), ConfigError> {
    let bad = || invalid(key, format!("{v:?} is not host:port"));
    let (_, port) = v.rsplit_once(':').ok_or_else(bad)?;
    match port.parse::<i32>() {
        Ok(-1) if allow_random => Ok(()),
        Ok(p) if (0..=65535).contains(&p) => Ok(()),
        _ => Err(bad()),
    }
}

fn check_urls(key: &'static str, urls: &[String], schemes: &[&str]) -> Result<(), ConfigError> {
    for u in urls {
        let scheme = u.split_once("://").map(|(s, _)| s);
        if !scheme.is_some_and(|s| schemes.contains(&s)) {
            return Err(invalid(
                key,
                format!(
                    "{u:?} must start with {}",
                    schemes
                        .iter()
                        .map(|s| format!("{s}://"))
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
            ));
        }
    }
    Ok(())
}

/// Where snapshots are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotStore {
    Nats { replicas: i64, bucket: String },
    S3(S3Settings),
    WebDav { url: String },
    Sftp(SftpSettings),
}

/// `[snapshot.sftp]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftpSettings {
    pub url: String,
    pub key_file: Option<PathBuf>,
    pub key_passphrase: Option<String>,
    pub known_hosts: Option<PathBuf>,
}

/// `[snapshot.s3]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Settings {
    pub path: String,
    pub endpoint: String,
    pub access_key: String,
    pub secret: String,
    pub session_token: String,
    pub bucket: String,
    pub use_ssl: bool,
    pub region: String,
    pub force_path_style: Option<bool>,
}

/// `[snapshot]`, validated.
#[derive(Debug, Clone)]
pub struct SnapshotSettings {
    pub enabled: bool,
    pub interval: Option<Duration>,
    pub leader_ttl: Duration,
    pub store: SnapshotStore,
}

/// `[replication_log]`, validated.
#[derive(Debug, Clone)]
pub struct ReplicationSettings {
    pub shards: u64,
    pub max_entries: i64,
    /// Stream replicas after Go's adjustment (`< 1` → `shards/2 + 1`, at most 5).
    pub replicas: usize,
    /// The value as configured, used verbatim for the `e-harmonylite` KV bucket (Go does).
    pub configured_replicas: i64,
    pub compress: bool,
    pub update_existing: bool,
    /// Largest decompressed event accepted, bytes; `None` = derived from the server's
    /// `max_payload`.
    pub max_event_bytes: Option<usize>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Console,
    Json,
}

/// Everything the daemon needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub db_path: PathBuf,
    pub node_id: u64,
    pub seq_map_path: PathBuf,
    pub publish: bool,
    pub replicate: bool,
    pub scan_max_changes: u32,
    pub cleanup_interval: Duration,
    pub sleep_timeout: Option<Duration>,
    pub polling_interval: Option<Duration>,
    pub snapshot: SnapshotSettings,
    pub replication: ReplicationSettings,
    pub nats: NatsConfig,
    /// Embedded-server clustering from `-cluster-addr`, `-cluster-peers`, `-leaf-servers`.
    pub cluster: ClusterSettings,
    /// `-pprof` listen address, if profiling was asked for.
    pub pprof: Option<String>,
    pub log_verbose: bool,
    pub log_format: LogFormat,
    pub prometheus: PrometheusConfig,
    pub health_check: HealthCheckConfig,
}

impl Settings {
    /// `harmonylite-node-<id>`: the NATS client and server name.
    pub fn node_name(&self) -> String {
        format!("{}-{}", wire::NODE_NAME_PREFIX, self.node_id)
    }

    /// Stream name of shard `shard` (1-based).
    pub fn stream_name(&self, shard: u64) -> String {
        wire::stream_name(&self.nats.stream_prefix, self.replication.compress, shard)
    }

    /// Subject of shard `shard` (1-based).
    pub fn subject_name(&self, shard: u64) -> String {
        wire::subject_name(&self.nats.subject_prefix, shard)
    }
}

fn ms(v: u32) -> Option<Duration> {
    (v > 0).then(|| Duration::from_millis(u64::from(v)))
}

impl FileConfig {
    /// Checks every value and applies CLI overrides.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first key whose value cannot work.
    pub fn validate(self, overrides: &Overrides) -> Result<Settings, ConfigError> {
        if self.db_path.trim().is_empty() {
            return Err(invalid("db_path", "must name the SQLite file to replicate"));
        }
        let db_path = PathBuf::from(&self.db_path);
        if self.scan_max_changes == 0 {
            return Err(invalid(
                "scan_max_changes",
                "must be at least 1 (0 would never publish anything)",
            ));
        }
        if self.cleanup_interval == 0 {
            return Err(invalid(
                "cleanup_interval",
                "must be at least 1 (milliseconds)",
            ));
        }
        let rl = &self.replication_log;
        if rl.shards == 0 {
            return Err(invalid("replication_log.shards", "must be at least 1"));
        }
        if rl.shards > 1024 {
            return Err(invalid("replication_log.shards", "must be at most 1024"));
        }
        if rl.max_entries == 0 || rl.max_entries < -1 {
            return Err(invalid(
                "replication_log.max_entries",
                "must be a positive number of messages per stream (or -1 for unlimited)",
            ));
        }
        // Go: logstream/replicator.go — replicas < 1 → shards/2+1, capped at 5.
        let replicas = if rl.replicas < 1 {
            (rl.shards / 2 + 1).min(5) as usize
        } else if rl.replicas > 5 {
            return Err(invalid(
                "replication_log.replicas",
                "JetStream allows at most 5 replicas",
            ));
        } else {
            rl.replicas as usize
        };
        let store = match self.snapshot.store.as_str() {
            "nats" => SnapshotStore::Nats {
                replicas: self.snapshot.nats.replicas,
                bucket: if self.snapshot.nats.bucket.is_empty() {
                    format!("{}-snapshot-store", self.nats.stream_prefix)
                } else {
                    self.snapshot.nats.bucket.clone()
                },
            },
            "s3" => {
                let s3 = &self.snapshot.s3;
                SnapshotStore::S3(S3Settings {
                    path: s3.path.clone(),
                    endpoint: s3.endpoint.clone(),
                    access_key: s3.access_key.clone(),
                    secret: s3.secret.clone(),
                    session_token: s3.session_token.clone(),
                    bucket: s3.bucket.clone(),
                    use_ssl: s3.use_ssl,
                    region: s3.region.clone(),
                    force_path_style: s3.force_path_style,
                })
            }
            "webdav" => SnapshotStore::WebDav {
                url: self.snapshot.webdav.url.clone(),
            },
            "sftp" => {
                let c = &self.snapshot.sftp;
                let path = |v: &str| (!v.is_empty()).then(|| PathBuf::from(v));
                SnapshotStore::Sftp(SftpSettings {
                    url: c.url.clone(),
                    key_file: path(&c.key_file),
                    key_passphrase: (!c.key_passphrase.is_empty())
                        .then(|| c.key_passphrase.clone()),
                    known_hosts: path(&c.known_hosts),
                })
            }
            other => {
                return Err(invalid(
                    "snapshot.store",
                    format!("unknown store {other:?}; expected one of nats, s3, webdav, sftp"),
                ));
            }
        };
        if self.nats.subject_prefix.is_empty() || !valid_nats_token(&self.nats.subject_prefix) {
            return Err(invalid(
                "nats.subject_prefix",
                "must be a non-empty NATS subject token (no spaces, '*', '>')",
            ));
        }
        if self.nats.stream_prefix.is_empty() || !valid_stream_name(&self.nats.stream_prefix) {
            return Err(invalid(
                "nats.stream_prefix",
                "must be a non-empty JetStream name (no spaces, '.', '*', '>', '/', '\\')",
            ));
        }
        if self.nats.urls.iter().any(|u| u.trim().is_empty()) {
            return Err(invalid("nats.urls", "contains an empty URL"));
        }
        if self.nats.cert_file.is_empty() != self.nats.key_file.is_empty() {
            return Err(invalid(
                if self.nats.cert_file.is_empty() {
                    "nats.cert_file"
                } else {
                    "nats.key_file"
                },
                "cert_file and key_file must be given together",
            ));
        }
        if self.nats.urls.is_empty() {
            check_host_port("nats.bind_address", &self.nats.bind_address, true)?;
        }
        let cluster = ClusterSettings {
            listen: (!overrides.cluster_addr.trim().is_empty())
                .then(|| overrides.cluster_addr.trim().to_owned()),
            peers: split_urls(&overrides.cluster_peers),
            leaf_servers: split_urls(&overrides.leaf_servers),
        };
        if let Some(listen) = &cluster.listen {
            check_host_port("-cluster-addr", listen, false)?;
        }
        check_urls(
            "-cluster-peers",
            &cluster.peers,
            &["nats", "nats-route", "dns"],
        )?;
        check_urls(
            "-leaf-servers",
            &cluster.leaf_servers,
            &["nats", "nats-leaf", "tls", "ws", "wss", "dns"],
        )?;
        if self.health_check.enable && !self.health_check.path.starts_with('/') {
            return Err(invalid("health_check.path", "must start with '/'"));
        }
        let log_format = match self.logging.format.as_str() {
            "json" => LogFormat::Json,
            // Go: any other value means console.
            _ => LogFormat::Console,
        };
        let node_id = if overrides.node_id != 0 {
            overrides.node_id
        } else {
            self.node_id.unwrap_or_else(default_node_id)
        };
        let seq_map_path = if self.seq_map_path.is_empty() {
            // Go: an explicitly empty seq_map_path means "next to the database".
            data_root_dir(&db_path).join("seq-map.cbor")
        } else {
            PathBuf::from(&self.seq_map_path)
        };
        Ok(Settings {
            node_id,
            seq_map_path,
            publish: self.publish,
            replicate: self.replicate,
            scan_max_changes: self.scan_max_changes,
            cleanup_interval: Duration::from_millis(u64::from(self.cleanup_interval)),
            sleep_timeout: ms(self.sleep_timeout),
            polling_interval: ms(self.polling_interval),
            snapshot: SnapshotSettings {
                enabled: self.snapshot.enabled,
                interval: ms(self.snapshot.interval),
                leader_ttl: ms(self.snapshot.leader_ttl).unwrap_or(Duration::from_secs(30)),
                store,
            },
            replication: ReplicationSettings {
                shards: rl.shards,
                max_entries: rl.max_entries,
                replicas,
                configured_replicas: rl.replicas,
                compress: rl.compress,
                update_existing: rl.update_existing,
                max_event_bytes: (rl.max_event_bytes > 0)
                    .then(|| usize::try_from(rl.max_event_bytes).unwrap_or(usize::MAX)),
            },
            nats: self.nats,
            cluster,
            pprof: (!overrides.pprof.trim().is_empty()).then(|| overrides.pprof.trim().to_owned()),
            log_verbose: self.logging.verbose,
            log_format,
            prometheus: self.prometheus,
            health_check: self.health_check,
            db_path,
        })
    }
}

fn valid_nats_token(s: &str) -> bool {
    !s.chars()
        .any(|c| c.is_whitespace() || matches!(c, '*' | '>') || c.is_control())
}

fn valid_stream_name(s: &str) -> bool {
    valid_nats_token(s) && !s.contains(['.', '/', '\\'])
}

/// `abs(dirname(db_path))`: Go's `DataRootDir`.
pub fn data_root_dir(db_path: &Path) -> PathBuf {
    let dir = match db_path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::path::absolute(&dir).unwrap_or(dir)
}

/// Go's default node id: FNV-1 64 of the machine id (dbus first, then systemd), or of a random
/// UUID with a warning when neither can be read.
pub fn default_node_id() -> u64 {
    let id = ["/var/lib/dbus/machine-id", "/etc/machine-id"]
        .iter()
        .find_map(|p| {
            std::fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| {
            tracing::warn!("⚠️⚠️⚠️ Unable to read machine ID from OS, generating random ID ⚠️⚠️⚠️");
            uuid::Uuid::new_v4().to_string()
        });
    wire::fnv1_64(id.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Parsed, ConfigError> {
        parse(s, Path::new("test.toml"))
    }

    fn settings(s: &str) -> Result<Settings, ConfigError> {
        parse_str(s)?.config.validate(&Overrides::default())
    }

    #[test]
    fn go_defaults() {
        let s = settings("node_id = 1").expect("valid");
        assert_eq!(s.db_path, std::env::temp_dir().join("harmonylite.db"));
        assert_eq!(s.seq_map_path, std::env::temp_dir().join("seq-map.cbor"));
        assert!(s.publish && s.replicate);
        assert_eq!(s.scan_max_changes, 512);
        assert_eq!(s.cleanup_interval, Duration::from_millis(5000));
        assert_eq!(s.sleep_timeout, None);
        assert_eq!(s.replication.shards, 1);
        assert_eq!(s.replication.max_entries, 1024);
        assert!(s.replication.compress);
        assert_eq!(s.stream_name(1), "harmonylite-changes-c-1");
        assert_eq!(s.subject_name(1), "harmonylite-change-log-1");
        assert_eq!(s.nats.bind_address, ":-1");
        assert_eq!(s.nats.connect_retries, 5);
        assert_eq!(s.prometheus.bind, ":3010");
        assert_eq!(s.health_check.bind, "0.0.0.0:8090");
        assert_eq!(s.snapshot.leader_ttl, Duration::from_secs(30));
        assert_eq!(
            s.snapshot.store,
            SnapshotStore::Nats {
                replicas: 1,
                bucket: "harmonylite-changes-snapshot-store".into()
            }
        );
        assert_eq!(s.node_name(), "harmonylite-node-1");
    }

    #[test]
    fn go_example_config_loads_unchanged() {
        let text = r#"
            seq_map_path="/tmp/harmonylite-1-sm.cbor"
            db_path="/tmp/harmonylite-1.db"
            [replication_log]
            shards=2
            max_entries=2048
            replicas=1
            compress=true
            [nats]
            user_name="harmonylite"
            user_password="secure-password-here"
            reconnect_wait_seconds=5
            server_config="examples/nats-server-1.conf"
            [logging]
            verbose=false
            format="console"
            [prometheus]
            enable=true
            bind="0.0.0.0:3010"
            [health_check]
            enable=true
            bind="0.0.0.0:8090"
            path="/health"
            detailed=true
            [snapshot]
            enabled=true
            interval=60000
            leader_ttl=30000
        "#;
        let p = parse_str(text).expect("parses");
        assert!(p.unknown_keys.is_empty(), "{:?}", p.unknown_keys);
        let s = p
            .config
            .validate(&Overrides {
                node_id: 3,
                ..Overrides::default()
            })
            .expect("valid");
        assert_eq!(s.node_id, 3);
        assert_eq!(s.replication.shards, 2);
        assert_eq!(s.snapshot.interval, Some(Duration::from_secs(60)));
    }

    #[test]
    fn unknown_keys_are_reported_by_path() {
        let p = parse_str("bogus = 1\n[nats]\ntls_ca_file = \"x\"\n[sharding]\nignore_tables=[]")
            .expect("parses");
        assert_eq!(p.unknown_keys, ["bogus", "nats.tls_ca_file", "sharding"]);
    }

    #[test]
    fn type_errors_name_the_key() {
        let err = parse_str("[replication_log]\nshards = \"two\"").expect_err("type error");
        assert!(err.to_string().contains("replication_log.shards"), "{err}");
        assert!(!err.to_string().contains('\n'), "{err}");
        let err = parse_str("publish = 3").expect_err("type error");
        assert!(err.to_string().contains("`publish`"), "{err}");
        let err = parse_str("node_id = -1").expect_err("negative");
        assert!(err.to_string().contains("node_id"), "{err}");
        assert!(parse_str("[nats\n").is_err());
    }

    #[test]
    fn impossible_values_name_the_key() {
        for (text, key) in [
            ("[replication_log]\nshards = 0", "replication_log.shards"),
            ("cleanup_interval = 0", "cleanup_interval"),
            ("scan_max_changes = 0", "scan_max_changes"),
            ("[snapshot]\nstore = \"ftp\"", "snapshot.store"),
            ("[nats]\ncert_file = \"c.pem\"", "nats.key_file"),
            ("[nats]\nstream_prefix = \"a.b\"", "nats.stream_prefix"),
            (
                "[replication_log]\nreplicas = 7",
                "replication_log.replicas",
            ),
        ] {
            let err = settings(text).expect_err(text);
            assert!(
                err.to_string().contains(&format!("`{key}`")),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn cluster_flags_are_split_and_checked() {
        let p = parse_str("").expect("parses");
        let o = Overrides {
            cluster_addr: "127.0.0.1:4221".into(),
            cluster_peers: " nats://127.0.0.1:4222/, ,dns://peers:4221?min=2".into(),
            ..Overrides::default()
        };
        let s = p.config.clone().validate(&o).expect("valid");
        assert_eq!(s.cluster.listen.as_deref(), Some("127.0.0.1:4221"));
        assert_eq!(
            s.cluster.peers,
            ["nats://127.0.0.1:4222/", "dns://peers:4221?min=2"]
        );
        for (o, key) in [
            (
                Overrides {
                    cluster_addr: "4221".into(),
                    ..Overrides::default()
                },
                "-cluster-addr",
            ),
            (
                Overrides {
                    cluster_peers: "127.0.0.1:4222".into(),
                    ..Overrides::default()
                },
                "-cluster-peers",
            ),
            (
                Overrides {
                    leaf_servers: "http://x".into(),
                    ..Overrides::default()
                },
                "-leaf-servers",
            ),
        ] {
            let err = p.config.clone().validate(&o).expect_err(key);
            assert!(err.to_string().contains(key), "{err}");
        }
        let err = settings("[nats]\nbind_address = \"nope\"").expect_err("bind");
        assert!(err.to_string().contains("nats.bind_address"), "{err}");
    }

    #[test]
    fn replicas_below_one_follow_go() {
        let s = settings("[replication_log]\nshards = 4\nreplicas = 0").expect("valid");
        assert_eq!(s.replication.replicas, 3);
        let s = settings("[replication_log]\nshards = 20\nreplicas = -1").expect("valid");
        assert_eq!(s.replication.replicas, 5);
    }

    #[test]
    fn empty_seq_map_path_goes_next_to_the_db() {
        let s = settings("db_path = \"/data/app.db\"\nseq_map_path = \"\"").expect("valid");
        assert_eq!(s.seq_map_path, PathBuf::from("/data/seq-map.cbor"));
    }

    #[test]
    fn node_id_override_and_default() {
        let p = parse_str("node_id = 5").expect("parses");
        assert_eq!(
            p.config
                .clone()
                .validate(&Overrides {
                    node_id: 0,
                    ..Overrides::default()
                })
                .expect("ok")
                .node_id,
            5
        );
        assert_eq!(
            p.config
                .validate(&Overrides {
                    node_id: 9,
                    ..Overrides::default()
                })
                .expect("ok")
                .node_id,
            9
        );
        assert_eq!(settings("").expect("ok").node_id, default_node_id());
    }

    #[test]
    fn example_config_documents_exactly_the_defaults() {
        let p = parse_str(include_str!("../config.example.toml")).expect("example parses");
        assert!(p.unknown_keys.is_empty(), "{:?}", p.unknown_keys);
        let mut example = p.config;
        let mut defaults = FileConfig::default();
        // Paths default to $TMPDIR; the example shows /tmp.
        example.db_path = defaults.db_path.clone();
        example.seq_map_path = defaults.seq_map_path.clone();
        defaults.node_id = None;
        assert_eq!(format!("{example:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn missing_file_is_an_error_but_no_path_means_defaults() {
        assert!(matches!(
            load(Some(Path::new("/nonexistent/harmonylite.toml"))),
            Err(ConfigError::Read { .. })
        ));
        assert!(load(None).is_ok());
    }
}
