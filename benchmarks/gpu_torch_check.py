"""GPU check on a machine without TensorFlow: Keras 3 on its torch backend, where the original
LSTM runs cuDNN (``torch._VF.lstm``) and ``method="trace"`` runs the generic loop.

    KERAS_BACKEND=torch python benchmarks/gpu_torch_check.py [--cpu] [small medium large xlarge]

Part 1 checks the states of both methods (``"trace"``: the generic loop; ``"reconstruct"``: the
LSTM itself, cuDNN here, with c and the gates rebuilt outside it) on the GPU against
tests/reference.py (masked and unmasked, go_backwards, Bidirectional) and that verification
passes. Part 2 times original vs rewritten (c only, and every state, for each method) on the
grid points of benchmarks/common.py: eager calls (torch runs eagerly),
interleaved original/rewritten/original/..., median of the per-pair ratios over 7 pairs. Prints
tables and writes ``gpu_torch_check.json`` to ``$OUT`` (or benchmarks/out/). ``--cpu`` is a dry
run of the script on a machine without CUDA (its timings say nothing about a GPU).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lstm_rewrite import expose_cell_states  # noqa: E402

SIZES = {"small": (256, 50, 16, 32), "medium": (64, 100, 32, 128), "large": (32, 200, 64, 256),
         "xlarge": (16, 500, 128, 512)}
ALL = ("c", "h", "i", "f", "g", "o")
METHODS = ("trace", "reconstruct")
REPEATS = 7
CPU = "--cpu" in sys.argv[1:]
DEVICE = "cpu" if CPU else "cuda"


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def check_correctness():
    from reference import lstm as reference_lstm

    rows = []
    rng = np.random.default_rng(0)
    for masked in (False, True):
        for go_backwards in (False, True):
            keras.utils.set_random_seed(1)
            tokens = keras.Input((None,), dtype="int32")
            embedding = keras.layers.Embedding(20, 8, mask_zero=masked)
            lstm = keras.layers.LSTM(16, return_sequences=True, go_backwards=go_backwards, name="lstm")
            model = keras.Model(tokens, lstm(embedding(tokens)))
            ids = rng.integers(1, 20, size=(4, 12)).astype("int32")
            if masked:
                ids[1, 9:] = 0
                ids[2, 5:] = 0
            cell = lstm.cell
            expected = reference_lstm(
                to_numpy(embedding(ids)), to_numpy(cell.kernel), to_numpy(cell.recurrent_kernel), to_numpy(cell.bias),
                mask=(ids != 0) if masked else None, go_backwards=go_backwards)
            for method in METHODS:
                traced = expose_cell_states(model, states=ALL, method=method)
                named = dict(zip(traced.output_names, [to_numpy(o) for o in traced(ids)]))
                worst = max(float(np.max(np.abs(named[f"lstm.{q}"] - expected[q]))) for q in ALL)
                report = traced.rewrite_record.verification
                rows.append({"case": f"lstm masked={masked} go_backwards={go_backwards}", "method": method,
                             "max_state_diff": worst, "verified": report.ok,
                             "output_diff": report.outputs[0].max_abs_diff})
    keras.utils.set_random_seed(2)
    tokens = keras.Input((None,), dtype="int32")
    embedding = keras.layers.Embedding(20, 8, mask_zero=True)
    bi = keras.layers.Bidirectional(keras.layers.LSTM(8, return_sequences=True), name="bi")
    model = keras.Model(tokens, bi(embedding(tokens)))
    ids = rng.integers(1, 20, size=(3, 10)).astype("int32")
    ids[1, 6:] = 0
    expected = {}
    for direction, layer in (("forward", bi.forward_layer), ("backward", bi.backward_layer)):
        cell = layer.cell
        expected[direction] = reference_lstm(
            to_numpy(embedding(ids)), to_numpy(cell.kernel), to_numpy(cell.recurrent_kernel), to_numpy(cell.bias),
            mask=ids != 0, go_backwards=layer.go_backwards)
    for method in METHODS:
        traced = expose_cell_states(model, states=ALL, method=method)
        named = dict(zip(traced.output_names, [to_numpy(o) for o in traced(ids)]))
        worst = 0.0
        for direction in ("forward", "backward"):
            for q in ALL:
                want = expected[direction][q]
                want = want[:, ::-1] if direction == "backward" else want
                worst = max(worst, float(np.max(np.abs(named[f"bi.{direction}.{q}"] - want))))
        report = traced.rewrite_record.verification
        rows.append({"case": "bidirectional masked", "method": method, "max_state_diff": worst,
                     "verified": report.ok, "output_diff": report.outputs[0].max_abs_diff})
    return rows


def timed(fn, x):
    start = time.perf_counter()
    out = fn(x)
    if not CPU:
        torch.cuda.synchronize()
    del out
    return time.perf_counter() - start


def time_grid(sizes):
    rows = []
    for size in sizes:
        batch, steps, features, units = SIZES[size]
        keras.utils.set_random_seed(0)
        inputs = keras.Input((steps, features))
        model = keras.Model(inputs, keras.layers.LSTM(units, return_sequences=True, name="lstm")(inputs))
        x = torch.as_tensor(np.random.default_rng(0).standard_normal((batch, steps, features)).astype("float32"),
                            device=DEVICE)
        variants = {"trace_c": expose_cell_states(model, method="trace"),
                    "trace_all": expose_cell_states(model, states=ALL, method="trace"),
                    "reconstruct_c": expose_cell_states(model, method="reconstruct"),
                    "reconstruct_all": expose_cell_states(model, states=ALL, method="reconstruct")}
        calls = {"original": lambda t: model(t, training=False)}
        calls.update({name: (lambda m: lambda t: m(t, training=False))(m) for name, m in variants.items()})
        with torch.no_grad():
            for fn in calls.values():  # warm-up
                timed(fn, x)
                timed(fn, x)
            samples = {name: [] for name in calls}
            ratios = {name: [] for name in variants}
            for _ in range(REPEATS):
                for name in variants:
                    before = timed(calls["original"], x)
                    traced_time = timed(calls[name], x)
                    after = timed(calls["original"], x)
                    samples["original"] += [before, after]
                    samples[name].append(traced_time)
                    ratios[name].append(traced_time / ((before + after) / 2))
        row = {"size": size, "shape": [batch, steps, features, units],
               "original_ms": 1e3 * statistics.median(samples["original"])}
        for name in variants:
            row[f"{name}_ms"] = 1e3 * statistics.median(samples[name])
            row[f"{name}_ratio"] = statistics.median(ratios[name])
        rows.append(row)
        print(f"{size:7s} {row['shape']}: original {row['original_ms']:.2f} ms, "
              + ", ".join(f"{name.replace('_', ' ')} {row[f'{name}_ms']:.2f} ms ({row[f'{name}_ratio']:.2f}x)"
                          for name in variants), flush=True)
    return rows


def main():
    if CPU:
        device = "cpu (dry run)"
    else:
        assert torch.cuda.is_available(), "no CUDA device visible to torch (--cpu for a dry run)"
        device = torch.cuda.get_device_name(0)
    print(f"device: {device}; keras {keras.__version__} on {keras.backend.backend()}; torch {torch.__version__}; "
          f"cuDNN {torch.backends.cudnn.version()} (TF32 in cuDNN: {torch.backends.cudnn.allow_tf32})", flush=True)
    correctness = check_correctness()
    print("\n| case | method | max |state - reference| | verified | max |output diff| |\n|---|---|---|---|---|")
    for row in correctness:
        print(f"| {row['case']} | {row['method']} | {row['max_state_diff']:.2e} | {row['verified']} "
              f"| {row['output_diff']:.2e} |")
    print("\ntiming (eager calls, median of 7 interleaved pairs):", flush=True)
    sizes = [arg for arg in sys.argv[1:] if arg != "--cpu"]
    timing = time_grid(sizes or ["medium", "large", "xlarge"])
    out_dir = os.environ.get("OUT") or os.path.join(HERE, "out")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu_torch_check.json"), "w") as f:
        json.dump({"device": device, "keras": keras.__version__, "torch": torch.__version__,
                   "correctness": correctness, "timing": timing}, f, indent=2)
    return 0 if all(r["verified"] and r["max_state_diff"] < 1e-4 for r in correctness) else 1


if __name__ == "__main__":
    sys.exit(main())
