//! Command-line flags, spelled as Go's `flag` package accepts them: `-config x`, `-config=x`,
//! `--config x`, and boolean switches `-cleanup` or `-cleanup=false` (design §2).
//!
//! clap has no single-dash long options, so [`normalise`] rewrites `-name` to `--name` before clap
//! parses; everything after a bare `--` is left alone. An unknown flag prints usage and exits 2,
//! `-h`/`-help` print usage and exit 0, as Go does.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{ArgAction, Parser};

/// harmonylite: leaderless SQLite replication over NATS JetStream.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "harmonylite",
    disable_version_flag = true,
    disable_help_flag = true
)]
pub struct Args {
    /// TOML config path (empty: built-in defaults)
    #[arg(long = "config", value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Node ID; overrides node_id from the config when non-zero
    #[arg(long = "node-id", value_name = "ID", default_value_t = 0)]
    pub node_id: u64,

    /// Remove all HarmonyLite triggers and change-log tables from the database, then exit
    #[arg(long = "cleanup", action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value_t = false, default_missing_value = "true", value_name = "BOOL")]
    pub cleanup: bool,

    /// Save a snapshot of the database to the configured store, then exit (non-zero if it failed)
    #[arg(long = "save-snapshot", action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value_t = false, default_missing_value = "true", value_name = "BOOL")]
    pub save_snapshot: bool,

    /// Print this node's schema hash and watched tables, then exit
    #[arg(long = "schema-status", action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value_t = false, default_missing_value = "true", value_name = "BOOL")]
    pub schema_status: bool,

    /// Print every node's schema hash from the cluster's schema registry, then exit
    #[arg(long = "schema-status-cluster", action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value_t = false, default_missing_value = "true", value_name = "BOOL")]
    pub schema_status_cluster: bool,

    /// Embedded NATS: cluster (route) listen address, host:port
    #[arg(long = "cluster-addr", value_name = "HOST:PORT", default_value = "")]
    pub cluster_addr: String,

    /// Embedded NATS: comma-separated route URLs (nats://host:port/ or dns://host:port?min=N&interval_ms=M)
    #[arg(long = "cluster-peers", value_name = "URLS", default_value = "")]
    pub cluster_peers: String,

    /// Embedded NATS: comma-separated leaf-node remote URLs (?hub=true marks a hub)
    #[arg(long = "leaf-servers", value_name = "URLS", default_value = "")]
    pub leaf_servers: String,

    /// Serve CPU profiles on this address (/debug/pprof/profile, /debug/pprof/flamegraph)
    #[arg(long = "pprof", value_name = "HOST:PORT", default_value = "")]
    pub pprof: String,

    /// Print the version and exit
    #[arg(long = "version", action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value_t = false, default_missing_value = "true", value_name = "BOOL")]
    pub version: bool,

    /// Print this help
    #[arg(long = "help", short = 'h', action = ArgAction::Help)]
    help: Option<bool>,
}

/// Rewrites Go-style `-name[=value]` arguments to `--name[=value]`.
pub fn normalise<I: IntoIterator<Item = OsString>>(argv: I) -> Vec<OsString> {
    let mut passthrough = false;
    let mut rewrite = |s: &str| {
        passthrough |= s == "--";
        (!passthrough && s.len() > 2 && s.starts_with('-') && !s.starts_with("--"))
            .then(|| OsString::from(format!("-{s}")))
    };
    let mut argv = argv.into_iter();
    let program = argv.next();
    let rest = argv.map(|arg| arg.to_str().and_then(&mut rewrite).unwrap_or(arg));
    program.into_iter().chain(rest).collect()
}

/// Parses argv (including the program name); clap's error knows how to print itself and its exit
/// code (2 for bad usage, 0 for help).
pub fn parse<I: IntoIterator<Item = OsString>>(argv: I) -> Result<Args, clap::Error> {
    Args::try_parse_from(normalise(argv))
}

/// The `-version` line: `HarmonyLite <version> (git: <commit>, tag: <tag>, built: <date>,
/// <toolchain>, <platform>)`, with Go's placeholders where the build did not record a value.
pub fn version_line() -> String {
    format!(
        "HarmonyLite {} (git: {}, tag: {}, built: {}, {}, {}/{})",
        env!("CARGO_PKG_VERSION"),
        option_env!("HARMONYLITE_GIT_COMMIT").unwrap_or("unknown"),
        option_env!("HARMONYLITE_GIT_TAG").unwrap_or("none"),
        option_env!("HARMONYLITE_BUILD_DATE").unwrap_or("unknown"),
        option_env!("HARMONYLITE_RUSTC").unwrap_or("rustc"),
        std::env::consts::OS,
        go_arch(std::env::consts::ARCH),
    )
}

/// Go's `GOARCH` spelling of an architecture, so `-version` reads like Go HarmonyLite's.
pub fn go_arch(arch: &str) -> &str {
    match arch {
        "x86_64" => "amd64",
        "x86" => "386",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64",
        "loongarch64" => "loong64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args, clap::Error> {
        parse(
            std::iter::once("harmonylite")
                .chain(list.iter().copied())
                .map(OsString::from),
        )
    }

    #[test]
    fn go_style_flags() {
        let a = args(&["-config", "c.toml", "-node-id=7", "-cleanup"]).expect("parses");
        assert_eq!(a.config, Some(PathBuf::from("c.toml")));
        assert_eq!(a.node_id, 7);
        assert!(a.cleanup);
        let a = args(&["--config=x.toml", "--node-id", "3", "-cleanup=false"]).expect("parses");
        assert_eq!(a.config, Some(PathBuf::from("x.toml")));
        assert_eq!(a.node_id, 3);
        assert!(!a.cleanup);
        assert!(args(&["-version"]).expect("parses").version);
        assert!(args(&["-schema-status"]).expect("parses").schema_status);
        let a = args(&["--schema-status-cluster", "-config", "x"]).expect("parses");
        assert!(a.schema_status_cluster && !a.schema_status);
        let a = args(&[
            "-cluster-addr",
            "127.0.0.1:4221",
            "-cluster-peers=nats://a:1/,dns://b:2?min=2",
        ])
        .expect("parses");
        assert_eq!(a.cluster_addr, "127.0.0.1:4221");
        assert_eq!(a.cluster_peers, "nats://a:1/,dns://b:2?min=2");
        assert_eq!(a.leaf_servers, "");
    }

    #[test]
    fn bad_usage_exits_2_and_help_exits_0() {
        let e = args(&["-db", "x"]).expect_err("unknown flag");
        assert_eq!(e.exit_code(), 2);
        let e = args(&["-node-id", "abc"]).expect_err("bad number");
        assert_eq!(e.exit_code(), 2);
        assert_eq!(args(&["-h"]).expect_err("help").exit_code(), 0);
        assert_eq!(args(&["-help"]).expect_err("help").exit_code(), 0);
    }

    #[test]
    fn version_line_format() {
        let v = version_line();
        assert!(
            v.starts_with(&format!("HarmonyLite {} (git: ", env!("CARGO_PKG_VERSION"))),
            "{v}"
        );
        assert!(
            v.contains(", tag: ") && v.contains(", built: ") && v.ends_with(')'),
            "{v}"
        );
    }
}
