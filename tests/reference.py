"""Test oracle: NumPy recurrent layers (LSTM, GRU, SimpleRNN, ConvLSTM2D) written from the Keras equations.

Nothing here imports keras, tf_keras, tensorflow or ``lstm_rewrite``: these functions are the independent ground
truth that every exposed state is compared against, and ``tests/test_reference.py`` checks them against the real
Keras layers of both flavours.

Conventions shared by every layer function:

* Inputs are cast to float64; every returned array is float64.
* Sequences are returned in *processing* order, the time order of the layer's ``return_sequences`` output: with
  ``go_backwards=True`` index 0 is the last input step.
* ``mask`` is ``(batch, time)`` bool in *input* time order (as Keras receives it); it is reversed together with the
  input when ``go_backwards=True``. The returned ``"mask"`` is that mask in processing order as float (1.0 = valid).
* On a masked step the states (``h``, ``c``) carry over unchanged, so the exposed state sequences hold the state after
  the last valid step (the initial state before any valid step). Gates hold their last valid value and are zero
  before the first valid step. ``"output"`` repeats the previous output (zero before the first valid step, even with
  a nonzero initial state), or is zero on masked steps with ``zero_output_for_mask=True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["LAYER_DEFAULT", "get_activation", "conv2d", "conv_lstm2d", "counter_cell", "gru", "lstm", "simple_rnn",
           "ACTIVATIONS"]

Array = np.ndarray
Flavour = str  # "keras3" | "tfkeras"

_FLAVOURS = ("keras3", "tfkeras")

#: Stands for "whatever the Keras layer of the given flavour defaults to" (used where the flavours disagree).
LAYER_DEFAULT: Any = "<layer default>"
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946
_erf = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid(x: Array) -> Array:
    # Split by sign so that exp never overflows.
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def _softplus(x: Array) -> Array:
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0.0)


def _hard_sigmoid_keras3(x: Array) -> Array:
    # keras/src/backend/tensorflow/nn.py: relu6(x + 3) / 6.
    return np.clip(x + 3.0, 0.0, 6.0) / 6.0


def _hard_sigmoid_tfkeras(x: Array) -> Array:
    # tf_keras/src/backend.py: clip(0.2 * x + 0.5, 0, 1).
    return np.clip(0.2 * x + 0.5, 0.0, 1.0)


def _softmax(x: Array) -> Array:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(x: Array) -> Array:
    s = x - x.max(axis=-1, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=-1, keepdims=True))


# Functions available under the same name (and with the same defaults) in both flavours.
_COMMON: dict[str, Callable[[Array], Array]] = {
    "linear": lambda x: x,
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    "relu": lambda x: np.maximum(x, 0.0),
    "relu6": lambda x: np.clip(x, 0.0, 6.0),
    "leaky_relu": lambda x: np.where(x >= 0, x, 0.2 * x),
    "softsign": lambda x: x / (1.0 + np.abs(x)),
    "softplus": _softplus,
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
    "selu": lambda x: _SELU_SCALE * np.where(x > 0, x, _SELU_ALPHA * np.expm1(np.minimum(x, 0.0))),
    "exponential": np.exp,
    "swish": lambda x: x * _sigmoid(x),
    "silu": lambda x: x * _sigmoid(x),
    # Both flavours default to the exact (erf) form when the activation is given by name.
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "mish": lambda x: x * np.tanh(_softplus(x)),
    "softmax": _softmax,
    "log_softmax": _log_softmax,
}

# Functions that only Keras 3 knows by name (tf-keras raises "Unknown activation function").
_KERAS3_ONLY: dict[str, Callable[[Array], Array]] = {
    "hard_silu": lambda x: x * _hard_sigmoid_keras3(x),
    "hard_swish": lambda x: x * _hard_sigmoid_keras3(x),
    "celu": lambda x: np.maximum(x, 0.0) + np.expm1(np.minimum(x, 0.0)),
    "hard_tanh": lambda x: np.clip(x, -1.0, 1.0),
    "log_sigmoid": lambda x: -_softplus(-x),
    "tanh_shrink": lambda x: x - np.tanh(x),
    "squareplus": lambda x: (x + np.sqrt(x * x + 4.0)) / 2.0,
    "sparse_plus": lambda x: np.where(x <= -1, 0.0, np.where(x >= 1, x, 0.25 * (x + 1.0) ** 2)),
    "sparse_sigmoid": lambda x: np.where(x <= -1, 0.0, np.where(x >= 1, 1.0, 0.5 * (x + 1.0))),
    "soft_shrink": lambda x: np.where(x > 0.5, x - 0.5, np.where(x < -0.5, x + 0.5, 0.0)),
    "hard_shrink": lambda x: np.where(np.abs(x) > 0.5, x, 0.0),
}

#: Activation names understood by :func:`get_activation`, per flavour.
ACTIVATIONS: dict[str, tuple[str, ...]] = {
    "keras3": tuple(sorted([*_COMMON, *_KERAS3_ONLY, "hard_sigmoid"])),
    "tfkeras": tuple(sorted([*_COMMON, "hard_sigmoid"])),
}


def get_activation(name: str | None, flavour: Flavour = "keras3") -> Callable[[Array], Array]:
    """Return the NumPy version of a Keras activation given by its string name.

    Args:
        name: A Keras activation name such as ``"tanh"`` or ``"hard_sigmoid"``; ``None`` means linear, as in Keras.
        flavour: ``"keras3"`` or ``"tfkeras"``; selects e.g. the ``hard_sigmoid`` formula.

    Returns:
        An element-wise float64 function (``softmax``/``log_softmax`` work over the last axis).

    Raises:
        ValueError: if the flavour or the name is unknown to that flavour.

    Example:
        >>> float(get_activation("hard_sigmoid", "tfkeras")(np.array(1.0)))
        0.7
    """
    if flavour not in _FLAVOURS:
        raise ValueError(f"Unknown Keras flavour; expected one of {_FLAVOURS}. Received: flavour={flavour!r}")
    if name is None:
        name = "linear"
    if not isinstance(name, str):
        raise ValueError(f"Activations must be given by name (a str). Received: {name!r}")
    if name == "hard_sigmoid":
        fn = _hard_sigmoid_keras3 if flavour == "keras3" else _hard_sigmoid_tfkeras
    elif name in _COMMON:
        fn = _COMMON[name]
    elif name in _KERAS3_ONLY and flavour == "keras3":
        fn = _KERAS3_ONLY[name]
    else:
        raise ValueError(
            f"Unknown activation for flavour {flavour!r}; known names: {', '.join(ACTIVATIONS[flavour])}. "
            f"Received: {name!r}"
        )

    def apply(x: Array) -> Array:
        return np.asarray(fn(np.asarray(x, dtype=np.float64)), dtype=np.float64)

    return apply


# ----------------------------------------------------------------------------------------------------------------
# The generic recurrence: Keras' RNN loop (keras/src/backend/tensorflow/rnn.py, tf_keras/src/backend.py::rnn).
# ----------------------------------------------------------------------------------------------------------------

Step = Callable[[Array, list[Array]], tuple[Array, list[Array], dict[str, Array]]]


def _as_float(a: Any, what: str) -> Array:
    try:
        return np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a numeric array. Received: {type(a).__name__}") from exc


def _check_mask(mask: Any, batch: int, time: int) -> Array:
    if mask is None:
        return np.ones((batch, time), dtype=bool)
    m = np.asarray(mask)
    if m.shape != (batch, time):
        raise ValueError(f"mask must have shape (batch, time) = {(batch, time)}. Received: shape={m.shape}")
    return m.astype(bool)


def _initial_states(initial_state: Any, shapes: Sequence[tuple[int, ...]], names: Sequence[str]) -> list[Array]:
    if initial_state is None:
        return [np.zeros(s) for s in shapes]
    if isinstance(initial_state, np.ndarray) or not isinstance(initial_state, (list, tuple)):
        initial_state = [initial_state]
    if len(initial_state) != len(shapes):
        raise ValueError(
            f"initial_state must hold {len(shapes)} array(s) ({', '.join(names)}). "
            f"Received: {len(initial_state)} array(s)"
        )
    states = []
    for s, shape, name in zip(initial_state, shapes, names):
        a = _as_float(s, f"initial_state {name}")
        if a.shape != tuple(shape):
            raise ValueError(f"initial_state {name} must have shape {tuple(shape)}. Received: shape={a.shape}")
        states.append(a.copy())
    return states



class _Editor:
    """Interventions applied inside the step, written from their definitions (issue 13).

    Each intervention is a dict: ``quantity`` (c, h, i, f, g, o; z, r, n), ``units`` (indices), ``steps``
    (``(batch, time)`` bool in *input* time order), ``kind`` and its constants:

    * ``"ablate"``: the units take ``value`` (a float, or one value per selected unit);
    * ``"clamp"``: ``clip(v, low, high)``; ``"scale"``: ``v * factor``;
    * ``"add"``: ``v + alpha * direction`` (``direction`` has one entry per selected unit);
    * ``"patch"``: the units take ``source`` (``(batch, time, len(units))``, input time order).

    Interventions on one quantity apply in list order, where the quantity is computed: a gate before it
    enters c (or n), c before h is computed from it, h before it is carried.
    """

    def __init__(self, interventions, batch: int, time: int):
        self.items = []
        for k, item in enumerate(interventions or ()):
            units = np.asarray(item["units"], dtype=int)
            steps = np.asarray(item["steps"], dtype=bool)
            if steps.shape != (batch, time):
                raise ValueError(f"intervention {k}: steps must be (batch, time) = {(batch, time)}. Received: {steps.shape}")
            self.items.append((item, units, steps))
        self.t = 0  # the input-time index of the step being computed

    def __call__(self, quantity: str, v: Array) -> Array:
        for item, units, steps in self.items:
            if item["quantity"] != quantity:
                continue
            on = steps[:, self.t]
            sel = v[:, units]
            kind = item["kind"]
            if kind == "ablate":
                new = np.broadcast_to(np.asarray(item["value"], dtype=np.float64), sel.shape)
            elif kind == "clamp":
                low = -np.inf if item.get("low") is None else item["low"]
                high = np.inf if item.get("high") is None else item["high"]
                new = np.minimum(np.maximum(sel, low), high)
            elif kind == "scale":
                new = sel * item["factor"]
            elif kind == "add":
                new = sel + item["alpha"] * np.asarray(item["direction"], dtype=np.float64)
            elif kind == "patch":
                new = np.asarray(item["source"], dtype=np.float64)[:, self.t]
            else:
                raise ValueError(f"unknown intervention kind. Received: {kind!r}")
            v = v.copy()
            v[:, units] = np.where(on[:, None], new, sel)
        return v

def _recur(
    x: Array,
    step: Step,
    states: list[Array],
    state_names: Sequence[str],
    extra_names: Sequence[str],
    *,
    mask: Array,
    go_backwards: bool,
    zero_output_for_mask: bool,
    editor: "_Editor | None" = None,
    masked_output: str = "previous",
) -> dict[str, Array]:
    """Run ``step`` over time with Keras masking; return sequences in processing order.

    ``editor`` (interventions) is told the input-time index of each step before it runs.
    """
    if go_backwards:
        x = x[:, ::-1]
        mask = mask[:, ::-1]
    time = x.shape[1]
    out_seq, state_seqs = [], {n: [] for n in state_names}
    extra_seqs: dict[str, list[Array]] = {n: [] for n in extra_names}
    prev_out: Array | None = None
    prev_extra: dict[str, Array] | None = None
    for t in range(time):
        if editor is not None:
            editor.t = time - 1 - t if go_backwards else t
        output, new_states, extras = step(x[:, t], states)
        if prev_out is None:
            prev_out = np.zeros_like(output)
            prev_extra = {n: np.zeros_like(extras[n]) for n in extra_names}
        m = mask[:, t].reshape((-1,) + (1,) * (output.ndim - 1))
        # Keras: tf.where(mask_t, new, previous) for states and outputs alike.
        states = [np.where(m, new, old) for new, old in zip(new_states, states)]
        # What a masked step outputs: the previous output (TensorFlow's and torch's loops), or the
        # carried states[0] (Keras 3's JAX and NumPy loops: the initial h before the first valid step).
        carried = prev_out if masked_output == "previous" else states[0]
        output = np.where(m, output, 0.0 if zero_output_for_mask else carried)
        extras = {n: np.where(m, extras[n], prev_extra[n]) for n in extra_names}
        prev_out, prev_extra = output, extras
        out_seq.append(output)
        for n, s in zip(state_names, states):
            state_seqs[n].append(s)
        for n in extra_names:
            extra_seqs[n].append(extras[n])
    result: dict[str, Array] = {n: np.stack(v, axis=1) for n, v in state_seqs.items()}
    result.update({n: np.stack(v, axis=1) for n, v in extra_seqs.items()})
    result["output"] = np.stack(out_seq, axis=1)
    result["last_output"] = result["output"][:, -1]
    for n, s in zip(state_names, states):
        result[f"last_{n}"] = s
    result["mask"] = mask.astype(np.float64)
    return result


def _check_2d(name: str, a: Array, shape: tuple[int, ...]) -> None:
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}. Received: shape={a.shape}")


def _prepare_sequence(x: Any, ndim: int, layer: str) -> Array:
    x = _as_float(x, f"{layer} input x")
    if x.ndim != ndim:
        raise ValueError(f"{layer} input x must have {ndim} dimensions. Received: shape={x.shape}")
    return x


# ----------------------------------------------------------------------------------------------------------------
# Dense recurrent layers.
# ----------------------------------------------------------------------------------------------------------------


def lstm(
    x: Any,
    kernel: Any,
    recurrent_kernel: Any,
    bias: Any = None,
    *,
    mask: Any = None,
    go_backwards: bool = False,
    initial_state: Any = None,
    activation: str | None = "tanh",
    recurrent_activation: str | None = "sigmoid",
    flavour: Flavour = "keras3",
    zero_output_for_mask: bool = False,
    masked_output: str = "previous",
    interventions: Sequence[dict] | None = None,
) -> dict[str, Array]:
    """Run a Keras ``LSTM`` layer in NumPy, keeping every state and gate at every step.

    ``z = x_t @ kernel + h @ recurrent_kernel + bias`` with columns in gate order i, f, g (Keras' "c"), o;
    ``i, f, o = recurrent_activation(...)``, ``g = activation(...)``, ``c = f * c + i * g``,
    ``h = o * activation(c)``.

    Args:
        x: Input of shape ``(batch, time, features)``.
        kernel: ``(features, 4 * units)``.
        recurrent_kernel: ``(units, 4 * units)``.
        bias: ``(4 * units,)`` or ``None`` (``use_bias=False``).
        mask: Optional ``(batch, time)`` bool mask in input time order.
        go_backwards: Process the input in reverse time order (the returned sequences stay in processing order).
        initial_state: Optional ``[h0, c0]``, each ``(batch, units)``.
        activation: Keras name of the activation.
        recurrent_activation: Keras name of the recurrent activation.
        flavour: ``"keras3"`` or ``"tfkeras"`` (decides what ``hard_sigmoid`` means).
        zero_output_for_mask: Zero ``"output"`` on masked steps instead of repeating the previous output.
        masked_output: ``"previous"`` (the previous output, TensorFlow and torch) or ``"state0"`` (the
            carried first state, Keras 3 on JAX) on masked steps; the states are the same either way.
        interventions: Edits applied inside the step (see ``_Editor``): each a dict with ``quantity``, ``units``,
            ``steps`` ((batch, time) bool, input time order), ``kind`` and its constants.

    Returns:
        A dict with ``"h", "c", "i", "f", "g", "o"`` of shape ``(batch, time, units)`` in processing order,
        ``"output"`` (the layer's ``return_sequences`` output), ``"last_output"``, ``"last_h"``, ``"last_c"``
        of shape ``(batch, units)`` and ``"mask"`` ``(batch, time)`` in processing order.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> r = lstm(rng.normal(size=(2, 3, 5)), rng.normal(size=(5, 8)), rng.normal(size=(2, 8)), np.zeros(8))
        >>> r["c"].shape, bool(np.allclose(r["output"], r["h"]))
        ((2, 3, 2), True)
    """
    x = _prepare_sequence(x, 3, "LSTM")
    batch, time, features = x.shape
    w = _as_float(kernel, "LSTM kernel")
    if w.ndim != 2 or w.shape[0] != features or w.shape[1] % 4:
        raise ValueError(f"LSTM kernel must have shape ({features}, 4 * units). Received: shape={w.shape}")
    units = w.shape[1] // 4
    u = _as_float(recurrent_kernel, "LSTM recurrent_kernel")
    _check_2d("LSTM recurrent_kernel", u, (units, 4 * units))
    b = np.zeros(4 * units) if bias is None else _as_float(bias, "LSTM bias")
    _check_2d("LSTM bias", b, (4 * units,))
    act = get_activation(activation, flavour)
    rec = get_activation(recurrent_activation, flavour)

    def step(x_t: Array, states: list[Array]) -> tuple[Array, list[Array], dict[str, Array]]:
        h, c = states
        z = x_t @ w + h @ u + b
        zi, zf, zg, zo = np.split(z, 4, axis=-1)
        i, f, g, o = edit("i", rec(zi)), edit("f", rec(zf)), edit("g", act(zg)), edit("o", rec(zo))
        c_new = edit("c", f * c + i * g)
        h_new = edit("h", o * act(c_new))
        return h_new, [h_new, c_new], {"i": i, "f": f, "g": g, "o": o}

    edit = _Editor(interventions, batch, time)
    states = _initial_states(initial_state, [(batch, units)] * 2, ["h", "c"])
    return _recur(
        x,
        step,
        states,
        ["h", "c"],
        ["i", "f", "g", "o"],
        mask=_check_mask(mask, batch, time),
        go_backwards=go_backwards,
        zero_output_for_mask=zero_output_for_mask,
        masked_output=masked_output,
        editor=edit,
    )


def gru(
    x: Any,
    kernel: Any,
    recurrent_kernel: Any,
    bias: Any = None,
    *,
    reset_after: bool = True,
    mask: Any = None,
    go_backwards: bool = False,
    initial_state: Any = None,
    activation: str | None = "tanh",
    recurrent_activation: str | None = "sigmoid",
    flavour: Flavour = "keras3",
    zero_output_for_mask: bool = False,
    masked_output: str = "previous",
    interventions: Sequence[dict] | None = None,
) -> dict[str, Array]:
    """Run a Keras ``GRU`` layer in NumPy, keeping the state, both gates and the candidate at every step.

    Columns hold z (update), r (reset), n (candidate, Keras' "h") in that order.
    ``z = ra(x W_z + b_z [+ h U_z + b_rz])``, ``r`` likewise; with ``reset_after=True`` (bias ``(2, 3 * units)``:
    input bias, then recurrent bias) ``n = a(x W_n + b_in + r * (h U_n + b_rn))``; with ``reset_after=False``
    (bias ``(3 * units,)``, no recurrent bias) ``n = a(x W_n + b_n + (r * h) U_n)``.
    Then ``h = z * h_prev + (1 - z) * n``.

    Args:
        x: Input of shape ``(batch, time, features)``.
        kernel: ``(features, 3 * units)``.
        recurrent_kernel: ``(units, 3 * units)``.
        bias: ``(2, 3 * units)`` if ``reset_after`` else ``(3 * units,)``; ``None`` for ``use_bias=False``.
        reset_after: Keras' ``reset_after`` (default ``True`` in both flavours).
        mask: Optional ``(batch, time)`` bool mask in input time order.
        go_backwards: Process the input in reverse time order.
        initial_state: Optional ``h0`` (or ``[h0]``) of shape ``(batch, units)``.
        activation: Keras name of the activation.
        recurrent_activation: Keras name of the recurrent activation.
        flavour: ``"keras3"`` or ``"tfkeras"``.
        zero_output_for_mask: Zero ``"output"`` on masked steps instead of repeating the previous output.
        masked_output: ``"previous"`` (the previous output, TensorFlow and torch) or ``"state0"`` (the
            carried first state, Keras 3 on JAX) on masked steps; the states are the same either way.
        interventions: Edits applied inside the step (see ``_Editor``): each a dict with ``quantity``, ``units``,
            ``steps`` ((batch, time) bool, input time order), ``kind`` and its constants.

    Returns:
        A dict with ``"h", "z", "r", "n"`` ``(batch, time, units)`` in processing order, ``"output"``,
        ``"last_output"``, ``"last_h"`` and ``"mask"``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> r = gru(rng.normal(size=(2, 3, 5)), rng.normal(size=(5, 6)), rng.normal(size=(2, 6)), np.zeros((2, 6)))
        >>> r["n"].shape
        (2, 3, 2)
    """
    x = _prepare_sequence(x, 3, "GRU")
    batch, time, features = x.shape
    w = _as_float(kernel, "GRU kernel")
    if w.ndim != 2 or w.shape[0] != features or w.shape[1] % 3:
        raise ValueError(f"GRU kernel must have shape ({features}, 3 * units). Received: shape={w.shape}")
    units = w.shape[1] // 3
    u = _as_float(recurrent_kernel, "GRU recurrent_kernel")
    _check_2d("GRU recurrent_kernel", u, (units, 3 * units))
    if reset_after:
        b = np.zeros((2, 3 * units)) if bias is None else _as_float(bias, "GRU bias")
        _check_2d("GRU bias (reset_after=True)", b, (2, 3 * units))
        b_in, b_rec = b[0], b[1]
    else:
        b_in = np.zeros(3 * units) if bias is None else _as_float(bias, "GRU bias")
        _check_2d("GRU bias (reset_after=False)", b_in, (3 * units,))
        b_rec = None
    act = get_activation(activation, flavour)
    rec = get_activation(recurrent_activation, flavour)

    def step(x_t: Array, states: list[Array]) -> tuple[Array, list[Array], dict[str, Array]]:
        (h,) = states
        xz, xr, xn = np.split(x_t @ w + b_in, 3, axis=-1)
        if reset_after:
            hz, hr, hn = np.split(h @ u + b_rec, 3, axis=-1)
        else:
            hz, hr = np.split(h @ u[:, : 2 * units], 2, axis=-1)
        z = edit("z", rec(xz + hz))
        r = edit("r", rec(xr + hr))
        n = edit("n", act(xn + r * hn) if reset_after else act(xn + (r * h) @ u[:, 2 * units :]))
        h_new = edit("h", z * h + (1.0 - z) * n)
        return h_new, [h_new], {"z": z, "r": r, "n": n}

    edit = _Editor(interventions, batch, time)
    states = _initial_states(initial_state, [(batch, units)], ["h"])
    return _recur(
        x,
        step,
        states,
        ["h"],
        ["z", "r", "n"],
        mask=_check_mask(mask, batch, time),
        go_backwards=go_backwards,
        zero_output_for_mask=zero_output_for_mask,
        masked_output=masked_output,
        editor=edit,
    )


def simple_rnn(
    x: Any,
    kernel: Any,
    recurrent_kernel: Any,
    bias: Any = None,
    *,
    mask: Any = None,
    go_backwards: bool = False,
    initial_state: Any = None,
    activation: str | None = "tanh",
    flavour: Flavour = "keras3",
    zero_output_for_mask: bool = False,
    masked_output: str = "previous",
    interventions: Sequence[dict] | None = None,
) -> dict[str, Array]:
    """Run a Keras ``SimpleRNN`` layer in NumPy: ``h = activation(x_t @ kernel + h @ recurrent_kernel + bias)``.

    Args:
        x: Input of shape ``(batch, time, features)``.
        kernel: ``(features, units)``.
        recurrent_kernel: ``(units, units)``.
        bias: ``(units,)`` or ``None``.
        mask: Optional ``(batch, time)`` bool mask in input time order.
        go_backwards: Process the input in reverse time order.
        initial_state: Optional ``h0`` (or ``[h0]``) of shape ``(batch, units)``.
        activation: Keras name of the activation.
        flavour: ``"keras3"`` or ``"tfkeras"``.
        zero_output_for_mask: Zero ``"output"`` on masked steps instead of repeating the previous output.
        masked_output: ``"previous"`` (the previous output, TensorFlow and torch) or ``"state0"`` (the
            carried first state, Keras 3 on JAX) on masked steps; the states are the same either way.
        interventions: Edits applied inside the step (see ``_Editor``): each a dict with ``quantity``, ``units``,
            ``steps`` ((batch, time) bool, input time order), ``kind`` and its constants.

    Returns:
        A dict with ``"h"`` ``(batch, time, units)`` in processing order, ``"output"``, ``"last_output"``,
        ``"last_h"`` and ``"mask"``.

    Example:
        >>> r = simple_rnn(np.ones((1, 2, 3)), np.zeros((3, 4)), np.zeros((4, 4)), np.ones(4))
        >>> round(float(r["last_h"][0, 0]), 4)
        0.7616
    """
    x = _prepare_sequence(x, 3, "SimpleRNN")
    batch, time, features = x.shape
    w = _as_float(kernel, "SimpleRNN kernel")
    if w.ndim != 2 or w.shape[0] != features:
        raise ValueError(f"SimpleRNN kernel must have shape ({features}, units). Received: shape={w.shape}")
    units = w.shape[1]
    u = _as_float(recurrent_kernel, "SimpleRNN recurrent_kernel")
    _check_2d("SimpleRNN recurrent_kernel", u, (units, units))
    b = np.zeros(units) if bias is None else _as_float(bias, "SimpleRNN bias")
    _check_2d("SimpleRNN bias", b, (units,))
    act = get_activation(activation, flavour)

    def step(x_t: Array, states: list[Array]) -> tuple[Array, list[Array], dict[str, Array]]:
        h_new = edit("h", act(x_t @ w + states[0] @ u + b))
        return h_new, [h_new], {}

    edit = _Editor(interventions, batch, time)
    states = _initial_states(initial_state, [(batch, units)], ["h"])
    return _recur(
        x,
        step,
        states,
        ["h"],
        [],
        mask=_check_mask(mask, batch, time),
        go_backwards=go_backwards,
        zero_output_for_mask=zero_output_for_mask,
        masked_output=masked_output,
        editor=edit,
    )


# ----------------------------------------------------------------------------------------------------------------
# Convolutional LSTM.
# ----------------------------------------------------------------------------------------------------------------


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    t = tuple(int(a) for a in v)
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints. Received: {v!r}")
    return t  # type: ignore[return-value]


def _pads(size: int, k: int, stride: int, dilation: int, padding: str) -> tuple[int, int, int]:
    """Output size and (before, after) padding along one axis, following TensorFlow's rules."""
    eff = (k - 1) * dilation + 1
    if padding == "valid":
        return max((size - eff) // stride + 1, 0), 0, 0
    out = -(-size // stride)  # ceil
    total = max((out - 1) * stride + eff - size, 0)
    # TensorFlow puts the odd pixel of "same" padding after, not before.
    return out, total // 2, total - total // 2


def conv2d(
    x: Any,
    w: Any,
    *,
    strides: int | Sequence[int] = 1,
    padding: str = "valid",
    dilation_rate: int | Sequence[int] = 1,
) -> Array:
    """Two-dimensional cross-correlation, channels last, with TensorFlow's ``"same"``/``"valid"`` padding.

    Args:
        x: ``(batch, height, width, in_channels)``.
        w: ``(kh, kw, in_channels, out_channels)``.
        strides: Stride, an int or ``(sh, sw)``.
        padding: ``"same"`` or ``"valid"`` (case-insensitive).
        dilation_rate: Dilation, an int or ``(dh, dw)``.

    Returns:
        ``(batch, out_height, out_width, out_channels)`` float64.

    Example:
        >>> conv2d(np.ones((1, 3, 3, 1)), np.ones((3, 3, 1, 1)), padding="same")[0, :, :, 0]
        array([[4., 6., 4.],
               [6., 9., 6.],
               [4., 6., 4.]])
    """
    x = _as_float(x, "conv2d input")
    w = _as_float(w, "conv2d kernel")
    padding = padding.lower()
    if padding not in ("same", "valid"):
        raise ValueError(f"padding must be 'same' or 'valid'. Received: padding={padding!r}")
    if x.ndim != 4 or w.ndim != 4 or x.shape[3] != w.shape[2]:
        raise ValueError(
            f"conv2d expects x (B, H, W, C) and w (kh, kw, C, F) with matching C. "
            f"Received: x.shape={x.shape}, w.shape={w.shape}"
        )
    (sh, sw), (dh, dw) = _pair(strides, "strides"), _pair(dilation_rate, "dilation_rate")
    kh, kw = w.shape[:2]
    oh, ph0, ph1 = _pads(x.shape[1], kh, sh, dh, padding)
    ow, pw0, pw1 = _pads(x.shape[2], kw, sw, dw, padding)
    xp = np.pad(x, ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
    out = np.zeros((x.shape[0], oh, ow, w.shape[3]))
    for a in range(kh):
        for b in range(kw):
            r0, c0 = a * dh, b * dw
            patch = xp[:, r0 : r0 + (oh - 1) * sh + 1 : sh, c0 : c0 + (ow - 1) * sw + 1 : sw, :]
            out += patch @ w[a, b]
    return out


def conv_lstm2d(
    x: Any,
    kernel: Any,
    recurrent_kernel: Any,
    bias: Any = None,
    *,
    padding: str = "valid",
    strides: int | Sequence[int] = 1,
    dilation_rate: int | Sequence[int] = 1,
    mask: Any = None,
    go_backwards: bool = False,
    initial_state: Any = None,
    activation: str | None = "tanh",
    recurrent_activation: str | None = LAYER_DEFAULT,
    flavour: Flavour = "keras3",
    data_format: str = "channels_last",
    zero_output_for_mask: bool = False,
    masked_output: str = "previous",
) -> dict[str, Array]:
    """Run a Keras ``ConvLSTM2D`` layer in NumPy, keeping every state and gate at every step.

    The gates are those of :func:`lstm` with the matrix products replaced by convolutions: the input convolution
    uses the layer's ``strides``, ``padding`` and ``dilation_rate``; the recurrent convolution over ``h`` always
    uses stride 1, ``"same"`` padding and no dilation (``recurrent_conv`` in Keras).

    Args:
        x: ``(batch, time, rows, cols, channels)`` (``(batch, time, channels, rows, cols)`` for channels_first).
        kernel: ``(kh, kw, channels, 4 * filters)``, gate order i, f, g, o along the last axis.
        recurrent_kernel: ``(kh, kw, filters, 4 * filters)``.
        bias: ``(4 * filters,)`` or ``None``.
        padding: ``"valid"`` (Keras' default) or ``"same"`` for the input convolution.
        strides: Input-convolution strides.
        dilation_rate: Input-convolution dilation.
        mask: Optional ``(batch, time)`` bool mask in input time order.
        go_backwards: Process the input in reverse time order.
        initial_state: Optional ``[h0, c0]``, each shaped like one output step.
        activation: Keras name of the activation.
        recurrent_activation: Keras name of the recurrent activation. By default the layer's own default, which
            differs: ``"sigmoid"`` in Keras 3, ``"hard_sigmoid"`` in tf-keras.
        flavour: ``"keras3"`` or ``"tfkeras"``.
        data_format: ``"channels_last"`` or ``"channels_first"``; states come back in the same layout.
        zero_output_for_mask: Zero ``"output"`` on masked steps instead of repeating the previous output.
        masked_output: ``"previous"`` (the previous output, TensorFlow and torch) or ``"state0"`` (the
            carried first state, Keras 3 on JAX) on masked steps; the states are the same either way.

    Returns:
        A dict with ``"h", "c", "i", "f", "g", "o"`` ``(batch, time, rows', cols', filters)`` (channels_last) in
        processing order, ``"output"``, ``"last_output"``, ``"last_h"``, ``"last_c"`` and ``"mask"``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> r = conv_lstm2d(rng.normal(size=(1, 2, 5, 5, 3)), rng.normal(size=(3, 3, 3, 8)),
        ...                 rng.normal(size=(3, 3, 2, 8)), np.zeros(8), padding="valid")
        >>> r["c"].shape
        (1, 2, 3, 3, 2)
    """
    x = _prepare_sequence(x, 5, "ConvLSTM2D")
    if data_format not in ("channels_last", "channels_first"):
        raise ValueError(f"data_format must be 'channels_last' or 'channels_first'. Received: {data_format!r}")
    channels_first = data_format == "channels_first"
    if channels_first:
        x = x.transpose(0, 1, 3, 4, 2)
    batch, time, rows, cols, channels = x.shape
    w = _as_float(kernel, "ConvLSTM2D kernel")
    if w.ndim != 4 or w.shape[2] != channels or w.shape[3] % 4:
        raise ValueError(
            f"ConvLSTM2D kernel must have shape (kh, kw, {channels}, 4 * filters). Received: shape={w.shape}"
        )
    filters = w.shape[3] // 4
    u = _as_float(recurrent_kernel, "ConvLSTM2D recurrent_kernel")
    _check_2d("ConvLSTM2D recurrent_kernel", u, (w.shape[0], w.shape[1], filters, 4 * filters))
    b = np.zeros(4 * filters) if bias is None else _as_float(bias, "ConvLSTM2D bias")
    _check_2d("ConvLSTM2D bias", b, (4 * filters,))
    if recurrent_activation == LAYER_DEFAULT:
        recurrent_activation = "sigmoid" if flavour == "keras3" else "hard_sigmoid"
    act = get_activation(activation, flavour)
    rec = get_activation(recurrent_activation, flavour)
    conv_args = {"strides": strides, "padding": padding, "dilation_rate": dilation_rate}
    (sh, sw), (dh, dw) = _pair(strides, "strides"), _pair(dilation_rate, "dilation_rate")
    out_rows = _pads(rows, w.shape[0], sh, dh, padding.lower())[0]
    out_cols = _pads(cols, w.shape[1], sw, dw, padding.lower())[0]
    state_shape = (batch, out_rows, out_cols, filters)

    def step(x_t: Array, states: list[Array]) -> tuple[Array, list[Array], dict[str, Array]]:
        h, c = states
        z = conv2d(x_t, w, **conv_args) + b + conv2d(h, u, padding="same")
        zi, zf, zg, zo = np.split(z, 4, axis=-1)
        i, f, g, o = rec(zi), rec(zf), act(zg), rec(zo)
        c_new = f * c + i * g
        h_new = o * act(c_new)
        return h_new, [h_new, c_new], {"i": i, "f": f, "g": g, "o": o}

    if initial_state is not None and channels_first:
        if isinstance(initial_state, (list, tuple)):
            initial_state = [np.asarray(s, dtype=np.float64).transpose(0, 2, 3, 1) for s in initial_state]
    states = _initial_states(initial_state, [state_shape] * 2, ["h", "c"])
    result = _recur(
        x,
        step,
        states,
        ["h", "c"],
        ["i", "f", "g", "o"],
        mask=_check_mask(mask, batch, time),
        go_backwards=go_backwards,
        zero_output_for_mask=zero_output_for_mask,
        masked_output=masked_output,
    )
    if channels_first:
        for k, v in result.items():
            if v.ndim == 5:
                result[k] = v.transpose(0, 1, 4, 2, 3)
            elif v.ndim == 4:
                result[k] = v.transpose(0, 3, 1, 2)
    return result


# ----------------------------------------------------------------------------------------------------------------
# A custom cell.
# ----------------------------------------------------------------------------------------------------------------


def counter_cell(
    x: Any,
    w: Any,
    u: Any,
    v: Any,
    p: Any,
    *,
    mask: Any = None,
    go_backwards: bool = False,
    zero_output_for_mask: bool = False,
    masked_output: str = "previous",
) -> dict[str, Array]:
    """Run ``RNN(CounterCell)`` (tests/test_recurrent_layers.py) in NumPy: a custom cell with two flat states.

    ``s = tanh(x_t @ w + s @ u)``, ``k = k + x_t @ v`` (a running sum), ``output = [s, k] @ p``; the states are
    exposed as ``state0`` (s) and ``state1`` (k).

    Args:
        x: Input of shape ``(batch, time, features)``.
        w: ``(features, units)``.
        u: ``(units, units)``.
        v: ``(features, 2)``.
        p: ``(units + 2, units + 1)``.
        mask: Optional ``(batch, time)`` bool mask in input time order.
        go_backwards: Process the input in reverse time order.
        zero_output_for_mask: Zero ``"output"`` on masked steps instead of repeating the previous output.
        masked_output: ``"previous"`` or ``"state0"``, as for :func:`lstm`.

    Returns:
        A dict with ``"state0"`` ``(batch, time, units)``, ``"state1"`` ``(batch, time, 2)`` in processing order,
        ``"output"``, ``"last_output"``, ``"last_state0"``, ``"last_state1"`` and ``"mask"``.

    Example:
        >>> r = counter_cell(np.ones((1, 2, 1)), np.zeros((1, 1)), np.zeros((1, 1)), np.ones((1, 2)), np.ones((3, 2)))
        >>> r["state1"][0, -1].tolist()
        [2.0, 2.0]
    """
    x = _prepare_sequence(x, 3, "CounterCell")
    batch, time, _ = x.shape
    w, u, v, p = (_as_float(a, f"CounterCell {name}") for a, name in zip((w, u, v, p), "wuvp"))
    units = w.shape[1]

    def step(x_t: Array, states: list[Array]) -> tuple[Array, list[Array], dict[str, Array]]:
        s, k = states
        s_new = np.tanh(x_t @ w + s @ u)
        k_new = k + x_t @ v
        return np.concatenate([s_new, k_new], axis=-1) @ p, [s_new, k_new], {}

    return _recur(
        x,
        step,
        [np.zeros((batch, units)), np.zeros((batch, v.shape[1]))],
        ["state0", "state1"],
        [],
        mask=_check_mask(mask, batch, time),
        go_backwards=go_backwards,
        zero_output_for_mask=zero_output_for_mask,
        masked_output=masked_output,
    )
