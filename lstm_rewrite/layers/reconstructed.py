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

The layers are written against ``self.flavour`` and bound with the traced layers by
`lstm_rewrite.layers.bind`; their outputs have `TracedRNN`'s layout, and verification covers them
like any traced layer. The functions here are what the rewrite asks of the fast path: which method
runs (`resolve_method`), whether an LSTM can be reconstructed (`unsupported_reason`), and the layers
standing in for it (`reconstructed_lstm`, `bidirectional_class`).
"""

from __future__ import annotations

from .. import kinds
from ..errors import InvalidArgumentError
from .bidirectional import TracedBidirectional
from .flavour import plain_python
from .masking import first_mask
from .shapes import shapes_only_active
from .traced_rnn import WrapsRecurrentLayer

METHODS = ("auto", "trace", "reconstruct")


def resolve_method(method: str, backend) -> str:
    """``"auto"`` -> ``"reconstruct"`` when ``backend`` computes on a GPU, else ``"trace"``; others
    as given.

    Args:
        method: one of `METHODS`.
        backend: the backend module of the model's flavour (`lstm_rewrite.backends.for_model`);
            asked ``gpu_visible()`` for ``"auto"`` only.

    Raises:
        InvalidArgumentError: for a name not in ``METHODS``.

    Example:
        >>> resolve_method("trace", backends.get("keras3"))
        'trace'
    """
    if method not in METHODS:
        raise InvalidArgumentError(
            f"method= is one of {list(METHODS)}: 'trace' runs a traced copy of the cell's loop (exact on any "
            f"device), 'reconstruct' keeps Keras's own LSTM kernel (cuDNN on a GPU) and rebuilds the states "
            f"from its outputs, 'auto' picks 'reconstruct' when a GPU is visible. Received: method={method!r}"
        )
    if method == "auto":
        return "reconstruct" if backend.gpu_visible() else "trace"
    return method


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


def reconstructed_lstm(backend, lstm, name: str, exposed, *, expose_mask: bool, return_sequences: bool,
                       return_state: bool, dtype: str):
    """A ReconstructedLSTM standing in for ``lstm`` (unbuilt; the rewrite copies the weights).

    Example:
        >>> layer = reconstructed_lstm(backend, lstm, "encoder", ("c", "h"), expose_mask=False,
        ...                            return_sequences=True, return_state=False, dtype="float32")
    """
    config = {**lstm.get_config(), "return_sequences": True, "return_state": True, "name": "rnn"}
    rnn = type(lstm).from_config(config)
    return backend.ReconstructedLSTM(
        rnn, exposed=tuple(exposed), return_sequences=return_sequences, return_state=return_state,
        expose_mask=expose_mask, name=name, dtype=dtype,
    )


def bidirectional_class(backend, directions) -> type:
    """The Bidirectional class for two built directions: ReconstructedBidirectional when either is
    a ReconstructedLSTM (it knows how to load them), else the backend's TracedBidirectional."""
    if any(isinstance(d, ReconstructedLSTM) for d in directions):
        return backend.ReconstructedBidirectional
    return backend.TracedBidirectional


class ReconstructedLSTM(WrapsRecurrentLayer):
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
        self.state_index = dict(kinds.get("lstm").state_index)
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

    @plain_python
    def call(self, inputs, initial_state=None, mask=None, training=None):
        ops = self.flavour.ops
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
        """Zeros shaped like the outputs, for a call on symbolic inputs (see `shapes.shapes_only`)."""
        ops = self.flavour.ops
        steps = ops.zeros_like(inputs[:, :, 0], dtype=self.compute_dtype)  # [batch, time]
        units = ops.zeros((int(self.rnn.cell.units),), dtype=self.compute_dtype)
        sequence = ops.expand_dims(steps, -1) + units
        state = ops.expand_dims(steps[:, 0], -1) + units
        outputs = [sequence if self.return_sequences else state]
        outputs += [state, state] if self.return_state else []
        outputs += [sequence] * len(self.exposed)
        return outputs + ([ops.cast(steps, "float32")] if self.expose_mask else [])

    def _scan(self, a, b, initial):
        return linear_scan(a, b, initial, self.flavour.ops, self.flavour.doubling_loop)

    def _states(self, inputs, sequence, step_mask, initial_state, dtype):
        """The exposed sequences, rebuilt from the h sequence, in ``self.exposed`` order."""
        ops = self.flavour.ops
        cell = self.rnn.cell
        # Initial states; None stands for zeros (the scans then skip folding them in).
        h0 = None if initial_state is None else ops.cast(initial_state[0], dtype)
        c0 = None if initial_state is None else ops.cast(initial_state[1], dtype)
        # [batch, time, 1]
        valid = None if step_mask is None else ops.expand_dims(ops.cast(step_mask, dtype), -1)
        # h as carried by the recurrence: the h of the last valid step, h0 before any.
        h = sequence if valid is None else self._scan(1 - valid, valid * sequence, h0)
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
            found["c"] = self._scan(decay, drive, c0)
            gates = {"i": i, "f": f, "g": g, "o": o}
            wanted = [q for q in ("i", "f", "g", "o") if q in self.exposed]
            if wanted and valid is not None:
                # Gates on masked steps hold their last valid value, zero before any (as the loop's
                # repeated outputs do): one scan over the wanted gates side by side.
                stacked = ops.concatenate([gates[q] for q in wanted], axis=-1)
                filled = self._scan(1 - valid, valid * stacked, None)
                gates.update(zip(wanted, ops.split(filled, len(wanted), axis=-1)))
            found.update(gates)
        return [found[q] for q in self.exposed]

    def get_config(self):
        layers = self.flavour.keras.layers
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
        config["rnn"] = cls.flavour.keras.layers.deserialize(config["rnn"], custom_objects=custom_objects)
        return cls(**config)


class ReconstructedBidirectional(TracedBidirectional):
    """`TracedBidirectional` over two ReconstructedLSTM directions (it saves and loads them as such)."""

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("forward", "backward"):
            # A TracedRNN's config has "extras"; a direction the rewrite traced loads as one.
            direction = cls.flavour.classes["TracedRNN" if "extras" in config[key] else "ReconstructedLSTM"]
            config[key] = direction.from_config(config[key], custom_objects)
        return cls(**config)


def _matmul_time(x, w, ops):
    """``[batch, time, n] @ [n, m] -> [batch, time, m]`` as one 2-D matmul over all steps."""
    shape = ops.shape(x)  # a tensor in place of each dimension unknown while tracing (TensorFlow)
    flat = ops.matmul(ops.reshape(x, (-1, shape[-1])), w)
    return ops.reshape(flat, (*shape[:-1], w.shape[-1]))


def linear_scan(a, b, initial, ops, doubling_loop=None):
    """Solve ``s_t = a_t * s_{t-1} + b_t`` along axis 1 for every t, with ``s_{-1} = initial``.

    A Hillis-Steele prefix scan: round k composes each step with the one 2**k before it, so
    ceil(log2 T) rounds of elementwise ops replace T sequential steps (what makes it fast on a GPU).
    The rounds run as a Python loop when T is known, which it always is on eager backends (torch,
    JAX) and in TensorFlow graphs of fixed length; a TensorFlow graph of unknown length runs them
    in the backend's ``doubling_loop`` (a ``tf.while_loop``). Each backend also offers it bound to
    its ops, as ``backend.linear_scan(a, b, initial)``.

    Args:
        a, b: ``[batch, time, ...]`` tensors of the same shape and dtype.
        initial: ``[batch, ...]``, the state before the first step; None for zeros.
        ops: the op namespace (``keras.ops`` or the tf-keras backend's shim).
        doubling_loop: the backend's loop for an unknown T (`Flavour.doubling_loop`).

    Returns:
        ``[batch, time, ...]``: every s_t.

    Example:
        >>> linear_scan(ops.full((1, 3, 1), 0.5), ops.ones((1, 3, 1)), ops.zeros((1, 1)), ops)[0, :, 0]
        array([1.  , 1.5 , 1.75], dtype=float32)  # as the backend's tensor
    """
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
    if doubling_loop is None:
        raise ValueError(f"linear_scan: the time length is unknown and this backend has no loop for it. "
                         f"Received: a of shape {tuple(a.shape)}")
    return doubling_loop(lambda a, b, shift, count: _compose(a, b, shift, count, ops), a, b)


def _compose(a, b, shift, count, ops, last=False):
    """One scan round: step t absorbs step t - shift (steps before ``shift`` are already complete).
    With ``last``, a is not needed any more and comes back unchanged."""
    tail_a = a[:, shift:]
    new_b = ops.concatenate([b[:, :shift], tail_a * b[:, :count - shift] + b[:, shift:]], axis=1)
    if last:
        return a, new_b
    new_a = ops.concatenate([a[:, :shift], tail_a * a[:, :count - shift]], axis=1)
    return new_a, new_b
