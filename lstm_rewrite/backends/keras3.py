"""Keras 3 backend: how Keras 3 spells the functional graph, and the traced layers for it.

Keras 3 keeps ``operation``, ``arguments.args`` / ``arguments.kwargs`` and a flat ``outputs`` list
on each node; masks travel as explicit ``mask=`` keywords produced by operations in the graph.
"""

from __future__ import annotations

import sys

import keras
import numpy as np
from keras import ops
from keras.src.layers.rnn.conv_lstm import ConvLSTM, ConvLSTMCell
from keras.src.models.functional import Functional

from .. import layers as traced_layers
from ..rewrite.record import CarriesRecord

LSTM = keras.layers.LSTM
LSTMCell = keras.layers.LSTMCell
GRU = keras.layers.GRU
GRUCell = keras.layers.GRUCell
SimpleRNN = keras.layers.SimpleRNN
SimpleRNNCell = keras.layers.SimpleRNNCell
StackedRNNCells = keras.layers.StackedRNNCells
RNN = keras.layers.RNN
Bidirectional = keras.layers.Bidirectional
Wrapper = keras.layers.Wrapper
Embedding = keras.layers.Embedding
Masking = keras.layers.Masking
Identity = keras.layers.Identity


def _dropout_masks(cell, inputs, h_tm1, training, count=4):
    # Keras 3's cells draw one mask per input (count is tf-keras's).
    if training and 0.0 < cell.dropout < 1.0:
        mask = cell.get_dropout_mask(inputs)
        inputs = inputs * (mask[0] if isinstance(mask, (list, tuple)) else mask)
    if training and 0.0 < cell.recurrent_dropout < 1.0:
        mask = cell.get_recurrent_dropout_mask(h_tm1)
        h_tm1 = h_tm1 * (mask[0] if isinstance(mask, (list, tuple)) else mask)
    return inputs, h_tm1


class PartsRNN(keras.layers.RNN):
    """``RNN`` that keeps a step's tuple of outputs as separate sequences.

    Keras 3's ``RNN.call`` casts its outputs with one ``ops.cast``, which stacks a tuple into a
    single ``[part, batch, time, units]`` tensor: a copy of every exposed sequence that the traced
    layer then sliced apart again (two extra passes; a small LSTM with every state exposed went
    from 1.32x to 1.18x the original's time without them). This ``call`` is ``RNN.call`` with the
    cast applied per part. On JAX the loop is the library's own (`lstm_rewrite.backends._jax`):
    it writes each step into its batch-major place and repeats the real previous output on
    masked steps.
    """

    # Whether masked steps repeat the real previous output (`TracedRNN` reads it): Keras's loop
    # does on TensorFlow and torch, this class's own on JAX; Keras's NumPy loop does not.
    repeats_previous_output = keras.backend.backend() != "numpy"
    # Whether ``call(..., input_time=True)`` writes a go_backwards layer's sequences aligned with
    # input time (`TracedRNN` reads it): this class's own loop on JAX.
    writes_input_time = keras.backend.backend() == "jax"

    def inner_loop(self, sequences, initial_state, mask, training=False, input_time=False):
        # (The traced layers' inner RNN always returns its sequences.)
        if keras.backend.backend() != "jax":
            return super().inner_loop(sequences, initial_state, mask, training=training)
        from ._jax import parts_loop

        takes_training = self.cell._call_has_training_arg

        def step(inputs, states, training=training):
            output, new_states = self.cell(inputs, states, **({"training": training} if takes_training else {}))
            return output, new_states if keras.tree.is_nested(new_states) else [new_states]

        return parts_loop(step, sequences, initial_state if keras.tree.is_nested(initial_state) else [initial_state],
                          mask=mask, go_backwards=self.go_backwards, unroll=self.unroll, input_time=input_time,
                          shapes_function=lambda inputs, states: step(inputs, states, training=False))

    def call(self, sequences, initial_state=None, mask=None, training=False, input_time=False):
        expected, received = getattr(self, "_expected_batch_size", None), sequences.shape[0]
        if self.stateful and None not in (expected, received) and expected != received:
            # Keras's own check (and message): the state variables hold one batch size.
            raise ValueError(
                f"If an RNN is stateful, the batch size of the input sequences must be the same as the "
                f"batch size of the initial state. \n- Expected batch size: {expected}\n"
                f"- Received batch size: {received}"
            )
        if initial_state is None:
            if self.stateful:
                initial_state = self.states
            else:
                initial_state = self.get_initial_state(batch_size=ops.shape(sequences)[0])
        if not keras.tree.is_nested(initial_state):
            initial_state = [initial_state]
        initial_state = keras.tree.map_structure(
            lambda x: ops.convert_to_tensor(x, dtype=self.cell.compute_dtype), list(initial_state)
        )
        self._maybe_config_dropout_masks(self.cell, sequences[:, 0, :], initial_state)
        last_output, outputs, states = self.inner_loop(
            sequences=sequences, initial_state=initial_state, mask=mask, training=training, input_time=input_time
        )
        cast = lambda x: ops.cast(x, self.compute_dtype)  # noqa: E731
        outputs = keras.tree.map_structure(cast, outputs)
        states = keras.tree.map_structure(cast, states)
        self._maybe_reset_dropout_masks(self.cell)
        if self.stateful:
            for variable, state in zip(keras.tree.flatten(self.states), keras.tree.flatten(states)):
                variable.assign(state)
        output = outputs if self.return_sequences else keras.tree.map_structure(cast, last_output)
        if self.return_state:
            return output, *states
        return output


# --- the traced layers (lstm_rewrite.layers), bound to Keras 3 ----------------------------------

# Keras's JAX and NumPy RNN loops carry states[0] as the previous output on masked steps
# (keras/src/backend/jax/rnn.py); TensorFlow's and torch's carry the real previous output, as
# `PartsRNN`'s own loop on JAX does (a Keras 3 file of 0.1.0 holds Keras's own RNN).
_MASKED_STEPS_REPEAT_OUTPUT = keras.backend.backend() in ("tensorflow", "torch")
if keras.backend.backend() == "tensorflow":
    from . import _tensorflow as _tf_graph
else:
    _tf_graph = None

_LAYERS = traced_layers.Flavour(
    keras=keras, ops=ops, tree=keras.tree, name_scope=keras.name_scope, dropout_masks=_dropout_masks,
    conv_lstm_cell=ConvLSTMCell, masked_steps_repeat_output=_MASKED_STEPS_REPEAT_OUTPUT,
    unrolled_loop_zeroes_masked_output=keras.backend.backend() != "jax",
    loop_keeps_tuples=keras.backend.backend() != "numpy",
    symbolic_tensor=keras.KerasTensor,
    **(_tf_graph.GRAPH_HELPERS if _tf_graph is not None else {}),
)
# TracedLSTMCell, TracedGRUCell, TracedSimpleRNNCell, TracedConvLSTMCell, TracedCell,
# TracedStackedCells, TracedRNN, TracedSubclassRNN, TracedBidirectional, ReconstructedLSTM,
# ReconstructedBidirectional, linear_scan.
globals().update(traced_layers.bind(_LAYERS, __name__))
keras.saving.register_keras_serializable(package="lstm_rewrite", name="PartsRNN")(PartsRNN)
InnerRNN = PartsRNN


# --- the graph -----------------------------------------------------------------------------


def flatten(structure):
    return keras.tree.flatten(structure)


def map_structure(fn, structure):
    return keras.tree.map_structure(fn, structure)


def is_tensor(obj) -> bool:
    return isinstance(obj, keras.KerasTensor)


def is_model(layer) -> bool:
    return isinstance(layer, keras.Model)


def functional_of(model):
    """The Functional graph behind ``model``, or None when it has none (subclassed, unbuilt)."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if isinstance(model, keras.Model) and hasattr(model, "_nodes_by_depth") and getattr(model, "_inputs_struct", None) is not None:
        return model
    return None


def graph_nodes(functional):
    """Every node of this functional level, as (operation, args, kwargs, outputs, is_input)."""
    for depth in sorted(functional._nodes_by_depth, reverse=True):
        for node in functional._nodes_by_depth[depth]:
            yield node, node.operation, node.arguments.args, node.arguments.kwargs, list(node.outputs), node.is_input


def inbound_nodes(layer):
    return list(getattr(layer, "_inbound_nodes", []))


def inputs_structure(functional):
    return functional._inputs_struct


def outputs_of(functional):
    return list(functional.outputs)


def output_names(model) -> list[str]:
    functional = functional_of(model)
    return list((functional or model).output_names)


def arrange_inputs(model, arrays):
    """Flat arrays nested like the model's own inputs: a Keras 3 model built on a one-element list
    expects a list, a dict-input model a dict; anything else warns about the structure."""
    structure = getattr(functional_of(model) or model, "_inputs_struct", None)
    if isinstance(structure, dict):
        position = {id(t): k for k, t in enumerate(model.inputs)}
        return {key: arrays[position[id(t)]] for key, t in structure.items()}
    if isinstance(structure, (list, tuple)):
        return list(arrays)
    return arrays[0] if len(arrays) == 1 else arrays


def make_input(tensor):
    return keras.Input(batch_shape=tuple(tensor.shape), dtype=tensor.dtype, sparse=tensor.sparse, name=tensor.name)


def make_model(inputs, outputs, name=None):
    return keras.Model(inputs, outputs, name=name)


def recurrent_call(args, kwargs):
    """Split a recorded RNN-layer call into (inputs, initial_state, mask, other kwargs)."""
    kwargs = dict(kwargs)
    inputs = args[0] if args else kwargs.pop("sequences", kwargs.pop("inputs", None))
    initial_state = kwargs.pop("initial_state", None)
    if initial_state is None and len(args) > 1:
        initial_state = args[1]
    mask = kwargs.pop("mask", None)
    if initial_state is not None:
        initial_state = list(flatten(initial_state))
    return inputs, initial_state, mask, kwargs


def call_traced(layer, inputs, initial_state, mask, kwargs):
    call_kwargs = {k: v for k, v in kwargs.items() if k in ("training", "edit_inputs")}
    if initial_state is not None:
        call_kwargs["initial_state"] = initial_state
    if mask is not None:
        call_kwargs["mask"] = mask
    return layer(inputs, **call_kwargs)


def zeroes_masked_output(layer) -> bool:
    return bool(getattr(layer, "zero_output_for_mask", False))


def stateful_variables(layer):
    """The state variables of a stateful RNN layer (empty for others)."""
    if getattr(layer, "stateful", False) and getattr(layer, "states", None) is not None:
        return [s for s in flatten(layer.states) if hasattr(s, "assign")]
    return []


# --- saving --------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="lstm_rewrite", name="TracedModel")
class TracedModel(CarriesRecord, Functional):
    """A traced model: functional, with its rewrite record saved in its config."""


# A legacy .h5 names the model by its bare class name (keras/src/legacy/saving), not by the
# registered "lstm_rewrite>TracedModel": register that name too, or such files cannot load.
keras.saving.get_custom_objects().setdefault("TracedModel", TracedModel)


def make_traced_model(inputs, outputs, name):
    return TracedModel(inputs, outputs, name=name)


def load_model_file(path, custom_objects=None, safe_mode=True):
    return keras.models.load_model(path, custom_objects=custom_objects, compile=False, safe_mode=safe_mode)


def registered_object(name):
    return keras.saving.get_registered_object(name)


# --- tensors -------------------------------------------------------------------------------


def to_numpy(value):
    """A tensor or variable of any Keras 3 backend (a CUDA tensor too) as a NumPy array."""
    return keras.ops.convert_to_numpy(value)


def dtype_policy(layer) -> str:
    """The name of the layer's dtype policy ("float32", "mixed_float16", ...), to give its copies."""
    return layer.dtype_policy.name


# --- capture: a compiled predict, datasets ---------------------------------------------------


def compiled_predict(model, signature):
    """``model``'s forward pass, compiled once for capture: ``f([input arrays]) -> [NumPy outputs]``.

    On TensorFlow one ``tf.function`` with open batch and time axes; on JAX the jitted stateless
    forward pass (`lstm_rewrite.backends._jax.compiled_predict`); on torch Keras's own predict step
    (without gradients). JAX's are traced again only for a new shape.
    """
    if keras.backend.backend() == "tensorflow":
        from ._tensorflow import tf_function_predict

        return tf_function_predict(model, signature)
    if keras.backend.backend() == "jax":
        from ._jax import compiled_predict as jax_compiled_predict

        return jax_compiled_predict(model)

    def call(arrays):
        arrays = list(arrays)
        result = model.predict_on_batch(arrays[0] if len(arrays) == 1 else arrays)
        result = result if isinstance(result, (list, tuple)) else [result]
        return [np.asarray(to_numpy(r)) for r in result]

    return call


def is_dataset(data) -> bool:
    """Whether ``data`` is a ``tf.data.Dataset``, which Keras 3 reads on any of its backends."""
    # One exists only once TensorFlow is imported: no import for the others (JAX, torch).
    if "tensorflow" not in sys.modules:
        return False
    from ._tensorflow import is_dataset as tensorflow_is_dataset

    return tensorflow_is_dataset(data)


def dataset_batches(dataset, batch_size, is_batched):
    from ._tensorflow import dataset_batches as tensorflow_dataset_batches

    return tensorflow_dataset_batches(dataset, batch_size, is_batched)


# --- GPU detection ---------------------------------------------------------------------------


def gpu_visible() -> bool:
    """Whether the Keras 3 backend in use (TensorFlow, torch or JAX) computes on a GPU."""
    name = keras.backend.backend()
    if name == "tensorflow":
        from ._tensorflow import gpu_visible as tensorflow_gpu_visible

        return tensorflow_gpu_visible()
    if name == "torch":
        import torch

        return bool(torch.cuda.is_available())
    if name == "jax":
        import jax

        return any(device.platform == "gpu" for device in jax.devices())
    return False
