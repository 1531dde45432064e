//! The file layer: the TOML file as read, key for key, with Go's defaults. Field names are the TOML
//! keys and units are Go's (integer milliseconds, seconds where Go used seconds); nothing here
//! checks a value. [`FileConfig::validate`] (in `validate.rs`) turns it into
//! [`Settings`](super::Settings).

use serde::Deserialize;

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
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn example_config_documents_exactly_the_defaults() {
        let text = include_str!("../../config.example.toml");
        let p = crate::config::parse(text, Path::new("test.toml")).expect("example parses");
        assert!(p.unknown_keys.is_empty(), "{:?}", p.unknown_keys);
        let mut example = p.config;
        let mut defaults = FileConfig::default();
        // Paths default to $TMPDIR; the example shows /tmp.
        example.db_path = defaults.db_path.clone();
        example.seq_map_path = defaults.seq_map_path.clone();
        defaults.node_id = None;
        assert_eq!(format!("{example:?}"), format!("{defaults:?}"));
    }
}
