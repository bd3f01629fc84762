#!/usr/bin/env bash
# Fan-out through the Redis broker against the in-process memory broker, in
# one run, with `wsproto-client bench fanout` (256 B messages):
#
#   baseline-1x10k benches/baseline's batched-writer tokio-tungstenite
#                  broadcast, the same load: the yardstick of
#                  benches/compare.sh's fan-out, so the brokers' figures
#                  compare with it too
#   memory-1x10k   one node, memory broker, 10,000 subscribers, publisher on it
#   redis-1x10k    one node on Redis, the same load: the cost of the broker
#   redis-2x5k     two nodes on Redis, 5,000 subscribers each, publisher on
#                  the first: the cost of crossing nodes
#   latency        a fixed rate (default 1,000 subscribers × 50 msg/s):
#                  memory broker, one node, against Redis with subscribers on
#                  node B and the publisher on node A (p99 publish→delivery)
#
# Servers are pinned to CPU 0 (both nodes share it, so every case has the
# same server budget); the load generator and Redis to CPU 1. Each cell runs
# REPEAT times (default 3), alternating; the report shows medians and ratios.
#
#   benches/cluster.sh                 full run (about 8 minutes)
#   QUICK=1 benches/cluster.sh         smoke run: 500 subscribers, 1 s, once
#
# Needs redis-server. Environment: DURATION, REPEAT, SUBS, LAT_SUBS, LAT_RATE,
# OUT (default benches/results/cluster.md; raw JSON lines in ${OUT%.md}.jsonl),
# BIN (already-built release binaries).
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK="${QUICK:-0}"
if [ "$QUICK" = 1 ]; then
    DURATION="${DURATION:-1s}" REPEAT="${REPEAT:-1}" SUBS="${SUBS:-500}"
    LAT_SUBS="${LAT_SUBS:-100}" LAT_RATE="${LAT_RATE:-20}"
else
    DURATION="${DURATION:-5s}" REPEAT="${REPEAT:-3}" SUBS="${SUBS:-10000}"
    LAT_SUBS="${LAT_SUBS:-1000}" LAT_RATE="${LAT_RATE:-50}"
fi
OUT="${OUT:-benches/results/cluster.md}"
JSONL="${OUT%.md}.jsonl"
say() { printf 'cluster.sh: %s\n' "$*" >&2; }

command -v redis-server >/dev/null || { say "needs redis-server: apt-get install -y redis-server"; exit 1; }
if [ -n "${BIN:-}" ]; then
    target="$BIN"
else
    say "building (release)"
    cargo build --release -p wsproto -p wsproto-client -p wsproto-baseline --bins
    target="$(cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/release"
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cpu0=(taskset -c 0) cpu1=(taskset -c 1)
command -v taskset >/dev/null || cpu0=() cpu1=()

scratch="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$scratch"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

redis_port="$(free_port)"
"${cpu1[@]}" redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$scratch" >"$scratch/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    [ "$(redis-cli -p "$redis_port" ping 2>/dev/null)" = PONG ] && break
    sleep 0.05
done

# node NAME BROKER: starts a node; prints its port.
node() {
    local port
    port="$(free_port)"
    "${cpu0[@]}" "$target/wsproto-server" --listen "127.0.0.1:$port" --broker "$2" --node-id "$1" \
        --rate-limit 0 --client-publish 'bench.#' --max-connections 100000 \
        --max-connections-per-ip 100000 >"$scratch/$1.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
        sleep 0.05
    done
    echo "$port"
}

: >"$JSONL"
base_port="$(free_port)"
"${cpu0[@]}" "$target/baseline-server" --listen "127.0.0.1:$base_port" >"$scratch/baseline.log" 2>&1 &
pids+=($!)
# It has no health endpoint: wait until it accepts connections.
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$base_port") 2>/dev/null && break
    sleep 0.05
done
mem="$(node mem memory)"
r1="$(node r1 "redis://127.0.0.1:$redis_port")"
ra="$(node ra "redis://127.0.0.1:$redis_port")"
rb="$(node rb "redis://127.0.0.1:$redis_port")"

# run CELL ARGS...: one bench run, tagged with CELL, appended to $JSONL.
run() {
    local cell="$1"
    shift
    say "$cell $*"
    "${cpu1[@]}" "$target/wsproto-client" bench fanout --size 256 --duration "$DURATION" --json "$@" \
        2>>"$scratch/client.log" | python3 -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line); r['cell'] = '$cell'; print(json.dumps(r))" >>"$JSONL" || say "$cell: run failed"
    sleep 1
}

for _ in $(seq "$REPEAT"); do
    run baseline-1x10k --url "ws://127.0.0.1:$base_port/" --subs "$SUBS" --rate max --raw
    run memory-1x10k --url "ws://127.0.0.1:$mem/ws" --subs "$SUBS" --rate max
    run redis-1x10k --url "ws://127.0.0.1:$r1/ws" --subs "$SUBS" --rate max
    run redis-2x5k --url "ws://127.0.0.1:$ra/ws" --subs "$SUBS" --rate max \
        --sub-url "ws://127.0.0.1:$ra/ws,ws://127.0.0.1:$rb/ws" --pub-url "ws://127.0.0.1:$ra/ws"
    run latency-memory --url "ws://127.0.0.1:$mem/ws" --subs "$LAT_SUBS" --rate "$LAT_RATE"
    run latency-redis-across --url "ws://127.0.0.1:$ra/ws" --subs "$LAT_SUBS" --rate "$LAT_RATE" \
        --sub-url "ws://127.0.0.1:$rb/ws" --pub-url "ws://127.0.0.1:$ra/ws"
done

python3 - "$JSONL" "$OUT" "$SUBS" "$LAT_SUBS" "$LAT_RATE" <<'PY'
import json, statistics, sys
jsonl, out, subs, lat_subs, lat_rate = sys.argv[1:]
runs = {}
for line in open(jsonl):
    r = json.loads(line)
    runs.setdefault(r["cell"], []).append(r)
def med(cell, key):
    values = [r[key] for r in runs.get(cell, []) if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")
def lost(cell):
    return sum(r.get("lost", 0) for r in runs.get(cell, []))
rows = [
    ("batched tokio-tungstenite broadcast (benches/baseline)", "baseline-1x10k"),
    ("memory broker, 1 node", "memory-1x10k"),
    ("Redis broker, 1 node", "redis-1x10k"),
    ("Redis broker, 2 nodes × half", "redis-2x5k"),
]
base = med("memory-1x10k", "deliveries_per_s")
batched = med("baseline-1x10k", "deliveries_per_s")
lines = [f"# Fan-out through Redis ({subs} subscribers, 256 B, max rate, median of {len(runs.get('memory-1x10k', []))})", "",
         "| case | deliveries/s | vs memory, 1 node | vs batched baseline | lost |", "|---|---:|---:|---:|---:|"]
for name, cell in rows:
    d = med(cell, "deliveries_per_s")
    lines.append(f"| {name} | {d:,.0f} | {d / base:.2f}× | {d / batched:.2f}× | {lost(cell)} |")
r1 = med("redis-1x10k", "deliveries_per_s")
lines += ["", f"2 nodes × half vs 1 node (Redis): {med('redis-2x5k', 'deliveries_per_s') / r1:.2f}×", "",
          f"## Latency at a fixed rate ({lat_subs} subscribers × {lat_rate} msg/s)", "",
          "| case | p50 µs | p99 µs | lost |", "|---|---:|---:|---:|"]
for name, cell in [("memory broker, 1 node", "latency-memory"), ("Redis, publisher on A, subscribers on B", "latency-redis-across")]:
    lines.append(f"| {name} | {med(cell, 'p50_us'):,.0f} | {med(cell, 'p99_us'):,.0f} | {lost(cell)} |")
delta = (med("latency-redis-across", "p99_us") - med("latency-memory", "p99_us")) / 1000
lines += ["", f"p99 across nodes minus single node: {delta:+.2f} ms"]
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
