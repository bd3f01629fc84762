#!/usr/bin/env python3
"""Markdown tables comparing wsproto with its references, from compare.sh's JSON lines.

Usage: table.py RESULTS.jsonl > tables.md

Each line is one `wsproto-client bench --json` report with a "server" field
added by compare.sh: "wsproto", "baseline" (plain tokio-tungstenite, batched
broadcast writer) or "fastwebsockets" (echo and idle connections only). Runs
of the same workload are grouped by their parameters; every ratio is wsproto
divided by a reference.
"""

import json
import math
import sys

SERVERS = ("wsproto", "baseline", "fastwebsockets")

# The servers each mode is run on (fastwebsockets-server has no fan-out).
SERVERS_OF_MODE = {
    "echo": SERVERS,
    "fanout": ("wsproto", "baseline"),
    "connections": SERVERS,
}


def workload(run):
    """The parameters that make two runs comparable."""
    mode = run["mode"]
    if mode == "echo":
        return (mode, run["conns"], run["size"], run["depth"])
    if mode == "fanout":
        return (mode, run["subs"], run["size"], run["rate"])
    if mode == "connections":
        return (mode, run["conns"])
    raise SystemExit(f"table.py: unknown mode {mode!r}")


MEDIAN_FIELDS = ("p50_us", "p90_us", "p99_us", "p999_us", "server_cpu_us_per_op")


def headline(run):
    """The number a run is ranked by when a workload was repeated."""
    return run.get("ops_per_s") or run.get("deliveries_per_s") or 0


def load(path):
    """Pairs of runs by workload, in the order the workloads were first run.

    A workload run several times (compare.sh's REPEAT) is represented by
    its median run on each server, by throughput, with each latency
    percentile the median of that percentile over the runs: single short
    runs on a shared machine move by ±10%, the median much less."""
    repeats = {}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                run = json.loads(line)
            except json.JSONDecodeError as err:
                raise SystemExit(f"table.py: {path}:{number}: {err}") from err
            repeats.setdefault(workload(run), {}).setdefault(run["server"], []).append(run)
    pairs = {}
    for key, by_server in repeats.items():
        pairs[key] = {}
        for server, runs in by_server.items():
            ranked = sorted(runs, key=headline)
            median = dict(ranked[(len(ranked) - 1) // 2])
            median["repeats"] = len(runs)
            # Latencies and CPU cost are medians of their own: the median run by
            # throughput need not have the median tail.
            for field in MEDIAN_FIELDS:
                values = sorted(run[field] for run in runs if run.get(field) is not None)
                if values:
                    median[field] = values[(len(values) - 1) // 2]
            pairs[key][server] = median
    return pairs


def number(value):
    """A count or rate, with thousands separators; '–' when missing."""
    if value is None:
        return "–"
    return f"{value:,.0f}"


def micros(value):
    if value is None:
        return "–"
    return f"{value:,.1f}" if value < 10 else f"{value:,.0f}"


def ratio(ours, theirs):
    if ours is None or not theirs:
        return None
    return ours / theirs


def show_ratio(value):
    return "–" if value is None else f"{value:.2f}×"


def pair(runs, field):
    """`field` of the wsproto, baseline and fastwebsockets runs (None when absent)."""
    return tuple(runs.get(server, {}).get(field) for server in SERVERS)


def cpu_per_op(run, rate_field):
    """The server's CPU µs per operation: measured when the run has it, else
    one core's second divided by the rate (right only if the server was the
    bottleneck)."""
    measured = run.get("server_cpu_us_per_op")
    if measured is not None:
        return measured
    rate = run.get(rate_field)
    return 1e6 / rate if rate else None


def geometric_mean(ratios):
    """Of the ratios that measured something; a run that measured nothing has
    no place in a geometric mean."""
    ratios = [r for r in ratios if r is not None and r > 0]
    if not ratios:
        return None, 0
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios)), len(ratios)


def echo_table(pairs):
    rows = [
        "## Echo round trips",
        "",
        "Round trips a second (higher is better) and p99 round-trip time. "
        "tt: plain tokio-tungstenite (`baseline-server`); fws: fastwebsockets "
        "(`fastwebsockets-server`). A throughput ratio above 1 means wsproto is faster; "
        "a p99 ratio at or below 1 means wsproto's tail is no worse. "
        "CPU ÷ fws: the server's CPU time per round trip against fastwebsockets' "
        "(below 1: wsproto does the same work for less); it tells the servers apart "
        "when the load generator, not the server, sets the pace (see Warnings).",
        "",
        "| conns | size | depth | wsproto rt/s | tt rt/s | fws rt/s | ÷ tt | ÷ fws "
        "| wsproto p99 µs | tt p99 µs | fws p99 µs | p99 ÷ fws | CPU ÷ fws |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    vs_tt, vs_fws = [], []
    for (_, conns, size, depth), runs in pairs:
        ours, tt, fws = pair(runs, "ops_per_s")
        p99_ours, p99_tt, p99_fws = pair(runs, "p99_us")
        cpu_ours, _, cpu_fws = (
            cpu_per_op(runs.get(server, {}), "ops_per_s") for server in SERVERS
        )
        cell_tt, cell_fws = ratio(ours, tt), ratio(ours, fws)
        vs_tt.append(cell_tt)
        vs_fws.append(cell_fws)
        rows.append(
            f"| {conns} | {size} | {depth} | {number(ours)} | {number(tt)} | {number(fws)} "
            f"| {show_ratio(cell_tt)} | {show_ratio(cell_fws)} "
            f"| {micros(p99_ours)} | {micros(p99_tt)} | {micros(p99_fws)} "
            f"| {show_ratio(ratio(p99_ours, p99_fws))} "
            f"| {show_ratio(ratio(cpu_ours, cpu_fws))} |"
        )
    rows.append("")
    for name, ratios in (("tokio-tungstenite", vs_tt), ("fastwebsockets", vs_fws)):
        mean, count = geometric_mean(ratios)
        if mean is None:
            rows.append(f"Geometric mean of the ratios to {name}: – (no workload ran on both).")
        else:
            rows.append(
                f"Geometric mean of the ratios to {name}: **{show_ratio(mean)}** "
                f"over {count} workloads."
            )
        rows.append("")
    return rows[:-1]


def fanout_table(pairs):
    rows = [
        "## Fan-out",
        "",
        "Messages delivered a second, summed over subscribers (higher is better), against "
        "the baseline's batched broadcast (one `tokio::sync::broadcast` channel; per "
        "connection a writer that feeds up to 64 queued messages, then flushes once). "
        "`max` publishes as fast as subscribers take it, with 32 messages in flight; a "
        "fixed rate measures latency. µs/delivery is the server's CPU time per delivery at "
        "max rate (measured from /proc; without it, one core divided by deliveries a "
        "second). Lost: messages a subscriber never received.",
        "",
        "| subs | rate | wsproto deliveries/s | baseline deliveries/s | ratio "
        "| µs/delivery (w/b) | lost (w/b) | p99 µs (w/b) | p99 ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cost = {}
    for (_, subs, _size, rate), runs in pairs:
        ours, theirs, _ = pair(runs, "deliveries_per_s")
        lost = pair(runs, "lost")
        p99 = pair(runs, "p99_us")
        shown_rate = "max" if rate is None else f"{rate:g}/s"
        # At a fixed rate deliveries/s is the offered load, not a capacity.
        if rate is None:
            shown_ratio = show_ratio(ratio(ours, theirs))
            per_delivery = tuple(
                cpu_per_op(runs.get(server, {}), "deliveries_per_s")
                for server in ("wsproto", "baseline")
            )
            cost[subs] = per_delivery
            shown_cost = f"{micros(per_delivery[0])} / {micros(per_delivery[1])}"
        else:
            shown_ratio = "–"
            shown_cost = "–"
        rows.append(
            f"| {subs} | {shown_rate} | {number(ours)} | {number(theirs)} "
            f"| {shown_ratio} | {shown_cost} | {number(lost[0])} / {number(lost[1])} "
            f"| {micros(p99[0])} / {micros(p99[1])} | {show_ratio(ratio(p99[0], p99[1]))} |"
        )
    sizes = sorted(cost)
    if len(sizes) >= 2:
        low, high = sizes[0], sizes[-1]
        growth = [ratio(cost[high][i], cost[low][i]) for i in range(2)]
        rows += [
            "",
            f"Cost per delivery from {low:,} to {high:,} subscribers grows "
            f"{show_ratio(growth[0])} on wsproto, {show_ratio(growth[1])} on the baseline.",
        ]
    return rows


def memory_table(pairs):
    rows = [
        "## Memory per idle connection",
        "",
        "Growth of the server's resident memory while holding idle connections, "
        "divided by the connections held (lower is better); a ratio below 1 means "
        "wsproto uses less.",
        "",
        "| idle conns held (w/tt/fws) | bytes/conn wsproto | tt | fws | ÷ tt | ÷ fws |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for _, runs in pairs:
        held = pair(runs, "held")
        ours, tt, fws = pair(runs, "bytes_per_conn")
        rows.append(
            f"| {' / '.join(number(h) for h in held)} | {number(ours)} | {number(tt)} "
            f"| {number(fws)} | {show_ratio(ratio(ours, tt))} | {show_ratio(ratio(ours, fws))} |"
        )
    return rows


def warnings(pairs):
    """Runs whose numbers should not be trusted as they stand."""
    found = []
    for key, runs in pairs:
        for server in SERVERS_OF_MODE[key[0]]:
            run = runs.get(server)
            if run is None:
                found.append(f"- {describe(key)}: no {server} run")
                continue
            wanted = run.get("conns", run.get("subs"))
            problems = []
            if run.get("errors"):
                problems.append(f"errors={run['errors']}")
            if run.get("failed"):
                problems.append(f"failed={run['failed']}")
            if run.get("lost"):
                problems.append(f"lost={run['lost']}")
            client_share = run.get("client_cpu_share")
            if client_share is not None and client_share > 0.9:
                problems.append(
                    f"load generator at {client_share:.0%} of a core "
                    "(its rate may be the load generator's, not the server's)"
                )
            connected = run.get("connected", run.get("held"))
            if connected is not None and wanted is not None and connected < wanted:
                problems.append(f"connected {connected} of {wanted}")
            if problems:
                found.append(f"- {describe(key)}, {server}: {', '.join(problems)}")
    return found


def describe(key):
    mode, *values = key
    names = {
        "echo": ("conns", "size", "depth"),
        "fanout": ("subs", "size", "rate"),
        "connections": ("conns",),
    }[mode]
    shown = ", ".join(
        f"{name} {'max' if value is None else value}" for name, value in zip(names, values)
    )
    return f"{mode} ({shown})"


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.strip().splitlines()[2])
    pairs = load(sys.argv[1])
    sections = [
        (echo_table, "echo"),
        (fanout_table, "fanout"),
        (memory_table, "connections"),
    ]
    out = []
    for render, mode in sections:
        of_mode = [(key, runs) for key, runs in pairs.items() if key[0] == mode]
        if of_mode:
            out += render(of_mode) + [""]
    found = warnings(list(pairs.items()))
    if found:
        out += ["## Warnings", ""] + found + [""]
    print("\n".join(out).rstrip())


if __name__ == "__main__":
    main()
