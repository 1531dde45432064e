//! Documentation checks: the configuration reference and `config.example.toml` list the same keys.

use std::collections::BTreeSet;

const EXAMPLE: &str = include_str!("../../config.example.toml");
const REFERENCE: &str = include_str!("../../docs/configuration.md");

/// `section.key` for every key in the example, commented-out ones (`# key = …`) included.
fn example_keys() -> BTreeSet<String> {
    let mut section = String::new();
    let mut keys = BTreeSet::new();
    for line in EXAMPLE.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let body = line.strip_prefix("# ").unwrap_or(line);
        let Some((key, _)) = body.split_once(" = ") else {
            continue;
        };
        if key.chars().all(|c| c.is_ascii_lowercase() || c == '_') && !key.is_empty() {
            if line.starts_with('#') && !line.starts_with("# ") {
                continue;
            }
            keys.insert(if section.is_empty() {
                key.to_owned()
            } else {
                format!("{section}.{key}")
            });
        }
    }
    keys
}

/// `section.key` for every row of every table in the reference.
fn reference_keys() -> BTreeSet<String> {
    let mut section = String::new();
    let mut keys = BTreeSet::new();
    for line in REFERENCE.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            section = h
                .strip_prefix("`[")
                .and_then(|h| h.split_once("]`"))
                .map(|(s, _)| s.to_owned())
                .unwrap_or_default();
            continue;
        }
        let Some(cell) = line
            .strip_prefix("| `")
            .and_then(|l| l.split_once('`'))
            .map(|(k, _)| k)
        else {
            continue;
        };
        keys.insert(if cell.contains('.') || section.is_empty() {
            cell.to_owned()
        } else {
            format!("{section}.{cell}")
        });
    }
    keys
}

#[test]
fn configuration_reference_matches_the_example() {
    let example = example_keys();
    let reference = reference_keys();
    assert!(example.len() > 40, "parsed too few keys: {example:?}");
    let undocumented: Vec<_> = example.difference(&reference).collect();
    let unknown: Vec<_> = reference.difference(&example).collect();
    assert!(
        undocumented.is_empty(),
        "in config.example.toml but not docs/configuration.md: {undocumented:?}"
    );
    assert!(
        unknown.is_empty(),
        "in docs/configuration.md but not config.example.toml: {unknown:?}"
    );
}

#[test]
fn example_keys_are_all_real_keys() {
    // Every key (commented ones uncommented) parses without an unknown-key warning.
    let uncommented = EXAMPLE.replace("# node_id = 1", "node_id = 1");
    let parsed =
        harmonylite::config::parse(&uncommented, std::path::Path::new("config.example.toml"))
            .expect("example parses");
    assert!(parsed.unknown_keys.is_empty(), "{:?}", parsed.unknown_keys);
}

#[test]
fn grafana_dashboard_is_valid_and_uses_only_real_metrics() {
    let text = include_str!("../../examples/grafana-dashboard.json");
    let dash: serde_json::Value = serde_json::from_str(text).expect("dashboard is valid JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(
        panels.len() >= 5,
        "throughput, pending, lag, errors, sequences at least"
    );
    let metrics = harmonylite::metrics::Metrics::unserved(1);
    // Per-shard series appear once a shard has a value.
    metrics.applied.with_label_values(&["1"]).inc();
    metrics
        .last_published_sequence
        .with_label_values(&["1"])
        .set(1);
    metrics
        .last_applied_sequence
        .with_label_values(&["1"])
        .set(1);
    let exported = metrics.render();
    let mut referenced = 0;
    for panel in panels {
        assert!(
            panel["title"].is_string() && panel["description"].is_string(),
            "{panel}"
        );
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for (i, _) in expr.match_indices("harmonylite_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let base = ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(&name);
                assert!(
                    exported.contains(&format!("# TYPE {base} ")),
                    "panel {:?} uses {name}, which harmonylite does not export",
                    panel["title"]
                );
                referenced += 1;
            }
        }
    }
    assert!(referenced >= 10);
}

/// The repository root holds only the project's files: no committed logs, scratch configs or
/// databases from local runs (they were committed once; `.gitignore` now keeps them out).
#[test]
fn repository_root_holds_only_project_files() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = match std::process::Command::new("git")
        .args(["ls-files", "--cached"])
        .current_dir(root)
        .output()
    {
        Ok(o) if o.status.success() => o,
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("git ls-files failed under CI")
        }
        _ => {
            eprintln!("SKIPPED: not a git checkout");
            return;
        }
    };
    let allowed = [
        ".ci",
        ".github",
        ".gitignore",
        "Cargo.lock",
        "Cargo.toml",
        "LICENSE",
        "README.md",
        "build.rs",
        "config.example.toml",
        "docs",
        "examples",
        "scripts",
        "src",
        "tests",
    ];
    let stray: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|p| p.split('/').next().unwrap_or(p).to_owned())
        .filter(|top| !allowed.contains(&top.as_str()))
        .collect();
    assert!(
        stray.is_empty(),
        "unexpected files at the repository root: {stray:?}"
    );
}
