"""Benchmark of the capture stage: peak memory of ``cell_states(..., out=...)`` for N and 10N sequences.

Each measurement runs in a fresh subprocess (so that one run's peak cannot hide another's) and
reports ``ru_maxrss``, the peak resident set size of that process. Streaming to HDF5 should give
the same peak for N and 10N sequences, although 10N sequences make ten times the state data; the
in-memory capture (``out=None``) is measured alongside for contrast, and grows with N.

The data come from a generator of batches, so that the input itself is never held in memory
either. Run from the repository root::

    python benchmarks/capture_memory.py            # N = 1000, T = 100, 64 units, c and h
    python benchmarks/capture_memory.py --n 500 --modes file
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(args) -> None:
    """Build a model, capture its states for ``args.sequences`` sequences, print one JSON line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import resource

    import numpy as np

    sys.path.insert(0, ROOT)
    from lstm_rewrite import expose_cell_states
    from lstm_rewrite.capture import cell_states

    k = __import__("keras" if args.flavour == "keras3" else "tf_keras")
    k.utils.set_random_seed(0)
    tokens = k.Input((args.time,), dtype="int32", name="tokens")
    x = k.layers.Embedding(100, 16, mask_zero=True, name="emb")(tokens)
    x = k.layers.LSTM(args.units, return_sequences=True, name="encoder")(x)
    model = k.Model(tokens, k.layers.Dense(100, name="next")(x))
    traced = expose_cell_states(model, states=("c", "h"), expose_masks=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def batches():
        rng = np.random.default_rng(1)
        for start in range(0, args.sequences, args.batch_size):
            size = min(args.batch_size, args.sequences - start)
            yield rng.integers(1, 100, size=(size, args.time)).astype("int32")

    out = os.path.join(args.dir, f"states_{args.sequences}.h5") if args.mode == "file" else None
    started = time.perf_counter()
    cs = cell_states(traced, batches(), states=None, out=out, progress=False)
    seconds = time.perf_counter() - started
    shapes = {n: list(cs[n].shape) for n in cs}
    state_bytes = sum(int(np.prod(s)) * 4 for s in shapes.values())
    file_bytes = os.path.getsize(out) if out else 0
    cs.close()
    if out:
        os.remove(out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": args.mode, "sequences": args.sequences, "state_mb": state_bytes / 2**20,
                      "file_mb": file_bytes / 2**20, "peak_before_mb": before / 1024, "peak_mb": peak / 1024,
                      "seconds": seconds}))


def measure(mode: str, sequences: int, args, directory: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", "--mode", mode, "--sequences", str(sequences),
               "--time", str(args.time), "--units", str(args.units), "--batch-size", str(args.batch_size),
               "--flavour", args.flavour, "--dir", directory]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measurement {mode} N={sequences} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="N: the small run has N sequences, the large 10N")
    parser.add_argument("--time", type=int, default=100)
    parser.add_argument("--units", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--flavour", choices=("keras3", "tfkeras"), default="keras3")
    parser.add_argument("--modes", default="file,memory", help="file (out=...), memory (out=None) or both")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--sequences", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0

    rows = []
    with tempfile.TemporaryDirectory(prefix="capture_memory_") as directory:
        for mode in args.modes.split(","):
            for sequences in (args.n, 10 * args.n):
                rows.append(measure(mode, sequences, args, directory))
                print(f"  measured {mode:6s} N={sequences}", file=sys.stderr)
    print(f"cell_states peak memory ({args.flavour}, T={args.time}, {args.units} units, states c and h, "
          f"batch {args.batch_size}; each row a fresh process)")
    print(f"{'mode':8s} {'sequences':>9s} {'states MB':>10s} {'file MB':>8s} {'RSS before MB':>14s} "
          f"{'peak RSS MB':>12s} {'growth MB':>10s} {'seconds':>8s}")
    for r in rows:
        print(f"{r['mode']:8s} {r['sequences']:9d} {r['state_mb']:10.1f} {r['file_mb']:8.1f} "
              f"{r['peak_before_mb']:14.1f} {r['peak_mb']:12.1f} {r['peak_mb'] - r['peak_before_mb']:10.1f} "
              f"{r['seconds']:8.1f}")
    for mode in args.modes.split(","):
        small, large = [r for r in rows if r["mode"] == mode]
        ratio = (large["peak_mb"] - large["peak_before_mb"]) / max(small["peak_mb"] - small["peak_before_mb"], 1.0)
        print(f"{mode}: 10x the sequences -> peak RSS {small['peak_mb']:.0f} -> {large['peak_mb']:.0f} MB "
              f"(capture growth x{ratio:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
