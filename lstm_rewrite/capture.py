"""Capture stage: run a traced model over a data set and collect its cell states, in memory or streamed to HDF5.

The rewrite (``expose_cell_states``) turns states into model outputs; this module feeds data through
that model batch by batch and gathers the state outputs as ``(sequences, time, units)`` arrays, with
the masks of padded sequences. With ``out="states.h5"`` every batch goes straight to disk, so the
memory used does not grow with the number of sequences.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import backends
from .errors import DataError, InvalidArgumentError, UnsupportedModelError
from .inputs import InputSpec, array_rank, input_specs, validate_batch
from .rewrite.record import record_of

__all__ = ["StateBatch", "CellStates", "iter_state_batches", "cell_states", "FILE_FORMAT"]

# Written to the root of every states file, so that `CellStates.open` can refuse foreign files.
FILE_FORMAT = "lstm_rewrite.cell_states"
FILE_FORMAT_VERSION = 1

# Target size of one HDF5 chunk: large enough for gzip to pay off, small enough to read a few
# sequences without decompressing megabytes.
_CHUNK_BYTES = 256 * 1024


@dataclass
class StateBatch:
    """The states of one batch of sequences.

    Attributes:
        states: output name (e.g. ``"encoder.c"``) -> array ``(batch, time, units)``, float32.
        mask: layer prefix (e.g. ``"encoder"``) -> array ``(batch, time)``, float32, 1.0 = valid
            step, in the time order of that layer's states; ``None`` where the layer receives no mask.
    """

    states: dict[str, np.ndarray]
    mask: dict[str, np.ndarray | None] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Number of sequences in the batch."""
        return next(iter(self.states.values())).shape[0] if self.states else 0


# --------------------------------------------------------------------------------------------
# Input data: normalise every accepted form to a stream of {input name: array} batches.
# --------------------------------------------------------------------------------------------


def _split_inputs(element, specs: Sequence[InputSpec]):
    """Drop targets from a Keras-style ``(x, y)`` or ``(x, y, sample_weight)`` element."""
    if isinstance(element, tuple) and len(element) in (2, 3) and not (
        len(specs) == len(element) and all(array_rank(e) == len(s.shape) + 1 or array_rank(e) == len(s.shape)
                                           for e, s in zip(element, specs))
    ):
        return element[0]
    return element


def _dataset_is_batched(element_spec, specs: Sequence[InputSpec]) -> bool:
    spec = _split_inputs(element_spec, specs)
    first = spec if not isinstance(spec, (Mapping, list, tuple)) else (
        next(iter(spec.values())) if isinstance(spec, Mapping) else spec[0])
    name = specs[0].name if isinstance(spec, Mapping) else None
    ref = next((s for s in specs if s.name == name), specs[0])
    rank = array_rank(first)
    if rank == len(ref.shape) + 1:
        return True
    if rank == len(ref.shape):
        return False
    raise DataError(
        f"The tf.data.Dataset yields elements of rank {rank} for input {ref.name!r}; the model expects "
        f"rank {len(ref.shape)} per sequence or {len(ref.shape) + 1} per batch. "
        f"Received element_spec: {element_spec}"
    )


class _Batches:
    """Iterable over validated batches ``{input name: array}``, with a length when it is known.

    ``backend`` (of the model's flavour) reads a ``tf.data.Dataset``; every other form is NumPy's.
    """

    def __init__(self, data, specs: Sequence[InputSpec], batch_size: int, backend):
        self.specs = specs
        self.total: int | None = None  # number of sequences, when known up front
        if backend.is_dataset(data):
            self._batches, elements = backend.dataset_batches(
                data, batch_size, lambda element_spec: _dataset_is_batched(element_spec, specs))
            self._source = lambda: (_split_inputs(e, specs) for e in elements())
            self._kind = "batch"
        elif isinstance(data, (np.ndarray, Mapping, list, tuple, str, bytes, os.PathLike)) or hasattr(data, "__array__"):
            arrays = validate_batch(data, specs, "passed as data")
            self.total = next(iter(arrays.values())).shape[0]
            self._batches = math.ceil(self.total / batch_size)
            self._source = lambda: ({n: a[i:i + batch_size] for n, a in arrays.items()}
                                    for i in range(0, self.total, batch_size))
            self._kind = "checked"
        elif isinstance(data, Iterable):
            iterator = iter(data)
            self._batches = None
            self._source = lambda: (_split_inputs(e, specs) for e in iterator)
            self._kind = "batch"
        else:
            raise DataError(
                f"Cannot read data of type {type(data).__name__}: pass a NumPy array, a list or dict of "
                f"arrays (one per input: {[s.name for s in specs]}), a tf.data.Dataset, or a generator "
                f"of batches. Received: {data!r:.200}"
            )

    @property
    def num_batches(self) -> int | None:
        return self._batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        seen = 0
        for index, batch in enumerate(self._source()):
            if self._kind == "checked":
                yield batch
                continue
            arrays = validate_batch(batch, self.specs, f"in batch {index}")
            seen += 1
            yield arrays
        if self._kind == "batch" and seen == 0:
            raise DataError(
                "The data yielded no batch: pass at least one sequence. Received: an empty "
                "dataset or generator (a generator can only be read once)."
            )


# --------------------------------------------------------------------------------------------
# Running the traced model.
# --------------------------------------------------------------------------------------------


def _quantities(states) -> tuple[str, ...]:
    from .naming import parse_states

    return parse_states(states)


def _select_exposed(record, states, layers) -> list:
    """The exposed outputs of an already traced model that ``states``/``layers`` ask for."""
    exposed = list(record.exposed)
    if states is not None:
        # Each requested item must name something exposed; "gates" names whatever gates exist.
        available = {e.quantity for e in exposed}
        wanted, missing = set(), []
        for item in [states] if isinstance(states, str) else list(states):
            hit = set(_quantities(item)) & available
            if not hit:
                missing.append(item)
            wanted |= hit
        if missing:
            raise InvalidArgumentError(
                f"The traced model exposes {sorted({e.quantity for e in exposed})} but states="
                f"{tuple(states)!r} asks for {missing}. Pass the original model to trace it again, or "
                f"ask for exposed quantities only. Received: states={states!r}"
            )
        exposed = [e for e in exposed if e.quantity in wanted]
    if layers is not None:
        if callable(layers):
            raise InvalidArgumentError(
                "A predicate selector needs the layers themselves: pass the original model, or select "
                f"the layers of an already traced model by name. Received: layers={layers!r}"
            )
        names = [layers] if isinstance(layers, str) else list(layers)
        known = sorted({e.layer for e in exposed})

        def matches(prefix: str, name: str) -> bool:
            return prefix == name or prefix.startswith(name + ".")

        unknown = [n for n in names if not any(matches(p, n) for p in known)]
        if unknown:
            raise InvalidArgumentError(
                f"The traced model exposes no layer named {unknown}; exposed layers: {known}. "
                f"Received: layers={layers!r}"
            )
        exposed = [e for e in exposed if any(matches(e.layer, n) for n in names)]
    return exposed


def _trace(model_or_traced, states, layers):
    """Return (traced model, exposed outputs, {layer prefix: mask output name or None}, reversed)."""
    record = record_of(model_or_traced)
    if record is not None:
        traced = model_or_traced
        exposed = _select_exposed(record, states, layers)
    else:
        from .api import expose_cell_states

        traced = expose_cell_states(
            model_or_traced,
            states=_quantities(states if states is not None else ("c",)),
            layers=layers,
            expose_masks=True,
        )
        record = traced.rewrite_record
        exposed = list(record.exposed)
    record_masks = dict(getattr(record, "masks", None) or {})
    masks = {}
    for e in exposed:
        masks.setdefault(e.layer, _by_prefix(record_masks, e.layer))
    reversed_layers = {e.layer: e.reversed for e in exposed}
    return traced, exposed, masks, reversed_layers


def _by_prefix(mapping: Mapping[str, Any], layer: str):
    """The entry for ``layer`` or for the closest call site that contains it: the cells of a
    stacked RNN (``stack.cell1``) share the mask and direction of their call (``stack``)."""
    while True:
        if layer in mapping:
            return mapping[layer]
        if "." not in layer:
            return None
        layer = layer.rsplit(".", 1)[0]


def _runner(traced, output_names: list[str]) -> Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]:
    """A compiled function from ``{input name: array}`` to the named outputs, in that order."""
    all_names = list(traced.output_names)
    missing = [n for n in output_names if n not in all_names]
    if missing:
        raise InvalidArgumentError(
            f"The traced model has no output named {missing}; its outputs are {all_names}. Was it "
            f"reloaded or edited after tracing? Trace the original model again."
        )
    specs = input_specs(traced)
    input_names = [s.name for s in specs]

    def make():
        backend = backends.for_model(traced)
        sub = backend.make_model(traced.inputs, [traced.outputs[all_names.index(n)] for n in output_names])
        return backend.compiled_predict(sub, [((None, *s.shape), s.dtype) for s in specs])

    run = backends.cached_on_model(traced, ("capture", tuple(output_names)), make)

    def call(arrays: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return run([arrays[n] for n in input_names])

    return call


def _progress_bar(enabled: bool, total: int | None, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="seq", desc=desc, leave=False)


def _iter(model_or_traced, data, states, layers, batch_size, progress):
    """Shared by the public functions: yields (batch, exposed, masks) and keeps the progress bar."""
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be a positive integer. Received: batch_size={batch_size!r}")
    # Validate the data against the model's own inputs before paying for the rewrite.
    try:
        specs = input_specs(model_or_traced)
        backend = backends.for_model(model_or_traced)
    except (AttributeError, ValueError, TypeError, UnsupportedModelError):
        specs = None  # unbuilt or unusual model: the rewrite explains what is wrong with it
    batches = None if specs is None else _Batches(data, specs, int(batch_size), backend)
    traced, exposed, masks, reversed_layers = _trace(model_or_traced, states, layers)
    if batches is None:
        specs = input_specs(traced)
        batches = _Batches(data, specs, int(batch_size), backends.for_model(traced))
    state_names = [e.name for e in exposed]
    mask_names = [m for m in dict.fromkeys(masks.values()) if m is not None]
    run = _runner(traced, state_names + mask_names)
    with _progress_bar(progress, batches.total, "cell states") as bar:
        for arrays in batches:
            values = run(arrays)
            named = dict(zip(state_names + mask_names, values))
            batch = StateBatch(
                states={n: np.asarray(named[n], dtype=np.float32) for n in state_names},
                mask={p: (None if m is None else np.asarray(named[m], dtype=np.float32))
                      for p, m in masks.items()},
            )
            bar.update(batch.size)
            yield batch, exposed, traced, reversed_layers


def iter_state_batches(
    model_or_traced,
    data,
    *,
    states: Sequence[str] | str | None = None,
    layers=None,
    batch_size: int = 32,
    progress: bool = True,
) -> Iterator[StateBatch]:
    """Run a model batch by batch and yield the states of each batch.

    Args:
        model_or_traced: a Keras 3 or tf-keras model, which is traced here with
            ``expose_cell_states(..., expose_masks=True)``, or a model already returned by
            ``expose_cell_states`` (recognised by its ``rewrite_record``); for the latter ``states``
            and ``layers`` pick among the outputs it exposes.
        data: a NumPy array (single-input model); a list of arrays in ``model.inputs`` order or a
            dict keyed by input name (multi-input model); a ``tf.data.Dataset`` whose elements are
            single sequences (batched here by ``batch_size``) or batches (used as they are), with
            Keras-style ``(x, y)`` elements reduced to ``x``; or any other iterable/generator of
            batches in one of the array forms above. Arrays are validated before anything runs,
            streamed batches as they arrive.
        states: quantities to expose: ``"c"``, ``"h"``, ``"i"``, ``"f"``, ``"g"``, ``"o"`` or
            ``"gates"``. ``None``: ``("c",)`` for a model, everything it exposes for a traced model.
        layers: which recurrent layers: a name, a list of names or a predicate (see
            ``expose_cell_states``); ``None`` = all.
        batch_size: sequences per batch for arrays and unbatched datasets.
        progress: show a tqdm progress bar on stderr.

    Yields:
        StateBatch: ``states`` maps output names (``"encoder.c"``) to float32 arrays
        ``(batch, time, units)``; ``mask`` maps layer prefixes (``"encoder"``) to ``(batch, time)``
        float32 masks (1.0 = valid step) or ``None`` for layers that receive no mask.

    Raises:
        DataError: the data does not fit the model (number of inputs, shape, dtype, NaN/Inf, empty).
        InvalidArgumentError: bad ``states``, ``layers`` or ``batch_size``.

    Example:
        >>> for batch in iter_state_batches(model, x, states=("c",), batch_size=64, progress=False):
        ...     running_max = np.maximum(running_max, batch.states["encoder.c"].max(axis=(0, 1)))
    """
    for batch, *_ in _iter(model_or_traced, data, states, layers, batch_size, progress):
        yield batch


# --------------------------------------------------------------------------------------------
# Collected states.
# --------------------------------------------------------------------------------------------


def _exposed_info(e, reversed_layers: Mapping[str, bool | None]) -> dict[str, Any]:
    shape = getattr(e, "shape", None)
    return {"layer": e.layer, "quantity": e.quantity, "layer_class": getattr(e, "layer_class", None),
            "units": None if getattr(e, "units", None) is None else int(e.units),
            "shape": None if not shape else [int(d) for d in shape],
            "reversed": reversed_layers.get(e.layer),
            # The record's one name for it; "reversed" stays for readers of earlier files.
            "time_order": getattr(e, "time_order", None)}


class CellStates(Mapping):
    """Captured states: a read-only mapping from output name to an array ``(sequences, time, units)``.

    In memory the values are NumPy arrays; read from a states file (``out=`` or ``CellStates.open``)
    they are ``h5py.Dataset`` objects that read lazily when sliced (``cs["encoder.c"][:10]``) or
    converted (``np.asarray(cs["encoder.c"])``).

    Attributes:
        masks: layer prefix -> ``(sequences, time)`` float32 mask (1.0 = valid step, in the time
            order of that layer's states) or ``None`` where every step is valid.
        lengths: layer prefix -> ``(sequences,)`` int32 number of valid steps.
        exposed: output name -> ``{"layer", "quantity", "layer_class", "units", "shape",
            "reversed", "time_order"}`` (``shape``: one step's shape, e.g. ``[rows, cols,
            filters]`` for ConvLSTM2D); ``time_order`` is the record's (``"forward"``,
            ``"go_backwards"``, ``"backward_aligned"``); ``reversed`` is true for a ``go_backwards``
            LSTM, whose time axis (and mask) runs from the last input step to the first, false
            when the axis follows the input, ``None`` when unknown (files written before the
            record kept time orders).
        config: how the states were captured (states, layers, batch size, model name, flavour).
        path: the HDF5 file backing the values, or ``None`` in memory.
    """

    def __init__(self, arrays, masks, lengths, exposed, config, file=None):
        self._arrays = dict(arrays)
        self.masks = dict(masks)
        self.lengths = dict(lengths)
        self.exposed = dict(exposed)
        self.config = dict(config)
        self._file = file
        self.path = None if file is None else file.filename

    def __getitem__(self, name: str):
        try:
            return self._arrays[name]
        except KeyError:
            raise KeyError(f"No states named {name!r}; captured: {list(self._arrays)}") from None

    def __iter__(self):
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    @property
    def num_sequences(self) -> int:
        """Number of captured sequences."""
        return int(next(iter(self._arrays.values())).shape[0]) if self._arrays else 0

    def layer_of(self, name: str) -> str:
        """The layer prefix of an output name, e.g. ``"bi.forward"`` for ``"bi.forward.c"``."""
        return self.exposed[name]["layer"]

    def mask_for(self, name: str):
        """The mask that goes with the states ``name`` (``None`` when every step is valid)."""
        return self.masks.get(self.layer_of(name))

    def close(self) -> None:
        """Close the backing file (no-op in memory); the values become unreadable."""
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "CellStates":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        shapes = {n: tuple(a.shape) for n, a in self._arrays.items()} if (
            self._file is None or self._file.id.valid) else "closed"
        where = f", path={self.path!r}" if self.path else ""
        return f"CellStates({shapes}{where})"

    @classmethod
    def open(cls, path: str | os.PathLike) -> "CellStates":
        """Open a states file written by ``cell_states(..., out=path)`` for lazy reading.

        Example:
            >>> with CellStates.open("states.h5") as cs:
            ...     first = cs["encoder.c"][0]
        """
        import h5py

        from .errors import ModelFileError

        path = os.fspath(path)
        try:
            handle = h5py.File(path, "r")
        except (OSError, ValueError) as exc:
            raise ModelFileError(
                f"Cannot open states file {path!r} ({exc}). Pass a file written by "
                f"`cell_states(..., out=...)` or `lstm-rewrite states`."
            ) from None
        if handle.attrs.get("format") != FILE_FORMAT:
            handle.close()
            raise ModelFileError(
                f"{path!r} is an HDF5 file but not a states file written by lstm_rewrite (no "
                f"format={FILE_FORMAT!r} attribute). Write one with `cell_states(..., out=...)`."
            )
        # An index written by lstm_rewrite.beam reads its shards through virtual datasets, which
        # would silently read zeros for a shard that is missing.
        shards = json.loads(handle.attrs.get("shards", "[]"))
        missing = [s for s in shards if not os.path.isfile(os.path.join(os.path.dirname(path), s))]
        if missing:
            handle.close()
            raise ModelFileError(
                f"The states index {path!r} reads {len(shards)} shard file(s) but {len(missing)} are missing "
                f"beside it, first {missing[0]!r}. Keep (or download) the index together with its shards "
                f"directory. Received: {path!r}"
            )
        exposed = json.loads(handle.attrs["exposed"])
        mask_paths = json.loads(handle.attrs["masks"])
        arrays = {name: handle["states"][name] for name in json.loads(handle.attrs["names"])}
        masks = {p: (None if m is None else handle[m]) for p, m in mask_paths.items()}
        lengths = {p: handle["lengths"][p][()] for p in mask_paths}
        return cls(arrays, masks, lengths, exposed, json.loads(handle.attrs["config"]), file=handle)


# --------------------------------------------------------------------------------------------
# Sinks: where the batches go.
# --------------------------------------------------------------------------------------------


def _pad_time(array: np.ndarray, steps: int) -> np.ndarray:
    if array.shape[1] == steps:
        return array
    pad = [(0, 0)] * array.ndim
    pad[1] = (0, steps - array.shape[1])
    return np.pad(array, pad)


class _MemorySink:
    """Keeps every batch; pads to the longest batch when sequence lengths differ."""

    def __init__(self):
        self._states: dict[str, list[np.ndarray]] = {}
        self._masks: dict[str, list[np.ndarray | None]] = {}
        self._steps: list[int] = []

    def append(self, batch: StateBatch) -> None:
        for name, value in batch.states.items():
            self._states.setdefault(name, []).append(value)
        for prefix, mask in batch.mask.items():
            self._masks.setdefault(prefix, []).append(mask)
        self._steps.append(next(iter(batch.states.values())).shape[1])

    def finish(self, exposed, config) -> CellStates:
        steps = max(self._steps)
        ragged = len(set(self._steps)) > 1
        arrays = {n: np.concatenate([_pad_time(v, steps) for v in vs]) for n, vs in self._states.items()}
        masks, lengths = {}, {}
        for prefix, parts in self._masks.items():
            if all(m is None for m in parts) and not ragged:
                masks[prefix] = None
                lengths[prefix] = np.full(sum(self._sizes()), steps, dtype=np.int32)
                continue
            full = [np.ones((n, t), np.float32) if m is None else m
                    for m, n, t in zip(parts, self._sizes(), self._steps)]
            masks[prefix] = np.concatenate([_pad_time(m, steps) for m in full]).astype(np.float32)
            lengths[prefix] = masks[prefix].sum(axis=1).astype(np.int32)
        return CellStates(arrays, masks, lengths, exposed, config)

    def _sizes(self) -> list[int]:
        first = next(iter(self._states.values()))
        return [v.shape[0] for v in first]

    def abort(self) -> None:
        self._states.clear()


class _H5Sink:
    """Appends each batch to resizable, chunked HDF5 datasets in a temporary file next to ``path``.

    The file only takes its final name in ``finish``; ``abort`` removes it, so a failed capture never
    leaves a partial file that looks complete.
    """

    def __init__(self, path: str, compression: str | None):
        import h5py

        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise InvalidArgumentError(
                f"Cannot write states to {path!r}: the directory {directory!r} does not exist. Create it "
                f"first or pick another path. Received: out={path!r}"
            )
        if os.path.isdir(path):
            raise InvalidArgumentError(
                f"Cannot write states to {path!r}: it is a directory. Pass a file name such as "
                f"{os.path.join(path, 'states.h5')!r}. Received: out={path!r}"
            )
        self.tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.partial")
        self.compression = compression
        try:
            self.file = h5py.File(self.tmp, "w")
        except OSError as error:  # h5py names only the temporary file
            raise OSError(error.errno, f"Cannot write states to {path!r}: {error}. Pick a writable path for out=.") from error
        self.rows = 0
        self.steps = 0  # current time dimension of every dataset
        self._mask_prefixes: list[str] = []
        self._has_mask: dict[str, bool] = {}

    @staticmethod
    def _chunks(steps: int, step_shape: tuple) -> tuple:
        """Chunks of about _CHUNK_BYTES: whole sequences when they fit, else slices of steps."""
        step_bytes = int(np.prod(step_shape, dtype=np.int64)) * 4 if step_shape else 4
        if steps * step_bytes <= _CHUNK_BYTES:
            return (max(1, _CHUNK_BYTES // (steps * step_bytes)), steps, *step_shape)
        return (1, max(1, min(steps, _CHUNK_BYTES // step_bytes)), *step_shape)

    def _create(self, group: str, name: str, steps: int, step_shape: tuple = ()):
        """A resizable float32 dataset ``(0, steps, *step_shape)``; rows and steps can grow."""
        return self.file.require_group(group).create_dataset(
            name, shape=(0, steps, *step_shape), maxshape=(None, None, *step_shape), dtype="float32",
            chunks=self._chunks(steps, step_shape), compression=self.compression, fillvalue=0,
        )

    def _add_mask(self, prefix: str) -> None:
        """Start a mask for a layer that had none: every step written so far was valid."""
        dataset = self._create("masks", prefix, self.steps)
        dataset.resize(self.rows, axis=0)
        block = max(1, _CHUNK_BYTES // max(1, self.steps * 4))
        for start in range(0, self.rows, block):
            stop = min(self.rows, start + block)
            dataset[start:stop] = np.ones((stop - start, self.steps), np.float32)
        self._has_mask[prefix] = True

    def append(self, batch: StateBatch) -> None:
        b = batch.size
        steps = next(iter(batch.states.values())).shape[1]
        if self.rows == 0 and not self._has_mask:
            self.steps = steps
            for name, value in batch.states.items():
                self._create("states", name, steps, tuple(value.shape[2:]))
            for prefix, mask in batch.mask.items():
                self._has_mask[prefix] = mask is not None
                if mask is not None:
                    self._create("masks", prefix, steps)
                lengths = self.file.require_group("lengths").create_dataset(
                    prefix, shape=(0,), maxshape=(None,), dtype="int32", chunks=(4096,))
                del lengths
        if steps != self.steps:
            # Sequences of another length: pad to the longest; from now on every layer needs a mask.
            for prefix, has in self._has_mask.items():
                if not has:
                    self._add_mask(prefix)
            if steps > self.steps:
                for group in ("states", "masks"):
                    for dataset in self.file.get(group, {}).values():
                        dataset.resize(steps, axis=1)
                self.steps = steps
        start, stop = self.rows, self.rows + b
        for name, value in batch.states.items():
            dataset = self.file["states"][name]
            dataset.resize(stop, axis=0)
            dataset[start:stop, :steps] = value
        for prefix, mask in batch.mask.items():
            if mask is None:
                mask_value = np.ones((b, steps), np.float32) if self._has_mask[prefix] else None
            else:
                if not self._has_mask[prefix]:
                    self._add_mask(prefix)
                mask_value = mask
            if mask_value is not None:
                dataset = self.file["masks"][prefix]
                dataset.resize(stop, axis=0)
                dataset[start:stop, :steps] = mask_value
                length = mask_value.sum(axis=1)
            else:
                length = np.full(b, steps)
            lengths = self.file["lengths"][prefix]
            lengths.resize(stop, axis=0)
            lengths[start:stop] = length.astype(np.int32)
        self.rows = stop

    def finish(self, exposed, config) -> CellStates:
        attrs = self.file.attrs
        attrs["format"] = FILE_FORMAT
        attrs["format_version"] = FILE_FORMAT_VERSION
        attrs["names"] = json.dumps(list(self.file["states"]))
        attrs["exposed"] = json.dumps(exposed)
        attrs["masks"] = json.dumps({p: (f"masks/{p}" if has else None) for p, has in self._has_mask.items()})
        attrs["config"] = json.dumps(config)
        for name, dataset in self.file["states"].items():
            for key, value in exposed[name].items():
                if value is not None:
                    dataset.attrs[key] = np.asarray(value) if isinstance(value, list) else value
        self.file.close()
        os.replace(self.tmp, self.path)
        return CellStates.open(self.path)

    def abort(self) -> None:
        try:
            self.file.close()
        except Exception:  # already closed or broken by the error that brought us here
            pass
        try:
            os.remove(self.tmp)
        except FileNotFoundError:
            pass


def _describe_layers(layers) -> Any:
    if layers is None or isinstance(layers, str):
        return layers
    if callable(layers):
        return getattr(layers, "__name__", "predicate")
    return list(layers)


def cell_states(
    model,
    data,
    *,
    states: Sequence[str] | str | None = None,
    layers=None,
    batch_size: int = 32,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    compression: str | None = None,
) -> CellStates:
    """Run ``model`` over ``data`` and return every exposed state at every step.

    Args:
        model: a Keras 3 or tf-keras model, or one already traced by ``expose_cell_states``.
        data: a NumPy array, a list/dict of arrays, a ``tf.data.Dataset`` (batched or not) or a
            generator of batches; see ``iter_state_batches`` for the details.
        states: quantities: ``"c"``, ``"h"``, ``"i"``, ``"f"``, ``"g"``, ``"o"``, ``"gates"``.
            ``None``: ``("c",)`` for a model, everything it exposes for a traced model.
        layers: which recurrent layers (name, list of names, predicate); ``None`` = all.
        batch_size: sequences per batch for arrays and unbatched datasets.
        out: ``None`` to keep everything in memory, or the path of an HDF5 file to stream each batch
            to (one chunked, resizable dataset per output under ``states/``, masks under ``masks/``,
            valid lengths under ``lengths/``, names and config as attributes). The file is written
            under a temporary name and renamed at the end; on any error it is removed.
        progress: show a tqdm progress bar on stderr.
        compression: HDF5 compression filter for ``out`` (``"gzip"``, ``"lzf"`` or ``None``). None
            by default: gzip cut capture to about a third of ``predict``'s throughput
            (benchmarks/RESULTS.md), where an uncompressed file keeps up with it.

    Returns:
        CellStates: name -> ``(sequences, time, units)``, e.g. ``cs["encoder.c"]``, plus
        ``cs.masks`` / ``cs.lengths`` per layer. Sequences of different lengths across batches are
        padded at the end to the longest, and the padding is masked. With ``out`` the values are
        read lazily from the file, which stays open until ``cs.close()``.

    Raises:
        DataError: the data does not fit the model.
        InvalidArgumentError: bad ``states``, ``layers``, ``batch_size`` or ``out``.

    Example:
        >>> cs = cell_states(model, x, states=("c", "h"), progress=False)
        >>> cs["encoder.c"].shape
        (100, 20, 16)
        >>> with cell_states(model, x, out="states.h5", progress=False) as cs:
        ...     first = cs["encoder.c"][0]
    """
    sink = _MemorySink() if out is None else _H5Sink(os.fspath(out), compression)
    try:
        exposed, traced, reversed_layers = None, None, {}
        for batch, exposed, traced, reversed_layers in _iter(model, data, states, layers, batch_size, progress):
            sink.append(batch)
        info = {e.name: _exposed_info(e, reversed_layers) for e in exposed}
        config = {
            "states": list(dict.fromkeys(e.quantity for e in exposed)),
            "layers": _describe_layers(layers),
            "batch_size": int(batch_size),
            "model": getattr(traced, "name", None),
            "flavour": backends.flavour_of(traced),
        }
        return sink.finish(info, config)
    except OSError as error:
        sink.abort()
        if out is None:
            raise
        # h5py reports a full disk or a lost mount without the file's name; nothing is left behind.
        raise OSError(
            error.errno,
            f"Writing states to {os.fspath(out)!r} failed: {error}. Nothing was written (the partial "
            f"file was removed); free space or pick another path for out=.",
        ) from error
    except BaseException:
        sink.abort()
        raise
