"""Throughput and memory of the audit on Beam against ``audit()`` on the same data (not a timed test).

Prints one table: sequences/s of the local ``audit()``, of ``audit_on_beam`` on the in-process
FnApiRunner (one worker) and on two worker processes (``direct_num_workers=2``,
``multi_processing``), with ratios; then the peak RSS of one worker for N and 10N sequences, each
measured in a fresh process (``ru_maxrss`` only grows).

    .venv/bin/python benchmarks/beam_audit.py     # 8000 sequences of 50 steps; memory at 1000 and 10000
    .venv/bin/python benchmarks/beam_audit.py --sequences 2000 --memory-sequences 500

Wall times include each run's fixed costs: loading and tracing the model once per worker, and for
two workers starting two Python processes that import TensorFlow.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

T, VOCAB, UNITS, ROWS_PER_SHARD = 50, 40, 32, 250


def make_corpus(directory: str, sequences: int) -> tuple[str, str]:
    """A saved Embedding -> LSTM model and ``sequences`` token sequences in .npz shards with a label."""
    import keras

    os.makedirs(directory, exist_ok=True)
    model_path = os.path.join(directory, "model.keras")
    if not os.path.exists(model_path):
        keras.utils.set_random_seed(0)
        inputs = keras.Input(shape=(T,), dtype="int32", name="tokens")
        seq = keras.layers.Embedding(VOCAB, 16, mask_zero=True)(inputs)
        seq = keras.layers.LSTM(UNITS, return_sequences=True, name="lstm")(seq)
        keras.Model(inputs, keras.layers.Dense(4, name="head")(seq)).save(model_path)
    data = os.path.join(directory, f"n{sequences}")
    os.makedirs(data, exist_ok=True)
    rng = np.random.default_rng(sequences)
    for shard, start in enumerate(range(0, sequences, ROWS_PER_SHARD)):
        n = min(ROWS_PER_SHARD, sequences - start)
        x = rng.integers(1, VOCAB, size=(n, T)).astype("int32")
        depth = np.cumsum(np.where(x % 2 == 0, 1.0, -1.0), axis=1)
        np.savez(os.path.join(data, f"part-{shard:04d}.npz"), tokens=x, depth=depth)
    return model_path, os.path.join(data, "part-*.npz")


def load_all(pattern: str) -> tuple[np.ndarray, np.ndarray]:
    import glob

    parts = [np.load(p) for p in sorted(glob.glob(pattern))]
    return np.concatenate([p["tokens"] for p in parts]), np.concatenate([p["depth"] for p in parts])


def run_local(model_path: str, pattern: str) -> float:
    from lstm_rewrite import audit
    from lstm_rewrite.loading import load_model

    x, depth = load_all(pattern)
    start = time.perf_counter()
    audit(load_model(model_path), x, labels={"depth": depth}, progress=False, batch_size=32)
    return time.perf_counter() - start


def run_beam(model_path: str, pattern: str, workers: int) -> float:
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from lstm_rewrite.beam import audit_on_beam

    options = PipelineOptions(direct_num_workers=workers,
                              direct_running_mode="multi_processing" if workers > 1 else "in_memory")
    start = time.perf_counter()
    audit_on_beam(model_path, pattern, labels=["depth"], batch_size=32, runner=FnApiRunner(), options=options)
    return time.perf_counter() - start


def peak_rss_mib(model_path: str, pattern: str, workers: int) -> float:
    """Peak RSS of one worker: the process itself (one worker) or its largest child (two)."""
    code = (
        "import resource, sys\n"
        "sys.path.insert(0, 'benchmarks')\n"
        "import beam_audit\n"
        f"beam_audit.run_beam({model_path!r}, {pattern!r}, {workers})\n"
        f"who = resource.RUSAGE_SELF if {workers} == 1 else resource.RUSAGE_CHILDREN\n"
        "print(resource.getrusage(who).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1]) / 1024.0  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=8000, help="sequences for the throughput runs")
    parser.add_argument("--memory-sequences", type=int, default=1000, help="N for peak RSS at N and 10N")
    parser.add_argument("--dir", default=None, help="where to write the model and shards (default: a temp dir)")
    args = parser.parse_args()
    directory = args.dir or tempfile.mkdtemp(prefix="beam_audit_bench_")
    n = args.sequences
    quarter = n // 4
    model_path, pattern = make_corpus(directory, n)
    _, quarter_pattern = make_corpus(directory, quarter)
    run_local(model_path, pattern)  # warm-up: TensorFlow import and first trace, paid once by every mode
    # Wall time of a whole run at N and at N/4; their difference gives the throughput once each
    # run's fixed costs (pipeline set-up, worker start, model load and trace) are paid.
    walls = {
        "audit() local": (run_local(model_path, quarter_pattern), run_local(model_path, pattern)),
        "Beam, 1 worker (in-proc)": (run_beam(model_path, quarter_pattern, 1), run_beam(model_path, pattern, 1)),
        "Beam, 2 worker processes": (run_beam(model_path, quarter_pattern, 2), run_beam(model_path, pattern, 2)),
    }
    rate = {k: (n / full, (n - quarter) / max(full - part, 1e-9)) for k, (part, full) in walls.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
          f"Python {platform.python_version()}; model Embedding -> LSTM({UNITS}), {T} steps, "
          f"{n} sequences in {-(-n // ROWS_PER_SHARD)} shards (and {quarter} for the marginal rate)")
    print(f"{'run':<26} {'wall s':>7} {'seq/s':>7} {'marginal seq/s':>15}  ratio (whole run; marginal)")
    local, one = rate["audit() local"], rate["Beam, 1 worker (in-proc)"]
    against = {"audit() local": (local, "of local"), "Beam, 1 worker (in-proc)": (local, "of local"),
               "Beam, 2 worker processes": (one, "of 1 worker")}
    for name, (part, full) in walls.items():
        base, what = against[name]
        whole, marginal = rate[name]
        print(f"{name:<26} {full:7.2f} {whole:7.0f} {marginal:15.0f}  "
              f"{whole / base[0]:.2f}x; {marginal / base[1]:.2f}x {what}")
    small = args.memory_sequences
    print("\npeak RSS per worker (fresh process each):")
    for sequences in (small, 10 * small):
        _, shards = make_corpus(directory, sequences)
        print(f"  {sequences:>7} sequences: 1 worker {peak_rss_mib(model_path, shards, 1):7.0f} MiB, "
              f"largest of 2 workers {peak_rss_mib(model_path, shards, 2):7.0f} MiB")


if __name__ == "__main__":
    main()
