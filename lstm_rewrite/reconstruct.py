"""Reconstruction, the GPU fast path of the rewrite: run the LSTM as Keras does and rebuild c and the gates.

`method="trace"` replaces an LSTM by a generic RNN loop over a traced cell, which on a GPU gives up
cuDNN. `method="reconstruct"` keeps a copy of the LSTM itself (so cuDNN runs it wherever Keras
would) for the h sequence, then recovers everything else outside the recurrence:

1. h carried over masked steps (cuDNN writes zeros at padded steps where the generic loop repeats
   the previous output, so the raw output cannot serve as h_{t-1});
2. all gates of all steps in one batched matmul, ``z = x_t @ W + h_{t-1} @ U + b``;
3. c by its linear recurrence ``c_t = f_t * c_{t-1} + i_t * g_t`` (carried on masked steps),
   solved by a parallel prefix scan in ceil(log2 T) elementwise rounds. The scan multiplies and
   adds, never divides, so it is as safe as the loop (a cumulative product of forget gates divided
   back out would not be).

The layers are written once, against an op namespace under ``keras.ops`` names (Keras 3's own on
any backend, the tf-keras backend's TensorFlow shim), and defined per Keras flavour by
`define_reconstructed_layers`, which `cells.define_traced_layers` calls, so the backends register
them with the traced layers. Their outputs have `TracedRNN`'s layout, and verification covers them
like any traced layer.
"""

from __future__ import annotations

import importlib
import sys

from .cells import LSTM_STATE_INDEX, WrapsRecurrentLayer, _plain_python, first_mask, shapes_only_active
from .errors import InvalidArgumentError

METHODS = ("auto", "trace", "reconstruct")

# Per flavour (keras module name) -> the classes `define_reconstructed_layers` made for it.
_DEFINED: dict = {}


def gpu_visible() -> bool:
    """Whether the Keras in use computes on a GPU (what ``method="auto"`` decides on).

    Under Keras 3 on a backend other than TensorFlow this asks that backend (torch, JAX); otherwise
    TensorFlow, which runs both tf-keras and Keras 3 on TensorFlow. False when neither is there.

    Example:
        >>> method = "reconstruct" if gpu_visible() else "trace"
    """
    if not _tensorflow_backend():
        if _keras3_backend() is None:
            return False
        return importlib.import_module("lstm_rewrite.backends.keras3").gpu_visible()
    import tensorflow as tf

    return bool(tf.config.list_logical_devices("GPU"))


def resolve_method(method: str) -> str:
    """``"auto"`` -> ``"reconstruct"`` when a GPU is visible, else ``"trace"``; others as given.

    Raises:
        InvalidArgumentError: for a name not in ``METHODS``.

    Example:
        >>> resolve_method("trace")
        'trace'
    """
    if method not in METHODS:
        raise InvalidArgumentError(
            f"method= is one of {list(METHODS)}: 'trace' runs a traced copy of the cell's loop (exact on any "
            f"device), 'reconstruct' keeps Keras's own LSTM kernel (cuDNN on a GPU) and rebuilds the states "
            f"from its outputs, 'auto' picks 'reconstruct' when a GPU is visible. Received: method={method!r}"
        )
    if method == "auto":
        return "reconstruct" if gpu_visible() else "trace"
    return method


def _keras3_backend() -> str | None:
    """The Keras 3 backend's name ("tensorflow", "torch", "jax", ...) when Keras 3 is imported."""
    keras = sys.modules.get("keras")
    backend = getattr(keras, "backend", None)
    if backend is None or not hasattr(backend, "backend"):
        return None
    return backend.backend()


def _tensorflow_backend() -> bool:
    """Whether the Keras in use runs on TensorFlow (tf-keras, or Keras 3 with its TensorFlow backend)."""
    if _keras3_backend() not in (None, "tensorflow"):
        return False
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


def unsupported_reason(lstm) -> str | None:
    """Why ``lstm`` cannot be reconstructed (the rewrite then traces it), or None when it can.

    A stateful layer keeps its states in variables the reconstruction would have to read before the
    call; recurrent dropout keeps Keras off cuDNN anyway, so the traced loop is as fast and exact.
    """
    if getattr(lstm, "stateful", False):
        return "stateful"
    if float(getattr(lstm, "recurrent_dropout", 0.0) or 0.0) > 0.0:
        return "recurrent_dropout"
    if getattr(lstm, "time_major", False):
        return "time_major"
    return None


def classes_for(backend) -> dict:
    """The reconstructed layer classes of ``backend``'s flavour (defined when its module loaded)."""
    return _DEFINED[backend.keras.__name__]


def reconstructed_lstm(backend, lstm, name: str, exposed, *, expose_mask: bool, return_sequences: bool,
                       return_state: bool, dtype: str):
    """A ReconstructedLSTM standing in for ``lstm`` (unbuilt; the rewrite copies the weights).

    Example:
        >>> layer = reconstructed_lstm(backend, lstm, "encoder", ("c", "h"), expose_mask=False,
        ...                            return_sequences=True, return_state=False, dtype="float32")
    """
    config = {**lstm.get_config(), "return_sequences": True, "return_state": True, "name": "rnn"}
    rnn = type(lstm).from_config(config)
    return classes_for(backend)["ReconstructedLSTM"](
        rnn, exposed=tuple(exposed), return_sequences=return_sequences, return_state=return_state,
        expose_mask=expose_mask, name=name, dtype=dtype,
    )


def bidirectional_class(backend, directions):
    """The Bidirectional class for two built directions: ReconstructedBidirectional when either is
    a ReconstructedLSTM (it knows how to load them), else the backend's TracedBidirectional."""
    classes = _DEFINED.get(backend.keras.__name__) or {}
    if classes and any(isinstance(d, classes["ReconstructedLSTM"]) for d in directions):
        return classes["ReconstructedBidirectional"]
    return backend.TracedBidirectional


def define_reconstructed_layers(keras, traced: dict, ops=None) -> dict:
    """Define ReconstructedLSTM and ReconstructedBidirectional for one Keras flavour.

    Args:
        keras: the ``keras`` (Keras 3) or ``tf_keras`` module.
        traced: the classes `cells.define_traced_layers` made for the same flavour.
        ops: the op namespace the layers compute with, under ``keras.ops`` names; by default
            ``keras.ops`` for Keras 3 (any backend) and the tf-keras backend's shim for tf-keras.

    Returns:
        A dict of the two classes, keyed by class name.
    """
    if ops is None:
        ops = getattr(keras, "ops", None)
    if ops is None:
        # tf-keras: its backend module defines the shim before it defines the layers (which is
        # what calls this), so the partly imported module already has it.
        ops = importlib.import_module("lstm_rewrite.backends.tfkeras").ops

    layers = keras.layers

    class ReconstructedLSTM(WrapsRecurrentLayer, layers.Layer):
        """An LSTM call rewritten to run the LSTM itself and rebuild its states from its h sequence.

        Wraps ``rnn``, a copy of the user's LSTM configured with ``return_sequences=True`` and
        ``return_state=True`` (everything else, mask handling included, as the user's, so Keras
        picks the same kernel for it). Outputs have `TracedRNN`'s layout:

            [output, *final_states (if return_state), *exposed, mask (if expose_mask)]

        with the exposed sequences ``[batch, time, units]`` in processing order.
        """

        def __init__(self, rnn, exposed=(), return_sequences=False, return_state=False,
                     expose_mask=False, **kwargs):
            super().__init__(**kwargs)
            self.rnn = rnn
            self.exposed = tuple(exposed)
            self.state_index = dict(LSTM_STATE_INDEX)
            self.return_sequences = return_sequences
            self.return_state = return_state
            self.expose_mask = expose_mask
            self.supports_masking = True

        def build(self, input_shape):
            if not self.rnn.built:
                self.rnn.build(input_shape)
            self.built = True

        @property
        def num_states(self):
            return 2

        @_plain_python
        def call(self, inputs, initial_state=None, mask=None, training=None):
            mask = first_mask(mask)
            cell = self.rnn.cell
            if training is True and (cell.dropout or cell.recurrent_dropout):
                raise InvalidArgumentError(
                    f"Layer {self.name!r} (ReconstructedLSTM) was called with training=True, but its LSTM has "
                    f"dropout: the reconstruction cannot see the dropout masks the LSTM draws, so its states "
                    f"would not be the layer's. Rewrite with method='trace' to get states in training mode. "
                    f"Received: dropout={cell.dropout}, recurrent_dropout={cell.recurrent_dropout}"
                )
            if shapes_only_active():
                return self._zeros(inputs)
            sequence, h_last, c_last = self.rnn(
                inputs, initial_state=initial_state, mask=mask, training=training)
            dtype = sequence.dtype
            step_mask = None
            if mask is not None:
                step_mask = ops.cast(mask, "bool")  # [batch, time], input order
                if self.rnn.go_backwards:
                    step_mask = ops.flip(step_mask, axis=1)
            if self.return_sequences:
                output = sequence
            elif step_mask is None or getattr(self.rnn, "zero_output_for_mask", False):
                output = sequence[:, -1]
            else:
                # The last output is the h of the last valid step: cuDNN's final h (its sequence holds
                # zeros at padded steps), and the loop's repeated output, zero when no step is valid.
                any_valid = ops.any(step_mask, axis=1, keepdims=True)
                output = ops.where(any_valid, h_last, ops.zeros_like(h_last))
            outputs = [output]
            if self.return_state:
                outputs += [h_last, c_last]
            if self.exposed:
                outputs += self._states(inputs, sequence, step_mask, initial_state, dtype)
            if self.expose_mask:
                if step_mask is None:
                    step_mask = ops.ones_like(sequence[..., 0], dtype="bool")
                outputs.append(ops.cast(step_mask, "float32"))
            return outputs

        def _zeros(self, inputs):
            """Zeros shaped like the outputs, for a call on symbolic inputs (see `cells.shapes_only`)."""
            steps = ops.zeros_like(inputs[:, :, 0], dtype=self.compute_dtype)  # [batch, time]
            units = ops.zeros((int(self.rnn.cell.units),), dtype=self.compute_dtype)
            sequence = ops.expand_dims(steps, -1) + units
            state = ops.expand_dims(steps[:, 0], -1) + units
            outputs = [sequence if self.return_sequences else state]
            outputs += [state, state] if self.return_state else []
            outputs += [sequence] * len(self.exposed)
            return outputs + ([ops.cast(steps, "float32")] if self.expose_mask else [])

        def _states(self, inputs, sequence, step_mask, initial_state, dtype):
            """The exposed sequences, rebuilt from the h sequence, in ``self.exposed`` order."""
            cell = self.rnn.cell
            # Initial states; None stands for zeros (the scans then skip folding them in).
            h0 = None if initial_state is None else ops.cast(initial_state[0], dtype)
            c0 = None if initial_state is None else ops.cast(initial_state[1], dtype)
            # [batch, time, 1]
            valid = None if step_mask is None else ops.expand_dims(ops.cast(step_mask, dtype), -1)
            # h as carried by the recurrence: the h of the last valid step, h0 before any.
            h = sequence if valid is None else linear_scan(1 - valid, valid * sequence, h0, ops)
            found = {"h": h}
            if any(q != "h" for q in self.exposed):
                x = ops.cast(inputs, dtype)
                if self.rnn.go_backwards:
                    x = ops.flip(x, axis=1)
                first = ops.zeros_like(h[:, :1]) if h0 is None else ops.expand_dims(h0, 1)
                h_prev = ops.concatenate([first, h[:, :-1]], axis=1)  # [batch, time, units]
                kernel = ops.cast(ops.convert_to_tensor(cell.kernel), dtype)
                recurrent_kernel = ops.cast(ops.convert_to_tensor(cell.recurrent_kernel), dtype)
                # [batch, time, 4 units]
                z = _matmul_time(x, kernel, ops) + _matmul_time(h_prev, recurrent_kernel, ops)
                if cell.use_bias:
                    z = z + ops.cast(ops.convert_to_tensor(cell.bias), dtype)
                z_i, z_f, z_g, z_o = ops.split(z, 4, axis=-1)
                i, f = cell.recurrent_activation(z_i), cell.recurrent_activation(z_f)
                g = cell.activation(z_g)
                o = cell.recurrent_activation(z_o) if "o" in self.exposed else None
                decay, drive = f, i * g
                if valid is not None:
                    decay, drive = valid * f + (1 - valid), valid * drive
                found["c"] = linear_scan(decay, drive, c0, ops)
                gates = {"i": i, "f": f, "g": g, "o": o}
                wanted = [q for q in ("i", "f", "g", "o") if q in self.exposed]
                if wanted and valid is not None:
                    # Gates on masked steps hold their last valid value, zero before any (as the loop's
                    # repeated outputs do): one scan over the wanted gates side by side.
                    stacked = ops.concatenate([gates[q] for q in wanted], axis=-1)
                    filled = linear_scan(1 - valid, valid * stacked, None, ops)
                    gates.update(zip(wanted, ops.split(filled, len(wanted), axis=-1)))
                found.update(gates)
            return [found[q] for q in self.exposed]

        def get_config(self):
            return {
                **super().get_config(),
                "rnn": layers.serialize(self.rnn),
                "exposed": list(self.exposed),
                "return_sequences": self.return_sequences,
                "return_state": self.return_state,
                "expose_mask": self.expose_mask,
            }

        @classmethod
        def from_config(cls, config, custom_objects=None):
            config = dict(config)
            config["rnn"] = layers.deserialize(config["rnn"], custom_objects=custom_objects)
            return cls(**config)

    class ReconstructedBidirectional(traced["TracedBidirectional"]):
        """`TracedBidirectional` over two ReconstructedLSTM directions (it saves and loads them as such)."""

        @classmethod
        def from_config(cls, config, custom_objects=None):
            config = dict(config)
            for key in ("forward", "backward"):
                # A TracedRNN's config has "extras"; a direction the rewrite traced loads as one.
                direction = traced["TracedRNN"] if "extras" in config[key] else ReconstructedLSTM
                config[key] = direction.from_config(config[key], custom_objects)
            return cls(**config)

    classes = {"ReconstructedLSTM": ReconstructedLSTM, "ReconstructedBidirectional": ReconstructedBidirectional}
    _DEFINED[keras.__name__] = classes
    return classes


def _matmul_time(x, w, ops):
    """``[batch, time, n] @ [n, m] -> [batch, time, m]`` as one 2-D matmul over all steps."""
    shape = ops.shape(x)  # a tensor in place of each dimension unknown while tracing (TensorFlow)
    flat = ops.matmul(ops.reshape(x, (-1, shape[-1])), w)
    return ops.reshape(flat, (*shape[:-1], w.shape[-1]))


def linear_scan(a, b, initial, ops=None):
    """Solve ``s_t = a_t * s_{t-1} + b_t`` along axis 1 for every t, with ``s_{-1} = initial``.

    A Hillis-Steele prefix scan: round k composes each step with the one 2**k before it, so
    ceil(log2 T) rounds of elementwise ops replace T sequential steps (what makes it fast on a GPU).
    The rounds run as a Python loop when T is known, which it always is on eager backends (torch,
    JAX) and in TensorFlow graphs of fixed length; a TensorFlow graph of unknown length runs them
    in a ``tf.while_loop``.

    Args:
        a, b: ``[batch, time, ...]`` tensors of the same shape and dtype.
        initial: ``[batch, ...]``, the state before the first step; None for zeros.
        ops: the op namespace (``keras.ops`` or the tf-keras backend's shim); by default
            ``keras.ops`` when Keras 3 is installed, else the shim.

    Returns:
        ``[batch, time, ...]``: every s_t.

    Example:
        >>> linear_scan(ops.full((1, 3, 1), 0.5), ops.ones((1, 3, 1)), ops.zeros((1, 1)), ops)[0, :, 0]
        array([1.  , 1.5 , 1.75], dtype=float32)  # as the backend's tensor
    """
    ops = ops or _default_ops()
    if initial is not None:
        # Fold the initial state into the first step: s_0 = a_0 * initial + b_0.
        b = ops.concatenate([b[:, :1] + a[:, :1] * ops.expand_dims(initial, 1), b[:, 1:]], axis=1)
    steps = a.shape[1]
    if steps is not None and not isinstance(steps, int):
        return b  # a shape-polymorphic trace (JAX's shape inference) asks for shapes only, and b has them
    if steps is not None:
        # Each op is a kernel launch on a GPU, which is what a scan of small tensors costs there:
        # the last round needs no new a.
        shift = 1
        while shift < steps:
            a, b = _compose(a, b, shift, steps, ops, last=2 * shift >= steps)
            shift *= 2
        return b
    return _tf_while_scan(a, b, ops)


def _default_ops():
    try:
        import keras

        return keras.ops
    except ImportError:
        return importlib.import_module("lstm_rewrite.backends.tfkeras").ops


def _tf_while_scan(a, b, ops):
    """The scan's rounds in a ``tf.while_loop``, for a TensorFlow graph whose time length is unknown."""
    import tensorflow as tf

    count = tf.shape(a)[1]

    def body(shift, a, b):
        new_a, new_b = _compose(a, b, shift, count, ops)
        new_a.set_shape(a.shape)
        new_b.set_shape(b.shape)
        return shift * 2, new_a, new_b

    _, _, b = tf.while_loop(lambda shift, a, b: shift < count, body, (tf.constant(1), a, b))
    return b


def _compose(a, b, shift, count, ops, last=False):
    """One scan round: step t absorbs step t - shift (steps before ``shift`` are already complete).
    With ``last``, a is not needed any more and comes back unchanged."""
    tail_a = a[:, shift:]
    new_b = ops.concatenate([b[:, :shift], tail_a * b[:, :count - shift] + b[:, shift:]], axis=1)
    if last:
        return a, new_b
    new_a = ops.concatenate([a[:, :shift], tail_a * a[:, :count - shift]], axis=1)
    return new_a, new_b
