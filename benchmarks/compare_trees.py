"""Benchmarks: the CPU grid of `run` for two source trees side by side, in interleaved rounds.

Says whether a change to the library made any grid point slower, on one machine, against the
run-to-run spread that the same run measures. Run from a checkout (its ``benchmarks/`` is the
harness for both trees; only ``lstm_rewrite`` comes from each tree)::

    git -C /work/main worktree add --detach /work/bench-old 4fe8a7f    # the old code, once
    .venv/bin/python benchmarks/compare_trees.py --old /work/bench-old --new /work/main
    .venv/bin/python benchmarks/compare_trees.py --old ... --new ... --quick --rounds 2   # smoke test

Options: ``--rounds`` (default 15, ``--quick`` 7), ``--quick`` (the first two sizes), ``--flavour``,
``--sizes``, ``--kinds``, ``--variants`` (default the original and the library's three),
``--call compiled|predict_on_batch``, ``--json PATH``. On a machine shared with other jobs add
``--measure cpu --threads 1``: each call's CPU time on one TensorFlow (or XLA) thread, which other
jobs barely change (wall time on a loaded machine moves by 2x between rounds). ``KERAS_BACKEND``
passes through to both workers (on JAX use ``--flavour keras3 --call predict_on_batch``), and so
do glibc's ``MALLOC_*`` variables: ``predict_on_batch`` copies every output into new arrays,
whose page faults are much of a traced model's time under glibc's defaults (RESULTS.md).

How: one long-lived worker process per tree (``PYTHONPATH`` and ``sys.path`` start with that
tree, checked on start-up), which builds every grid point once (`run.grid_variants`: the grid
is defined there only) and then times single calls on request. Each round times every
(point, variant) once under old and once under new, back to back, the order alternating between
rounds and points, so drift of the machine's load falls on both trees alike; a first round
warms up and is not counted.

The table, per point and variant: the median and minimum time of each tree, new/old as the ratio
of medians and of minima, each tree's spread (max/min and median/min across its rounds) and each
tree's ratio to its own original (median of the per-round ratios). A row is flagged ``SLOWER``
when new/old exceeds ``1 + noise`` both for the medians and for the minima, where ``noise`` is the
larger median/min - 1 of the two trees (how far a call of either tree typically strays above its
best in this run), and at least how far the point's ``original`` row is from 1. That row runs the
same Keras code under both trees: it is the control, and a flagged original says that this run's
spread was underestimated (too few rounds for the machine's noise; 2 rounds only smoke-test the
script). ``faster`` is the mirror image.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_VARIANTS = ("original", "trace_c", "trace_all", "reconstruct_c")


# --- the worker: one per tree ---------------------------------------------------------------


def worker(tree: str, call: str) -> None:
    """Serve one tree: JSON requests on stdin, one JSON reply per line on stdout.

    Requests: ``{"op": "setup", "flavour", "size", "kind"}`` (build the point; reply its variants
    and their output differences to the original), ``{"op": "time", "point", "variant"}`` (reply
    the wall and CPU seconds of one call), ``{"op": "quit"}``.
    """
    # Replies go to the real stdout; whatever the libraries print goes to stderr.
    reply_to = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.path.insert(0, HERE)
    import run

    # `run` puts its own checkout first on the path; the library must come from ``tree``.
    sys.path[:] = [tree] + [p for p in sys.path if os.path.abspath(p) != os.path.dirname(HERE)]
    import lstm_rewrite

    where = os.path.dirname(os.path.dirname(os.path.abspath(lstm_rewrite.__file__)))
    if os.path.realpath(where) != os.path.realpath(tree):
        raise SystemExit(f"lstm_rewrite imported from {where}, not from {tree}")
    points = {}
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "quit":
            break
        if request["op"] == "setup":
            key = "/".join((request["flavour"], request["size"], request["kind"]))
            original, variants, diffs = run.grid_variants(request["flavour"], request["kind"], request["size"],
                                                          call, baselines=False)
            points[key] = {"original": original, **variants}
            answer = {"point": key, "variants": list(points[key]), "max_abs_diff": diffs, "library": where}
        else:
            run_ = points[request["point"]][request["variant"]]
            start, start_cpu = time.perf_counter(), time.process_time()
            run_()
            answer = {"s": time.perf_counter() - start, "cpu": time.process_time() - start_cpu}
        reply_to.write(json.dumps(answer) + "\n")


class Worker:
    """The parent's handle on a worker process."""

    def __init__(self, tree: str, call: str, threads: int | None = None):
        env = {**os.environ, "PYTHONPATH": tree, "TF_CPP_MIN_LOG_LEVEL": "2"}
        if threads:
            env.update(TF_NUM_INTEROP_THREADS=str(threads), TF_NUM_INTRAOP_THREADS=str(threads))
            # JAX on the CPU: XLA's own thread pool.
            # (XLA_FLAGS must start with a "--" flag, or XLA reads it as a file name.)
            xla = (["--xla_cpu_multi_thread_eigen=false"] if threads == 1 else []) + [f"intra_op_parallelism_threads={threads}"]
            env["XLA_FLAGS"] = " ".join(xla + [env.get("XLA_FLAGS", "")]).strip()
        self.tree = tree
        self.log = open(os.devnull, "w") if not os.environ.get("COMPARE_TREES_LOG") else sys.stderr
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", tree, "--call", call],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, cwd=tree)

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker for {self.tree} died (COMPARE_TREES_LOG=1 shows its stderr)")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.ask(op="quit")
        except (RuntimeError, BrokenPipeError, json.JSONDecodeError):
            pass
        self.proc.wait(timeout=60)


# --- the comparison -------------------------------------------------------------------------


def compare(old: str, new: str, flavours, sizes, kinds, variants, rounds: int, call: str,
            measure: str = "wall", threads: int | None = None) -> dict:
    """Time every (point, variant) under both trees, ``rounds`` interleaved rounds; see the module docstring."""
    trees = {"old": Worker(old, call, threads), "new": Worker(new, call, threads)}
    reply_key = "s" if measure == "wall" else "cpu"
    try:
        points, setup = [], {}
        for flavour in flavours:
            for size in sizes:
                for kind in kinds:
                    answers = {side: w.ask(op="setup", flavour=flavour, size=size, kind=kind)
                               for side, w in trees.items()}
                    key = answers["old"]["point"]
                    points.append(key)
                    setup[key] = {side: a["max_abs_diff"] for side, a in answers.items()}
                    libraries = {side: a["library"] for side, a in answers.items()}
                    print(f"built {key}", flush=True)
        print(f"libraries: {libraries}", flush=True)
        times = {(p, v): {"old": [], "new": []} for p in points for v in variants}
        started = time.perf_counter()
        # Round -1 warms up (caches, allocator, the first call after building other points) and is dropped.
        for r in range(-1, rounds):
            for k, point in enumerate(points):
                for j, variant in enumerate(variants):
                    order = ("old", "new") if (r + k + j) % 2 == 0 else ("new", "old")
                    for side in order:
                        seconds = trees[side].ask(op="time", point=point, variant=variant)[reply_key]
                        if r >= 0:
                            times[point, variant][side].append(seconds)
            print(f"round {r + 1}/{rounds} ({time.perf_counter() - started:.0f} s)", flush=True)
    finally:
        for w in trees.values():
            w.close()
    rows = []
    for point in points:
        control = summarize(point, "original", times[point, "original"], None) if "original" in variants else None
        for variant in variants:
            rows.append(control if variant == "original" else
                        summarize(point, variant, times[point, variant], times.get((point, "original")), control))
    return {"old": old, "new": new, "call": call, "rounds": rounds, "measure": measure, "threads": threads,
            "rows": rows, "max_abs_diff": setup,
            "libraries": libraries,
            "load_average": list(os.getloadavg())}


def summarize(point: str, variant: str, times: dict, original: dict | None, control: dict | None = None) -> dict:
    """One row of the table (see the module docstring); ``control`` is the point's original row."""
    row = {"point": point, "variant": variant, "times": times}
    for side in ("old", "new"):
        t = times[side]
        row[side] = {"median_s": statistics.median(t), "min_s": min(t), "max_over_min": max(t) / min(t),
                     "median_over_min": statistics.median(t) / min(t)}
        if original is not None and variant != "original":
            row[side]["x_original"] = statistics.median(a / b for a, b in zip(t, original[side]))
    row["ratio_median"] = row["new"]["median_s"] / row["old"]["median_s"]
    row["ratio_min"] = row["new"]["min_s"] / row["old"]["min_s"]
    noise = max(row["old"]["median_over_min"], row["new"]["median_over_min"]) - 1
    if control is not None:
        # What the same code measured under both trees at this point: a floor for the noise.
        noise = max(noise, *(abs(math.log(control[k])) for k in ("ratio_median", "ratio_min")))
    row["noise"] = noise
    if row["ratio_median"] > 1 + noise and row["ratio_min"] > 1 + noise:
        row["flag"] = "SLOWER"
    elif row["ratio_median"] < 1 / (1 + noise) and row["ratio_min"] < 1 / (1 + noise):
        row["flag"] = "faster"
    else:
        row["flag"] = ""
    return row


def table(result: dict) -> str:
    lines = [f"old: {result['old']}  new: {result['new']}  ({result['call']} calls, {result['rounds']} rounds, "
             f"{result.get('measure', 'wall')} time, threads {result.get('threads') or 'default'}, "
             f"load at the end {result['load_average'][0]:.1f})", "",
             "| point | variant | old ms (min) | new ms (min) | new/old median | new/old min | old max/min | "
             "new max/min | noise | x orig old | x orig new | |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        o, n = r["old"], r["new"]
        xo = f"{o['x_original']:.2f}" if "x_original" in o else "-"
        xn = f"{n['x_original']:.2f}" if "x_original" in n else "-"
        lines.append(
            f"| {r['point']} | {r['variant']} | {o['median_s'] * 1e3:.1f} ({o['min_s'] * 1e3:.1f}) | "
            f"{n['median_s'] * 1e3:.1f} ({n['min_s'] * 1e3:.1f}) | {r['ratio_median']:.3f} | {r['ratio_min']:.3f} | "
            f"{o['max_over_min']:.2f} | {n['max_over_min']:.2f} | {r['noise']:.3f} | {xo} | {xn} | {r['flag']} |")
    slower = [f"{r['point']} {r['variant']}" for r in result["rows"] if r["flag"] == "SLOWER" and r["variant"] != "original"]
    lines.append("")
    lines.append("slower beyond the spread: " + (", ".join(slower) if slower else "none"))
    control = [r["point"] for r in result["rows"] if r["variant"] == "original" and r["flag"]]
    if control:
        lines.append(f"control: the original (the same code in both trees) is flagged at {', '.join(control)}: "
                     "the spread is underestimated here, run more rounds")
    return "\n".join(lines)


def main(argv=None):
    sys.path.insert(0, HERE)
    import common

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", help="checkout of the old code")
    parser.add_argument("--new", help="checkout of the new code")
    parser.add_argument("--quick", action="store_true", help="the first two sizes, fewer rounds")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15, quick 7)")
    parser.add_argument("--flavour", choices=["keras3", "tfkeras", "both"], default="both")
    parser.add_argument("--sizes", default=None, help="comma-separated subset of " + ",".join(common.SIZES))
    parser.add_argument("--kinds", default=",".join(common.KINDS))
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--call", choices=["compiled", "predict_on_batch"], default="compiled")
    parser.add_argument("--measure", choices=["wall", "cpu"], default="wall",
                        help="wall time, or the worker's CPU time (with --threads 1: a call's work alone, which "
                             "other jobs on a shared machine barely change)")
    parser.add_argument("--threads", type=int, default=None,
                        help="TensorFlow's inter- and intra-op threads (and XLA's on the CPU, for JAX)")
    parser.add_argument("--json", help="also write the result (every time) here")
    parser.add_argument("--worker", metavar="TREE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(os.path.abspath(args.worker), args.call)
    if not (args.old and args.new):
        parser.error("--old and --new are required")
    flavours = common.FLAVOURS if args.flavour == "both" else (args.flavour,)
    sizes = args.sizes.split(",") if args.sizes else (common.QUICK_SIZES if args.quick else tuple(common.SIZES))
    rounds = args.rounds or (7 if args.quick else 15)
    result = compare(os.path.abspath(args.old), os.path.abspath(args.new), flavours, sizes, args.kinds.split(","),
                     args.variants.split(","), rounds, args.call, args.measure, args.threads)
    result["machine"] = common.machine_info()
    print()
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
