"""Benchmarks: per-op-type time of a compiled model's call on TensorFlow, original against traced.

The compiled ``model(x)`` is frozen (weights as constants), imported into a v1 session and run
with full tracing; the step stats give each node's time (inside the loops too, once lowered), summed
per op type over ``--runs`` runs, the fastest run's stats kept. Run::

    PYTHONPATH=. .venv/bin/python benchmarks/op_times_probe.py --kind stacked --size medium
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402


def frozen(model, x):
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    fn = tf.function(lambda t: model(t, training=False), input_signature=[tf.TensorSpec(x.shape, x.dtype)])
    cf = convert_variables_to_constants_v2(fn.get_concrete_function())
    return cf.graph.as_graph_def(), [t.name for t in cf.inputs], [t.name for t in cf.outputs]


def op_times(model, x, runs):
    import tensorflow as tf

    graph_def, inputs, outputs = frozen(model, x)
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    best = None
    with tf.compat.v1.Session(graph=graph) as session:
        options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
        session.run(outputs, {inputs[0]: x})
        for _ in range(runs):
            metadata = tf.compat.v1.RunMetadata()
            session.run(outputs, {inputs[0]: x}, options=options, run_metadata=metadata)
            per_op, total = collections.Counter(), 0
            for device in metadata.step_stats.dev_stats:
                for node in device.node_stats:
                    op = node.timeline_label.split("=")[-1].split("(")[0].strip() if node.timeline_label else node.node_name
                    op = op.split(":")[-1].strip() if ":" in op else op
                    micros = node.op_end_rel_micros - node.op_start_rel_micros
                    per_op[op] += micros
                    total += micros
            if best is None or total < best[0]:
                best = (total, per_op)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", default="stacked", choices=common.KINDS)
    parser.add_argument("--size", default="medium", choices=list(common.SIZES))
    parser.add_argument("--flavour", default="keras3", choices=common.FLAVOURS)
    parser.add_argument("--states", default="c")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args(argv)

    from lstm_rewrite import expose_cell_states

    keras = common.keras_of(args.flavour)
    batch, steps, features, units = common.SIZES[args.size]
    model = common.build_model(keras, args.kind, steps, features, units)
    x = common.make_data(7, batch, steps, features, masked=(args.kind == "masked"))
    traced = expose_cell_states(model, states=tuple(args.states.split(",")), verify=False)
    results = {name: op_times(m, x, args.runs) for name, m in (("original", model), ("traced", traced))}
    ops = sorted(set(results["original"][1]) | set(results["traced"][1]),
                 key=lambda k: -results["traced"][1].get(k, 0))
    print(f"{args.flavour} {args.size} {args.kind}, states {args.states}: summed op time of the fastest of "
          f"{args.runs} traced runs, microseconds")
    print(f"{'op':28} {'original':>9} {'traced':>9} {'diff':>8}")
    for op in ops:
        a, b = results["original"][1].get(op, 0), results["traced"][1].get(op, 0)
        if a or b:
            print(f"{op:28} {a:9d} {b:9d} {b - a:8d}")
    print(f"{'total':28} {results['original'][0]:9d} {results['traced'][0]:9d} "
          f"{results['traced'][0] - results['original'][0]:8d}")


if __name__ == "__main__":
    main()
