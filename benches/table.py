#!/usr/bin/env python3
"""Markdown tables comparing wsproto with the baseline, from compare.sh's JSON lines.

Usage: table.py RESULTS.jsonl > tables.md

Each line is one `wsproto-client bench --json` report with a "server" field
("wsproto" or "baseline") added by compare.sh. Runs of the same workload are
paired by their parameters; every ratio is wsproto / baseline.
"""

import json
import math
import sys

SERVERS = ("wsproto", "baseline")


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


def headline(run):
    """The number a run is ranked by when a workload was repeated."""
    return run.get("ops_per_s") or run.get("deliveries_per_s") or 0


def load(path):
    """Pairs of runs by workload, in the order the workloads were first run.

    A workload run several times (compare.sh's REPEAT) is represented by
    its median run on each server, by throughput: single short runs on a
    shared machine move by ±10%, the median much less."""
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
    return tuple(runs.get(server, {}).get(field) for server in SERVERS)


def echo_table(pairs):
    rows = [
        "## Echo round trips",
        "",
        "Round trips a second (higher is better); ratio above 1 means wsproto is faster.",
        "",
        "| conns | size | depth | wsproto rt/s | baseline rt/s | ratio | wsproto p99 µs | baseline p99 µs |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = []
    for (_, conns, size, depth), runs in pairs:
        ours, theirs = pair(runs, "ops_per_s")
        cell = ratio(ours, theirs)
        if cell is not None:
            ratios.append(cell)
        p99_ours, p99_theirs = pair(runs, "p99_us")
        rows.append(
            f"| {conns} | {size} | {depth} | {number(ours)} | {number(theirs)} "
            f"| {show_ratio(cell)} | {micros(p99_ours)} | {micros(p99_theirs)} |"
        )
    rows.append("")
    if ratios:
        # A run that measured nothing has no place in a geometric mean.
        ratios = [r for r in ratios if r > 0]
        mean = math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else 0
        rows.append(
            f"Geometric mean of the ratios: **{show_ratio(mean)}** over {len(ratios)} workloads."
        )
    else:
        rows.append("Geometric mean of the ratios: – (no workload ran on both servers).")
    return rows


def fanout_table(pairs):
    rows = [
        "## Fan-out",
        "",
        "Messages delivered a second, summed over subscribers (higher is better); "
        "`max` publishes as fast as subscribers take it, a fixed rate measures latency. "
        "Lost: messages a subscriber never received.",
        "",
        "| subs | rate | wsproto deliveries/s | baseline deliveries/s | ratio "
        "| lost (w/b) | p99 µs (w/b) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (_, subs, _size, rate), runs in pairs:
        ours, theirs = pair(runs, "deliveries_per_s")
        lost = pair(runs, "lost")
        p99 = pair(runs, "p99_us")
        shown_rate = "max" if rate is None else f"{rate:g}/s"
        # At a fixed rate deliveries/s is the offered load, not a capacity.
        shown_ratio = show_ratio(ratio(ours, theirs)) if rate is None else "–"
        rows.append(
            f"| {subs} | {shown_rate} | {number(ours)} | {number(theirs)} "
            f"| {shown_ratio} | {number(lost[0])} / {number(lost[1])} "
            f"| {micros(p99[0])} / {micros(p99[1])} |"
        )
    return rows


def memory_table(pairs):
    rows = [
        "## Memory per idle connection",
        "",
        "Growth of the server's resident memory while holding idle connections, "
        "divided by the connections held (lower is better); ratio below 1 means "
        "wsproto uses less.",
        "",
        "| idle conns held (w/b) | bytes/conn wsproto | bytes/conn baseline | ratio |",
        "|---:|---:|---:|---:|",
    ]
    for _, runs in pairs:
        held = pair(runs, "held")
        ours, theirs = pair(runs, "bytes_per_conn")
        rows.append(
            f"| {number(held[0])} / {number(held[1])} | {number(ours)} | {number(theirs)} "
            f"| {show_ratio(ratio(ours, theirs))} |"
        )
    return rows


def warnings(pairs):
    """Runs whose numbers should not be trusted as they stand."""
    found = []
    for key, runs in pairs:
        for server in SERVERS:
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
