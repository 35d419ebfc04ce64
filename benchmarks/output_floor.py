"""How much of exposing every state is the cost of returning its bytes: Keras 3 on JAX, CPU.

For each grid point, one interleaved run of the compiled calls (`common.compiled_runner`) of:

- ``original``: the model;
- ``trace_c`` / ``trace_all``: ``expose_cell_states(model, states=("c",))`` / every state;
- ``floor_c`` / ``floor_all``: the original's forward pass jitted together with one filled array per
  output the traced model adds (same shapes), so the same bytes leave the call with no recurrence
  behind them: a floor no rewrite can go under without returning fewer bytes.

Prints the ratios to the original (median of the per-pair ratios) and the minor page faults per
call. Run with ``KERAS_BACKEND=jax``; ``--threads 1`` pins XLA to one thread and process CPU time
(for a machine shared with other jobs).

    KERAS_BACKEND=jax python benchmarks/output_floor.py --sizes small,medium --rounds 15
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402


def floor_runner(model, extra_shapes, x):
    """The original's jitted forward pass, also returning a filled array of each extra shape."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    def forward(trainable, other, t):
        outputs = model.stateless_call(trainable, other, t, training=False)[0]
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        # A value read from the input, so that XLA cannot fold the fills into constants.
        seed = t[0, 0, 0]
        return outputs + [jnp.full(shape, seed, t.dtype) for shape in extra_shapes]

    fn = jax.jit(forward)
    trainable = [v.value for v in model.trainable_variables]
    other = [v.value for v in model.non_trainable_variables]
    tensor = jnp.asarray(x)

    def run():
        return [np.asarray(o) for o in fn(trainable, other, tensor)]

    run()
    return run


def measure(fn, cpu: bool):
    clock = time.process_time if cpu else time.perf_counter
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = clock()
    fn()
    return clock() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,medium")
    parser.add_argument("--kinds", default=",".join(common.KINDS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="1: one XLA thread, CPU time")
    args = parser.parse_args(argv)
    if args.threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    import keras

    from lstm_rewrite import expose_cell_states

    if keras.backend.backend() != "jax":
        parser.error("run with KERAS_BACKEND=jax")
    print("| size (BxTxFxU) | model | original ms | trace_c (x) | floor_c (x) | trace_all (x) | floor_all (x) "
          "| page faults per call: original / trace_all / floor_all |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        batch, steps, features, units = common.SIZES[size]
        for kind in args.kinds.split(","):
            model = common.build_model(keras, kind, steps, features, units)
            x = common.make_data(0, batch, steps, features, kind == "masked")
            runners = {"original": common.compiled_runner(model, x)}
            for name, states in (("c", ("c",)), ("all", ("c", "h", "gates"))):
                traced = expose_cell_states(model, states=states)
                shapes = [(batch,) + tuple(int(d) for d in o.shape[1:]) for o in traced.outputs[len(model.outputs):]]
                runners[f"trace_{name}"] = common.compiled_runner(traced, x)
                runners[f"floor_{name}"] = floor_runner(model, shapes, x)
            ratios = {name: [] for name in runners if name != "original"}
            faults = {name: [] for name in runners}
            base_times = []
            for _ in range(args.rounds):
                for name in ratios:
                    base, base_faults = measure(runners["original"], args.threads == 1)
                    value, value_faults = measure(runners[name], args.threads == 1)
                    ratios[name].append(value / base)
                    base_times.append(base)
                    faults["original"].append(base_faults)
                    faults[name].append(value_faults)
            med = {name: statistics.median(r) for name, r in ratios.items()}
            fault = {name: int(statistics.median(f)) for name, f in faults.items()}
            print(f"| {size} {batch}x{steps}x{features}x{units} | {kind} | {1e3 * statistics.median(base_times):.1f} "
                  f"| {med['trace_c']:.2f} | {med['floor_c']:.2f} | {med['trace_all']:.2f} | {med['floor_all']:.2f} "
                  f"| {fault['original']} / {fault['trace_all']} / {fault['floor_all']} |", flush=True)
    print(f"\n{common.machine_info()['cpu']}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
          f"{args.rounds} interleaved rounds; {'CPU time, one XLA thread' if args.threads == 1 else 'wall time'}")


if __name__ == "__main__":
    main()
