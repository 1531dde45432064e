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
