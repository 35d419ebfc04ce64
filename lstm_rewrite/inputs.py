"""Input stage: what a model takes (name, shape, dtype of each input) and the checks of data against it.

Capture, verification, the CLI and the Beam handler validate every batch here before a model sees
it, so that bad data gets a message naming the input and the fix rather than a framework trace.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DataError

__all__ = ["InputSpec", "input_specs", "validate_batch", "array_rank"]


@dataclass(frozen=True)
class InputSpec:
    """One input of a model: its name, its shape per sequence and its dtype."""

    name: str
    shape: tuple  # without the batch dimension; None = any size
    dtype: np.dtype


def input_specs(model) -> list[InputSpec]:
    """Name, per-sequence shape and dtype of each of ``model``'s inputs, in order.

    Example:
        >>> [s.name for s in input_specs(model)]
        ['tokens']
    """
    specs = []
    for tensor in model.inputs:
        shape = tuple(None if d is None else int(d) for d in tuple(tensor.shape)[1:])
        # tf-keras gives a tf.DType, Keras 3 a name: read either without importing TensorFlow,
        # which a Keras 3 model on another backend does not have.
        dtype = np.dtype(getattr(tensor.dtype, "as_numpy_dtype", tensor.dtype))
        name = str(tensor.name).split(":")[0]
        specs.append(InputSpec(name, shape, dtype))
    return specs


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"array of shape {value.shape} and dtype {value.dtype}"
    return f"{type(value).__name__}"


def _expected(specs: Sequence[InputSpec]) -> str:
    return ", ".join(f"{s.name!r} (batch, {', '.join('?' if d is None else str(d) for d in s.shape)}) {s.dtype}"
                     for s in specs)


def _structure_to_dict(batch, specs: Sequence[InputSpec], where: str) -> dict[str, Any]:
    """Map one batch (array, list/tuple of arrays, dict by input name) onto the model's inputs."""
    names = [s.name for s in specs]
    if isinstance(batch, Mapping):
        unknown = [k for k in batch if k not in names]
        missing = [n for n in names if n not in batch]
        if unknown or missing:
            raise DataError(
                f"The data {where} is a dict whose keys do not match the model's inputs: missing "
                f"{missing}, unknown {unknown}. Use the input names as keys: {names}. "
                f"Received keys: {list(batch)}"
            )
        return {n: batch[n] for n in names}
    if isinstance(batch, (list, tuple)) and len(specs) == 1 and not (
            len(batch) == 1 and array_rank(batch[0]) == len(specs[0].shape) + 1):
        # A single-input model given nested lists: read them as one array.
        return {names[0]: batch}
    if isinstance(batch, (list, tuple)):
        if len(batch) != len(specs):
            raise DataError(
                f"The model takes {len(specs)} input(s) ({_expected(specs)}) but the data {where} holds "
                f"{len(batch)} array(s). Pass one array per input, in this order, or a dict keyed by "
                f"input name. Received: {[_describe(np.asarray(b)) for b in batch]}"
            )
        return dict(zip(names, batch))
    if len(specs) != 1:
        raise DataError(
            f"The model takes {len(specs)} inputs ({_expected(specs)}) but the data {where} is a single "
            f"{_describe(batch)}. Pass a list of arrays in this order or a dict keyed by input name."
        )
    return {names[0]: batch}


def _check_array(name: str, value, spec: InputSpec, where: str) -> np.ndarray:
    """Validate one input array (shape, dtype, finiteness) and cast it to the model's input dtype."""
    if isinstance(value, (str, bytes, os.PathLike)):
        raise DataError(
            f"Input {name!r} {where} is a file name, not an array: load it first (np.load(path) for .npy, "
            f"np.load(path)[key] for .npz). Received: {value!r:.200}"
        )
    try:
        array = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise DataError(
            f"Input {name!r} {where} cannot be read as one array ({exc}). Pad the sequences to a common "
            f"length first. Received: {type(value).__name__}"
        ) from None
    expected_rank = len(spec.shape) + 1
    if array.dtype.kind not in "biuf":
        raise DataError(
            f"Input {name!r} {where} has dtype {array.dtype}; the model expects numbers ({spec.dtype}). "
            f"Convert text to token ids first. Received: {_describe(array)}"
        )
    if array.ndim != expected_rank:
        raise DataError(
            f"Input {name!r} {where} has {array.ndim} dimension(s); the model expects {expected_rank} "
            f"(batch, {', '.join('?' if d is None else str(d) for d in spec.shape)}). Check that the "
            f"data is not missing or carrying an extra axis. Received: {_describe(array)}"
        )
    for axis, (want, got) in enumerate(zip(spec.shape, array.shape[1:]), start=1):
        if want is not None and want != got:
            raise DataError(
                f"Input {name!r} {where} has size {got} on axis {axis}; the model expects {want}. "
                f"Expected (batch, {', '.join('?' if d is None else str(d) for d in spec.shape)}). "
                f"Received: {_describe(array)}"
            )
    if array.size == 0:
        raise DataError(
            f"Input {name!r} {where} is empty: pass at least one sequence of at least one step. "
            f"Received: {_describe(array)}"
        )
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            bad = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise DataError(
                f"Input {name!r} {where} contains NaN or Inf (first at index {bad}). Clean or impute "
                f"the data first: a NaN input makes every state after it NaN, and NaN outputs would "
                f"\"agree\" in a comparison. Received: {_describe(array)}"
            )
        if spec.dtype.kind in "iub" and not np.array_equal(array, np.round(array)):
            raise DataError(
                f"Input {name!r} {where} holds fractional values but the model expects integer ids "
                f"({spec.dtype}). Pass token ids, not embeddings or probabilities. "
                f"Received: {_describe(array)}"
            )
    return array.astype(spec.dtype, copy=False)


def validate_batch(batch, specs: Sequence[InputSpec], where: str) -> dict[str, np.ndarray]:
    """Check one batch against ``specs`` (count, rank, sizes, dtype, empty, NaN/Inf) and return
    ``{input name: array}`` in the model's dtypes; ``where`` places the data in messages.

    Raises:
        DataError: naming the input, what was expected and what was received.
    """
    arrays = _structure_to_dict(batch, specs, where)
    checked = {s.name: _check_array(s.name, arrays[s.name], s, where) for s in specs}
    sizes = {n: a.shape[0] for n, a in checked.items()}
    if len(set(sizes.values())) > 1:
        raise DataError(
            f"The inputs {where} hold different numbers of sequences: {sizes}. Every input needs one "
            f"row per sequence."
        )
    return checked


def array_rank(value) -> int | None:
    """The number of axes of an array or tensor spec; None when unknown or not array-like."""
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    try:
        return len(shape)
    except TypeError:  # unknown rank
        return None
