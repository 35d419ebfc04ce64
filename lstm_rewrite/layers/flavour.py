"""What the traced layers need from a Keras flavour: the one object through which they reach it.

The layers of this package are written once, against `Flavour`'s fields; each backend fills one in
(``lstm_rewrite.backends.keras3``, ``lstm_rewrite.backends.tfkeras``) and `lstm_rewrite.layers.bind`
makes the flavour's classes from it, each holding it as its ``flavour`` attribute.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import ModuleType
from typing import Any


def _unchanged(function):
    return function


@dataclasses.dataclass
class Flavour:
    """One Keras flavour, as the traced layers see it.

    Attributes:
        keras: the ``keras`` (Keras 3) or ``tf_keras`` module (its layers, saving, initializers).
        ops: an op namespace under ``keras.ops`` names (Keras 3's own, or tf-keras's shim over
            TensorFlow).
        tree: ``flatten`` and ``pack_sequence_as`` for nested state lists.
        name_scope: the flavour's name-scope context manager (tf-keras names weights by scope, and
            ``.h5`` files need the forward and backward weights apart).
        dropout_masks: ``f(cell, inputs, h_tm1, training, count) -> (inputs, h_tm1)``, applying a
            cell's (recurrent) dropout the way the flavour's cells do in training; ``count`` is
            how many masks the Keras cell draws at once (tf-keras), of which the first is used.
        conv_lstm_cell: the flavour's ``ConvLSTMCell`` class (public in neither flavour).
        masked_steps_repeat_output: whether Keras's RNN loop on this backend repeats the real
            previous output on masked steps (TensorFlow, torch). Keras 3's JAX and NumPy loops
            repeat ``states[0]`` instead (keras/src/backend/jax/rnn.py), which is not a traced
            cell's output: there the inner RNN zeroes masked steps and `TracedRNN` fills them
            itself. An inner RNN class that runs its own loop says what it does as its
            ``repeats_previous_output`` attribute (Keras 3's ``PartsRNN`` on JAX).
        unrolled_loop_zeroes_masked_output: whether Keras's unrolled RNN loop honours
            ``zero_output_for_mask`` (TensorFlow, torch, tf-keras; Keras 3's JAX loop does not).
        loop_keeps_tuples: whether the backend's RNN loop keeps a step's tuple of outputs as a
            tuple of sequences (every backend but Keras 3's NumPy, which stacks them into one array).
        symbolic_tensor: Keras 3's ``KerasTensor`` (a shape and dtype, no graph op), or None
            (tf-keras traces its layers into a real graph).
        graph_placeholder: ``f(tensor) -> make(shape, dtype)`` making one placeholder op for a
            tensor of a TensorFlow graph, None for any other tensor; None where no graph is built.
        plain_python: keeps autograph away from a ``call`` without tensor-dependent control flow
            (tf-keras converts every subclassed layer's ``call`` while building a functional model,
            which cost more than the rest of the rewrite); unchanged where there is no autograph.
        doubling_loop: ``f(round, a, b) -> b`` running ``a, b = round(a, b, shift, count)`` for
            shift = 1, 2, 4, ... below ``count``, the time length of ``a`` when it is unknown while
            tracing (a TensorFlow graph); None where every length is known.
        classes: the flavour's classes by name, filled in by `lstm_rewrite.layers.bind`.
    """

    keras: ModuleType
    ops: Any
    tree: Any
    name_scope: Callable
    dropout_masks: Callable
    conv_lstm_cell: type
    masked_steps_repeat_output: bool = True
    unrolled_loop_zeroes_masked_output: bool = True
    loop_keeps_tuples: bool = True
    symbolic_tensor: type | None = None
    graph_placeholder: Callable | None = None
    plain_python: Callable = _unchanged
    doubling_loop: Callable | None = None
    classes: dict = dataclasses.field(default_factory=dict)

    def placeholder_for(self, tensor) -> Callable | None:
        """``make(shape, dtype)`` for a symbolic ``tensor`` (Keras 3's, or of a TensorFlow graph),
        else None: only its shape matters, and it costs no op (or one)."""
        if self.symbolic_tensor is not None and isinstance(tensor, self.symbolic_tensor):
            return self.symbolic_tensor
        return self.graph_placeholder(tensor) if self.graph_placeholder is not None else None


def plain_python(method):
    """Mark a layer's ``call`` for `Flavour.plain_python`, which `lstm_rewrite.layers.bind` applies
    in each flavour's class (the layers here cannot name autograph)."""
    method.plain_python = True
    return method
