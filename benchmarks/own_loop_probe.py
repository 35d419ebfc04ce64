"""Probe behind RESULTS.md's "tried, not adopted" own loop: would a recurrence loop of our own make
exposing every state of a masked LSTM cheaper than Keras's loop does?

    python benchmarks/own_loop_probe.py [small,medium]

Keras's loop masks each output part at each step (expand, tile, select); the loop here carries h,
c and the four gates and masks each with one broadcast select. Both write one TensorArray per
state and transpose it to [batch, time, units]. Keras 3 on TensorFlow, the masked model of the
grid, interleaved pairs (benchmarks/common.py), ratio to the original model. Prints a table.
"""

from __future__ import annotations

import sys

import common
import keras
import numpy as np
import tensorflow as tf

from lstm_rewrite import expose_cell_states

ROUNDS = 15


def own_loop(lstm, shape):
    """A compiled masked-LSTM loop returning [h, c, i, f, g, o], each [batch, time, units]."""
    batch, steps, features = shape
    units = int(lstm.units)
    kernel, recurrent_kernel, bias = [tf.constant(w) for w in lstm.get_weights()]

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32)])
    def run(x):
        valid = tf.transpose(tf.reduce_any(tf.not_equal(x, 0.0), axis=-1))[..., None]  # [T, B, 1]
        x_t = tf.transpose(x, [1, 0, 2])
        zero = tf.zeros((batch, units))
        arrays = [tf.TensorArray(tf.float32, size=steps) for _ in range(6)]

        def body(t, carried, arrays):
            h, c = carried[0], carried[1]
            z = tf.matmul(x_t[t], kernel) + tf.matmul(h, recurrent_kernel) + bias
            z_i, z_f, z_g, z_o = tf.split(z, 4, axis=-1)
            i, f, g, o = tf.sigmoid(z_i), tf.sigmoid(z_f), tf.tanh(z_g), tf.sigmoid(z_o)
            c_new = f * c + i * g
            new = (o * tf.tanh(c_new), c_new, i, f, g, o)
            carried = tuple(tf.where(valid[t], n, old) for n, old in zip(new, carried))
            return t + 1, carried, [a.write(t, v) for a, v in zip(arrays, carried)]

        _, _, arrays = tf.while_loop(lambda t, *_: t < steps, body, (0, (zero,) * 6, arrays))
        return [tf.transpose(a.stack(), [1, 0, 2]) for a in arrays]

    return run


def main(sizes):
    print("| size (BxTxFxU) | Keras's loop, every state | own loop, every state | max abs diff of c |")
    print("|---|---|---|---|")
    for size in sizes:
        batch, steps, features, units = common.SIZES[size]
        model = common.build_model(keras, "masked", steps, features, units)
        x = common.make_data(7, batch, steps, features, masked=True)
        original = common.compiled_runner(model, x)
        traced = common.compiled_runner(expose_cell_states(model, states=common.ALL_STATES, verify=False), x)
        loop, tensor = own_loop(model.get_layer("lstm"), x.shape), tf.constant(x)

        def own():
            return [np.asarray(o) for o in loop(tensor)]

        # Trailing padding only: the loop's repeated outputs are the carried states, as here.
        diff = float(np.max(np.abs(own()[1] - traced()[1])))
        timings = common.paired_timings(original, {"keras": traced, "own": own}, ROUNDS)
        print(f"| {size} {'x'.join(map(str, common.SIZES[size]))} | {timings['keras']['ratio']:.2f} "
              f"| {timings['own']['ratio']:.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1].split(",") if len(sys.argv) > 1 else ["small", "medium"])
