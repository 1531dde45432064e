#!/usr/bin/env bash
# A working demo on one machine: builds harmonylite, creates three sample databases and starts
# three nodes from examples/node-{1,2,3}.toml. Each node runs its own nats-server (embedded mode);
# -cluster-addr and -cluster-peers alone join them into one cluster. It writes a row on node 1
# and shows it arriving on nodes 2 and 3, then waits: write to any node yourself (see the printed
# commands); Ctrl-C stops everything.
# Needs: Rust (rustup) and python3 with venv. Set DEMO_EXIT=1 to stop right after the check.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
scripts/install-test-servers.sh
cargo build --release --locked --bin harmonylite
bin="$root/target/release/harmonylite"
# Embedded mode finds nats-server on PATH (or nats.server_binary in the config).
export PATH="$root/target/tools/bin:$PATH"

work=$(mktemp -d "${TMPDIR:-/tmp}/harmonylite-demo.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
  echo "demo stopped; everything it started is gone"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

sql() { python3 -c 'import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); r=c.execute(sys.argv[2]).fetchall(); c.commit(); print("\n".join("|".join(map(str,x)) for x in r))' "$@"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

ports=("$(free_port)" "$(free_port)" "$(free_port)")
for n in 1 2 3; do
  sql "$work/node-$n.db" "CREATE TABLE Books (id INTEGER PRIMARY KEY AUTOINCREMENT, title TEXT NOT NULL, author TEXT NOT NULL, publication_year INTEGER)" >/dev/null
  # The example configs, with the databases moved into this demo's own directory.
  sed -e "s|/tmp/harmonylite-$n|$work/node-$n|g" "examples/node-$n.toml" >"$work/node-$n.toml"
done
for n in 1 2 3; do
  peers=()
  for m in 1 2 3; do [ "$m" != "$n" ] && peers+=("nats://127.0.0.1:${ports[$((m - 1))]}/"); done
  "$bin" -config "$work/node-$n.toml" -cluster-addr "127.0.0.1:${ports[$((n - 1))]}" \
    -cluster-peers "$(IFS=,; echo "${peers[*]}")" >"$work/node-$n.log" 2>&1 &
  pids+=($!)
done
for n in 1 2 3; do
  for _ in $(seq 600); do grep -q "Replication running" "$work/node-$n.log" && break; sleep 0.1; done
  grep -q "Replication running" "$work/node-$n.log" || { tail -20 "$work/node-$n.log"; echo "node $n did not start"; exit 1; }
done
echo "three nodes running, each with its own nats-server, clustered on ports ${ports[*]} (logs: $work/node-N.log)"

sql "$work/node-1.db" "INSERT INTO Books (title, author, publication_year) VALUES ('The Hobbit', 'J.R.R. Tolkien', 1937)" >/dev/null
echo "node 1: inserted 'The Hobbit'"
for n in 2 3; do
  for _ in $(seq 200); do
    [ "$(sql "$work/node-$n.db" "SELECT count(*) FROM Books WHERE title = 'The Hobbit'")" = 1 ] && break
    sleep 0.05
  done
  echo "node $n: $(sql "$work/node-$n.db" "SELECT id, title, author, publication_year FROM Books")"
done
[ "$(sql "$work/node-3.db" "SELECT count(*) FROM Books")" = 1 ] || { echo "replication failed"; exit 1; }
echo "replication works."
[ "${DEMO_EXIT:-0}" = 1 ] && exit 0
cat <<TXT

Try it yourself (any node, any statement), e.g.:
  python3 -c "import sqlite3; c=sqlite3.connect('$work/node-2.db'); c.execute(\"UPDATE Books SET title='The Hobbit, or There and Back Again'\"); c.commit()"
  python3 -c "import sqlite3; print(sqlite3.connect('$work/node-3.db').execute('SELECT * FROM Books').fetchall())"
Press Ctrl-C to stop the nodes and their nats-servers.
TXT
while true; do sleep 3600; done
