"""Verification: run the original and the traced model on the same inputs and compare their outputs.

Tolerances: float32 models must agree within ``atol=1e-5, rtol=1e-4``. The traced cell computes
the same equations as the Keras LSTM but may group the matrix products differently, which moves
results by a few float32 ulps per step; 1e-5 leaves room for that over long sequences while still
catching any real difference (a wrong gate, a misaligned step or mask is off by 1e-2 or more).
Models with a float16 or bfloat16 compute dtype get ``atol=rtol=1e-2`` (float16's resolution).
On a GPU, float32 models get ``atol=rtol=2e-3``: cuDNN and the matmuls of Ampere and later GPUs run
in TF32 by default (10-bit mantissa), so the original model itself is only that precise there; a
GPU check measured 1e-4 to 4e-4 between a cuDNN LSTM/GRU and the exact step on short sequences.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from . import backends
from .errors import DataError, VerificationError

FLOAT32_TOLERANCE = (1e-5, 1e-4)  # (atol, rtol)
HALF_TOLERANCE = (1e-2, 1e-2)
GPU_TOLERANCE = (2e-3, 2e-3)
DEFAULT_BATCH = 3
# Four steps run the recurrence past its first step in every sample (the last of three has two
# padded), which is all a wrong gate, weight or mask needs to show; verification runs eagerly, so
# its time grows with the steps (7 steps took 40% longer for a chain of 100 LSTMs).
DEFAULT_TIME = 4


@dataclasses.dataclass(frozen=True)
class OutputComparison:
    """How one original output of the traced model compares with the model's."""

    name: str
    max_abs_diff: float
    atol: float
    rtol: float
    ok: bool


@dataclasses.dataclass
class VerificationReport:
    """Result of `verify`: one comparison per original output."""

    outputs: list
    batch_size: int

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def __str__(self) -> str:
        rows = [f"  {o.name}: max |diff| {o.max_abs_diff:.3g} (atol {o.atol:g}, rtol {o.rtol:g})"
                f" {'ok' if o.ok else 'MISMATCH'}" for o in self.outputs]
        return "\n".join([f"verification on a batch of {self.batch_size}: {'ok' if self.ok else 'FAILED'}", *rows])


def verify(model, traced, inputs=None) -> VerificationReport:
    """Run ``model`` and ``traced`` on ``inputs`` and compare every original output.

    Args:
        model: the original Keras model.
        traced: the model returned by `expose_cell_states` (its first outputs are the original ones).
        inputs: what ``model`` takes (array, list or dict of arrays); synthesized from the input
            specs when None (see `synthesize_inputs`).

    Returns:
        A VerificationReport; ``report.ok`` tells whether every output agreed.

    Example:
        >>> report = verify(model, expose_cell_states(model, verify=False))
        >>> report.ok
        True
    """
    made = None
    if inputs is None:
        inputs, made = _synthesize(model)
    else:
        inputs = checked_inputs(model, inputs)
    saved = _save_states(model) + _save_states(traced)
    try:
        expected = _run(model, inputs, made=made)
        _restore_states(saved)
        actual = _run(traced, inputs, traced_from=model)[: len(expected)]
    finally:
        _restore_states(saved)
    atol, rtol = _tolerance(model)
    names = backends.for_model(model).output_names(model)
    comparisons = []
    for name, want, got in zip(names, expected, actual):
        want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
        if want.shape != got.shape:
            comparisons.append(OutputComparison(name, float("inf"), atol, rtol, False))
            continue
        diff = float(np.max(np.abs(want - got))) if want.size else 0.0
        ok = bool(np.allclose(got, want, atol=atol, rtol=rtol, equal_nan=True))
        comparisons.append(OutputComparison(name, diff, atol, rtol, ok))
    return VerificationReport(comparisons, _batch_size(inputs))


def check(model, traced, inputs=None) -> VerificationReport:
    """`verify`, raising VerificationError naming every output that differs."""
    report = verify(model, traced, inputs)
    if not report.ok:
        bad = [o for o in report.outputs if not o.ok]
        details = "; ".join(f"{o.name!r}: max |diff| {o.max_abs_diff:.3g} > atol {o.atol:g} + rtol {o.rtol:g}"
                            for o in bad)
        subclassed = _subclass_calls(traced)
        if subclassed:
            # The likeliest cause: a subclass's call does more than wrap its parent's (it reads an
            # attribute of its own that the traced layer lacks, say).
            raise VerificationError(
                f"The traced model of {model.name!r} does not reproduce the original outputs: {details}. It runs "
                f"the call of the LSTM/RNN subclass layer(s) {', '.join(subclassed)} over traced layers, and that "
                f"call does not compute the same there. Exclude those layers with layers=[...] naming the other "
                f"recurrent layers, or pass verify=False to get the traced model anyway. "
                f"Received: {', '.join(subclassed)}", report)
        raise VerificationError(
            f"The traced model of {model.name!r} does not reproduce the original outputs: {details}. "
            f"The rewrite does not handle something in this model; please report it with the model's summary. "
            f"Pass verify=False to get the traced model anyway.", report)
    return report


def _subclass_calls(traced) -> list:
    """The layers of ``traced`` that run a user subclass's call (TracedSubclassRNN), as 'name' (Class)."""
    wrapped = backends.for_model(traced).TracedSubclassRNN
    return [f"{layer.name!r} ({layer.subclass.__name__})" for layer in _all_layers(traced)
            if isinstance(layer, wrapped)]


def checked_inputs(model, inputs):
    """Validate caller-supplied verification inputs and arrange them as ``model`` expects.

    The checks are those of `lstm_rewrite.capture.cell_states` (number of arrays, rank, sizes,
    dtype, empty, NaN/Inf), so that a bad batch gets a message naming the input and the fix rather
    than a TensorFlow trace. NaN and Inf are refused because they would make the comparison
    vacuous: a NaN output "agrees" with a NaN output.

    Raises:
        DataError: naming the input, what was expected and what was received.

    Example:
        >>> x = checked_inputs(model, np.zeros((2, 5, 4)))
    """
    from .inputs import input_specs, validate_batch

    specs = input_specs(model)
    arrays = validate_batch(inputs, specs, "passed as sample_inputs")
    fixed = _fixed_batch(list(model.inputs))
    rows = next(iter(arrays.values())).shape[0]
    if fixed is not None and rows != fixed:
        # A stateful model is built for one batch size; Keras' own error names no input.
        raise DataError(
            f"Model {model.name!r} is built for batches of exactly {fixed} sequences (a stateful recurrent "
            f"layer or a fixed batch_shape), but sample_inputs holds {rows}. Pass {fixed} sequences. "
            f"Received: {[f'{n} {tuple(a.shape)}' for n, a in arrays.items()]}"
        )
    return backends.for_model(model).arrange_inputs(model, [arrays[spec.name] for spec in specs])


def synthesize_inputs(model, batch_size: int = DEFAULT_BATCH, time_steps: int = DEFAULT_TIME, seed: int = 0):
    """Make a batch of inputs from ``model``'s input specs.

    An input that feeds an ``Embedding`` (directly, or inside nested models and Sequential
    wrappers) gets token ids in ``[1, input_dim)`` whatever its dtype: Keras 2 text models declare
    their ``Input`` float32 (the Keras 2 default) and cast in the Embedding, which refuses
    negative ids. Other integer inputs get ids in ``[1, 10)``, other floats are standard normal.
    The time axis gets ``time_steps`` where it is None (or the length another input declares,
    since inputs may meet in a merge); every sample but the first has trailing padded steps (id 0,
    which ``Embedding(mask_zero=True)`` masks; the mask value for ``Masking``), so masked paths
    are exercised.

    Example:
        >>> x = synthesize_inputs(model)
    """
    return _synthesize(model, batch_size, time_steps, seed)[0]


def _synthesize(model, batch_size: int = DEFAULT_BATCH, time_steps: int = DEFAULT_TIME, seed: int = 0):
    """`synthesize_inputs`, and per input a note of how it was made (for the error when it does not fit)."""
    backend = backends.for_model(model)
    rng = np.random.default_rng(seed)
    tensors = list(model.inputs)
    batch = _fixed_batch(tensors) or batch_size
    # Every consumer counts: in Keras 3 an Embedding(mask_zero) input also feeds the op that
    # computes its mask, and that op may come first.
    consumers = [_consumers(model, tensor, backend) for tensor in tensors]
    embeddings = [[int(c.input_dim) for c in found if isinstance(c, backend.Embedding)] for found in consumers]
    # Inputs that meet (concatenated, added) need the same length: follow one that declares it.
    time_steps = _declared_time(tensors, [bool(e) for e in embeddings]) or time_steps
    arrays, notes = [], []
    for tensor, found, dims in zip(tensors, consumers, embeddings):
        masking = next((c for c in found if isinstance(c, backend.Masking)), None)
        shape = [batch] + [time_steps if d is None else int(d) for d in list(tensor.shape)[1:]]
        dtype = np.dtype(_dtype_name(tensor.dtype))
        if dims or np.issubdtype(dtype, np.integer) or dtype == np.bool_:
            high = max(min(dims) if dims else 10, 2)
            array = rng.integers(1, high, size=shape).astype(dtype)
            pad = 0
            why = (f"it feeds an Embedding of input_dim {min(dims)}" if dims
                   else "no Embedding consumes it, so its range is a guess")
            note = f"ids in [1, {high}), 0 on padded steps ({why})"
        else:
            array = rng.standard_normal(shape).astype(dtype)
            pad = float(masking.mask_value) if masking is not None else None
            note = ("standard-normal floats" + (f", {pad:g} on padded steps (Masking)" if masking is not None else "")
                    + " (no Embedding consumes it, so nothing says which values it takes)")
        if len(shape) >= 2 and shape[1] > 2 and pad is not None:
            for b in range(1, batch):
                array[b, shape[1] - min(b, shape[1] - 1):] = pad
        arrays.append(array)
        notes.append(f"{_input_name(tensor)!r} {dtype.name} {tuple(shape)}: {note}")
    return backend.arrange_inputs(model, arrays), notes


def _input_name(tensor) -> str:
    history = getattr(tensor, "_keras_history", None)
    operation = getattr(history, "operation", None) or getattr(history, "layer", None)
    return getattr(operation, "name", None) or getattr(tensor, "name", "input")


def _consumers(model, tensor, backend, depth: int = 0) -> list:
    """Every layer that consumes ``tensor`` in ``model``, looking into nested models and Sequential wrappers."""
    functional = backend.functional_of(model) or model
    found = []
    for node, layer, args, kwargs, _, is_input in backend.graph_nodes(functional):
        if is_input:
            continue
        flat = [t for t in backend.flatten((list(args), dict(kwargs))) if backend.is_tensor(t)]
        for position, argument in enumerate(flat):
            if argument is not tensor:
                continue
            found.append(layer)
            inner_inputs = list(getattr(layer, "inputs", None) or []) if backend.is_model(layer) else []
            if position < len(inner_inputs) and depth < 16:
                found += _consumers(layer, inner_inputs[position], backend, depth + 1)
    if not found and functional is not model:
        for inner in functional.inputs:
            return _consumers(functional, inner, backend, depth + 1)
    return found


def _declared_time(tensors, ids=None):
    """The time length an input declares: axis 1 of a sequence (rank >= 3, or ids of rank 2:
    integers, or any dtype where ``ids`` says the input feeds an Embedding)."""
    for k, tensor in enumerate(tensors):
        shape = list(tensor.shape)
        integer = np.issubdtype(np.dtype(_dtype_name(tensor.dtype)), np.integer) or bool(ids and ids[k])
        if len(shape) >= 3 or (len(shape) == 2 and integer):
            if shape[1] is not None:
                return int(shape[1])
    return None


def _fixed_batch(tensors):
    for tensor in tensors:
        if tensor.shape[0] is not None:
            return int(tensor.shape[0])
    return None


def _dtype_name(dtype) -> str:
    return getattr(dtype, "name", None) or str(dtype)


def _run(model, inputs, traced_from=None, made=None) -> list:
    """Run ``model`` on ``inputs``; ``made`` is, for synthesized inputs, how each was made."""
    try:
        outputs = model(inputs, training=False)
    except Exception as error:  # noqa: BLE001 - Keras and TensorFlow raise many types for bad inputs
        if traced_from is not None:
            # The original model ran on these inputs: a traced model that does not is our bug.
            raise VerificationError(
                f"The traced model of {traced_from.name!r} fails on inputs the original model accepts: "
                f"{type(error).__name__}: {_first_line(error)}. This is a bug in lstm_rewrite; please report it "
                f"with the model's summary."
            ) from error
        expects = "; ".join(f"{_input_name(t)!r} {tuple(t.shape)} {_dtype_name(t.dtype)}" for t in model.inputs)
        if made is None:
            raise DataError(
                f"Model {model.name!r} could not run on the verification inputs: {_first_line(error)}. Pass "
                f"sample_inputs= with arrays shaped like the model's inputs ({expects}). "
                f"Received: {_describe(inputs)}"
            ) from error
        # Synthesized inputs follow the input specs; what they cannot know is the values a layer
        # accepts (a vocabulary reached through a cast or a lookup, a range a Lambda assumes).
        raise DataError(
            f"Model {model.name!r} could not run on the inputs lstm_rewrite synthesized for verification from its "
            f"input specs ({expects}): {_first_line(error)}. The specs give shapes and dtypes only, not which "
            f"values the model accepts, and the synthesized values did not fit. Pass sample_inputs= with a few "
            f"real sequences (e.g. token ids from your data), or verify=False to skip the check. "
            f"Received (synthesized): {'; '.join(made)}"
        ) from error
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    to_numpy = backends.for_model(model).to_numpy
    return [np.asarray(to_numpy(o)) for o in outputs]


def _describe(inputs) -> str:
    flat = list(inputs.items()) if isinstance(inputs, dict) else list(enumerate(
        inputs if isinstance(inputs, (list, tuple)) else [inputs]))
    return "; ".join(f"{k!r} {np.asarray(a).dtype} {np.shape(a)}" for k, a in flat)


def _first_line(error) -> str:
    """The gist of a Keras error: without terminal colour codes and the "Arguments received" dump."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Exception encountered when calling")]
    return (lines[0] if lines else type(error).__name__)[:300]


def _tolerance(model):
    for layer in _all_layers(model):
        if str(getattr(layer, "compute_dtype", "float32")) in ("float16", "bfloat16"):
            return HALF_TOLERANCE
    if backends.for_model(model).gpu_visible():
        return GPU_TOLERANCE
    return FLOAT32_TOLERANCE


def _all_layers(model, seen=None):
    """Every layer inside ``model``, at any depth: nested models, wrappers and the traced layers'
    inner RNNs (a TracedBidirectional holds TracedRNNs that hold the stateful RNNs)."""
    seen = set() if seen is None else seen
    for layer in getattr(model, "layers", []):
        yield from _layer_and_inner(layer, seen)


def _layer_and_inner(layer, seen):
    if id(layer) in seen:
        return
    seen.add(id(layer))
    yield layer
    if hasattr(layer, "layers"):
        yield from _all_layers(layer, seen)
    for attr in ("forward_layer", "backward_layer", "layer", "rnn"):
        inner = getattr(layer, attr, None)
        if inner is not None and hasattr(inner, "name") and inner is not layer:
            yield from _layer_and_inner(inner, seen)


def _save_states(model):
    """(variable, value) for every stateful RNN state, so that verification leaves them as they were."""
    saved = []
    for layer in _all_layers(model):
        if getattr(layer, "stateful", False) and getattr(layer, "states", None) is not None:
            for variable in layer.states if isinstance(layer.states, (list, tuple)) else [layer.states]:
                if hasattr(variable, "assign"):
                    saved.append((variable, np.array(backends.for_model(model).to_numpy(variable))))
    return saved


def _restore_states(saved):
    for variable, value in saved:
        variable.assign(value)


def _batch_size(inputs) -> int:
    first = inputs
    while isinstance(first, (list, tuple)):
        first = first[0]
    if isinstance(first, dict):
        first = next(iter(first.values()))
    return int(np.shape(first)[0])
