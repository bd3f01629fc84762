#!/usr/bin/env bash
# Benchmarks wsproto-server against two references on the same workloads,
# back to back, with `wsproto-client bench`, and writes a markdown report of
# the ratios:
#   baseline-server        plain tokio-tungstenite (benches/baseline): echo, and
#                          fan-out through one broadcast channel with a batched
#                          writer per connection
#   fastwebsockets-server  fastwebsockets on hyper 1 (benches/baseline): echo only
#
#   benches/compare.sh              full run (about 20 minutes)
#   QUICK=1 benches/compare.sh      smoke run: proves the script and tools work,
#                                   every server exercised once
#
# Environment:
#   DURATION  how long each run measures (default 5s; 1s with QUICK=1)
#   QUICK     1 for the smoke run: 1 and 10 connections, one size, 10 subscribers
#   REPEAT    runs of each echo and fan-out cell, alternating servers (default 3;
#             1 with QUICK=1); the report shows each server's median
#   OUT       the report (default benches/results/latest.md); the raw JSON
#             lines go next to it, in ${OUT%.md}.jsonl
#   BIN       a directory holding already-built release binaries to use
#             instead of building (wsproto-server, wsproto-client,
#             baseline-server, fastwebsockets-server)
#   A subset of the cells (space-separated lists; default the full set, or
#   QUICK's): ECHO_CONNS, ECHO_SIZES, ECHO_DEPTHS, FANOUT_SUBS (empty: no
#   fan-out), FANOUT_FIXED=0 (max rate only), IDLE_CONNS (0: no idle run). E.g.
#     ECHO_CONNS=1000 ECHO_SIZES=4096 ECHO_DEPTHS=1 FANOUT_SUBS="1000 10000" \
#     FANOUT_FIXED=0 IDLE_CONNS=0 benches/compare.sh
#   SERVER_CPU_QUOTA  percent of one CPU each server may use (a CFS bandwidth
#             quota per 10 ms period; needs root and the cgroup cpu
#             controller). On two cores the load generator costs about what
#             a server does per round trip, so without a quota it, not the
#             server, sets the pace of the busy echo cells; with
#             SERVER_CPU_QUOTA=50 the server is the bottleneck and the
#             ratios are the servers' own. It is also what a container
#             with a CPU limit gets. E.g.
#     SERVER_CPU_QUOTA=50 ECHO_DEPTHS=1 FANOUT_SUBS="" IDLE_CONNS=0 benches/compare.sh
#
# Exits non-zero when a build fails, a server does not start or dies, or a
# bench run produces no JSON. A run that reports errors or lost messages is
# a result, not a failure: it is listed under "Warnings" in the report.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK="${QUICK:-0}"
if [ "$QUICK" = 1 ]; then
    DURATION="${DURATION:-1s}"
else
    DURATION="${DURATION:-5s}"
fi
OUT="${OUT:-benches/results/latest.md}"
# Echo and fan-out cells are run REPEAT times each, alternating servers; the
# report shows each server's median run.
REPEAT="${REPEAT:-3}"
if [ "$QUICK" = 1 ]; then
    REPEAT=1
fi
JSONL="${OUT%.md}.jsonl"

say() { printf 'compare.sh: %s\n' "$*" >&2; }

# fail MESSAGE [LOG]: reports MESSAGE and the end of LOG, then exits 1.
fail() {
    say "$1"
    if [ -n "${2:-}" ] && [ -s "$2" ]; then
        printf -- '--- last lines of %s:\n' "$2" >&2
        tail -n 30 "$2" >&2
    fi
    exit 1
}

command -v python3 >/dev/null || fail "python3 is required (it turns the results into tables)"
command -v curl >/dev/null || fail "curl is required (it waits for wsproto-server's /healthz)"

if [ -n "${BIN:-}" ]; then
    target="$BIN"
    say "using the binaries in $target (not building)"
else
    say "building (release)"
    cargo build --release -p wsproto -p wsproto-client -p wsproto-baseline --bins
    target="$(cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/release"
fi

# Every connection costs a descriptor in the server and one in the client.
hard_limit="$(ulimit -Hn)"
if [ "$hard_limit" = unlimited ]; then
    ulimit -n 1048576 2>/dev/null || true
else
    ulimit -n "$hard_limit"
fi
fd_limit="$(ulimit -n)"
say "open-file limit: $fd_limit (each of server and load generator)"

# The server and the load generator on separate CPUs, so neither steals the
# other's time; both servers get the same treatment.
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
    server_cpu=(taskset -c 0)
    client_cpu=(taskset -c 1)
    pinning="server pinned to CPU 0, load generator to CPU 1 (taskset)"
else
    # env runs its command in place, so $! is still the server's pid.
    server_cpu=(env)
    client_cpu=(env)
    pinning="unpinned (needs 2 CPUs and taskset)"
fi
say "$pinning"

scratch="$(mktemp -d)"
declare -A server_pid=() server_url=() server_log=()

# The binaries are linked (or, across file systems, copied) out of the target
# directory, so a build running meanwhile (a shared CARGO_TARGET_DIR) cannot
# swap them mid-run: cargo replaces a binary with a new file, and the link
# keeps the old one.
bin="$scratch/bin"
mkdir -p "$bin"
for program in wsproto-server wsproto-client baseline-server fastwebsockets-server; do
    [ -x "$target/$program" ] || fail "no $program in $target"
    cp -l "$target/$program" "$bin/" 2>/dev/null || cp "$target/$program" "$bin/" ||
        fail "cannot copy $program out of $target"
done

# alive PID: the process exists and is not a zombie waiting to be reaped.
alive() {
    [ -r "/proc/$1/stat" ] && ! grep -q ') Z ' "/proc/$1/stat" 2>/dev/null
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ready NAME PORT: the server answers on PORT.
ready() {
    case "$1" in
        wsproto) curl -sf -o /dev/null "http://127.0.0.1:$2/healthz" ;;
        baseline | fastwebsockets) (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null ;;
    esac
}

# start_server NAME: starts a fresh wsproto, baseline or fastwebsockets server on a free port
# and waits (at most 10s) until it answers.
start_server() {
    local name="$1" port log
    port="$(free_port)"
    log="$scratch/$name-$port.log"
    case "$name" in
        wsproto)
            # No limits that would throttle the load generator; clients may
            # publish to bench.# for the fan-out runs.
            "${server_cpu[@]}" "$bin/wsproto-server" --listen "127.0.0.1:$port" \
                --rate-limit 0 --max-connections 200000 --max-connections-per-ip 200000 \
                --max-handshakes 4096 --max-handshakes-per-ip 4096 --client-publish 'bench.#' --log warn \
                >"$log" 2>&1 &
            server_url[$name]="ws://127.0.0.1:$port/ws"
            ;;
        baseline)
            "${server_cpu[@]}" "$bin/baseline-server" --listen "127.0.0.1:$port" >"$log" 2>&1 &
            server_url[$name]="ws://127.0.0.1:$port/"
            ;;
        fastwebsockets)
            "${server_cpu[@]}" "$bin/fastwebsockets-server" --listen "127.0.0.1:$port" >"$log" 2>&1 &
            server_url[$name]="ws://127.0.0.1:$port/"
            ;;
    esac
    server_pid[$name]=$!
    server_log[$name]="$log"
    if [ -n "$quota_group" ]; then
        echo "${server_pid[$name]}" >"$quota_group/cgroup.procs" ||
            fail "cannot move the $name server into $quota_group"
    fi
    local _
    for _ in $(seq 100); do
        alive "${server_pid[$name]}" || fail "$name server exited while starting" "$log"
        if ready "$name" "$port"; then
            return 0
        fi
        sleep 0.1
    done
    fail "$name server did not answer on port $port within 10s" "$log"
}

# stop_server NAME: SIGTERM, then SIGKILL if it is still there after 10s.
stop_server() {
    local name="$1" pid="${server_pid[$1]:-}"
    [ -n "$pid" ] || return 0
    unset "server_pid[$name]"
    kill -TERM "$pid" 2>/dev/null || true
    local _
    for _ in $(seq 100); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        say "$name server still running 10s after SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local name
    for name in "${!server_pid[@]}"; do
        stop_server "$name"
    done
    rm -rf "$scratch"
    if [ -n "${quota_group:-}" ]; then
        rmdir "$quota_group" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The optional CPU quota: one cgroup (v2 or v1) that every server joins.
quota="${SERVER_CPU_QUOTA:-}"
quota_group=""
if [ -n "$quota" ]; then
    case "$quota" in
        *[!0-9]* | 0) fail "SERVER_CPU_QUOTA is a percent of one CPU, 1 to 100 (got '$quota')" ;;
    esac
    [ "$quota" -le 100 ] || fail "SERVER_CPU_QUOTA is at most 100 (got $quota)"
    period=10000
    if grep -qw cpu /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
        quota_group="/sys/fs/cgroup/wsproto-bench-$$"
        echo +cpu >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true
        { mkdir "$quota_group" && echo "$((period * quota / 100)) $period" >"$quota_group/cpu.max"; } ||
            fail "cannot set a cgroup v2 CPU quota in $quota_group (run as root)"
    elif [ -d /sys/fs/cgroup/cpu ]; then
        quota_group="/sys/fs/cgroup/cpu/wsproto-bench-$$"
        { mkdir "$quota_group" && echo "$period" >"$quota_group/cpu.cfs_period_us" &&
            echo "$((period * quota / 100))" >"$quota_group/cpu.cfs_quota_us"; } ||
            fail "cannot set a cgroup v1 CPU quota in $quota_group (run as root)"
    else
        fail "SERVER_CPU_QUOTA needs the cgroup cpu controller"
    fi
    pinning="$pinning; each server limited to $quota% of a CPU (CFS quota per 10 ms)"
    say "servers limited to $quota% of a CPU ($quota_group)"
fi

# bench NAME MODE ARGS...: one load-generator run against server NAME; its JSON
# line, tagged with "server", is appended to $JSONL.
bench() {
    local name="$1" line status=0 err="$scratch/client.err"
    shift
    local args=("$@")
    if [ "$name" != wsproto ]; then
        args+=(--raw)
    fi
    # The server's CPU time per operation: its cost even when the load
    # generator, not the server, set the pace.
    case "$1" in
        echo | fanout) args+=(--server-pid "${server_pid[$name]}") ;;
    esac
    say "$name: bench ${args[*]}"
    # Bounded, so a hung run fails the script instead of hanging CI.
    line="$("${client_cpu[@]}" timeout --kill-after=10 600 "$bin/wsproto-client" \
        --url "${server_url[$name]}" bench "${args[@]}" --json 2>"$err")" || status=$?
    line="$(printf '%s\n' "$line" | grep '^{' | tail -n 1 || true)"
    if [ -z "$line" ]; then
        fail "wsproto-client bench ${args[*]} against $name failed (exit $status) with no JSON" "$err"
    fi
    python3 -c 'import json, sys; json.loads(sys.argv[1])' "$line" 2>/dev/null ||
        fail "wsproto-client bench ${args[*]} against $name printed invalid JSON: $line" "$err"
    if [ "$status" -ne 0 ]; then
        say "$name: the run saw errors or lost messages (exit $status); kept, and shown in the report"
        tail -n 5 "$err" >&2
    fi
    alive "${server_pid[$name]}" || fail "$name server died during the run" "${server_log[$name]}"
    printf '{"server":"%s",%s\n' "$name" "${line#\{}" >>"$JSONL"
    settle "$name"
}

# settle NAME: waits (up to 20 s) until wsproto has closed the last run's
# sessions, so the next run does not share the CPU with their teardown.
settle() {
    [ "$1" = wsproto ] || return 0
    local health="${server_url[wsproto]/ws:/http:}"
    health="${health%/ws}/healthz"
    for _ in $(seq 200); do
        curl -sf "$health" | grep -q '"sessions":0' && return 0
        sleep 0.1
    done
}

# fits CONNS WHAT: the open-file limit leaves room for CONNS connections;
# otherwise WHAT is recorded as skipped.
skipped=()
fits() {
    if [ $(($1 + 200)) -le "$fd_limit" ]; then
        return 0
    fi
    skipped+=("$2 with $1 connections: open-file limit $fd_limit is too low")
    say "skipping ${skipped[-1]}"
    return 1
}

if [ "$QUICK" = 1 ]; then
    echo_conns=(1 10)
    echo_sizes=(32)
    fanout_subs=(10)
    idle_conns=200
else
    echo_conns=(1 100 1000)
    echo_sizes=(32 4096)
    fanout_subs=(1000 10000)
    idle_conns=$((fd_limit - 200))
    if [ "$idle_conns" -gt 19800 ]; then
        idle_conns=19800
    fi
fi
echo_depths=(1 16)
# Overrides for measuring a subset (see the top of this file).
[ -n "${ECHO_CONNS+set}" ] && read -r -a echo_conns <<<"$ECHO_CONNS"
[ -n "${ECHO_SIZES+set}" ] && read -r -a echo_sizes <<<"$ECHO_SIZES"
[ -n "${ECHO_DEPTHS+set}" ] && read -r -a echo_depths <<<"$ECHO_DEPTHS"
[ -n "${FANOUT_SUBS+set}" ] && read -r -a fanout_subs <<<"$FANOUT_SUBS"
idle_conns="${IDLE_CONNS:-$idle_conns}"
fanout_fixed="${FANOUT_FIXED:-1}"

# echo_servers, fanout_servers: the servers each mode runs on, in the order
# they alternate (fastwebsockets-server has no fan-out).
echo_servers=(wsproto baseline fastwebsockets)
fanout_servers=(wsproto baseline)

# A fixed rate low enough that both servers keep up (50,000 deliveries a
# second, well under either's maximum on a 2-core machine), so p99 is
# latency and not queueing.
fixed_rate() {
    case "$1" in
        10000) echo 5 ;;
        1000) echo 50 ;;
        *) echo 100 ;;
    esac
}

mkdir -p "$(dirname "$OUT")"
: >"$JSONL"

say "echo: $DURATION per run"
for name in "${echo_servers[@]}"; do
    start_server "$name"
done
for conns in "${echo_conns[@]}"; do
    fits "$conns" echo || continue
    for size in "${echo_sizes[@]}"; do
        for depth in "${echo_depths[@]}"; do
            # Alternating repeats; the report takes each server's median.
            for _ in $(seq "$REPEAT"); do
                for name in "${echo_servers[@]}"; do
                    bench "$name" echo --conns "$conns" --depth "$depth" --size "$size" \
                        --duration "$DURATION"
                done
            done
        done
    done
done
for name in "${echo_servers[@]}"; do
    stop_server "$name"
done

say "fan-out: $DURATION per run"
for name in "${fanout_servers[@]}"; do
    start_server "$name"
done
for subs in "${fanout_subs[@]+"${fanout_subs[@]}"}"; do
    fits "$subs" fan-out || continue
    rates=(max)
    if [ "$fanout_fixed" = 1 ]; then
        rates+=("$(fixed_rate "$subs")")
    fi
    for rate in "${rates[@]}"; do
        for _ in $(seq "$REPEAT"); do
            for name in "${fanout_servers[@]}"; do
                bench "$name" fanout --subs "$subs" --size 256 --rate "$rate" --duration "$DURATION"
            done
        done
    done
done
for name in "${fanout_servers[@]}"; do
    stop_server "$name"
done
# The baseline's own count of messages its lagging subscribers skipped (the
# load generator counts them as lost too; this says where they were lost).
baseline_lost="$(grep -o 'stopped lost=[0-9]*' "${server_log[baseline]}" | tail -n 1 | cut -d= -f2 || true)"
baseline_lost="${baseline_lost:-unknown (no exit line in its log)}"

# A fresh server each, alone, so its resident memory is only these connections.
if [ "$idle_conns" -gt 0 ] && fits "$idle_conns" "idle connections"; then
    say "idle connections: $idle_conns held for $DURATION"
    for name in "${echo_servers[@]}"; do
        start_server "$name"
        bench "$name" connections --conns "$idle_conns" --hold "$DURATION" \
            --server-pid "${server_pid[$name]}"
        stop_server "$name"
    done
fi

run_kind=""
if [ "$QUICK" = 1 ]; then
    run_kind=" (QUICK smoke run)"
fi
cpu_model="$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || true)"
report="$scratch/report.md"
{
    echo "# wsproto vs plain tokio-tungstenite and fastwebsockets"
    echo
    printf '%s · `%s` · %s · nproc %s · %s · open-file limit %s · %s per run, echo and fan-out cells median of %s%s · commit %s\n' \
        "$(date -u '+%Y-%m-%d %H:%M UTC')" "$(uname -srm)" "${cpu_model:-unknown CPU}" \
        "$(nproc)" "$pinning" "$fd_limit" "$DURATION" "$REPEAT" \
        "$run_kind" \
        "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    echo "Each workload ran on wsproto, then at once on each reference, on the same machine."
    echo "The ratios are the result; the absolute numbers depend on the machine."
    echo
    python3 benches/table.py "$JSONL"
    echo
    echo "baseline-server's broadcast channel skipped $baseline_lost messages for lagging subscribers."
    if [ "${#skipped[@]}" -gt 0 ]; then
        echo
        echo "## Skipped"
        echo
        printf -- '- %s\n' "${skipped[@]}"
    fi
} >"$report"
cp "$report" "$OUT"
cat "$OUT"
say "report: $OUT; raw results: $JSONL"
