"""tf-keras (Keras 2) backend: how tf-keras spells the functional graph, and the traced layers for it.

tf-keras keeps ``layer``, ``call_args`` / ``call_kwargs`` and nested ``outputs`` on each node;
masks ride on the tensors (``_keras_mask``) and ``initial_state`` is folded into the call's
inputs as ``[x, h, c]``.
"""

from __future__ import annotations

import types

import numpy as np
import tensorflow as tf
import tf_keras as keras
from tf_keras.src.engine.functional import Functional
from tf_keras.src.layers.rnn.base_conv_lstm import ConvLSTM, ConvLSTMCell

from .. import layers as traced_layers
from ..rewrite.record import CarriesRecord
from . import _tensorflow

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

# The few ops the traced layers use, under their keras.ops names.
ops = types.SimpleNamespace(
    matmul=tf.linalg.matmul,
    split=lambda x, n, axis=-1: tf.split(x, n, axis=axis),
    concatenate=lambda xs, axis=-1: tf.concat(xs, axis=axis),
    where=tf.where,
    flip=lambda x, axis: tf.reverse(x, [axis]),
    expand_dims=tf.expand_dims,
    cast=tf.cast,
    cumsum=lambda x, axis: tf.cumsum(x, axis=axis),
    zeros_like=tf.zeros_like,
    ones_like=tf.ones_like,
    zeros=lambda shape, dtype="float32": tf.zeros(shape, dtype=dtype),
    reshape=tf.reshape,
    shape=lambda x: tuple(d if d is not None else tf.shape(x)[k] for k, d in enumerate(x.shape)),
    unstack=lambda x, axis=0: tf.unstack(x, axis=axis),
    convert_to_tensor=tf.convert_to_tensor,
    any=lambda x, axis=None, keepdims=False: tf.reduce_any(x, axis=axis, keepdims=keepdims),
    # Interventions (layers/edits.py): step and unit selection inside the step.
    greater=tf.greater,
    greater_equal=tf.greater_equal,
    less=tf.less,
    equal=tf.equal,
    mod=tf.math.floormod,
    clip=tf.clip_by_value,
)
# Nested state lists (stacked cells), under keras.tree's names.
_tree = types.SimpleNamespace(flatten=tf.nest.flatten, pack_sequence_as=tf.nest.pack_sequence_as)


def _dropout_masks(cell, inputs, h_tm1, training, count=4):
    # tf-keras draws ``count`` masks at once (a single one not in a list); the first is used.
    if training and 0.0 < cell.dropout < 1.0:
        inputs = inputs * _first(cell.get_dropout_mask_for_cell(inputs, training, count=count))
    if training and 0.0 < cell.recurrent_dropout < 1.0:
        h_tm1 = h_tm1 * _first(cell.get_recurrent_dropout_mask_for_cell(h_tm1, training, count=count))
    return inputs, h_tm1


def _first(masks):
    return masks[0] if isinstance(masks, (list, tuple)) else masks


# --- the traced layers (lstm_rewrite.layers), bound to tf-keras ---------------------------------

_LAYERS = traced_layers.Flavour(
    keras=keras, ops=ops, tree=_tree, name_scope=tf.name_scope, dropout_masks=_dropout_masks,
    conv_lstm_cell=ConvLSTMCell, **_tensorflow.GRAPH_HELPERS,
)
# TracedLSTMCell, TracedGRUCell, TracedSimpleRNNCell, TracedConvLSTMCell, TracedCell,
# TracedStackedCells, TracedRNN, TracedSubclassRNN, TracedBidirectional, ReconstructedLSTM,
# ReconstructedBidirectional, linear_scan.
globals().update(traced_layers.bind(_LAYERS, __name__))
InnerRNN = RNN  # tf-keras's RNN keeps a tuple of step outputs apart already


# --- the graph -----------------------------------------------------------------------------


def flatten(structure):
    return tf.nest.flatten(structure)


def map_structure(fn, structure):
    return tf.nest.map_structure(fn, structure)


def is_tensor(obj) -> bool:
    return keras.backend.is_keras_tensor(obj) if hasattr(obj, "_keras_history") or hasattr(obj, "type_spec") else False


def is_model(layer) -> bool:
    return isinstance(layer, keras.Model)


def functional_of(model):
    """The model itself when it is a graph network (functional, or Sequential with known input)."""
    if isinstance(model, keras.Model) and getattr(model, "_is_graph_network", False):
        return model
    return None


def graph_nodes(functional):
    """Every node of this functional level, as (layer, args, kwargs, outputs, is_input)."""
    for depth in sorted(functional._nodes_by_depth, reverse=True):
        for node in functional._nodes_by_depth[depth]:
            yield node, node.layer, tuple(node.call_args), dict(node.call_kwargs), flatten(node.outputs), node.is_input


def inbound_nodes(layer):
    return list(getattr(layer, "_inbound_nodes", []))


def inputs_structure(functional):
    return functional._nested_inputs


def outputs_of(functional):
    return list(functional.outputs)


def output_names(model) -> list[str]:
    return list(model.output_names)


def arrange_inputs(model, arrays):
    """Flat arrays as a tf-keras model is called with them: one array, or the list in
    ``model.inputs`` order (tf-keras does not warn, as Keras 3 does, about a structure unlike the one it was built on)."""
    return arrays[0] if len(arrays) == 1 else arrays


def make_input(tensor):
    return keras.Input(
        batch_shape=tuple(tensor.shape),
        dtype=tensor.dtype,
        name=tensor._keras_history.layer.name,
        sparse=isinstance(tensor.type_spec, tf.SparseTensorSpec),
        ragged=isinstance(tensor.type_spec, tf.RaggedTensorSpec),
    )


def make_model(inputs, outputs, name=None):
    return keras.Model(inputs, outputs, name=name)


def recurrent_call(args, kwargs):
    """Split a recorded RNN-layer call into (inputs, initial_state, mask, other kwargs)."""
    kwargs = dict(kwargs)
    inputs = args[0] if args else kwargs.pop("inputs")
    initial_state = kwargs.pop("initial_state", None)
    kwargs.pop("constants", None)
    mask = kwargs.pop("mask", None)
    if isinstance(inputs, (list, tuple)):
        # tf-keras folds initial_state into the inputs: [x, h, c] or [x, hf, cf, hb, cb].
        inputs, folded = inputs[0], list(inputs[1:])
        if folded:
            initial_state = folded
    if initial_state is not None:
        initial_state = list(flatten(initial_state))
    return inputs, initial_state, mask, kwargs


def call_traced(layer, inputs, initial_state, mask, kwargs):
    # tf-keras hands the input tensor's mask to the layer by itself and records no mask then
    # (passing that one again would break the node's bookkeeping: it is not a layer output). A
    # recorded mask was passed explicitly, as a layer's output, and is passed on.
    call_kwargs = {k: v for k, v in kwargs.items() if k in ("training", "edit_inputs")}
    if initial_state is not None:
        call_kwargs["initial_state"] = initial_state
    if mask is not None:
        call_kwargs["mask"] = mask
    return layer(inputs, **call_kwargs)


def zeroes_masked_output(layer) -> bool:
    # tf-keras's ConvLSTM layers never pass zero_output_for_mask to their loop
    # (tf_keras/src/layers/rnn/base_conv_rnn.py), though Bidirectional sets it on its halves.
    if isinstance(layer, ConvLSTM):
        return False
    return bool(getattr(layer, "zero_output_for_mask", False))


def stateful_variables(layer):
    if getattr(layer, "stateful", False) and getattr(layer, "states", None) is not None:
        return [s for s in flatten(layer.states) if hasattr(s, "assign")]
    return []


# --- saving --------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="lstm_rewrite", name="TracedModel")
class TracedModel(CarriesRecord, Functional):
    """A traced model: functional, with its rewrite record saved in its config."""


# A legacy .h5 names the model by its bare class name (tf_keras saving_utils.model_metadata), not
# by the registered "lstm_rewrite>TracedModel": register that name too, or such files cannot load.
keras.utils.get_custom_objects().setdefault("TracedModel", TracedModel)


def make_traced_model(inputs, outputs, name):
    return TracedModel(inputs, outputs, name=name)


def load_model_file(path, custom_objects=None, safe_mode=True):
    return keras.models.load_model(path, custom_objects=custom_objects, compile=False, safe_mode=safe_mode)


def registered_object(name):
    return keras.saving.get_registered_object(name)


# --- tensors -------------------------------------------------------------------------------


def to_numpy(value):
    """A tensor or variable as a NumPy array."""
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def dtype_policy(layer) -> str:
    """The name of the layer's dtype policy ("float32", "mixed_float16", ...), to give its copies."""
    return layer._dtype_policy.name


# --- capture (one tf.function predict, tf.data) and GPU detection: TensorFlow's, see _tensorflow --

compiled_predict = _tensorflow.tf_function_predict
is_dataset = _tensorflow.is_dataset
dataset_batches = _tensorflow.dataset_batches
gpu_visible = _tensorflow.gpu_visible
