//! The file layer: the TOML file as read, field names the keys, with Go's defaults and units
//! (integer milliseconds, seconds where Go used seconds). Nothing here checks a value:
//! [`FileConfig::validate`] (in `validate.rs`) builds [`Settings`](super::Settings).

use serde::{Deserialize, Serialize};

/// A `#[serde(default)]` section of the file whose fields carry their defaults (Go's:
/// cfg/config.go `var Config = &Configuration{…}`), written `name: Type = default`.
macro_rules! section {
    ($(#[$m:meta])* pub struct $name:ident {
        $($(#[$fm:meta])* $field:ident: $ty:ty = $default:expr,)*
    }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Deserialize, Serialize)]
        #[serde(default)]
        pub struct $name {
            $($(#[$fm])* pub $field: $ty,)*
        }

        impl Default for $name {
            fn default() -> Self {
                $name { $($field: $default,)* }
            }
        }
    };
}

section! {
    pub struct FileConfig {
        db_path: String = temp_dir_path("harmonylite.db"),
        node_id: Option<u64> = None,
        seq_map_path: String = temp_dir_path("seq-map.cbor"),
        publish: bool = true,
        replicate: bool = true,
        scan_max_changes: u32 = 512,
        cleanup_interval: u32 = 5000,
        sleep_timeout: u32 = 0,
        polling_interval: u32 = 0,
        snapshot: SnapshotConfig = SnapshotConfig::default(),
        replication_log: ReplicationLogConfig = ReplicationLogConfig::default(),
        nats: NatsConfig = NatsConfig::default(),
        logging: LoggingConfig = LoggingConfig::default(),
        prometheus: PrometheusConfig = PrometheusConfig::default(),
        health_check: HealthCheckConfig = HealthCheckConfig::default(),
    }
}

/// Go computes default paths from `os.TempDir()` at process start (honours `$TMPDIR`).
fn temp_dir_path(name: &str) -> String {
    std::env::temp_dir()
        .join(name)
        .to_string_lossy()
        .into_owned()
}

section! {
    /// `[snapshot]`.
    pub struct SnapshotConfig {
        enabled: bool = true,
        interval: u32 = 0,
        leader_ttl: u32 = 0,
        store: String = "nats".into(),
        nats: SnapshotNatsConfig = SnapshotNatsConfig::default(),
        s3: SnapshotS3Config = SnapshotS3Config::default(),
        webdav: UrlConfig = UrlConfig::default(),
        sftp: SftpConfig = SftpConfig::default(),
    }
}

section! {
    /// `[snapshot.nats]`.
    pub struct SnapshotNatsConfig {
        replicas: i64 = 1,
        bucket: String = String::new(),
    }
}

/// `[snapshot.s3]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
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
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct UrlConfig {
    pub url: String,
}

/// `[snapshot.sftp]`: Go's `url`, plus (ours) key authentication and host-key checking.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct SftpConfig {
    pub url: String,
    /// Private key file for public-key authentication (tried before the URL's password).
    pub key_file: String,
    pub key_passphrase: String,
    /// OpenSSH known_hosts file the host key must be in; empty = any key (as Go), with a warning.
    pub known_hosts: String,
}

section! {
    /// `[replication_log]`.
    pub struct ReplicationLogConfig {
        shards: u64 = 1,
        max_entries: i64 = 1024,
        replicas: i64 = 1,
        compress: bool = true,
        update_existing: bool = false,
        /// Ours: largest decompressed event (bytes); 0 = 16 × the server's `max_payload`, ≥ 16 MiB.
        max_event_bytes: u64 = 0,
        /// Ours (not in Go): least milliseconds between two apply commits while remote events
        /// keep arriving; 0 = commit every batch at once. See `replicate::apply`.
        apply_interval_ms: u32 = DEFAULT_APPLY_INTERVAL_MS,
    }
}

/// Default `replication_log.apply_interval_ms` (figures: docs/performance.md#commits-and-readers).
pub const DEFAULT_APPLY_INTERVAL_MS: u32 = 20;

section! {
    /// `[nats]`.
    pub struct NatsConfig {
        urls: Vec<String> = Vec::new(),
        subject_prefix: String = "harmonylite-change-log".into(),
        stream_prefix: String = "harmonylite-changes".into(),
        server_config: String = String::new(),
        /// Rust-only: path of the `nats-server` executable for embedded mode (else `PATH`).
        server_binary: String = String::new(),
        seed_file: String = String::new(),
        user_name: String = String::new(),
        user_password: String = String::new(),
        ca_file: String = String::new(),
        cert_file: String = String::new(),
        key_file: String = String::new(),
        bind_address: String = ":-1".into(),
        connect_retries: u32 = 5,
        reconnect_wait_seconds: u32 = 2,
    }
}

section! {
    /// `[logging]`.
    pub struct LoggingConfig {
        verbose: bool = false,
        format: String = "console".into(),
    }
}

section! {
    /// `[prometheus]`.
    pub struct PrometheusConfig {
        enable: bool = false,
        bind: String = ":3010".into(),
        namespace: String = "harmonylite".into(),
        subsystem: String = String::new(),
    }
}

section! {
    /// `[health_check]`.
    pub struct HealthCheckConfig {
        enable: bool = false,
        bind: String = "0.0.0.0:8090".into(),
        path: String = "/health".into(),
        detailed: bool = true,
        max_publish_held_seconds: u32 = 30,
    }
}

/// The known key nearest to `unknown` (same section, at most two edits away): a misspelt key
/// silently keeps its default (`db_pth` meant the database in `/tmp`), so such a key is an
/// error naming the likely one. Other unknown keys (Go-only ones) are only warned about.
pub fn near_miss(unknown: &str) -> Option<String> {
    let (section, name) = unknown.rsplit_once('.').unwrap_or(("", unknown));
    let mut value = serde_json::to_value(FileConfig::default()).ok()?;
    for part in section.split('.').filter(|p| !p.is_empty()) {
        value = value.get(part)?.clone();
    }
    let (distance, known) = value
        .as_object()?
        .keys()
        .map(|k| (edit_distance(name, k), k))
        .min()?;
    let full = if section.is_empty() {
        known.clone()
    } else {
        format!("{section}.{known}")
    };
    (distance <= 2 && name.len() > 2).then_some(full)
}

/// Levenshtein distance, ASCII case-insensitive (keys are case-sensitive: `DB_PATH` misses too).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.to_ascii_lowercase(), b.to_ascii_lowercase());
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let here = (diagonal + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diagonal = row[j + 1];
            row[j + 1] = here;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn a_misspelt_key_names_the_likely_one() {
        assert_eq!(near_miss("db_pth").as_deref(), Some("db_path"));
        assert_eq!(near_miss("nats.url").as_deref(), Some("nats.urls"));
        assert_eq!(
            near_miss("snapshot.s3.bukcet").as_deref(),
            Some("snapshot.s3.bucket")
        );
        assert_eq!(near_miss("NODE_ID").as_deref(), Some("node_id"));
        assert_eq!(near_miss("bogus"), None);
        assert_eq!(near_miss("nats.tls_ca_file"), None);
        // Keys Go's documentation lists but Go never read: warned about, not refused.
        for go_docs_only in [
            "sharding",
            "replication",
            "nats.tls_key_file",
            "nats.tls_cert_file",
        ] {
            assert_eq!(near_miss(go_docs_only), None, "{go_docs_only}");
        }
    }

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
