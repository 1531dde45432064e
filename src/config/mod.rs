//! Configuration in two layers: [`FileConfig`] ([`file`], re-exported here) mirrors Go
//! HarmonyLite's TOML exactly (same keys, same units, Go's defaults from `cfg/config.go`);
//! `validate` checks it section by section into [`Settings`], the typed view the rest of the
//! program uses. Here: the settings, errors, parsing and loading.
//!
//! Invariants:
//! - Any config Go accepts loads unchanged; unknown keys get a warning by path (Go ignored them).
//! - Every rejection is a [`ConfigError`] naming the offending key; nothing here panics on input.
//! - CLI overrides (`-node-id`) are applied in one place, [`FileConfig::validate`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::wire;

pub mod file;
mod validate;

pub use file::{
    FileConfig, HealthCheckConfig, LoggingConfig, NatsConfig, PrometheusConfig,
    ReplicationLogConfig, SftpConfig, SnapshotConfig, SnapshotNatsConfig, SnapshotS3Config,
    UrlConfig,
};

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

/// A parsed file plus the keys it had that we do not know (to warn about once logging is up).
#[derive(Debug, Clone, Default)]
pub struct Parsed {
    pub config: FileConfig,
    pub unknown_keys: Vec<String>,
}

/// Parses TOML text (`origin` names the source in messages); errors name the key path.
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
    if let Some((key, near)) = unknown_keys
        .iter()
        .find_map(|k| file::near_miss(k).map(|n| (k, n)))
    {
        return Err(ConfigError::Parse {
            path: origin.to_owned(),
            message: format!(
                "unknown key `{key}` (did you mean `{near}`? a misspelt key would silently keep its default)"
            ),
        });
    }
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
pub fn load(path: Option<&Path>) -> Result<Parsed, ConfigError> {
    let Some(path) = path.filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(Parsed::default());
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

/// `[snapshot.s3]`, as read: every value is usable as it is.
pub type S3Settings = SnapshotS3Config;

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
    /// Largest decompressed event accepted, bytes; `None`: from the server's `max_payload`.
    pub max_event_bytes: Option<usize>,
    /// Least time between two apply commits while events keep arriving (zero: no pacing).
    pub apply_interval: Duration,
}

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
    pub cluster: ClusterSettings,
    /// `-pprof` listen address, if profiling was asked for.
    pub pprof: Option<String>,
    pub log_verbose: bool,
    pub log_format: LogFormat,
    pub prometheus: PrometheusConfig,
    pub health_check: HealthCheckConfig,
}

impl Settings {
    /// Checks the directories of `db_path` and `seq_map_path` exist and are writable (the WAL,
    /// lock, sent-mark and seq-map files go there), else every write fails after start-up. Done
    /// at start, not in `validate`, which only reads text.
    pub fn check_paths(&self) -> Result<(), ConfigError> {
        for (key, path) in [
            ("db_path", &self.db_path),
            ("seq_map_path", &self.seq_map_path),
        ] {
            let dir = data_root_dir(path);
            let problem = if !dir.is_dir() {
                "does not exist"
            } else if nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK).is_err() {
                "is not writable"
            } else {
                continue;
            };
            return Err(invalid(
                key,
                format!("directory {} {problem}", dir.display()),
            ));
        }
        Ok(())
    }

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

/// `abs(dirname(db_path))`: Go's `DataRootDir`.
pub fn data_root_dir(db_path: &Path) -> PathBuf {
    let dir = match db_path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::path::absolute(&dir).unwrap_or(dir)
}

/// Turns Go's `:3010` style bind address into something `TcpListener` accepts.
pub fn listen_addr(bind: &str) -> String {
    match bind.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => bind.to_owned(),
    }
}

/// Go's default node id: FNV-1 64 of the machine id (dbus, then systemd) or, warned, a random UUID.
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

    pub(super) fn parse_str(s: &str) -> Result<Parsed, ConfigError> {
        parse(s, Path::new("test.toml"))
    }

    pub(super) fn settings(s: &str) -> Result<Settings, ConfigError> {
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
        assert_eq!(
            s.replication.apply_interval,
            Duration::from_millis(file::DEFAULT_APPLY_INTERVAL_MS.into())
        );
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
    fn bind_addresses() {
        assert_eq!(listen_addr(":3010"), "0.0.0.0:3010");
        assert_eq!(listen_addr("127.0.0.1:9"), "127.0.0.1:9");
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
