"""Benchmarks: where a traced model's extra time goes, from its compiled graph and from min-of-N timings.

Measurements that survive a noisy machine: the op counts of the compiled graphs (TensorFlow:
the ``tf.function`` concrete function of ``model(x)``, per function of its library, so each
``while`` body apart; JAX: the jaxpr of the predict function, per ``scan``/``while`` body), and
the minimum over many interleaved single calls. Run::

    PYTHONPATH=. .venv/bin/python benchmarks/graph_probe.py --kind stacked --size medium
    PYTHONPATH=. .venv/bin/python benchmarks/graph_probe.py --kind lstm --size medium --reps 200 --ops-only
    KERAS_BACKEND=jax PYTHONPATH=. .venv/bin/python benchmarks/graph_probe.py --kind stacked --states c,h,gates

Prints, per model (the original and the traced one): op types and counts outside and inside each
loop body, then the differences, then the timings (min and median of ``--reps`` interleaved calls
of ``--call``, wall and CPU time; ``--threads 1`` makes the CPU time a call's own work) and the
minor page faults per call (memory touched afresh: ``predict_on_batch`` copies every output into
new NumPy arrays, which glibc hands back to the system once they are freed, when they are large).
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402
import numpy as np  # noqa: E402


def tf_graph_ops(model, x) -> dict:
    """``{function name: Counter(op type)}`` of the compiled ``model(x)``; ``"<outer>"`` is the top graph."""
    import tensorflow as tf

    fn = tf.function(lambda t: model(t, training=False), input_signature=[tf.TensorSpec(x.shape, x.dtype)])
    graph_def = fn.get_concrete_function().graph.as_graph_def()
    result = {"<outer>": collections.Counter(node.op for node in graph_def.node)}
    for function in graph_def.library.function:
        result[function.signature.name] = collections.Counter(node.op for node in function.node_def)
    return result


def jax_graph_ops(model, x) -> dict:
    """``{"<outer>" or "<scan k>"/"<while k>": Counter(primitive)}`` of ``model(x)``'s jaxpr."""
    import jax

    variables = [v.value for v in model.trainable_variables + model.non_trainable_variables]

    def call(trainable, non_trainable, t):
        outputs, _ = model.stateless_call(trainable, non_trainable, t, training=False)
        return outputs

    n = len(model.trainable_variables)
    jaxpr = jax.make_jaxpr(call)(variables[:n], variables[n:], x)
    result = {}
    counter = collections.Counter()

    def walk(jpr, name):
        counts = result.setdefault(name, collections.Counter())
        for eqn in jpr.eqns:
            counts[eqn.primitive.name] += 1
            for key, value in eqn.params.items():
                inner = getattr(value, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns") or hasattr(value, "eqns"):
                    sub = value.jaxpr if hasattr(value, "jaxpr") else value
                    if eqn.primitive.name in ("scan", "while"):
                        counter[eqn.primitive.name] += 1
                        walk(sub, f"<{eqn.primitive.name} {counter[eqn.primitive.name]}:{key}>")
                    else:
                        walk(sub, name)

    walk(jaxpr.jaxpr, "<outer>")
    return result


def loop_bodies(ops: dict) -> dict:
    """The functions that are loop bodies (TensorFlow: names with ``body``; JAX: scans, whiles)."""
    return {k: v for k, v in ops.items() if "body" in k or k.startswith("<scan") or k.startswith("<while")}


def show(title: str, ops: dict) -> None:
    print(f"\n## {title}")
    for name, counts in ops.items():
        if not counts:
            continue
        print(f"{name}: {sum(counts.values())} ops: " + ", ".join(f"{op} {n}" for op, n in sorted(counts.items())))


def diff(a: collections.Counter, b: collections.Counter) -> str:
    keys = sorted(set(a) | set(b))
    return ", ".join(f"{k} {a.get(k, 0)}->{b.get(k, 0)}" for k in keys if a.get(k, 0) != b.get(k, 0)) or "same"


def summed(ops: dict, bodies: bool) -> collections.Counter:
    total = collections.Counter()
    for name, counts in ops.items():
        if (name in loop_bodies(ops)) == bodies:
            total.update(counts)
    return total


def interleaved(runs: dict, reps: int) -> tuple[dict, dict, dict]:
    """Wall and CPU (process) seconds and minor page faults of ``reps`` calls of each run, alternating the order.

    Page faults count memory the call touched for the first time since the allocator last
    returned it to the system (exact, unlike times on a shared machine).
    """
    import resource

    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    faults = {name: [] for name in runs}
    for r in range(reps):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            start_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start, start_cpu = time.perf_counter(), time.process_time()
            runs[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start_faults)
    return wall, cpu, faults


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", default="stacked", choices=common.KINDS)
    parser.add_argument("--size", default="medium", choices=list(common.SIZES))
    parser.add_argument("--flavour", default="keras3", choices=common.FLAVOURS)
    parser.add_argument("--states", default="c")
    parser.add_argument("--method", default="trace")
    parser.add_argument("--reps", type=int, default=60)
    parser.add_argument("--call", default="predict_on_batch", choices=["compiled", "predict_on_batch"])
    parser.add_argument("--ops-only", action="store_true")
    parser.add_argument("--times-only", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="TensorFlow's inter- and intra-op threads (default: its own); with 1, the CPU time "
                             "of a call is its work alone, which other jobs on the machine barely change")
    args = parser.parse_args(argv)
    if args.threads is not None:
        import tensorflow as tf

        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)

    import lstm_rewrite
    from lstm_rewrite import expose_cell_states

    keras = common.keras_of(args.flavour)
    backend = keras.backend.backend() if args.flavour == "keras3" else "tensorflow"
    print(f"library {lstm_rewrite.__file__}; {args.flavour} on {backend}")
    batch, steps, features, units = common.SIZES[args.size]
    model = common.build_model(keras, args.kind, steps, features, units)
    x = common.make_data(7, batch, steps, features, masked=(args.kind == "masked"))
    traced = expose_cell_states(model, states=tuple(args.states.split(",")), method=args.method, verify=False)
    print("traced layers: " + ", ".join(f"{layer.name} ({type(layer).__name__})" for layer in traced.layers))
    if not args.times_only:
        probe = tf_graph_ops if backend == "tensorflow" else jax_graph_ops
        before, after = probe(model, x), probe(traced, x)
        show("original", before)
        show("traced", after)
        print("\n## difference, original -> traced")
        print("outside loops: " + diff(summed(before, False), summed(after, False)))
        print("loop bodies:   " + diff(summed(before, True), summed(after, True)))
    if args.ops_only:
        return
    runs = {"original": common.compiled_runner(model, x, args.call), "traced": common.compiled_runner(traced, x, args.call)}
    assert np.allclose(runs["original"]()[0], runs["traced"]()[0], atol=1e-5)
    wall, cpu, faults = interleaved(runs, args.reps)
    print(f"\n## {args.reps} interleaved {args.call} calls, {args.flavour} {args.size} {args.kind}, states {args.states}"
          f", threads {args.threads or 'default'}")
    for name in runs:
        print(f"{name:9} wall min {min(wall[name]) * 1e3:7.2f} ms median {statistics.median(wall[name]) * 1e3:7.2f} "
              f"(x{min(wall[name]) / min(wall['original']):.3f} of min)  CPU min {min(cpu[name]) * 1e3:7.2f} ms "
              f"median {statistics.median(cpu[name]) * 1e3:7.2f} (x{min(cpu[name]) / min(cpu['original']):.3f} of min, "
              f"x{statistics.median(cpu[name]) / statistics.median(cpu['original']):.3f} of median)  "
              f"page faults {statistics.median(faults[name]):.0f} "
              f"({statistics.median(faults[name]) * resource.getpagesize() / 2**20:.1f} MiB) per call")


if __name__ == "__main__":
    main()
