"""GPU check of the reconstruct method: correctness against the NumPy reference, then speed against the original.

Needs tensorflow (with CUDA), keras, tf_keras (optional: skipped when missing), numpy and networkx;
run from the repository root:

    python benchmarks/gpu_check.py            # both parts, both flavours, about 2-4 minutes
    python benchmarks/gpu_check.py --part timing --flavour keras3

Part 1 (``correctness``) runs the cases of tests/test_reconstruct.py on the GPU, where Keras runs
the LSTM copy with cuDNN: masked (right-padded, as cuDNN needs) and unmasked, go_backwards,
initial state, Bidirectional, every quantity, compared with tests/reference.py. TF32 is switched
off for this part so that float32 tolerances hold; it is switched back on for part 2.
Part 2 (``timing``) times the original model, ``method="trace"`` and ``method="reconstruct"`` (c
only, and every state) on the medium and large grid points (benchmarks/common.py), compiled calls,
interleaved, median of the per-pair ratios. Prints tables; writes ``gpu_check.json`` to ``$OUT``
when set, else to benchmarks/out/. Exits 1 when a correctness case fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT, os.path.join(ROOT, "tests")]

import common  # noqa: E402
import numpy as np  # noqa: E402

GPU_SIZES = ("medium", "large")
ALL = ("c", "h", "i", "f", "g", "o")


def available_flavours(wanted):
    found = []
    for flavour in wanted:
        try:
            common.keras_of(flavour)
            found.append(flavour)
        except ImportError as error:
            print(f"skipping {flavour}: {error}", flush=True)
    return found


# --- part 1: correctness -----------------------------------------------------------------------


def _reference(layer, x, flavour, **kwargs):
    from reference import lstm

    cell = layer.cell
    bias = np.asarray(cell.bias.numpy()) if cell.use_bias else None
    name = lambda fn: getattr(fn, "__name__", str(fn))  # noqa: E731
    return lstm(x, np.asarray(cell.kernel.numpy()), np.asarray(cell.recurrent_kernel.numpy()), bias,
                activation=name(cell.activation), recurrent_activation=name(cell.recurrent_activation),
                go_backwards=layer.go_backwards, flavour=flavour, **kwargs)


def _named(traced, inputs):
    outputs = traced(inputs, training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return {name: np.asarray(o) for name, o in zip(traced.output_names, outputs)}


def _compare(named, site, expected, quantities, atol=1e-4):
    worst = 0.0
    for q in quantities:
        got, want = named[f"{site}.{q}"], expected[q]
        if got.shape != want.shape:
            raise AssertionError(f"{site}.{q}: shape {got.shape} != {want.shape}")
        worst = max(worst, float(np.max(np.abs(got - want))))
    if worst > atol:
        raise AssertionError(f"{site}: max |diff| {worst:.3g} > {atol}")
    return worst


def _right_padded(rng, batch, steps, features):
    x = rng.standard_normal((batch, steps, features)).astype("float32")
    for b in range(1, batch):
        x[b, steps - b:] = 0.0  # trailing padding only: what cuDNN (and Keras 3 on GPU) accepts
    return x


def correctness_cases(flavour):
    """(name, run) pairs; run() returns the worst |diff| or raises."""
    import tensorflow as tf

    from lstm_rewrite import expose_cell_states

    keras = common.keras_of(flavour)
    layers = keras.layers
    rng = np.random.default_rng(3)
    cases = []

    def masked(go_backwards, return_sequences):
        def run():
            keras.backend.clear_session()
            inputs = keras.Input((None, 5))
            lstm = layers.LSTM(8, return_sequences=return_sequences, go_backwards=go_backwards, name="lstm",
                               bias_initializer="glorot_uniform")
            model = keras.Model(inputs, lstm(layers.Masking(0.0)(inputs)))
            x = _right_padded(rng, 4, 9, 5)
            traced = expose_cell_states(model, states=("c", "h", "gates"), method="reconstruct", expose_masks=True)
            named = _named(traced, x)
            np.testing.assert_allclose(named[model.output_names[0]], np.asarray(model(x)), atol=1e-5)
            worst = _compare(named, "lstm", _reference(lstm, x, flavour, mask=np.any(x != 0, -1)), ALL)
            on_gpu = bool(tf.config.list_physical_devices("GPU"))
            if on_gpu and flavour == "keras3" and getattr(traced.get_layer("lstm").rnn, "supports_jit", True):
                raise AssertionError("the LSTM copy did not run with cuDNN (supports_jit still True)")
            return worst
        return run

    for go_backwards in (False, True):
        for return_sequences in (True, False):
            cases.append((f"masked go_backwards={go_backwards} return_sequences={return_sequences}",
                          masked(go_backwards, return_sequences)))

    def initial_state():
        keras.backend.clear_session()
        x_in, h_in, c_in = keras.Input((None, 5)), keras.Input((8,)), keras.Input((8,))
        lstm = layers.LSTM(8, return_sequences=True, return_state=True, name="lstm")
        model = keras.Model([x_in, h_in, c_in], lstm(x_in, initial_state=[h_in, c_in]))
        x = rng.standard_normal((3, 12, 5)).astype("float32")
        h0, c0 = rng.standard_normal((2, 3, 8)).astype("float32")
        traced = expose_cell_states(model, states=("c", "h", "gates"), method="reconstruct",
                                    sample_inputs=[x, h0, c0])
        return _compare(_named(traced, [x, h0, c0]), "lstm", _reference(lstm, x, flavour, initial_state=[h0, c0]), ALL)

    cases.append(("initial_state return_state", initial_state))

    def bidirectional():
        keras.backend.clear_session()
        tokens = keras.Input((None,), dtype="int32")
        embedding = layers.Embedding(20, 6, mask_zero=True, name="embedding")
        bi = layers.Bidirectional(layers.LSTM(7, return_sequences=True), name="bi")
        model = keras.Model(tokens, layers.Dense(3, name="head")(bi(embedding(tokens))))
        ids = rng.integers(1, 20, size=(4, 10)).astype("int32")
        for b in range(1, 4):
            ids[b, 10 - 2 * b:] = 0
        traced = expose_cell_states(model, states=("c", "h", "gates"), method="reconstruct")
        named = _named(traced, ids)
        embedded, mask = np.asarray(embedding(ids)), ids != 0
        forward = _reference(bi.forward_layer, embedded, flavour, mask=mask)
        backward = _reference(bi.backward_layer, embedded, flavour, mask=mask)
        backward = {q: v[:, ::-1] for q, v in backward.items() if v.ndim == 3}
        return max(_compare(named, "bi.forward", forward, ALL), _compare(named, "bi.backward", backward, ALL))

    cases.append(("bidirectional embedding mask_zero", bidirectional))

    def long_sequence():
        keras.backend.clear_session()
        inputs = keras.Input((300, 16))
        lstm = layers.LSTM(32, return_sequences=True, name="lstm")
        model = keras.Model(inputs, lstm(inputs))
        x = rng.standard_normal((8, 300, 16)).astype("float32")
        traced = expose_cell_states(model, states=("c", "gates"), method="reconstruct")
        return _compare(_named(traced, x), "lstm", _reference(lstm, x, flavour), ("c", "i", "f", "g", "o"), atol=5e-4)

    cases.append(("300 steps, no mask", long_sequence))
    return cases


def run_correctness(flavours):
    import tensorflow as tf

    tf.config.experimental.enable_tensor_float_32_execution(False)
    rows, failed = [], 0
    for flavour in flavours:
        for name, run in correctness_cases(flavour):
            started = time.perf_counter()
            try:
                worst = run()
                status = "ok"
            except Exception as error:  # noqa: BLE001 - report every case, fail at the end
                worst, status = None, f"FAIL: {type(error).__name__}: {error}"
                failed += 1
                traceback.print_exc()
            rows.append({"flavour": flavour, "case": name, "max_abs_diff": worst, "status": status,
                         "seconds": time.perf_counter() - started})
            print(f"{flavour:7} {name:45} {status} "
                  f"{'' if worst is None else f'(max |diff| {worst:.2g})'}", flush=True)
    tf.config.experimental.enable_tensor_float_32_execution(True)
    return rows, failed


# --- part 2: timing ----------------------------------------------------------------------------


def run_timing(flavours, sizes, kinds, repeats):
    from lstm_rewrite import expose_cell_states

    rows = []
    for flavour in flavours:
        keras = common.keras_of(flavour)
        for size in sizes:
            for kind in kinds:
                keras.backend.clear_session()
                batch, steps, features, units = common.SIZES[size]
                model = common.build_model(keras, kind, steps, features, units)
                x = common.make_data(7, batch, steps, features, masked=(kind == "masked"))
                original = common.compiled_runner(model, x)
                want = original()[0]
                variants, diffs = {}, {}
                for method in ("trace", "reconstruct"):
                    for label, states in (("c", ("c",)), ("all", common.ALL_STATES)):
                        traced = expose_cell_states(model, states=states, method=method, verify=False)
                        name = f"{method}_{label}"
                        variants[name] = common.compiled_runner(traced, x)
                        diffs[name] = float(np.max(np.abs(variants[name]()[0] - want)))
                timings = common.paired_timings(original, variants, repeats)
                row = {"flavour": flavour, "size": size, "kind": kind, "shape": common.SIZES[size],
                       "original_ms": 1e3 * min(v["baseline_median_s"] for v in timings.values()),
                       "variants": {k: {"ms": 1e3 * v["median_s"], "ratio": v["ratio"]} for k, v in timings.items()},
                       "max_abs_diff_of_original_output": diffs}
                rows.append(row)
                print(f"{flavour:7} {size:6} {kind:7} original {row['original_ms']:7.2f} ms  " + "  ".join(
                    f"{k} {v['ratio']:.2f}x" for k, v in row["variants"].items()), flush=True)
    return rows


def timing_table(rows):
    names = ["trace_c", "trace_all", "reconstruct_c", "reconstruct_all"]
    lines = ["| flavour | size (BxTxFxU) | model | original ms | " + " | ".join(f"{n} ms (x)" for n in names) + " |",
             "|" + "---|" * (4 + len(names))]
    for r in rows:
        shape = "x".join(str(d) for d in r["shape"])
        lines.append(f"| {r['flavour']} | {r['size']} {shape} | {r['kind']} | {r['original_ms']:.2f} | " + " | ".join(
            f"{r['variants'][n]['ms']:.2f} ({r['variants'][n]['ratio']:.2f})" for n in names) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["all", "correctness", "timing"], default="all")
    parser.add_argument("--flavour", choices=["keras3", "tfkeras", "both"], default="both")
    parser.add_argument("--kinds", default="lstm,masked")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)

    import tensorflow as tf

    started = time.perf_counter()
    flavours = available_flavours(common.FLAVOURS if args.flavour == "both" else (args.flavour,))
    result = {"machine": common.machine_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"machine: {result['machine']}", flush=True)
    if not tf.config.list_physical_devices("GPU"):
        print("WARNING: TensorFlow sees no GPU; the numbers below are CPU numbers.", flush=True)
    failed = 0
    if args.part in ("all", "correctness"):
        result["correctness"], failed = run_correctness(flavours)
    if args.part in ("all", "timing"):
        result["timing"] = run_timing(flavours, GPU_SIZES, args.kinds.split(","), args.repeats)
        print("\n### GPU timing: compiled calls, ms, ratio to the original in parentheses\n")
        print(timing_table(result["timing"]))
    result["seconds"] = time.perf_counter() - started
    out = os.environ.get("OUT") or os.path.join(HERE, "out")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "gpu_check.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\ncorrectness failures: {failed}; {result['seconds']:.0f} s; wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
