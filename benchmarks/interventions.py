"""Benchmark of interventions (issue 13): an intervened model against the traced model, and unit_importance.

Run ``.venv/bin/python benchmarks/interventions.py`` (``--quick``: the small size only, fewer repeats;
``--flavour keras3`` or ``tfkeras``). Prints two markdown tables:

- per flavour, size (`common.SIZES`) and model kind: the traced model (``expose_cell_states``, c
  exposed) against the intervened model with the same outputs and one ``Ablate`` on a quarter of the
  units from the middle step on (its cell reads the time channel and edits c inside the step). Compiled
  calls, paired and interleaved (see `common`); the ratio is the median of per-pair ratios.
- ``unit_importance`` over every unit of the LSTM of the "lstm" model: how many passes each sample
  made (units + 1), the wall time, and that time against ``units + 1`` compiled passes of the traced
  model over the same data (what one pass per variant costs at best).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
from common import SIZES, build_model, compiled_runner, keras_of, make_data, paired_timings  # noqa: E402

from lstm_rewrite import expose_cell_states  # noqa: E402
from lstm_rewrite.interventions import Ablate, intervene, logit_difference_metric, unit_importance  # noqa: E402

SITES = {"lstm": "lstm", "bidirectional": "bi.forward", "masked": "lstm"}


def grid(flavours, sizes, repeats):
    rows = []
    for flavour in flavours:
        keras = keras_of(flavour)
        for size in sizes:
            batch, steps, features, units = SIZES[size]
            for kind, site in SITES.items():
                keras.backend.clear_session()
                model = build_model(keras, kind, steps, features, units)
                x = make_data(0, batch, steps, features, masked=kind == "masked")
                traced = expose_cell_states(model, states=("c",), verify=False, method="trace")
                edited = intervene(model, [Ablate(f"{site}.c", units=list(range(units // 4)), steps=f"{steps // 2}:")],
                                   states=("c",), verify=False)
                base = compiled_runner(traced, x)
                result = paired_timings(base, {"intervened": compiled_runner(edited, x)}, repeats)["intervened"]
                rows.append((flavour, size, kind, result["baseline_median_s"] * 1e3, result["median_s"] * 1e3,
                             result["ratio"]))
                print(f"  {flavour} {size} {kind}: ratio {result['ratio']:.2f}", file=sys.stderr)
    return rows


def importance(flavours, size):
    rows = []
    batch, steps, features, units = SIZES[size]
    for flavour in flavours:
        keras = keras_of(flavour)
        keras.backend.clear_session()
        model = build_model(keras, "lstm", steps, features, units)
        x = make_data(0, batch, steps, features, masked=False)
        metric = logit_difference_metric(0, 1, step=-1)
        unit_importance(model, x[:8], metric, "lstm.c", value="zero")  # warm up (graph building, imports)
        start = time.perf_counter()
        result = unit_importance(model, x, metric, "lstm.c", value="zero")
        elapsed = time.perf_counter() - start
        traced = expose_cell_states(model, states=("c",), verify=False, method="trace")
        one_pass = compiled_runner(traced, x)
        passes = []
        for _ in range(3):
            t0 = time.perf_counter()
            one_pass()
            passes.append(time.perf_counter() - t0)
        floor = statistics.median(passes) * (units + 1)
        rows.append((flavour, size, units, result.passes, elapsed, floor, elapsed / floor))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--flavour", choices=("keras3", "tfkeras"))
    args = parser.parse_args(argv)
    flavours = [args.flavour] if args.flavour else ["keras3", "tfkeras"]
    sizes = ["small"] if args.quick else ["small", "medium"]
    repeats = 5 if args.quick else 9
    print(f"CPU: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print("\n| flavour | size | model | traced ms | intervened ms | ratio |\n|---|---|---|---|---|---|")
    for flavour, size, kind, base, edited, ratio in grid(flavours, sizes, repeats):
        print(f"| {flavour} | {size} | {kind} | {base:.1f} | {edited:.1f} | {ratio:.2f} |")
    print("\n| flavour | size | units | passes per sample | unit_importance s | (units+1) traced passes s | ratio |\n"
          "|---|---|---|---|---|---|---|")
    for flavour, size, units, passes, elapsed, floor, ratio in importance(flavours, "small"):
        print(f"| {flavour} | {size} | {units} | {passes} | {elapsed:.2f} | {floor:.2f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
