"""Shapes only: traced layers called on symbolic inputs skip their recurrence while a model is built.

The rewrite calls its traced layers on symbolic inputs only to learn their output shapes, and
building a recurrence graph there (a while loop per layer) would be most of the rewrite's time.
Within `shapes_only` they return zeros (or placeholders) of the right shapes instead; the model
built this way runs the real recurrence whenever it is executed.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

from .cells import cells_within

_SHAPES_ONLY = contextvars.ContextVar("lstm_rewrite_shapes_only", default=False)


@contextlib.contextmanager
def shapes_only():
    """Within this block traced layers skip their recurrence and return zeros of the right shapes.

    Only for calls on symbolic inputs whose values are never used (building a functional model).

    Example:
        >>> with shapes_only():
        ...     outputs = traced_layer(keras.Input((None, 4)))
    """
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


def shapes_only_active() -> bool:
    """Whether the calling code runs inside `shapes_only`."""
    return _SHAPES_ONLY.get()


def flat_shapes(shapes) -> list:
    """Flatten what ``RNN.compute_output_shape`` returns (nested lists of shape tuples) to shapes."""
    if hasattr(shapes, "as_list"):  # tf.TensorShape
        return [tuple(shapes.as_list())]
    if isinstance(shapes, (list, tuple)) and shapes and all(d is None or isinstance(d, int) for d in shapes):
        return [tuple(shapes)]
    return [shape for part in shapes for shape in flat_shapes(part)]


def zeros_for_rnn(flavour, rnn, inputs, step_shapes):
    """``[parts, *flat_final_states]`` of ``rnn`` on ``inputs`` as zeros (see `shapes_only`), the
    sequence already cut into parts as ``step_shapes(width)`` tells; None when the inner RNN
    cannot tell its output shapes."""
    ops = flavour.ops
    try:
        shapes = flat_shapes(rnn.compute_output_shape(tuple(inputs.shape)))
    except (ValueError, TypeError, AttributeError, NotImplementedError):
        return None
    # The sequence is [batch, time, ...], each state [batch, ...]; batch and time as ``inputs``
    # has them. Only their shapes matter, so a symbolic input gets placeholders: Keras 3's
    # KerasTensor (no graph op at all), or one placeholder op in a TensorFlow graph, where
    # zeros of a dynamic batch size cost five ops (~0.4 ms each to create).
    placeholder = flavour.placeholder_for(inputs)
    batch, steps = tuple(inputs.shape)[:2] if placeholder else ops.shape(inputs)[:2]
    make = placeholder or ops.zeros
    sequence, *states = shapes
    parts = [make((batch, steps) + tuple(shape), rnn.compute_dtype)
             for shape in step_shapes(math.prod(int(d) for d in sequence[2:]))]
    return [parts] + [make((batch,) + tuple(int(d) for d in shape[1:]), rnn.compute_dtype) for shape in states]


@contextlib.contextmanager
def zero_initializers(flavour, cell):
    """Within this block ``cell`` (and the cells inside it) initialise weights with zeros.

    Random and orthogonal initialisers run eagerly, a few ops per weight: 30% of rewriting a
    chain of LSTMs, for values the copied weights overwrite at once.
    """
    initializers = flavour.keras.initializers
    zeros = initializers.Zeros()
    saved = []
    for sub in cells_within(cell):
        for name, value in list(vars(sub).items()):
            if name.endswith("_initializer") and isinstance(value, initializers.Initializer):
                saved.append((sub, name, value))
    try:
        for sub, name, _ in saved:
            object.__setattr__(sub, name, zeros)
        yield
    finally:
        for sub, name, value in saved:
            object.__setattr__(sub, name, value)
