//! The validation layer: checks every value of a [`FileConfig`], applies the CLI [`Overrides`],
//! builds the typed [`Settings`]. One function per section, checked in a fixed order so the first
//! bad key reported stays the same; each rejection is a [`ConfigError::Invalid`] naming the key.

use std::path::PathBuf;
use std::time::Duration;

use super::{
    ClusterSettings, ConfigError, FileConfig, LogFormat, NatsConfig, Overrides, PrometheusConfig,
    ReplicationLogConfig, ReplicationSettings, Settings, SftpConfig, SftpSettings, SnapshotConfig,
    SnapshotSettings, SnapshotStore, data_root_dir, default_node_id, invalid,
};

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
            let starts = schemes.join(":// or ");
            return Err(invalid(key, format!("{u:?} must start with {starts}://")));
        }
    }
    Ok(())
}

fn ms(v: u32) -> Option<Duration> {
    (v > 0).then(|| Duration::from_millis(u64::from(v)))
}

impl FileConfig {
    /// Checks every value and applies CLI overrides; the error names the first bad key.
    pub fn validate(self, overrides: &Overrides) -> Result<Settings, ConfigError> {
        let db_path = self.check_top_level()?;
        if self.node_id == Some(0) {
            // Go's "unset": a node id of 0 would be this node's name and key in every bucket.
            return Err(invalid(
                "node_id",
                "must be at least 1 (leave it out to derive one from the machine id)",
            ));
        }
        let replication = replication_settings(&self.replication_log)?;
        let snapshot = snapshot_settings(&self.snapshot, &self.nats.stream_prefix)?;
        check_nats(&self.nats)?;
        let cluster = cluster_settings(overrides)?;
        if self.health_check.enable && !self.health_check.path.starts_with('/') {
            return Err(invalid("health_check.path", "must start with '/'"));
        }
        check_prometheus(&self.prometheus)?;
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
            snapshot,
            replication,
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

    /// `db_path`, `scan_max_changes`, `cleanup_interval`; returns the database path.
    fn check_top_level(&self) -> Result<PathBuf, ConfigError> {
        if self.db_path.trim().is_empty() {
            return Err(invalid("db_path", "must name the SQLite file to replicate"));
        }
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
        Ok(PathBuf::from(&self.db_path))
    }
}

/// `[replication_log]`.
fn replication_settings(rl: &ReplicationLogConfig) -> Result<ReplicationSettings, ConfigError> {
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
    if rl.apply_interval_ms > MAX_APPLY_INTERVAL_MS {
        return Err(invalid(
            "replication_log.apply_interval_ms",
            format!("must be at most {MAX_APPLY_INTERVAL_MS} (milliseconds)"),
        ));
    }
    Ok(ReplicationSettings {
        shards: rl.shards,
        max_entries: rl.max_entries,
        replicas,
        configured_replicas: rl.replicas,
        compress: rl.compress,
        update_existing: rl.update_existing,
        max_event_bytes: (rl.max_event_bytes > 0)
            .then(|| usize::try_from(rl.max_event_bytes).unwrap_or(usize::MAX)),
        apply_interval: Duration::from_millis(rl.apply_interval_ms.into()),
    })
}

/// Largest `replication_log.apply_interval_ms`: every remote change may wait this long on a busy
/// node, so seconds would make replication lag by design.
const MAX_APPLY_INTERVAL_MS: u32 = 1000;

/// `[snapshot]`; the default NATS bucket is named after `nats.stream_prefix`.
fn snapshot_settings(
    snapshot: &SnapshotConfig,
    stream_prefix: &str,
) -> Result<SnapshotSettings, ConfigError> {
    let store = match snapshot.store.as_str() {
        "nats" => SnapshotStore::Nats {
            replicas: snapshot.nats.replicas,
            bucket: if snapshot.nats.bucket.is_empty() {
                format!("{stream_prefix}-snapshot-store")
            } else {
                snapshot.nats.bucket.clone()
            },
        },
        "s3" => SnapshotStore::S3(snapshot.s3.clone()),
        "webdav" => SnapshotStore::WebDav {
            url: snapshot.webdav.url.clone(),
        },
        "sftp" => SnapshotStore::Sftp(sftp_settings(&snapshot.sftp)),
        other => {
            return Err(invalid(
                "snapshot.store",
                format!("unknown store {other:?}; expected one of nats, s3, webdav, sftp"),
            ));
        }
    };
    Ok(SnapshotSettings {
        enabled: snapshot.enabled,
        interval: ms(snapshot.interval),
        leader_ttl: ms(snapshot.leader_ttl).unwrap_or(Duration::from_secs(30)),
        store,
    })
}

/// `[snapshot.sftp]`: empty strings become `None`.
fn sftp_settings(c: &SftpConfig) -> SftpSettings {
    let path = |v: &str| (!v.is_empty()).then(|| PathBuf::from(v));
    SftpSettings {
        url: c.url.clone(),
        key_file: path(&c.key_file),
        key_passphrase: (!c.key_passphrase.is_empty()).then(|| c.key_passphrase.clone()),
        known_hosts: path(&c.known_hosts),
    }
}

/// `[nats]`: names, URLs, TLS pairing and (embedded mode only) the bind address.
fn check_nats(nats: &NatsConfig) -> Result<(), ConfigError> {
    if nats.subject_prefix.is_empty() || !valid_nats_token(&nats.subject_prefix) {
        return Err(invalid(
            "nats.subject_prefix",
            "must be a non-empty NATS subject token (no spaces, '*', '>')",
        ));
    }
    if nats.stream_prefix.is_empty() || !valid_stream_name(&nats.stream_prefix) {
        return Err(invalid(
            "nats.stream_prefix",
            "must be a non-empty JetStream name (no spaces, '.', '*', '>', '/', '\\')",
        ));
    }
    if nats.urls.iter().any(|u| u.trim().is_empty()) {
        return Err(invalid("nats.urls", "contains an empty URL"));
    }
    // A URL the client cannot use would be retried as a host name forever (`nats//h:4222`) or
    // fail only at connect time (`http://`).
    for u in nats.urls.iter().map(|u| u.trim()) {
        let usable = match u.split_once("://") {
            Some((scheme, rest)) => {
                ["nats", "tls", "ws", "wss"].contains(&scheme) && !rest.is_empty()
            }
            None => {
                !u.contains('/')
                    && u.rsplit_once(':')
                        .is_none_or(|(_, p)| p.parse::<u16>().is_ok())
            }
        };
        if !usable {
            return Err(invalid(
                "nats.urls",
                format!("{u:?} is not a NATS server URL (nats://host:port, tls://, ws://, wss://)"),
            ));
        }
    }
    if nats.cert_file.is_empty() != nats.key_file.is_empty() {
        return Err(invalid(
            if nats.cert_file.is_empty() {
                "nats.cert_file"
            } else {
                "nats.key_file"
            },
            "cert_file and key_file must be given together",
        ));
    }
    if nats.urls.is_empty() {
        check_host_port("nats.bind_address", &nats.bind_address, true)?;
    }
    Ok(())
}

/// The embedded server's clustering from `-cluster-addr`, `-cluster-peers`, `-leaf-servers`.
fn cluster_settings(overrides: &Overrides) -> Result<ClusterSettings, ConfigError> {
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
    Ok(cluster)
}

/// `[prometheus]`: the prefix `<namespace>_<subsystem>` (empty parts skipped) of every metric name
/// must be a valid name, `[a-zA-Z_:][a-zA-Z0-9_:]*`, even if `enable` is false (built either way).
fn check_prometheus(p: &PrometheusConfig) -> Result<(), ConfigError> {
    const RULE: &str = "Prometheus metric names match [a-zA-Z_:][a-zA-Z0-9_:]*";
    if !p.namespace.is_empty() && !valid_metric_name(&p.namespace) {
        return Err(invalid(
            "prometheus.namespace",
            format!("{:?} cannot start a metric name ({RULE})", p.namespace),
        ));
    }
    let prefix = [p.namespace.as_str(), p.subsystem.as_str()]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("_");
    if !p.subsystem.is_empty() && !valid_metric_name(&prefix) {
        return Err(invalid(
            "prometheus.subsystem",
            format!("{:?} cannot be part of a metric name ({RULE})", p.subsystem),
        ));
    }
    Ok(())
}

/// Prometheus's metric name rule (as the `prometheus` crate checks it when a metric is built).
fn valid_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || matches!(c, '_' | ':'))
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':'))
}

fn valid_nats_token(s: &str) -> bool {
    !s.chars()
        .any(|c| c.is_whitespace() || matches!(c, '*' | '>') || c.is_control())
}

fn valid_stream_name(s: &str) -> bool {
    valid_nats_token(s) && !s.contains(['.', '/', '\\'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{parse_str, settings};

    #[test]
    fn impossible_values_name_the_key() {
        for (text, key) in [
            ("[replication_log]\nshards = 0", "replication_log.shards"),
            (
                "[replication_log]\napply_interval_ms = 1001",
                "replication_log.apply_interval_ms",
            ),
            (
                "[replication_log]\napply_interval_ms = -1",
                "replication_log.apply_interval_ms",
            ),
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
    fn node_id_zero_and_unusable_nats_urls_are_refused() {
        let err = settings("node_id = 0").expect_err("node_id 0");
        assert!(err.to_string().contains("node_id"), "{err}");
        for bad in ["nats//h:4222", "http://h:4222", "h:port", "nats://"] {
            let err = settings(&format!("[nats]\nurls = [{bad:?}]")).expect_err(bad);
            assert!(err.to_string().contains("nats.urls"), "{err}");
        }
        for good in ["nats://u:p@h:4222", "tls://h:4222", "h:4222", "localhost"] {
            settings(&format!("[nats]\nurls = [{good:?}]")).expect(good);
        }
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
    fn prometheus_names_follow_the_metric_name_rule() {
        for ok in [
            "",
            "namespace = \"acme\"",
            "namespace = \"_a:b_9\"\nsubsystem = \"9db\"",
            "namespace = \"\"\nsubsystem = \"db\"",
        ] {
            let text = format!("[prometheus]\n{ok}");
            settings(&text).expect(&text);
        }
        for (body, key) in [
            ("namespace = \"has space\"", "prometheus.namespace"),
            ("namespace = \"9lives\"", "prometheus.namespace"),
            ("namespace = \"a-b\"", "prometheus.namespace"),
            ("namespace = \"ünï\"", "prometheus.namespace"),
            ("subsystem = \"d.b\"", "prometheus.subsystem"),
            (
                "namespace = \"\"\nsubsystem = \"9db\"",
                "prometheus.subsystem",
            ),
        ] {
            // `enable` does not matter: the metrics are built either way.
            let text = format!("[prometheus]\nenable = false\n{body}");
            let err = settings(&text).expect_err(&text);
            assert!(
                err.to_string().contains(&format!("`{key}`")),
                "{text}: {err}"
            );
        }
    }
}
