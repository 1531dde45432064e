#!/usr/bin/env bash
# A working demo on one machine: builds harmonylite, starts a nats-server, creates three sample
# databases and three nodes, writes on node 1 and shows the row arriving on nodes 2 and 3.
# Then it waits: write to any node yourself (see the printed commands); Ctrl-C stops everything.
# Needs: Rust (rustup) and python3 with venv. Set DEMO_EXIT=1 to stop right after the check.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
scripts/install-test-servers.sh
cargo build --release --locked --bin harmonylite
bin="$root/target/release/harmonylite"
nats="$root/target/tools/bin/nats-server"

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

mkdir -p "$work/ports"
"$nats" -a 127.0.0.1 -p -1 -js -sd "$work/js" --ports_file_dir "$work/ports" >"$work/nats.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do ls "$work"/ports/*.ports >/dev/null 2>&1 && break; sleep 0.1; done
url=$(python3 -c 'import json,glob,sys; print(json.load(open(glob.glob(sys.argv[1]+"/ports/*.ports")[0]))["nats"][0])' "$work")
echo "nats-server on $url"

for n in 1 2 3; do
  sql "$work/node-$n.db" "CREATE TABLE Books (id INTEGER PRIMARY KEY AUTOINCREMENT, title TEXT NOT NULL, author TEXT NOT NULL, publication_year INTEGER)" >/dev/null
  cat >"$work/node-$n.toml" <<TOML
db_path = "$work/node-$n.db"
seq_map_path = "$work/node-$n-seq-map.cbor"
node_id = $n
[replication_log]
shards = 2
[nats]
urls = ["$url"]
TOML
  "$bin" -config "$work/node-$n.toml" >"$work/node-$n.log" 2>&1 &
  pids+=($!)
done
for n in 1 2 3; do
  for _ in $(seq 200); do grep -q "Replication running" "$work/node-$n.log" && break; sleep 0.1; done
  grep -q "Replication running" "$work/node-$n.log" || { cat "$work/node-$n.log"; echo "node $n did not start"; exit 1; }
done
echo "three nodes running (logs in $work/node-N.log)"

sql "$work/node-1.db" "INSERT INTO Books (title, author, publication_year) VALUES ('The Hobbit', 'J.R.R. Tolkien', 1937)" >/dev/null
echo "node 1: inserted 'The Hobbit'"
for n in 2 3; do
  for _ in $(seq 100); do
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
Press Ctrl-C to stop the nodes and the nats-server.
TXT
while true; do sleep 3600; done
