"""What both flavours do the same way where TensorFlow computes: a compiled predict for capture."""

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
