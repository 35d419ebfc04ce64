"""Benchmarks of the rewrite: run time of traced models against the original, memory, rewrite cost, capture.

Run ``.venv/bin/python benchmarks/run.py`` (``--quick`` for the first two grid sizes and fewer
repeats; ``--flavour keras3`` or ``tfkeras`` for one Keras; ``--sections`` to pick sections).
Prints markdown tables and writes ``benchmarks/out/bench-<profile>.json`` and ``.png``.

Sections:

- ``grid``: batch x time x features x units (`common.SIZES`) x model kind (one LSTM, two stacked,
  Bidirectional, masked input). Per cell: the original model's time, then traced with c only,
  traced with every state, the reconstruct method with c (on CPU for reference: it is the GPU
  path), and for the one-LSTM kind the baselines users write today: an ``RNN`` over an LSTMCell
  subclass returning ``concat([h, c])``, and an LSTMCell called in an eager Python loop. Each
  variant is timed right after a run of the original, interleaved, ``--repeats`` rounds; the
  table gives the medians and the median of the per-pair ratios variant/original. Calls are
  compiled calls (see `common`), every output converted to NumPy.
- ``memory``: peak resident memory growth of one call, per size and variant, one subprocess per
  flavour and size (see `memory_child`).
- ``scaling``: rewrite and verification time of models with 1, 10, 50 and 100 stacked LSTMs,
  wall and CPU time, in a fresh subprocess per flavour.
- ``capture``: ``cell_states`` throughput, in memory and streamed to HDF5, against a bare
  ``model.predict`` and a compiled call over the same batches.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402
import numpy as np  # noqa: E402

OUT = os.path.join(HERE, "out")
SCALING_LAYERS = (1, 10, 50, 100)
TARGETS = {"trace_c": 1.05, "trace_all": 1.3}
# The library's variants of a grid cell: (name, states, method) for `expose_cell_states`.
LIBRARY_VARIANTS = (("trace_c", ("c",), "trace"), ("trace_all", common.ALL_STATES, "trace"),
                    ("reconstruct_c", ("c",), "reconstruct"))


# --- grid ------------------------------------------------------------------------------------


def grid_variants(flavour, kind, size, call, baselines=True):
    """The original's run, ``{variant: run}`` and the output checks for one grid cell.

    ``baselines=False`` leaves out the hand-written baselines (they do not run the library:
    `compare_trees` times only what differs between two trees).
    """
    from lstm_rewrite import expose_cell_states

    keras = common.keras_of(flavour)
    keras.backend.clear_session()
    batch, steps, features, units = common.SIZES[size]
    model = common.build_model(keras, kind, steps, features, units)
    x = common.make_data(7, batch, steps, features, masked=(kind == "masked"))
    original = common.compiled_runner(model, x, call)
    want = original()[0]
    variants, diffs = {}, {}
    for name, states, method in LIBRARY_VARIANTS:
        traced = expose_cell_states(model, states=states, method=method, verify=False)
        variants[name] = common.compiled_runner(traced, x, call)
        diffs[name] = float(np.max(np.abs(variants[name]()[0] - want)))
    # The baselines are TensorFlow code (an eager loop of tf ops, a cell subclass the JAX loop cannot
    # zero): on Keras 3's other backends the grid times the original and the library's variants only.
    tensorflow = flavour == "tfkeras" or keras.backend.backend() == "tensorflow"
    if baselines and kind == "lstm" and tensorflow:
        lstm = model.get_layer("lstm")
        variants["concat_rnn"] = common.compiled_runner(common.concat_rnn_model(keras, lstm, steps, features), x, call)
        diffs["concat_rnn"] = float(np.max(np.abs(variants["concat_rnn"]()[0] - want)))
        loop = common.loop_cell_runner(keras, lstm)
        diffs["loop_cell"] = float(np.max(np.abs(loop(x)[0] - want)))
        variants["loop_cell"] = lambda: loop(x)
    return original, variants, diffs


def run_grid(flavours, sizes, kinds, repeats, call):
    rows = []
    for flavour in flavours:
        for size in sizes:
            for kind in kinds:
                started = time.perf_counter()
                original, variants, diffs = grid_variants(flavour, kind, size, call)
                timings = common.paired_timings(original, variants, repeats)
                row = {"flavour": flavour, "size": size, "kind": kind, "shape": common.SIZES[size],
                       "original_s": statistics.median(
                           [t for v in timings.values() for t in [v["baseline_median_s"]]]),
                       "variants": timings, "max_abs_diff": diffs,
                       "wall_s": time.perf_counter() - started}
                rows.append(row)
                print(_grid_line(row), flush=True)
                gc.collect()
    return rows


def _grid_line(row):
    parts = [f"{row['flavour']:7} {row['size']:6} {row['kind']:13} original {row['original_s'] * 1e3:8.1f} ms"]
    for name, v in row["variants"].items():
        parts.append(f"{name} {v['ratio']:.2f}x")
    return "  ".join(parts)


def grid_table(rows) -> str:
    names = ["trace_c", "trace_all", "reconstruct_c", "concat_rnn", "loop_cell"]
    head = ("| flavour | size (BxTxFxU) | model | original ms | " + " | ".join(f"{n} ms (x)" for n in names) + " |")
    lines = [head, "|" + "---|" * (4 + len(names))]
    for row in rows:
        shape = "x".join(str(d) for d in row["shape"])
        cells = []
        for name in names:
            v = row["variants"].get(name)
            if v is None:
                cells.append("-")
                continue
            mark = " **!**" if name in TARGETS and v["ratio"] > TARGETS[name] else ""
            cells.append(f"{v['median_s'] * 1e3:.1f} ({v['ratio']:.2f}){mark}")
        lines.append(f"| {row['flavour']} | {row['size']} {shape} | {row['kind']} | {row['original_s'] * 1e3:.1f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- memory ----------------------------------------------------------------------------------


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def memory_child(flavour, size, call):
    """Peak RSS growth (MiB) of one call per variant, for the one-LSTM model of ``size``.

    Runs in its own process with ``MALLOC_MMAP_THRESHOLD_`` fixed, so that every large buffer is
    mapped and unmapped and the resident size falls back between calls. Per variant: warm up
    (trace the graph), note the resident size, reset the peak (``/proc/self/clear_refs``), call
    once, read the peak ``VmHWM``. The growth counts the call's intermediates and its outputs
    (the arrays a user gets back), not the model's weights or the traced graph.
    """
    from lstm_rewrite import expose_cell_states

    keras = common.keras_of(flavour)
    batch, steps, features, units = common.SIZES[size]
    model = common.build_model(keras, "lstm", steps, features, units)
    x = common.make_data(7, batch, steps, features, masked=False)
    models = {"original": model}
    for name, states, method in LIBRARY_VARIANTS:
        models[name] = expose_cell_states(model, states=states, method=method, verify=False)
    models["concat_rnn"] = common.concat_rnn_model(keras, model.get_layer("lstm"), steps, features)
    result = {}
    for name, m in models.items():
        run = common.compiled_runner(m, x, call)
        peaks = []
        for _ in range(3):
            gc.collect()
            before = _rss_kb("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            out = run()
            peaks.append((_rss_kb("VmHWM") - before) / 1024)
            output_mb = sum(o.nbytes for o in out) / 2**20
            del out
        result[name] = {"peak_growth_mib": statistics.median(peaks), "outputs_mib": output_mb}
    print(json.dumps(result))


def run_memory(flavours, sizes, call):
    rows = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TF_CPP_MIN_LOG_LEVEL": "2"}
    for flavour in flavours:
        for size in sizes:
            proc = subprocess.run([sys.executable, __file__, "--memory-child", flavour, size, "--call", call],
                                  capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"memory {flavour} {size} failed:\n{proc.stderr[-2000:]}", flush=True)
                continue
            data = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"flavour": flavour, "size": size, "variants": data})
            print(f"{flavour:7} {size:6} " + "  ".join(f"{k} {v['peak_growth_mib']:.1f} MiB" for k, v in data.items()),
                  flush=True)
    return rows


def memory_table(rows) -> str:
    names = ["original", "trace_c", "trace_all", "reconstruct_c", "concat_rnn"]
    lines = ["| flavour | size | " + " | ".join(f"{n} MiB" for n in names) + " | outputs of trace_all MiB |",
             "|" + "---|" * (3 + len(names))]
    for row in rows:
        v = row["variants"]
        lines.append(f"| {row['flavour']} | {row['size']} | "
                     + " | ".join(f"{v[n]['peak_growth_mib']:.1f}" if n in v else "-" for n in names)
                     + f" | {v.get('trace_all', {}).get('outputs_mib', float('nan')):.1f} |")
    return "\n".join(lines)


# --- scaling ---------------------------------------------------------------------------------


def scaling_child(flavour, counts):
    """Rewrite and verification time of a chain of ``n`` LSTM(8) layers, for each n in ``counts``."""
    from lstm_rewrite import expose_cell_states, verify

    keras = common.keras_of(flavour)
    result = []
    for n in counts:
        keras.backend.clear_session()
        inputs = keras.Input((None, 8))
        x = inputs
        for k in range(n):
            x = keras.layers.LSTM(8, return_sequences=True, name=f"lstm{k}")(x)
        model = keras.Model(inputs, x)
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        traced = expose_cell_states(model, verify=False)
        rewrite = (time.perf_counter() - wall, time.process_time() - cpu)
        wall, cpu = time.perf_counter(), time.process_time()
        report = verify(model, traced)
        check = (time.perf_counter() - wall, time.process_time() - cpu)
        assert report.ok, str(report)
        result.append({"layers": n, "rewrite_wall_s": rewrite[0], "rewrite_cpu_s": rewrite[1],
                       "verify_wall_s": check[0], "verify_cpu_s": check[1],
                       "total_wall_s": rewrite[0] + check[0], "total_cpu_s": rewrite[1] + check[1]})
    print(json.dumps(result))


def run_scaling(flavours, counts):
    rows = []
    for flavour in flavours:
        proc = subprocess.run([sys.executable, __file__, "--scaling-child", flavour,
                               "--layers", ",".join(str(n) for n in counts)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"scaling {flavour} failed:\n{proc.stderr[-2000:]}", flush=True)
            continue
        for entry in json.loads(proc.stdout.strip().splitlines()[-1]):
            rows.append({"flavour": flavour, **entry})
            print(f"{flavour:7} {entry['layers']:4} LSTMs: rewrite {entry['rewrite_wall_s']:.2f} s, verify "
                  f"{entry['verify_wall_s']:.2f} s, total {entry['total_wall_s']:.2f} s wall "
                  f"({entry['total_cpu_s']:.2f} s CPU)", flush=True)
    return rows


def scaling_table(rows) -> str:
    lines = ["| flavour | LSTM layers | rewrite s | verify s | total s (wall) | total s (CPU) | total per layer ms |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['flavour']} | {r['layers']} | {r['rewrite_wall_s']:.2f} | {r['verify_wall_s']:.2f} | "
                     f"{r['total_wall_s']:.2f} | {r['total_cpu_s']:.2f} | {1e3 * r['total_wall_s'] / r['layers']:.0f} |")
    return "\n".join(lines)


# --- capture ---------------------------------------------------------------------------------


def run_capture(flavours, sequences, repeats):
    """Sequences per second: cell_states (memory / HDF5, gzip or not) against predict and a compiled call."""
    from lstm_rewrite import expose_cell_states
    from lstm_rewrite.capture import cell_states

    rows = []
    batch_size = 64
    _, steps, features, units = common.SIZES["medium"]
    for flavour in flavours:
        keras = common.keras_of(flavour)
        keras.backend.clear_session()
        model = common.build_model(keras, "lstm", steps, features, units)
        x = common.make_data(3, sequences, steps, features, masked=False)
        traced = expose_cell_states(model, states=("c",), expose_masks=True)
        if common.on_jax(model):
            fn = common.jax_forward(model)
        else:
            import tensorflow as tf

            fn = tf.function(lambda t: model(t, training=False),
                             input_signature=[tf.TensorSpec((None, steps, features), tf.float32)])

        def compiled():
            for start in range(0, sequences, batch_size):
                np.asarray(fn(x[start:start + batch_size]))

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "states.h5")

            def capture(out, compression):
                def run():
                    if out and os.path.exists(path):
                        os.remove(path)
                    cs = cell_states(traced, x, batch_size=batch_size, progress=False,
                                     out=path if out else None, compression=compression)
                    if out:
                        cs.close()
                return run

            cases = {
                "predict": lambda: model.predict(x, batch_size=batch_size, verbose=0),
                "compiled_call": compiled,
                "cell_states_memory": capture(False, None),
                "cell_states_h5": capture(True, None),
                "cell_states_h5_gzip": capture(True, "gzip"),
            }
            for fn_ in cases.values():
                fn_()  # warm up: trace graphs, create files
            times = {name: [] for name in cases}
            for _ in range(repeats):
                for name, fn_ in cases.items():
                    times[name].append(common.timed(fn_))
        medians = {name: statistics.median(t) for name, t in times.items()}
        row = {"flavour": flavour, "sequences": sequences, "shape": [steps, features, units], "batch_size": batch_size,
               "seconds": medians, "sequences_per_s": {k: sequences / v for k, v in medians.items()}}
        row["vs_predict"] = {k: medians["predict"] / v for k, v in medians.items()}
        row["vs_compiled_call"] = {k: medians["compiled_call"] / v for k, v in medians.items()}
        rows.append(row)
        print(f"{flavour:7} " + "  ".join(f"{k} {v:.0f} seq/s" for k, v in row["sequences_per_s"].items()), flush=True)
    return rows


def capture_table(rows) -> str:
    names = ["predict", "compiled_call", "cell_states_memory", "cell_states_h5", "cell_states_h5_gzip"]
    lines = ["| flavour | " + " | ".join(f"{n} seq/s (vs predict)" for n in names) + " |",
             "|" + "---|" * (1 + len(names))]
    for r in rows:
        lines.append(f"| {r['flavour']} | " + " | ".join(
            f"{r['sequences_per_s'][n]:.0f} ({r['vs_predict'][n]:.0%})" for n in names) + " |")
    return "\n".join(lines)


# --- plots -----------------------------------------------------------------------------------


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = results.get("grid") or []
    scaling = results.get("scaling") or []
    flavours = sorted({r["flavour"] for r in grid})
    panels = len(flavours) + (1 if scaling else 0)
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.5), squeeze=False)
    names = ["trace_c", "trace_all", "reconstruct_c", "concat_rnn"]
    for ax, flavour in zip(axes[0], flavours):
        rows = [r for r in grid if r["flavour"] == flavour]
        labels = [f"{r['size']}\n{r['kind']}" for r in rows]
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            values = [r["variants"].get(name, {}).get("ratio", np.nan) for r in rows]
            ax.bar(np.arange(len(rows)) + k * width, values, width, label=name)
        for name, target in TARGETS.items():
            ax.axhline(target, linestyle="--", linewidth=0.8, color="grey")
        ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2)
        ax.set_xticklabels(labels, fontsize=7, rotation=90)
        ax.set_ylabel("time / original (median of pairs)")
        ax.set_title(f"{flavour}: traced / original")
        ax.legend(fontsize=7)
    if scaling:
        ax = axes[0][-1]
        for flavour in sorted({r["flavour"] for r in scaling}):
            rows = [r for r in scaling if r["flavour"] == flavour]
            ax.plot([r["layers"] for r in rows], [r["total_wall_s"] for r in rows], marker="o", label=f"{flavour} wall")
            ax.plot([r["layers"] for r in rows], [r["total_cpu_s"] for r in rows], marker="x", linestyle=":",
                    label=f"{flavour} CPU")
        ax.axhline(10, linestyle="--", linewidth=0.8, color="grey")
        ax.set_xlabel("LSTM layers")
        ax.set_ylabel("rewrite + verification, s")
        ax.set_title("rewrite cost")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="first two sizes, fewer repeats, fewer sequences")
    parser.add_argument("--flavour", choices=["keras3", "tfkeras", "both"], default="both")
    parser.add_argument("--sections", default="grid,memory,scaling,capture")
    parser.add_argument("--sizes", default=None, help="comma-separated subset of " + ",".join(common.SIZES))
    parser.add_argument("--kinds", default=",".join(common.KINDS))
    parser.add_argument("--repeats", type=int, default=None, help="rounds per grid cell (default 9, quick 7)")
    parser.add_argument("--call", choices=["compiled", "predict_on_batch"], default="compiled")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--tables", metavar="JSON", help="print the tables of an earlier run's JSON and exit")
    parser.add_argument("--memory-child", nargs=2, metavar=("FLAVOUR", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--scaling-child", metavar="FLAVOUR", help=argparse.SUPPRESS)
    parser.add_argument("--layers", default=",".join(str(n) for n in SCALING_LAYERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.tables:
        with open(args.tables) as f:
            return print_tables(json.load(f))
    if args.memory_child:
        return memory_child(*args.memory_child, args.call)
    if args.scaling_child:
        return scaling_child(args.scaling_child, [int(n) for n in args.layers.split(",")])

    flavours = common.FLAVOURS if args.flavour == "both" else (args.flavour,)
    sizes = args.sizes.split(",") if args.sizes else (common.QUICK_SIZES if args.quick else tuple(common.SIZES))
    kinds = args.kinds.split(",")
    repeats = args.repeats or (7 if args.quick else 9)
    sections = args.sections.split(",")
    profile = "quick" if args.quick else "full"
    results = {"profile": profile, "call": args.call, "repeats": repeats, "machine": common.machine_info(),
               "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"machine: {results['machine']}", flush=True)
    if "grid" in sections:
        results["grid"] = run_grid(flavours, sizes, kinds, repeats, args.call)
    if "memory" in sections:
        results["memory"] = run_memory(flavours, sizes, args.call)
    if "scaling" in sections:
        results["scaling"] = run_scaling(flavours, SCALING_LAYERS)
    if "capture" in sections:
        results["capture"] = run_capture(flavours, 1024 if args.quick else 4096, 3)
    results["machine"]["load_average_end"] = list(os.getloadavg())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"bench-{profile}.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(args.out, f"bench-{profile}.png"))
    print_tables(results)
    print(f"\nwrote {os.path.join(args.out, f'bench-{profile}.json')} and .png")


def print_tables(results):
    machine = results["machine"]
    print(f"\n{machine['cpu']}, {machine['cores']} cores, load {machine['load_average'][0]:.1f} -> "
          f"{machine.get('load_average_end', [float('nan')])[0]:.1f}; TF {machine['tensorflow']}, Keras "
          f"{machine['keras3']}, tf-keras {machine['tfkeras']}; {results['call']} calls, {results['repeats']} rounds")
    sections = [
        ("grid", "Grid: time per call, ratio to the original in parentheses", grid_table),
        ("memory", "Peak resident memory growth of one call (one LSTM)", memory_table),
        ("scaling", "Rewrite + verification time", scaling_table),
        ("capture", "cell_states throughput (medium LSTM, batch 64)", capture_table),
    ]
    for key, title, table in sections:
        if results.get(key):
            print(f"\n### {title}\n\n{table(results[key])}")


if __name__ == "__main__":
    main()
