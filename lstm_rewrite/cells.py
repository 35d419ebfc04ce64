"""Cells and traced layers: the recurrent steps that also emit their states (and gates), and the layers that run them.

The classes are written once and defined per Keras flavour by `define_traced_layers`, which each
backend calls with its own ``keras`` module and op set. The backends register them as
serializable, so a traced model saves and loads like any other.

Layout of a traced step: Keras 3's ``RNN`` needs an integer ``cell.output_size``, so a traced cell
returns one flat tensor, ``concat([output, *extras])`` along the last axis, that `TracedRNN`
slices (and, for convolutional cells, reshapes) afterwards. The cell's own recurrence, its state
list, is left exactly as the Keras cell keeps it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import math
import sys


# Per-step quantities an LSTM can expose, in output order (c first: it is why the library exists).
LSTM_QUANTITIES = ("c", "h", "i", "f", "g", "o")
GATES = ("i", "f", "g", "o")
# GRU: the state h, the update gate z, the reset gate r and the candidate n.
GRU_QUANTITIES = ("h", "z", "r", "n")
GRU_GATES = ("z", "r", "n")
ALL_GATES = GATES + GRU_GATES
# Every named quantity, in the order a layer exposes them; a custom cell's states ("state0", ...)
# come after these.
QUANTITY_ORDER = ("c", "h") + ALL_GATES
STATE_PREFIX = "state"
# The quantities that are recurrent states, with their index in the cell's state list. On masked
# steps they hold the carried state, which before the first valid step is the initial state.
LSTM_STATE_INDEX = {"h": 0, "c": 1}
GRU_STATE_INDEX = {"h": 0}

MERGE_MODES = ("concat", "sum", "ave", "mul", None)


@dataclasses.dataclass(frozen=True)
class CellFamily:
    """What one kind of recurrent cell can expose.

    Attributes:
        name: "lstm", "gru", "simple_rnn", "conv_lstm" or "generic".
        quantities: every quantity it can expose, in output order.
        gates: the quantities that ``"gates"`` means for it.
        recurrent: what it exposes for a requested ``"c"`` or ``"h"`` it does not have (its
            recurrent state: h for GRU and SimpleRNN, every state for a custom cell).
        state_index: quantity -> position in the cell's (flattened) state list.
    """

    name: str
    quantities: tuple
    gates: tuple
    recurrent: tuple
    state_index: dict


LSTM_FAMILY = CellFamily("lstm", LSTM_QUANTITIES, GATES, ("c",), LSTM_STATE_INDEX)
CONV_LSTM_FAMILY = CellFamily("conv_lstm", LSTM_QUANTITIES, GATES, ("c",), LSTM_STATE_INDEX)
GRU_FAMILY = CellFamily("gru", GRU_QUANTITIES, GRU_GATES, ("h",), GRU_STATE_INDEX)
SIMPLE_RNN_FAMILY = CellFamily("simple_rnn", ("h",), (), ("h",), GRU_STATE_INDEX)


# Set while the rewrite builds a traced model: its layers are then called on symbolic inputs only,
# to learn their output shapes, and building a recurrence graph there (a while loop per layer)
# would be most of the rewrite's time. See `shapes_only`.
_SHAPES_ONLY = contextvars.ContextVar("lstm_rewrite_shapes_only", default=False)


@contextlib.contextmanager
def shapes_only():
    """Within this block traced layers skip their recurrence and return zeros of the right shapes.

    Only for calls on symbolic inputs whose values are never used (building a functional model);
    the model built this way runs the real recurrence whenever it is executed.

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


def _flat_shapes(shapes) -> list:
    """Flatten what ``RNN.compute_output_shape`` returns (nested lists of shape tuples) to shapes."""
    if hasattr(shapes, "as_list"):  # tf.TensorShape
        return [tuple(shapes.as_list())]
    if isinstance(shapes, (list, tuple)) and shapes and all(d is None or isinstance(d, int) for d in shapes):
        return [tuple(shapes)]
    return [shape for part in shapes for shape in _flat_shapes(part)]


def _plain_python(call):
    """Keep autograph away from a layer's ``call`` that has no tensor-dependent control flow.

    tf-keras converts every subclassed layer's ``call`` with autograph while building a functional
    model, and the conversion (of ``call`` and of every function it calls) cost more than the rest
    of the rewrite.
    """
    try:
        import tensorflow as tf
    except ImportError:  # Keras 3 on another backend: no autograph to keep away
        return call
    return tf.autograph.experimental.do_not_convert(call)


def generic_family(num_states: int) -> CellFamily:
    """The family of a custom cell with ``num_states`` (flattened) states: state0, state1, ..."""
    names = tuple(f"{STATE_PREFIX}{k}" for k in range(num_states))
    return CellFamily("generic", names, (), names, {name: k for k, name in enumerate(names)})


def first_mask(mask):
    """The mask of a recurrent call's sequence input (tf-keras hands a list of masks when initial
    states are folded into the inputs)."""
    if isinstance(mask, (list, tuple)):
        return mask[0] if mask else None
    return mask


# What a recurrent-layer subclass may define besides ``call`` and still be exposed: its
# construction and config (the traced copy reads the configuration from the layer's attributes).
# Any other method (compute_mask, build, get_initial_state, inner_loop, ...) changes what the
# layer computes in a way the traced call does not run, so such a subclass is refused.
_SUBCLASS_MAY_DEFINE = {"call", "__init__", "get_config", "from_config"}


def wrapping_call(layer_class, base):
    """The ``call`` function of a subclass of ``base`` (a Keras recurrent layer) that only wraps
    ``super().call(...)``, or None when the subclass does not define ``call``.

    Raises:
        ValueError: saying why the subclass's ``call`` cannot be run over the traced layer (two
            classes define it, it does not call ``super().call``, the subclass defines other methods).

    Example:
        >>> wrapping_call(ReversingLSTM, keras.layers.LSTM) is ReversingLSTM.call
        True
    """
    chain = [k for k in layer_class.__mro__[:layer_class.__mro__.index(base)]]
    defining = [k for k in chain if "call" in vars(k)]
    if not defining:
        return None
    others = sorted({name for k in chain for name, value in vars(k).items()
                     if name not in _SUBCLASS_MAY_DEFINE and not name.startswith("__")
                     and (callable(value) or isinstance(value, (property, staticmethod, classmethod)))})
    if others:
        raise ValueError(f"it also defines {others}, which the traced layer does not run")
    if len(defining) > 1:
        raise ValueError(f"{[k.__name__ for k in defining]} each define call; only one wrapping call is supported")
    call = vars(defining[0])["call"]
    code = getattr(call, "__code__", None)
    if code is None or "__class__" not in code.co_freevars or "super" not in code.co_names:
        raise ValueError("its call does not run super().call(...), so its states are not the Keras layer's")
    return call


def call_with_super(call, owner):
    """``call`` (a function using zero-argument ``super()``) with ``super()`` resolving from ``owner``.

    Example:
        >>> call = call_with_super(ReversingLSTM.call, TracedSubclassRNN)  # super().call: the traced parent
    """
    import types

    closure = list(call.__closure__ or ())
    closure[call.__code__.co_freevars.index("__class__")] = types.CellType(owner)
    rebound = types.FunctionType(call.__code__, call.__globals__, call.__name__, call.__defaults__, tuple(closure))
    rebound.__kwdefaults__ = call.__kwdefaults__
    return rebound


# The traced parent call puts each call's exposed sequences here for the subclass's call to return.
_PARENT_RESULTS = contextvars.ContextVar("lstm_rewrite_parent_results", default=None)


class WrapsRecurrentLayer:
    """What the traced and reconstructed layers share: each wraps an inner recurrent layer
    ``self.rnn`` and returns ``[output, *final_states (if return_state), *exposed, mask (if
    expose_mask)]``, of which only the output carries the input's mask."""

    @property
    def go_backwards(self):
        return self.rnn.go_backwards

    def compute_mask(self, inputs, mask=None):
        mask = first_mask(mask)
        count = 1 + (self.num_states if self.return_state else 0) + len(self.exposed) + int(self.expose_mask)
        output_mask = mask if self.return_sequences else None
        return [output_mask] + [None] * (count - 1)

    def reset_states(self):
        self.rnn.reset_states()

    def reset_state(self):  # Keras 3's name for it
        self.reset_states()


def define_traced_layers(keras, ops, dropout_masks, name_scope, tree, conv_lstm_cell,
                         masked_steps_repeat_output=True):
    """Define the traced cells, TracedRNN and TracedBidirectional for one Keras flavour.

    Args:
        keras: the ``keras`` (Keras 3) or ``tf_keras`` module.
        ops: an op namespace with the names of ``keras.ops`` used below (the tf-keras backend
            passes a thin shim over TensorFlow).
        dropout_masks: ``f(cell, inputs, h_tm1, training) -> (inputs, h_tm1)`` applying the
            cell's (recurrent) dropout the way that flavour's cells do during training.
        name_scope: that flavour's name-scope context manager (tf-keras names weights by scope,
            and ``.h5`` files need the forward and backward weights apart).
        tree: ``flatten`` and ``pack_sequence_as`` for nested state lists (``keras.tree``, ``tf.nest``).
        conv_lstm_cell: that flavour's ``ConvLSTMCell`` class (not public in either flavour).
        masked_steps_repeat_output: whether the backend's RNN loop repeats the real previous
            output on masked steps (TensorFlow, torch). Keras 3's JAX and NumPy loops repeat
            ``states[0]`` instead (keras/src/backend/jax/rnn.py), which is not the traced cell's
            output: there the inner RNN zeroes masked steps and `TracedRNN` fills them itself.

    Returns:
        A dict of the classes, keyed by class name.
    """
    layers = keras.layers
    # Keras 3's symbolic tensor (None in tf-keras, whose layers are traced into a real graph).
    symbolic_tensor = getattr(keras, "KerasTensor", None)

    # --- interventions (lstm_rewrite.interventions): edits applied inside the step ------------------
    # A cell with ``edits`` receives ``concat([x, t, *channels])`` per step: ``t`` is the step's
    # input-time index (the same for go_backwards and a Bidirectional's backward half, which run over
    # reversed inputs), ``channels`` the call-time data (per-sample step masks, unit masks, patch
    # values), whose offsets the edits name. Each edit applies where its quantity is computed.

    def _edited_input_shape(cell, input_shape):
        if not cell.edits:
            return input_shape
        return tuple(input_shape)[:-1] + (int(cell.input_width),)

    def _split_edit_inputs(cell, inputs):
        if not cell.edits:
            return inputs, None, None
        width = int(cell.input_width)
        return inputs[:, :width], inputs[:, width], inputs[:, width + 1:]  # [batch, F], [batch], [batch, C]

    def _step_editor(cell, t, channels):
        if not cell.edits:
            return lambda quantity, value: value

        def edit(quantity, value):
            for spec in cell.edits:
                if spec["quantity"] == quantity:
                    value = _apply_edit(spec, value, t, channels, int(cell.units))
            return value

        return edit

    def _active_steps(steps, t, channels, dtype):
        """[batch] float: 1.0 where the edit applies at this step."""
        if "channel" in steps:
            return ops.cast(ops.greater(channels[:, int(steps["channel"])], 0.5), dtype)
        if "at" in steps:
            on = ops.zeros_like(t)
            for step in steps["at"]:
                on = on + ops.cast(ops.equal(t, float(step)), dtype)
            return ops.cast(ops.greater(on, 0.5), dtype)
        start, stop, every = int(steps.get("start", 0)), steps.get("stop"), int(steps.get("every", 1))
        on = ops.cast(ops.greater_equal(t, float(start)), dtype)
        if stop is not None:
            on = on * ops.cast(ops.less(t, float(stop)), dtype)
        if every != 1:
            on = on * ops.cast(ops.equal(ops.mod(t - float(start), float(every)), 0.0), dtype)
        return on

    def _apply_edit(spec, value, t, channels, units):
        dtype = value.dtype
        on = ops.expand_dims(_active_steps(spec["steps"], ops.cast(t, dtype), channels, dtype), -1)  # [batch, 1]
        if spec.get("units_channel") is not None:
            offset = int(spec["units_channel"])
            chosen = ops.cast(channels[:, offset:offset + units], dtype)  # [batch, units], per sample
        else:
            chosen = ops.convert_to_tensor([1.0 if k in set(spec["units"]) else 0.0 for k in range(units)],
                                           dtype=dtype)  # [units]
        kind = spec["kind"]
        if kind == "ablate":
            new = ops.convert_to_tensor([float(v) for v in spec["value"]], dtype=dtype)  # [units]
        elif kind == "clamp":
            low = -3.0e38 if spec.get("low") is None else float(spec["low"])
            high = 3.0e38 if spec.get("high") is None else float(spec["high"])
            new = ops.clip(value, low, high)
        elif kind == "scale":
            new = value * float(spec["factor"])
        elif kind == "add":
            new = value + float(spec["alpha"]) * ops.convert_to_tensor(
                [float(v) for v in spec["direction"]], dtype=dtype)
        elif kind == "patch":
            offset = int(spec["source_channel"])
            new = ops.cast(channels[:, offset:offset + units], dtype)
        else:
            raise ValueError(f"unknown edit kind {kind!r}")
        return ops.where(ops.greater(on * chosen, 0.5), new, value)

    def _edit_config(cell):
        if not cell.edits:
            return {}
        return {"edits": [dict(e) for e in cell.edits], "input_width": cell.input_width}

    class TracedLSTMCell(layers.LSTMCell):
        """The Keras LSTM step, emitting ``concat([h, *extras])`` as its output.

        ``extras`` names, in order, the quantities appended after h: any of c, h, i, f, g, o.
        The state list is the LSTM's own ``[h, c]``, so the recurrence is unchanged.

        With ``split_outputs`` the step returns the tuple ``(h, *extras)`` instead: the RNN loop then
        keeps one sequence per part (`TracedRNN` takes both layouts). ``output_size`` still
        describes the concatenation, which is what shape inference sees.
        """

        def __init__(self, units, extras=(), split_outputs=False, edits=(), input_width=None, **kwargs):
            super().__init__(units, **kwargs)
            self.extras = tuple(extras)
            self.split_outputs = bool(split_outputs)
            self.edits = [dict(e) for e in (edits or ())]
            self.input_width = input_width
            # LSTMCell assigns output_size in __init__; widen it to hold h and every extra.
            self.output_size = self.units * (1 + len(self.extras))
            self.step_output_size = self.units

        def build(self, input_shape):
            super().build(_edited_input_shape(self, input_shape))

        def call(self, inputs, states, training=False):
            h_tm1, c_tm1 = states[0], states[1]
            inputs, t, channels = _split_edit_inputs(self, inputs)
            edit = _step_editor(self, t, channels)
            inputs, h_in = dropout_masks(self, inputs, h_tm1, training)
            z = ops.matmul(inputs, self.kernel) + ops.matmul(h_in, self.recurrent_kernel)
            if self.use_bias:
                z = z + self.bias
            z_i, z_f, z_g, z_o = ops.split(z, 4, axis=-1)  # [batch, units] each
            # Each edit where its quantity enters the step: gates before they make c, c before h.
            i = edit("i", self.recurrent_activation(z_i))
            f = edit("f", self.recurrent_activation(z_f))
            g = edit("g", self.activation(z_g))
            o = edit("o", self.recurrent_activation(z_o))
            c = edit("c", f * c_tm1 + i * g)
            h = edit("h", o * self.activation(c))
            emitted = {"c": c, "h": h, "i": i, "f": f, "g": g, "o": o}
            parts = [h] + [emitted[q] for q in self.extras]
            if self.split_outputs:
                # Concatenating every step and slicing the sequence apart afterwards cost two
                # passes over all the exposed states: up to 1.6x the LSTM's time with every gate.
                return tuple(parts), [h, c]
            return ops.concatenate(parts, axis=-1), [h, c]

        def get_config(self):
            return {**super().get_config(), "extras": list(self.extras), "split_outputs": self.split_outputs,
                    **_edit_config(self)}

    class TracedGRUCell(layers.GRUCell):
        """The Keras GRU step (both ``reset_after`` variants), emitting ``concat([h, *extras])``.

        ``extras``: any of h, z (update gate), r (reset gate), n (candidate). The state list is
        the GRU's own ``[h]``.
        """

        def __init__(self, units, extras=(), edits=(), input_width=None, **kwargs):
            super().__init__(units, **kwargs)
            self.extras = tuple(extras)
            self.output_size = self.units * (1 + len(self.extras))
            self.step_output_size = self.units
            self.edits = [dict(e) for e in (edits or ())]
            self.input_width = input_width

        def build(self, input_shape):
            super().build(_edited_input_shape(self, input_shape))

        def call(self, inputs, states, training=False):
            h_tm1 = states[0] if isinstance(states, (list, tuple)) else states
            inputs, t, channels = _split_edit_inputs(self, inputs)
            edit = _step_editor(self, t, channels)
            inputs, h_in = dropout_masks(self, inputs, h_tm1, training)
            units = self.units
            input_bias = recurrent_bias = None
            if self.use_bias:
                if self.reset_after:
                    # Bias [2, 3 * units]: the input part, then the recurrent part.
                    input_bias, recurrent_bias = ops.unstack(ops.convert_to_tensor(self.bias), axis=0)
                else:
                    input_bias = self.bias
            x = ops.matmul(inputs, self.kernel)
            if input_bias is not None:
                x = x + input_bias
            x_z, x_r, x_n = ops.split(x, 3, axis=-1)  # [batch, units] each
            if self.reset_after:
                inner = ops.matmul(h_in, self.recurrent_kernel)
                if recurrent_bias is not None:
                    inner = inner + recurrent_bias
                h_z, h_r, h_n = ops.split(inner, 3, axis=-1)
                z = edit("z", self.recurrent_activation(x_z + h_z))
                r = edit("r", self.recurrent_activation(x_r + h_r))
                n = edit("n", self.activation(x_n + r * h_n))
            else:
                h_z, h_r = ops.split(ops.matmul(h_in, self.recurrent_kernel[:, : 2 * units]), 2, axis=-1)
                z = edit("z", self.recurrent_activation(x_z + h_z))
                r = edit("r", self.recurrent_activation(x_r + h_r))
                n = edit("n", self.activation(x_n + ops.matmul(r * h_in, self.recurrent_kernel[:, 2 * units:])))
            h = edit("h", z * h_tm1 + (1 - z) * n)
            emitted = {"h": h, "z": z, "r": r, "n": n}
            output = ops.concatenate([h] + [emitted[q] for q in self.extras], axis=-1)
            return output, ([h] if isinstance(states, (list, tuple)) else h)

        def get_config(self):
            return {**super().get_config(), "extras": list(self.extras), **_edit_config(self)}

    class TracedSimpleRNNCell(layers.SimpleRNNCell):
        """The Keras SimpleRNN step, unchanged: its output is its state h, the only quantity it has.

        ``extras`` may hold "h" (a stacked cell emits its h after the stack's output).
        """

        def __init__(self, units, extras=(), edits=(), input_width=None, **kwargs):
            super().__init__(units, **kwargs)
            self.extras = tuple(extras)
            self.output_size = self.units * (1 + len(self.extras))
            self.step_output_size = self.units
            self.edits = [dict(e) for e in (edits or ())]
            self.input_width = input_width

        def build(self, input_shape):
            super().build(_edited_input_shape(self, input_shape))

        def call(self, inputs, states, training=False):
            inputs, t, channels = _split_edit_inputs(self, inputs)
            output, new_states = super().call(inputs, states, training=training)
            if self.edits:
                output = _step_editor(self, t, channels)("h", output)  # the output is the state h
                new_states = [output] if isinstance(new_states, (list, tuple)) else output
            if self.extras:
                output = ops.concatenate([output] * (1 + len(self.extras)), axis=-1)
            return output, new_states

        def get_config(self):
            return {**super().get_config(), "extras": list(self.extras), **_edit_config(self)}

    class TracedConvLSTMCell(conv_lstm_cell):
        """The Keras ConvLSTM step over flat states, emitting ``concat([flat(h), *flat(extras)])``.

        ``state_shape`` is one state's shape without the batch axis (``(*spatial, filters)``, or
        ``(filters, *spatial)`` for channels_first). The states travel flattened to
        ``[batch, prod(state_shape)]`` so that the generic ``RNN`` of both flavours can run the
        cell; `TracedRNN` flattens initial states and reshapes every sequence back.
        """

        def __init__(self, rank, filters, kernel_size, extras=(), state_shape=(), **kwargs):
            super().__init__(rank, filters, kernel_size, **kwargs)
            self.extras = tuple(extras)
            self.state_shape = tuple(int(d) for d in state_shape)
            self.state_width = math.prod(self.state_shape)
            self.state_size = [self.state_width, self.state_width]
            self.output_size = self.state_width * (1 + len(self.extras))
            self.step_output_size = self.state_width

        def build(self, input_shape, *args, **kwargs):
            # A reloaded model builds from a JSON list; the Keras cell concatenates it to a tuple.
            super().build(tuple(input_shape), *args, **kwargs)

        def get_initial_state(self, inputs=None, batch_size=None, dtype=None):
            dtype = dtype or self.compute_dtype
            return [ops.zeros((batch_size, self.state_width), dtype=dtype) for _ in range(2)]

        def call(self, inputs, states, training=False):
            shape = (-1,) + self.state_shape
            # Dropout on the flat h: the RNN prepares the recurrent dropout mask from the flat state.
            inputs, h_in = dropout_masks(self, inputs, states[0], training)
            h_tm1, h_in = ops.reshape(states[0], shape), ops.reshape(h_in, shape)
            c_tm1 = ops.reshape(states[1], shape)
            kernels = ops.split(self.kernel, 4, axis=self.rank + 1)
            recurrent_kernels = ops.split(self.recurrent_kernel, 4, axis=self.rank + 1)
            biases = ops.split(self.bias, 4) if self.use_bias else [None] * 4
            z_i, z_f, z_g, z_o = (
                self.input_conv(inputs, k, b, padding=self.padding) + self.recurrent_conv(h_in, rk)
                for k, rk, b in zip(kernels, recurrent_kernels, biases)
            )  # [batch, *state_shape] each
            i = self.recurrent_activation(z_i)
            f = self.recurrent_activation(z_f)
            g = self.activation(z_g)
            o = self.recurrent_activation(z_o)
            c = f * c_tm1 + i * g
            h = o * self.activation(c)
            emitted = {"c": c, "h": h, "i": i, "f": f, "g": g, "o": o}
            flat = [ops.reshape(t, (-1, self.state_width)) for t in [h] + [emitted[q] for q in self.extras]]
            return ops.concatenate(flat, axis=-1), [flat[0], ops.reshape(c, (-1, self.state_width))]

        def get_config(self):
            return {**super().get_config(), "rank": self.rank, "extras": list(self.extras),
                    "state_shape": list(self.state_shape)}

    class TracedCell(layers.Layer):
        """Any cell following the Keras RNN cell API, run as it is, also emitting its new states.

        Wraps ``cell`` (a copy of the user's cell) and returns ``concat([output, *states])`` with
        the states flattened in order; the state list passes through untouched. Works for cells
        whose output and states are flat ``[batch, n]`` tensors.
        """

        def __init__(self, cell, **kwargs):
            super().__init__(**kwargs)
            self.cell = cell
            self.state_size = cell.state_size
            self.state_widths = [int(s) for s in tree.flatten(cell.state_size)]
            output_size = getattr(cell, "output_size", None)
            self.step_output_size = int(output_size if isinstance(output_size, int) else self.state_widths[0])
            self.output_size = self.step_output_size + sum(self.state_widths)
            self.extras = tuple(f"{STATE_PREFIX}{k}" for k in range(len(self.state_widths)))
            self._cell_takes_training = "training" in inspect.signature(cell.call).parameters

        def build(self, input_shape):
            if not self.cell.built:
                with name_scope(self.cell.name):
                    self.cell.build(input_shape)
            self.built = True

        def get_initial_state(self, inputs=None, batch_size=None, dtype=None):
            own = getattr(self.cell, "get_initial_state", None)
            if own is not None:
                try:
                    return own(batch_size=batch_size)
                except TypeError:
                    return own(inputs=inputs, batch_size=batch_size, dtype=dtype)
            dtype = dtype or self.compute_dtype
            return [ops.zeros((batch_size, width), dtype=dtype) for width in self.state_widths]

        def call(self, inputs, states, training=None):
            kwargs = {"training": training} if self._cell_takes_training else {}
            output, new_states = self.cell(inputs, states, **kwargs)
            emitted = [output] + [ops.cast(s, output.dtype) for s in tree.flatten(new_states)]
            return ops.concatenate(emitted, axis=-1), new_states

        def get_config(self):
            return {**super().get_config(), "cell": layers.serialize(self.cell)}

        @classmethod
        def from_config(cls, config, custom_objects=None):
            config = dict(config)
            config["cell"] = layers.deserialize(config["cell"], custom_objects=custom_objects)
            return cls(**config)

    class TracedStackedCells(layers.Layer):
        """The step of ``StackedRNNCells`` over traced cells: each cell feeds only its own output on.

        Output: ``concat([last cell's output, *cell0 extras, *cell1 extras, ...])``. The state
        list is the stack's own, passed back in the structure the RNN handed in. (Not a
        ``StackedRNNCells`` subclass: Keras 3's RNN runs those cells itself to set up dropout,
        feeding each cell's whole output to the next.)
        """

        def __init__(self, cells, **kwargs):
            super().__init__(**kwargs)
            self.cells = list(cells)

        @property
        def state_size(self):
            return [cell.state_size for cell in self.cells]

        @property
        def output_size(self):
            return self.step_output_size + sum(c.output_size - c.step_output_size for c in self.cells)

        @property
        def step_output_size(self):
            return self.cells[-1].step_output_size

        def build(self, input_shape):
            batch = tuple(input_shape)[0]
            for cell in self.cells:
                if not cell.built:
                    with name_scope(cell.name):
                        cell.build(input_shape)
                        cell.built = True
                input_shape = (batch, cell.step_output_size)
            self.built = True

        def get_initial_state(self, inputs=None, batch_size=None, dtype=None):
            states = []
            for cell in self.cells:
                own = getattr(cell, "get_initial_state", None)
                if "dtype" in inspect.signature(own).parameters:
                    cell_states = own(inputs=None, batch_size=batch_size, dtype=dtype or cell.compute_dtype)
                else:
                    cell_states = own(batch_size=batch_size)
                states.append(list(tree.flatten(cell_states)))
            return states

        def call(self, inputs, states, training=None):
            flat = tree.flatten(states)
            new_states, extras, position = [], [], 0
            for cell in self.cells:
                count = len(tree.flatten(cell.state_size))
                cell_states = list(flat[position:position + count])
                position += count
                output, cell_new = cell(inputs, cell_states, training=training)
                inputs = output[..., : cell.step_output_size]
                extras.append(output[..., cell.step_output_size:])
                new_states += tree.flatten(cell_new)
            output = ops.concatenate([inputs] + extras, axis=-1)
            return output, tree.pack_sequence_as(states, new_states)

        def get_config(self):
            return {**super().get_config(), "cells": [layers.serialize(cell) for cell in self.cells]}

        @classmethod
        def from_config(cls, config, custom_objects=None):
            config = dict(config)
            known = {**TRACED_CELLS, **(custom_objects or {})}
            config["cells"] = [layers.deserialize(c, custom_objects=known) for c in config["cells"]]
            return cls(**config)

    class TracedRNN(WrapsRecurrentLayer, layers.Layer):
        """A recurrent layer call rewritten to also return its per-step states.

        Wraps ``rnn``, an ``RNN`` over a traced cell configured with ``return_sequences=True``,
        ``return_state=True`` and ``zero_output_for_mask=False``, so that every step's
        ``concat([output, *extras])`` survives. ``call`` rebuilds what the original layer
        returned (honouring its own ``return_sequences``, ``return_state`` and
        ``zero_output_for_mask``) and appends the exposed sequences:

            [output, *final_states (if return_state), *exposed, mask (if expose_mask)]

        Exposed sequences are ``[batch, time, ...]`` in the layer's processing order (the order of
        its own ``return_sequences`` output, so reversed input time for ``go_backwards``).

        Args:
            rnn: the inner ``RNN``.
            extras: names of the parts after the output, in order.
            exposed: the names to return, each in ``extras`` or equal to ``output_alias``.
            state_index: name -> position in the flat initial-state list, for the names that are
                recurrent states (they are carried on masked steps).
            output_alias: the name the output part stands for ("h"), or None.
            part_sizes: widths of ``[output, *extras]``; None for equal widths.
            part_shapes: per part, its per-step shape to reshape to (None: keep it flat).
            state_shapes: per flat state, its per-step shape when the inner RNN keeps it flat.
            state_count: how many final states the layer returns with ``return_state``.
        """

        def __init__(
            self,
            rnn,
            extras=(),
            exposed=(),
            state_index=None,
            return_sequences=False,
            return_state=False,
            zero_output_for_mask=False,
            expose_mask=False,
            output_alias="h",
            part_sizes=None,
            part_shapes=None,
            state_shapes=None,
            state_count=None,
            edit_channels=None,
            **kwargs,
        ):
            super().__init__(**kwargs)
            self.rnn = rnn
            # Interventions: the widths of the call-time tensors (``edit_inputs``) the edited cell
            # reads; None when the cell has no edits (and then its input is not widened).
            self.edit_channels = None if edit_channels is None else [int(w) for w in edit_channels]
            self.extras = tuple(extras)
            self.exposed = tuple(exposed)
            self.state_index = dict(state_index or {})
            self.return_sequences = return_sequences
            self.return_state = return_state
            self.zero_output_for_mask = zero_output_for_mask
            self.expose_mask = expose_mask
            self.output_alias = output_alias
            self.part_sizes = None if part_sizes is None else [int(s) for s in part_sizes]
            self.part_shapes = None if part_shapes is None else [
                None if s is None else tuple(int(d) for d in s) for s in part_shapes]
            self.state_shapes = None if state_shapes is None else [tuple(int(d) for d in s) for s in state_shapes]
            self.state_count = state_count
            self.supports_masking = True
            # The inner loop's masked steps, decided by the backend that runs it (a file saved under
            # one backend loads under another): where the loop repeats the previous output it keeps
            # every step's parts as they are; elsewhere it zeroes masked steps, the same on every
            # backend, and `_fill_masked` repeats the last valid step's parts as such a loop would.
            # A step output must then be one tensor (the loop zeroes it with one `where`).
            self.rnn.zero_output_for_mask = not masked_steps_repeat_output
            if not masked_steps_repeat_output and getattr(self.rnn.cell, "split_outputs", False):
                self.rnn.cell.split_outputs = False

        def build(self, input_shape):
            # Build the inner RNN here, not lazily in call: Keras 3 traces call in a stateless scope
            # where a stateful RNN could not create its state variables.
            if self.edit_channels is not None:
                # The edited cell reads concat([x, t, *edit channels]) at each step.
                input_shape = tuple(input_shape)[:-1] + (int(tuple(input_shape)[-1]) + 1 + sum(self.edit_channels),)
            if not self.rnn.built:
                if shapes_only_active():
                    # The rewrite copies the original weights in right after: skip the initializers.
                    with _zero_initializers(self.rnn.cell):
                        self.rnn.build(input_shape)
                else:
                    self.rnn.build(input_shape)
            self.built = True

        @property
        def num_states(self):
            if self.state_count is not None:
                return self.state_count
            return len(self.state_index) if self.state_index else 2

        def _parts(self, sequence):
            """Slice ``[batch, time, width]`` into ``[output, *extras]``, reshaped per step.

            A cell with split outputs gives the parts already apart, as a list; or, in a Keras 3
            model saved by 0.1.0 (whose inner layer is Keras's own ``RNN``, which casts the list
            to one tensor), stacked as ``[part, batch, time, units]``.
            """
            if isinstance(sequence, (list, tuple)):
                return list(sequence)
            if len(sequence.shape) == 4 and self.part_shapes is None and self.part_sizes is None:
                return [sequence[k] for k in range(int(sequence.shape[0]))]
            parts, start = [], 0
            lead = None
            for shape in self._step_shapes(int(sequence.shape[-1])):
                size = math.prod(shape)
                part = sequence[..., start:start + size]
                start += size
                if len(shape) > 1:
                    if lead is None:
                        lead = tuple(ops.shape(sequence)[:2])
                    part = ops.reshape(part, lead + shape)  # [batch, time, *shape]
                parts.append(part)
            return parts

        def _step_shapes(self, width):
            """Per part of ``[output, *extras]``, its per-step shape, given their total ``width``."""
            count = 1 + len(self.extras)
            sizes = self.part_sizes or [width // count] * count
            return [self.part_shapes[k] if self.part_shapes and self.part_shapes[k] is not None else (size,)
                    for k, size in enumerate(sizes)]

        def _inner_states(self, states):
            """The flat list of initial states as the inner RNN takes them: flattened per state
            for a convolutional cell, nested like the cell's state_size for stacked cells."""
            if states is None:
                return None
            if self.state_shapes:
                states = [ops.reshape(s, (-1, math.prod(shape))) for s, shape in zip(states, self.state_shapes)]
            structure = self.rnn.cell.state_size
            if isinstance(structure, (list, tuple)) and len(tree.flatten(structure)) != len(structure):
                # tf-keras counts initial states per cell of a stack. Plain lists: JAX refuses
                # Keras's tracked lists as loop carries.
                states = tree.pack_sequence_as(_plain_lists(structure), list(states))
            return states

        def _with_edit_channels(self, inputs, edit_inputs):
            """``concat([x, t, *edit_inputs])``: t is the input-time index of each step (so go_backwards
            sees it reversed with x), each call-time tensor ``[batch, time]`` or ``[batch, time, n]``."""
            edit_inputs = list(edit_inputs or [])
            if len(edit_inputs) != len(self.edit_channels):
                raise ValueError(
                    f"Layer {self.name!r} (TracedRNN) runs edits that read {len(self.edit_channels)} call-time "
                    f"input(s); pass them as edit_inputs=[...]. Received: {len(edit_inputs)}")
            ones = ops.ones_like(inputs[..., :1])  # [batch, time, 1]
            steps = ops.cumsum(ones, axis=1) - ones  # 0, 1, 2, ... in input time
            parts = [inputs, steps]
            for tensor, width in zip(edit_inputs, self.edit_channels):
                tensor = ops.cast(tensor, inputs.dtype)
                if len(tensor.shape) == 2:
                    tensor = ops.expand_dims(tensor, -1)  # [batch, time, 1]
                parts.append(tensor)
            return ops.concatenate(parts, axis=-1)

        @_plain_python
        def call(self, inputs, initial_state=None, mask=None, training=None, edit_inputs=None):
            mask = first_mask(mask)
            _reset_dropout_masks(self.rnn.cell)
            if self.edit_channels is not None:
                inputs = self._with_edit_channels(inputs, edit_inputs)
            if shapes_only_active():
                results = _zeros_for_rnn(self.rnn, inputs, self._step_shapes)
            if not shapes_only_active() or results is None:
                results = self.rnn(inputs, initial_state=self._inner_states(initial_state), mask=mask,
                                   training=training)
            sequence, final_states = results[0], list(tree.flatten(list(results[1:])))
            if self.state_shapes:
                final_states = [ops.reshape(s, (-1,) + shape) for s, shape in zip(final_states, self.state_shapes)]
            parts = self._parts(sequence)
            step_mask = None
            if mask is not None:
                step_mask = ops.cast(mask, "bool")  # [batch, time], input order
                if self.rnn.go_backwards:
                    step_mask = ops.flip(step_mask, axis=1)
                if self.rnn.zero_output_for_mask:
                    parts = _fill_masked(parts, step_mask)
                    if not masked_steps_repeat_output and initial_state is not None and \
                            tuple(initial_state[0].shape[1:]) == tuple(parts[0].shape[2:]):
                        # The original layer's loop repeats states[0] there, the initial h before
                        # the first valid step; a stacked or custom cell's output is not its
                        # states[0], and verification says if that differs.
                        parts = [_carry_initial_state(parts[0], step_mask, initial_state, 0), *parts[1:]]
            output = parts[0]  # [batch, time, ...]
            if step_mask is not None:
                if self.zero_output_for_mask:
                    output = ops.where(_expand_like(step_mask, output), output, ops.zeros_like(output))
            if not self.return_sequences:
                output = output[:, -1]
            outputs = [output]
            if self.return_state:
                outputs += final_states
            for quantity in self.exposed:
                if quantity in self.extras:
                    sequence_q = parts[1 + self.extras.index(quantity)]
                else:
                    sequence_q = parts[0]  # the output_alias
                # Without an initial state the loop's zero output before the first valid step is
                # already the zero state carried there: nothing to put back (and 3 passes saved).
                # Except for the output part: tf-keras hangs masks on tensor objects, so the
                # exposed copy must be a tensor of its own or it would take the output's mask.
                carry = initial_state is not None or sequence_q is parts[0]
                if step_mask is not None and quantity in self.state_index and carry:
                    sequence_q = _carry_initial_state(
                        sequence_q, step_mask, initial_state, self.state_index[quantity]
                    )
                outputs.append(sequence_q)
            if self.expose_mask:
                if step_mask is None:
                    step_mask = parts[0]
                    while len(step_mask.shape) > 2:
                        step_mask = step_mask[..., 0]  # [batch, time]
                    step_mask = ops.ones_like(step_mask)
                outputs.append(ops.cast(step_mask, "float32"))
            return outputs

        def compute_output_spec(self, inputs, initial_state=None, mask=None, training=None, edit_inputs=None):
            # Keras 3 finds a layer's output specs by tracing ``call`` into a scratch graph, ops
            # that cost ~0.5 ms each to create. Within `shapes_only`, ``call`` runs on the symbolic
            # inputs themselves instead: Keras 3's ops infer shapes in Python, and the whole call
            # creates no graph op (a third of the rewrite's time for a chain of LSTMs).
            if shapes_only_active() and symbolic_tensor is not None and isinstance(inputs, symbolic_tensor):
                outputs = self.call(inputs, initial_state=initial_state, mask=mask, training=training,
                                    edit_inputs=edit_inputs)
                # One new tensor per output: call may return one tensor twice (the output and the
                # exposed h), and Keras maps a node's outputs by identity when it runs the graph.
                return [symbolic_tensor(t.shape, dtype=t.dtype) for t in outputs]
            extra = {} if edit_inputs is None else {"edit_inputs": edit_inputs}
            return super().compute_output_spec(inputs, initial_state=initial_state, mask=mask, training=training,
                                               **extra)

        def get_config(self):
            config = {
                **super().get_config(),
                "rnn": layers.serialize(self.rnn),
                "extras": list(self.extras),
                "exposed": list(self.exposed),
                "state_index": dict(self.state_index),
                "return_sequences": self.return_sequences,
                "return_state": self.return_state,
                "zero_output_for_mask": self.zero_output_for_mask,
                "expose_mask": self.expose_mask,
                "output_alias": self.output_alias,
                "state_count": self.state_count,
            }
            if self.edit_channels is not None:
                config["edit_channels"] = list(self.edit_channels)
            if self.part_sizes is not None:
                config["part_sizes"] = list(self.part_sizes)
            if self.part_shapes is not None:
                config["part_shapes"] = [None if s is None else list(s) for s in self.part_shapes]
            if self.state_shapes is not None:
                config["state_shapes"] = [list(s) for s in self.state_shapes]
            return config

        @classmethod
        def from_config(cls, config, custom_objects=None):
            config = dict(config)
            # Legacy .h5 configs name the cells by their bare class names: resolve them here.
            known = {**TRACED_CELLS, **(custom_objects or {})}
            config["rnn"] = layers.deserialize(config["rnn"], custom_objects=known)
            return cls(**config)

    class _TracedParentCall(TracedRNN):
        # ``super().call`` of a wrapped subclass: what the Keras layer's call returns, the exposed
        # sequences put aside (see TracedSubclassRNN).
        def call(self, inputs, initial_state=None, mask=None, training=None):
            results = super().call(inputs, initial_state=initial_state, mask=mask, training=training)
            count = 1 + (self.num_states if self.return_state else 0)
            aside = _PARENT_RESULTS.get()
            if aside is None or aside:
                raise ValueError("its call runs super().call(...) more than once, or outside call")
            aside.append(results[count:])
            return results[0] if count == 1 else results[:count]

    class TracedSubclassRNN(_TracedParentCall):
        """A TracedRNN running the ``call`` of a user's recurrent-layer subclass around its own.

        For a subclass (e.g. ``class ReversingLSTM(LSTM)`` reversing its output back to input
        order) whose ``call`` only wraps ``super().call(...)``: that ``call`` runs with this layer
        as ``self``, and its ``super().call`` runs the traced layer, which returns what the Keras
        layer's call would and keeps the exposed sequences aside. Returns

            [*what the subclass's call returns, *exposed, mask (if expose_mask)]

        The exposed sequences are the traced layer's, in its processing order (reversed input time
        for ``go_backwards``): what the subclass does to its output is not applied to them. The
        subclass's call can only use what this layer has (``go_backwards``, ``return_sequences``,
        ``return_state``, ``rnn``): an attribute of its own fails when the rewrite calls it.

        Saving: the config names the subclass by its registered Keras name, so loading needs the
        class, as loading the original model does (``keras.saving.register_keras_serializable``,
        or ``custom_objects={"ReversingLSTM": ReversingLSTM}``).

        Args:
            rnn: the inner ``RNN``, as for TracedRNN.
            subclass: the user's class, or its registered name (in a config).
            **kwargs: TracedRNN's.
        """

        def __init__(self, rnn, subclass=None, **kwargs):
            super().__init__(rnn, **kwargs)
            if isinstance(subclass, str):
                found = keras.saving.get_registered_object(subclass)
                if found is None:
                    raise ValueError(
                        f"Layer {self.name!r} (TracedSubclassRNN) runs the call of {subclass!r}, which is not "
                        f"registered. Register the class with keras.saving.register_keras_serializable, or pass it "
                        f"in custom_objects, when loading. Received: subclass={subclass!r}"
                    )
                subclass = found
            self.subclass = subclass
            base = next(k for k in subclass.__mro__ if k.__module__.split(".")[0] in ("keras", "tf_keras"))
            self._subclass_call = call_with_super(wrapping_call(subclass, base), TracedSubclassRNN)

        @_plain_python
        def call(self, inputs, initial_state=None, mask=None, training=None):
            kwargs = {"mask": mask, "training": training} if mask is not None else {"training": training}
            if initial_state is not None:
                kwargs["initial_state"] = initial_state
            aside = []
            token = _PARENT_RESULTS.set(aside)
            try:
                result = self._subclass_call(self, inputs, **kwargs)
            finally:
                _PARENT_RESULTS.reset(token)
            if not aside:
                raise ValueError("its call did not run super().call(...)")
            return [*tree.flatten(result), *aside[0]]

        def compute_output_spec(self, inputs, initial_state=None, mask=None, training=None):
            # The subclass's call may use framework ops that take no symbolic tensor: trace it as
            # Keras does for any layer.
            return layers.Layer.compute_output_spec(
                self, inputs, initial_state=initial_state, mask=mask, training=training)

        def get_config(self):
            return {**super().get_config(), "subclass": keras.saving.get_registered_name(self.subclass)}

    class TracedBidirectional(layers.Layer):
        """A ``Bidirectional`` call rewritten as two TracedRNN calls and the same merge.

        Outputs: ``[*merged (1, or 2 for merge_mode=None), *forward_states, *backward_states
        (if return_state), *forward_exposed, *backward_exposed, masks]``. Backward sequences
        are flipped back to input time, exactly as ``Bidirectional`` aligns its backward output.
        """

        def __init__(self, forward, backward, merge_mode="concat", return_sequences=False,
                     return_state=False, **kwargs):
            super().__init__(**kwargs)
            # Not `self.forward`: on the torch backend a layer is a torch Module, whose forward()
            # that name would shadow.
            self.forward_layer = forward
            self.backward_layer = backward
            self.merge_mode = merge_mode
            self.return_sequences = return_sequences
            self.return_state = return_state
            self.supports_masking = True

        def build(self, input_shape):
            for layer in (self.forward_layer, self.backward_layer):
                if not layer.built:
                    with name_scope(layer.name):
                        layer.build(input_shape)
            self.built = True

        def _split_results(self, results, layer):
            states = layer.num_states if self.return_state else 0
            output, finals = results[0], list(results[1:1 + states])
            extra = list(results[1 + states:])
            return output, finals, extra

        @_plain_python
        def call(self, inputs, initial_state=None, mask=None, training=None, edit_inputs=None):
            mask = first_mask(mask)
            forward_state = backward_state = None
            if initial_state is not None:
                half = len(initial_state) // 2
                forward_state, backward_state = list(initial_state[:half]), list(initial_state[half:])
            # Call-time edit inputs: the forward direction's first, then the backward's.
            split = len(getattr(self.forward_layer, "edit_channels", None) or [])
            edit_inputs = list(edit_inputs or [])
            forward_edits = {"edit_inputs": edit_inputs[:split]} if split else {}
            backward_edits = {"edit_inputs": edit_inputs[split:]} if edit_inputs[split:] else {}
            y, forward_finals, forward_extra = self._split_results(
                self.forward_layer(inputs, initial_state=forward_state, mask=mask, training=training, **forward_edits),
                self.forward_layer)
            y_rev, backward_finals, backward_extra = self._split_results(
                self.backward_layer(inputs, initial_state=backward_state, mask=mask, training=training,
                                    **backward_edits),
                self.backward_layer)
            if self.return_sequences:
                y_rev = ops.flip(y_rev, axis=1)
            if self.merge_mode == "concat":
                merged = [ops.concatenate([y, y_rev], axis=-1)]
            elif self.merge_mode == "sum":
                merged = [y + y_rev]
            elif self.merge_mode == "ave":
                merged = [(y + y_rev) / 2]
            elif self.merge_mode == "mul":
                merged = [y * y_rev]
            else:
                merged = [y, y_rev]
            finals = forward_finals + backward_finals if self.return_state else []
            # The backward layer runs over reversed time; align its sequences with input time.
            backward_extra = [ops.flip(t, axis=1) for t in backward_extra]
            return merged + finals + forward_extra + backward_extra

        def compute_mask(self, inputs, mask=None):
            mask = first_mask(mask)
            merged = 2 if self.merge_mode is None else 1
            states = (self.forward_layer.num_states + self.backward_layer.num_states) if self.return_state else 0
            extras = sum(len(l.exposed) + int(l.expose_mask) for l in (self.forward_layer, self.backward_layer))
            output_mask = mask if self.return_sequences else None
            return [output_mask] * merged + [None] * (states + extras)

        def reset_states(self):
            self.forward_layer.reset_states()
            self.backward_layer.reset_states()

        def reset_state(self):  # Keras 3's name for it
            self.reset_states()

        def get_config(self):
            return {
                **super().get_config(),
                "forward": self.forward_layer.get_config(),
                "backward": self.backward_layer.get_config(),
                "merge_mode": self.merge_mode,
                "return_sequences": self.return_sequences,
                "return_state": self.return_state,
            }

        @classmethod
        def from_config(cls, config, custom_objects=None):
            config = dict(config)
            config["forward"] = TracedRNN.from_config(config["forward"], custom_objects)
            config["backward"] = TracedRNN.from_config(config["backward"], custom_objects)
            return cls(**config)

    def _zeros_for_rnn(rnn, inputs, step_shapes):
        """``[parts, *flat_final_states]`` of ``rnn`` on ``inputs`` as zeros (see `shapes_only`), the
        sequence already cut into parts as ``step_shapes(width)`` tells; None when the inner RNN
        cannot tell its output shapes."""
        try:
            shapes = _flat_shapes(rnn.compute_output_shape(tuple(inputs.shape)))
        except (ValueError, TypeError, AttributeError, NotImplementedError):
            return None
        # The sequence is [batch, time, ...], each state [batch, ...]; batch and time as ``inputs``
        # has them. Only their shapes matter, so a symbolic input gets placeholders: Keras 3's
        # KerasTensor (no graph op at all), or one placeholder op in a TensorFlow graph, where
        # zeros of a dynamic batch size cost five ops (~0.4 ms each to create).
        placeholder = _placeholder_maker(inputs)
        batch, steps = tuple(inputs.shape)[:2] if placeholder else ops.shape(inputs)[:2]
        make = placeholder or ops.zeros
        sequence, *states = shapes
        parts = [make((batch, steps) + tuple(shape), rnn.compute_dtype)
                 for shape in step_shapes(math.prod(int(d) for d in sequence[2:]))]
        return [parts] + [make((batch,) + tuple(int(d) for d in shape[1:]), rnn.compute_dtype) for shape in states]

    def _placeholder_maker(inputs):
        """``make(shape, dtype)`` for a symbolic ``inputs`` (Keras 3 or in a TensorFlow graph), else None."""
        if symbolic_tensor is not None and isinstance(inputs, symbolic_tensor):
            return symbolic_tensor
        tf = sys.modules.get("tensorflow")
        if tf is not None and tf.is_tensor(inputs) and tf.is_symbolic_tensor(inputs):
            return lambda shape, dtype: tf.raw_ops.Placeholder(dtype=tf.as_dtype(dtype), shape=shape)
        return None

    @contextlib.contextmanager
    def _zero_initializers(cell):
        """Within this block ``cell`` (and the cells inside it) initialise weights with zeros.

        Random and orthogonal initialisers run eagerly, a few ops per weight: 30% of rewriting a
        chain of LSTMs, for values the copied weights overwrite at once.
        """
        zeros = keras.initializers.Zeros()
        saved = []
        for sub in _cells_within(cell):
            for name, value in list(vars(sub).items()):
                if name.endswith("_initializer") and isinstance(value, keras.initializers.Initializer):
                    saved.append((sub, name, value))
        try:
            for sub, name, _ in saved:
                object.__setattr__(sub, name, zeros)
            yield
        finally:
            for sub, name, value in saved:
                object.__setattr__(sub, name, value)

    def _cells_within(cell):
        found = [cell]
        for sub in list(getattr(cell, "cells", [])) + ([cell.cell] if isinstance(cell, TracedCell) else []):
            found.extend(_cells_within(sub))
        return found

    def _reset_dropout_masks(cell):
        # Each RNN call resets the dropout masks of the cells it knows (a DropoutRNNCell, the cells of
        # a StackedRNNCells); the cells inside a traced stack or wrapper are ours to reset, else a
        # mask made for one batch would be reused for the next.
        inner = list(getattr(cell, "cells", []))
        if isinstance(cell, TracedCell):
            inner.append(cell.cell)
        for sub in inner:
            for reset in ("reset_dropout_mask", "reset_recurrent_dropout_mask"):
                if callable(getattr(sub, reset, None)):
                    getattr(sub, reset)()
            _reset_dropout_masks(sub)

    def _expand_like(step_mask, tensor):
        # [batch, time] -> [batch, time, 1, ...] to broadcast over the state's trailing axes.
        expanded = step_mask
        for _ in range(len(tensor.shape) - 2):
            expanded = ops.expand_dims(expanded, -1)
        return expanded

    def _plain_lists(structure):
        if isinstance(structure, (list, tuple)):
            return [_plain_lists(item) for item in structure]
        return structure

    def _fill_masked(parts, step_mask):
        # Each masked step takes the value of the last valid step before it (zero before the first,
        # which `_carry_initial_state` then replaces by the initial state where that is carried):
        # what a loop that repeats its previous output gives, from a loop that zeroed masked steps.
        if not isinstance(step_mask.shape[1], int):
            # Only shapes are asked for (a symbolic or shape-polymorphic time axis, where no scan
            # can run), and filling keeps them.
            return parts
        positions = ops.cumsum(ops.ones_like(step_mask, dtype="int32"), axis=1) - 1  # [batch, time]: t
        marked = ops.where(step_mask, positions, -ops.ones_like(positions))
        last_valid = ops.associative_scan(ops.maximum, marked, axis=1)  # [batch, time]
        seen = last_valid >= 0
        index = ops.maximum(last_valid, 0)
        filled = []
        for part in parts:
            gather = index
            for _ in range(len(part.shape) - 2):
                gather = ops.expand_dims(gather, -1)
            repeated = ops.take_along_axis(part, gather + ops.zeros_like(part, dtype="int32"), axis=1)
            filled.append(ops.where(_expand_like(seen, part), repeated, ops.zeros_like(part)))
        return filled

    def _carry_initial_state(sequence, step_mask, initial_state, index):
        # The RNN loop repeats its previous *output* on masked steps, and that output is zero before
        # the first valid step; the state carried there is the initial state. Put it back.
        seen = ops.cumsum(ops.cast(step_mask, "int32"), axis=1) > 0  # [batch, time]
        if initial_state is not None:
            start = ops.expand_dims(ops.cast(initial_state[index], sequence.dtype), 1)
            start = start + ops.zeros_like(sequence)
        else:
            start = ops.zeros_like(sequence)
        return ops.where(_expand_like(seen, sequence), sequence, start)

    TRACED_CELLS = {
        "TracedLSTMCell": TracedLSTMCell,
        "TracedGRUCell": TracedGRUCell,
        "TracedSimpleRNNCell": TracedSimpleRNNCell,
        "TracedConvLSTMCell": TracedConvLSTMCell,
        "TracedCell": TracedCell,
        "TracedStackedCells": TracedStackedCells,
    }
    classes = {
        **TRACED_CELLS,
        "TracedRNN": TracedRNN,
        "TracedSubclassRNN": TracedSubclassRNN,
        "TracedBidirectional": TracedBidirectional,
    }
    # The GPU fast path's layers (method="reconstruct"), defined and registered with these.
    from .reconstruct import define_reconstructed_layers

    classes.update(define_reconstructed_layers(keras, classes))
    return classes
