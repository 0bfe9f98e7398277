#!/usr/bin/env bash
# Instructions per completed 2-step saga, counted by valgrind's callgrind: a figure that does not
# depend on a noisy or shared machine (BENCHMARKS.md records it next to the timings).
#
#   scripts/callgrind-saga.sh [CLIENTS] [SECONDS]      # defaults: 16 clients, 10 s
#   KUBETX_BIN=/tmp/kubetx-before scripts/callgrind-saga.sh   # another build, for a before/after
#   STORE=postgres://postgres@127.0.0.1:5432/fresh scripts/callgrind-saga.sh   # an empty PostgreSQL
#                                                   # database instead (psql counts the sagas)
#
# Runs the release build's `kubetx serve` under callgrind on a fresh SQLite file (instrumentation
# off during start-up), switches it on, drives it with `kubetx bench --target` (sagas only),
# switches it off, and divides the instructions of kubetx by the sagas that succeeded. The
# profile is left in $OUT (default: a temp dir) for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."

clients="${1:-16}"
seconds="${2:-10}"
bin="${KUBETX_BIN:-target/release/kubetx}"
out="${OUT:-$(mktemp -d)}"
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
db="$out/kubetx.db"

store_args=(--db "$db")
[ -n "${STORE:-}" ] && store_args=(--store "$STORE")
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out/callgrind.out" \
    "$bin" serve --listen "127.0.0.1:$port" --grpc-listen "" "${store_args[@]}" --log-level warn 2>"$out/valgrind.log" &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    curl -fs "http://127.0.0.1:$port/api/ping" >/dev/null && break
    sleep 0.1
done
callgrind_control -i on "$pid" >/dev/null
"$bin" bench --target "http://127.0.0.1:$port" --scenarios saga --clients "$clients" \
    --duration "$seconds" --warmup 1 --drain 30 >"$out/bench.txt"
callgrind_control -i off "$pid" >/dev/null
kill -TERM "$pid"
wait "$pid" || true
trap - EXIT

count="SELECT count(*) FROM trans_global WHERE status = 'succeed'"
if [ -n "${STORE:-}" ]; then
    sagas="$(psql "$STORE" -Atc "$count")"
else
    sagas="$(sqlite3 "$db" "$count")"
fi
instructions="$(callgrind_annotate "$out/callgrind.out" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')"
echo "sagas: $sagas"
echo "instructions: $instructions"
echo "instructions per saga: $((instructions / sagas))"
echo "profile: $out/callgrind.out"
