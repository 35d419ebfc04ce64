"""What both flavours do the same way where TensorFlow computes: a compiled predict for capture, and
the graph helpers the traced layers take from a TensorFlow backend (`GRAPH_HELPERS`)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def tf_function_predict(model, signature):
    """``model``'s forward pass as one ``tf.function`` over every batch, returning NumPy arrays.

    Batch size (the last batch is smaller) and, where the model allows it, sequence length stay
    open in the signature, so the recurrent loop is traced once instead of once per shape.

    Args:
        model: a Keras model (either flavour) whose outputs are wanted.
        signature: per input, ``(shape with None for open axes, dtype)``.
    """
    spec = [[tf.TensorSpec(shape, tf.as_dtype(dtype)) for shape, dtype in signature]]

    @tf.function(input_signature=spec)
    def run(inputs):
        result = model(inputs, training=False)
        return result if isinstance(result, (list, tuple)) else [result]

    return lambda arrays: [np.asarray(t) for t in run(list(arrays))]


# --- graph helpers for the traced layers (lstm_rewrite.layers.Flavour) -----------------------------


def _placeholder(shape, dtype):
    return tf.raw_ops.Placeholder(dtype=tf.as_dtype(dtype), shape=shape)


def graph_placeholder(tensor):
    """``make(shape, dtype)`` for a tensor of a TensorFlow graph (one placeholder op, where zeros of a
    dynamic batch size cost five), else None."""
    if tf.is_tensor(tensor) and tf.is_symbolic_tensor(tensor):
        return _placeholder
    return None


def plain_python(call):
    """Keep autograph away from a layer's ``call`` that has no tensor-dependent control flow.

    tf-keras converts every subclassed layer's ``call`` with autograph while building a functional
    model, and the conversion (of ``call`` and of every function it calls) cost more than the rest
    of the rewrite.
    """
    return tf.autograph.experimental.do_not_convert(call)


def doubling_loop(round_, a, b):
    """``a, b = round_(a, b, shift, count)`` for shift = 1, 2, 4, ... below ``count``, the time
    length of ``a`` (axis 1), in a ``tf.while_loop``: for a graph whose length is unknown while
    tracing. Returns the last b."""
    count = tf.shape(a)[1]

    def body(shift, a, b):
        new_a, new_b = round_(a, b, shift, count)
        new_a.set_shape(a.shape)
        new_b.set_shape(b.shape)
        return shift * 2, new_a, new_b

    _, _, b = tf.while_loop(lambda shift, a, b: shift < count, body, (tf.constant(1), a, b))
    return b


GRAPH_HELPERS = {"graph_placeholder": graph_placeholder, "plain_python": plain_python,
                 "doubling_loop": doubling_loop}
