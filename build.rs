//! Embeds build facts for `-version`: git commit and tag, build date, compiler version.
//! Missing facts (no git, a source tarball) fall back to Go's placeholders in `cli::version_line`.

use std::process::Command;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

fn run(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    if let Some(commit) = run("git", &["rev-parse", "--short=12", "HEAD"]) {
        println!("cargo:rustc-env=HARMONYLITE_GIT_COMMIT={commit}");
    }
    if let Some(tag) = run("git", &["describe", "--tags", "--exact-match"]) {
        println!("cargo:rustc-env=HARMONYLITE_GIT_TAG={tag}");
    }
    // A reproducible build dates itself from SOURCE_DATE_EPOCH. The crate's clock module is not
    // available to its own build script, so this is the one other reader of the wall clock.
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<i64>().ok());
    let built = match epoch {
        Some(secs) => OffsetDateTime::from_unix_timestamp(secs).ok(),
        None => Some(OffsetDateTime::now_utc().truncate_to_second()),
    };
    // `2006-01-02T15:04:05Z`, as Go's build stamped it.
    match built.and_then(|t| t.format(&Rfc3339).ok()) {
        Some(date) => println!("cargo:rustc-env=HARMONYLITE_BUILD_DATE={date}"),
        None => println!("cargo:warning=SOURCE_DATE_EPOCH is out of range; no build date"),
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    if let Some(version) = run(&rustc, &["--version"]) {
        println!("cargo:rustc-env=HARMONYLITE_RUSTC={version}");
    }
}
