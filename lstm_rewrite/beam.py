"""Scale-out stage: capture and audit on Apache Beam (``pip install lstm_rewrite[beam]``).

The same stages as on one machine, as Beam transforms:

* ``ReadExamples``: file patterns of ``.npy`` / ``.npz`` shards or TFRecord files of serialized
  ``tf.train.Example`` (with a declared feature spec) -> keyed examples. The key of an example is
  ``(source index, row)``: the source's place among the sorted matched files and the row in it, so
  key order is the order a single machine reads the concatenated files in.
* ``StatesModelHandler`` (a ``RunInference`` model handler) loads the model once per worker
  through ``loading.load_model`` (safe mode, Lambda refusal: the CLI's rules), exposes the states
  once, and runs batches; ``ExtractStates`` wraps it: examples -> ``ExampleStates`` (key, states,
  masks, lengths).
* ``WriteStates``: one HDF5 states file per shard, written under a temporary name and renamed when
  complete (a retried bundle rewrites the same shard, never a second one), then an index file of
  HDF5 virtual datasets over the shards, so ``CellStates.open(index)`` reads the result like a
  single-machine capture.
* ``AuditCombineFn``: the audit's mergeable accumulators as a ``beam.CombineFn``; the output is
  the ``AuditReport`` that ``audit()`` returns on the same data.

Beam's ``TFModelHandler*`` are not used: they import tensorflow_hub, are documented for older
TensorFlow, and would bypass the safe loader.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

try:
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.ml.inference.base import ModelHandler, RunInference
except ImportError as _error:  # pragma: no cover - the extra is missing
    raise ImportError(
        "lstm_rewrite.beam needs Apache Beam: install it with `pip install 'lstm_rewrite[beam]'`. "
        f"Received: {_error}"
    ) from _error

from . import backends
from .audit import (
    EXPLORER_SEQUENCES,
    AuditReport,
    AuditThresholds,
    _LayerAccumulator,
    _sample_tokens,
    _split_name,
)
from .errors import DataError, InvalidArgumentError, LstmRewriteError, ModelFileError

__all__ = [
    "Example",
    "ExampleStates",
    "ReadExamples",
    "StatesModelHandler",
    "ExtractStates",
    "WriteStates",
    "AuditCombineFn",
    "audit_on_beam",
    "cell_states_on_beam",
]

# Quantities the audit asks for when it traces a model itself (as ``audit()`` does).
AUDIT_STATES = ("c", "h", "gates")
_NUMPY_SUFFIXES = (".npy", ".npz")
_TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfrecord.gz", ".tfrecords.gz")
_FEATURE_DTYPES = {"int64": "int64_list", "int32": "int64_list", "float32": "float_list",
                   "float64": "float_list", "bytes": "bytes_list"}


class Example(NamedTuple):
    """One input sequence: ``key`` = (source index, row), per-sequence arrays (model inputs and
    anything else the source holds), labels by name (time,), and where it came from (for messages)."""

    key: tuple[int, int]
    arrays: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    where: str


class StatesMeta(NamedTuple):
    """What every state of one traced model shares: output infos, layer classes and time orders."""

    exposed: dict[str, dict[str, Any]]
    layer_classes: dict[str, str | None]
    time_orders: dict[str, str]
    config: dict[str, Any]


class ExampleStates(NamedTuple):
    """One sequence's states: name -> (time, units) float32, mask per layer prefix ((time,) or
    None), valid steps per prefix, its labels, its token ids (a 1-D integer input) and ``meta``."""

    key: tuple[int, int]
    states: dict[str, np.ndarray]
    mask: dict[str, np.ndarray | None]
    lengths: dict[str, int]
    labels: dict[str, np.ndarray]
    tokens: np.ndarray | None
    meta: StatesMeta


# --------------------------------------------------------------------------------------------
# Reading examples from file patterns.
# --------------------------------------------------------------------------------------------


def match_sources(patterns: str | Sequence[str]) -> list[str]:
    """The files the pattern(s) match, sorted (their order defines the example keys).

    Raises:
        DataError: a pattern matching no file.

    Example:
        >>> match_sources("data/part-*.npz")  # doctest: +SKIP
        ['data/part-0.npz', 'data/part-1.npz']
    """
    patterns = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
    found: list[str] = []
    for pattern in map(os.fspath, patterns):
        # Beam's local filesystem matches relative patterns against nothing: make them absolute.
        result = FileSystems.match([os.path.abspath(pattern) if _is_local(pattern) else pattern])[0]
        paths = sorted(m.path for m in result.metadata_list)
        if not paths:
            raise DataError(
                f"The data pattern {pattern!r} matches no file. Check the path and the glob (quote it "
                f"so that the shell does not expand it). Received: --data {pattern!r}"
            )
        found += paths
    return list(dict.fromkeys(found))


def _kind_of(path: str) -> str:
    lower = path.lower()
    if lower.endswith(_NUMPY_SUFFIXES):
        return "numpy"
    if lower.endswith(_TFRECORD_SUFFIXES):
        return "tfrecord"
    raise DataError(
        f"Cannot tell the format of {path!r} from its name: use .npy / .npz shards or TFRecord files "
        f"(.tfrecord, .tfrecord.gz) with a feature spec. Received: {path!r}"
    )


def normalise_feature_spec(spec: Mapping[str, Any] | str | os.PathLike | None) -> dict[str, dict] | None:
    """A feature spec (dict, or a JSON file of one): name -> {"dtype", "shape"}; None stays None.

    ``dtype`` is one of int64, int32, float32, float64; ``shape`` the per-sequence shape, with at
    most one ``null`` (read from the value count), e.g. ``{"tokens": {"dtype": "int64", "shape":
    [null]}}``.

    Example:
        >>> normalise_feature_spec({"x": {"dtype": "int64", "shape": [None]}})["x"]["shape"]
        [None]
    """
    if spec is None:
        return None
    if isinstance(spec, (str, os.PathLike)):
        path = os.fspath(spec)
        try:
            with FileSystems.open(path) as handle:
                spec = json.loads(handle.read().decode("utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidArgumentError(
                f"Cannot read the feature spec {path!r} ({exc}). Pass a JSON object name -> "
                f'{{"dtype": "int64", "shape": [null]}}. Received: --feature-spec {path!r}'
            ) from None
    if not isinstance(spec, Mapping) or not spec:
        raise InvalidArgumentError(f"A feature spec is a non-empty mapping name -> {{dtype, shape}}. Received: {spec!r}")
    out = {}
    for name, entry in spec.items():
        dtype = entry.get("dtype") if isinstance(entry, Mapping) else None
        shape = entry.get("shape", [None]) if isinstance(entry, Mapping) else None
        if dtype not in _FEATURE_DTYPES or dtype == "bytes" or not isinstance(shape, (list, tuple)) or \
                sum(d is None or d == -1 for d in shape) > 1:
            raise InvalidArgumentError(
                f"Feature {name!r} of the feature spec needs a dtype among int64, int32, float32, float64 "
                f"and a shape list with at most one null. Received: {entry!r}"
            )
        out[str(name)] = {"dtype": dtype, "shape": [None if d in (None, -1) else int(d) for d in shape]}
    return out


def _numpy_examples(index: int, path: str, label_keys: Sequence[str]) -> Iterator[Example]:
    with FileSystems.open(path) as handle:
        payload = handle.read()
    try:
        loaded = np.load(io.BytesIO(payload), allow_pickle=False)
        arrays = {"": loaded} if isinstance(loaded, np.ndarray) else {k: loaded[k] for k in loaded.files}
    except Exception as exc:  # numpy raises ValueError/OSError/EOFError/zipfile errors
        raise DataError(
            f"Cannot read the data shard {path!r} ({type(exc).__name__}: {exc}). Pass .npy files (one "
            f"array) or .npz files (np.savez) of numeric arrays. Received: {path!r}"
        ) from None
    missing = [k for k in label_keys if k not in arrays]
    if missing:
        raise DataError(
            f"The data shard {path!r} has no label array {missing}; it holds {sorted(arrays)}. Save the "
            f"labels in every shard under these keys, shaped (sequences, time). Received: labels={list(label_keys)}"
        )
    rows = {k: (a.shape[0] if a.ndim else None) for k, a in arrays.items()}
    if len(set(rows.values())) != 1 or None in rows.values():
        raise DataError(
            f"The arrays of the data shard {path!r} hold different numbers of sequences: {rows}. Every "
            f"array needs one row per sequence. Received: {path!r}"
        )
    inputs = {k: a for k, a in arrays.items() if k not in label_keys}
    for row in range(next(iter(rows.values()))):
        yield Example((index, row), {k: a[row] for k, a in inputs.items()},
                      {k: np.asarray(arrays[k][row], dtype=np.float64) for k in label_keys},
                      f"{path!r} row {row}")


def _feature_values(feature, name: str, entry: dict, where: str) -> np.ndarray:
    kind = _FEATURE_DTYPES[entry["dtype"]]
    values = np.asarray(getattr(feature, kind).value, dtype=entry["dtype"])
    shape = entry["shape"]
    known = int(np.prod([d for d in shape if d is not None], dtype=np.int64))
    if None in shape:
        if known == 0 or values.size % known:
            raise DataError(f"Feature {name!r} {where} has {values.size} values, which do not fill the "
                            f"declared shape {shape}. Received: {values.size} values")
        shape = [values.size // known if d is None else d for d in shape]
    elif values.size != known:
        raise DataError(f"Feature {name!r} {where} has {values.size} values; the feature spec declares "
                        f"shape {shape} ({known} values). Received: {values.size} values")
    return values.reshape(shape)


def _tfrecord_examples(index: int, path: str, label_keys: Sequence[str],
                       spec: dict[str, dict]) -> Iterator[Example]:
    for row, features in enumerate(backends.read_tfrecord(path)):
        where = f"in {path!r} record {row}"
        missing = [n for n in spec if n not in features]
        if missing:
            raise DataError(f"Record {row} of {path!r} lacks feature(s) {missing} of the feature spec; "
                            f"it holds {sorted(features)}. Received: {sorted(features)}")
        arrays = {n: _feature_values(features[n], n, e, where) for n, e in spec.items()}
        yield Example((index, row), {n: a for n, a in arrays.items() if n not in label_keys},
                      {n: arrays[n].astype(np.float64) for n in label_keys}, f"{path!r} record {row}")


class _ReadSource(beam.DoFn):
    def __init__(self, label_keys: tuple[str, ...], spec: dict | None):
        self._labels, self._spec = label_keys, spec

    def process(self, item):
        index, path = item
        if _kind_of(path) == "numpy":
            yield from _numpy_examples(index, path, self._labels)
        else:
            yield from _tfrecord_examples(index, path, self._labels, self._spec)


class ReadExamples(beam.PTransform):
    """File patterns -> ``Example`` elements keyed by (source index, row).

    Args:
        patterns: one file pattern or a list (``"gs://bucket/data/part-*.npz"``), matched when the
            pipeline is built; the sorted matches define the keys.
        labels: names of per-step label arrays (``.npz`` keys or TFRecord features), read beside the
            inputs and left out of them.
        feature_spec: for TFRecord sources, name -> ``{"dtype", "shape"}`` (or a JSON file of it).

    Raises:
        DataError: a pattern matching nothing, a file of unknown format.
        InvalidArgumentError: TFRecord sources without a feature spec, a bad feature spec.

    Example:
        >>> with beam.Pipeline(runner=FnApiRunner()) as p:  # doctest: +SKIP
        ...     examples = p | ReadExamples("data/*.npz", labels=["depth"])
    """

    def __init__(self, patterns: str | Sequence[str], *, labels: Sequence[str] = (),
                 feature_spec: Mapping[str, Any] | str | None = None):
        super().__init__()
        self.sources = match_sources(patterns)
        self.labels = tuple(labels)
        self.feature_spec = normalise_feature_spec(feature_spec)
        kinds = {_kind_of(p) for p in self.sources}
        if "tfrecord" in kinds and self.feature_spec is None:
            first = next(p for p in self.sources if _kind_of(p) == "tfrecord")
            raise InvalidArgumentError(
                f"TFRecord data ({first!r}) needs a feature spec: which features to read, with their "
                f"dtype and per-sequence shape. Pass feature_spec= (API) or --feature-spec FILE.json, e.g. "
                f'{{"tokens": {{"dtype": "int64", "shape": [null]}}}}. Received: feature_spec=None'
            )
        if self.feature_spec is not None:
            unknown = [k for k in self.labels if k not in self.feature_spec]
            if unknown:
                raise InvalidArgumentError(f"Label(s) {unknown} are not features of the feature spec "
                                           f"{sorted(self.feature_spec)}. Received: labels={list(self.labels)}")

    def expand(self, pbegin):
        return (pbegin
                | "Sources" >> beam.Create(list(enumerate(self.sources)))
                | "Read" >> beam.ParDo(_ReadSource(self.labels, self.feature_spec)))


# --------------------------------------------------------------------------------------------
# The model handler.
# --------------------------------------------------------------------------------------------


class _LoadedModel:
    """A worker's model: the compiled state function and what it needs to name its outputs."""

    def __init__(self, run, specs, state_names, masks, meta):
        self.run, self.specs, self.state_names, self.masks, self.meta = run, specs, state_names, masks, meta


def _local_copy(path: str) -> tuple[str, str | None]:
    """A local file for ``path`` (copied from a remote filesystem into a temporary directory)."""
    if os.path.exists(path) or "://" not in path:
        return path, None
    directory = tempfile.mkdtemp(prefix="lstm_rewrite_model_")
    local = os.path.join(directory, os.path.basename(path))
    try:
        with FileSystems.open(path) as source, open(local, "wb") as target:
            while chunk := source.read(1 << 24):
                target.write(chunk)
    except OSError as exc:
        raise ModelFileError(f"Cannot read the model file {path!r} on this worker ({exc}). Check that the "
                             f"workers can read it. Received: {path!r}") from None
    return local, directory


def _inputs_of(arrays: Mapping[str, np.ndarray], names: Sequence[str], where: str):
    """Map one example's arrays onto the model's inputs (the rules of the CLI's ``read_data``)."""
    keys = list(arrays)
    if keys == [""] and len(names) == 1:
        return {names[0]: arrays[""]}
    if set(names) <= set(keys):  # arrays beside the inputs (labels of another run) are left alone
        return {n: arrays[n] for n in names}
    if keys == [f"arr_{i}" for i in range(len(names))]:
        return dict(zip(names, (arrays[k] for k in keys)))
    if len(keys) == 1 and len(names) == 1:
        return {names[0]: arrays[keys[0]]}
    raise DataError(
        f"The example {where} holds arrays {keys}, which do not match the model's inputs {list(names)} "
        f"(labels are left out). Key the arrays by input name, or save them in input order with "
        f"np.savez(path, *arrays). Received keys: {keys}"
    )


class StatesModelHandler(ModelHandler):
    """Beam ``ModelHandler``: ``Example`` batches -> ``ExampleStates``, one model per worker process.

    ``load_model`` reads the file with ``lstm_rewrite.load_model(path, safe=safe)`` (a remote path is
    copied to local disk first) and traces it once: with ``states``/``layers`` for a model, or with
    what it exposes for a traced one. Batches are split into runs of equal input shapes, so
    sequences of different lengths are never padded here.

    Args:
        model_path: ``.keras`` or ``.h5`` file, local or on a Beam filesystem (``gs://...``).
        states: quantities as for ``cell_states`` (``None``: ``c`` for a model, everything a
            traced model exposes).
        layers: recurrent layer names (``None``: all).
        safe: refuse layers carrying Python code (``False`` = the CLI's ``--unsafe``).
        batch_size: most sequences per model call.

    Example:
        >>> examples | RunInference(StatesModelHandler("model.keras", states=("c", "h")))  # doctest: +SKIP
    """

    def __init__(self, model_path: str, *, states: Sequence[str] | str | None = None, layers=None,
                 safe: bool = True, batch_size: int = 32):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be a positive integer. Received: batch_size={batch_size!r}")
        # Full batches: BatchElements would otherwise start at one sequence and grow.
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self.model_path = os.fspath(model_path)
        self.states = states
        self.layers = layers
        self.safe = safe
        self.batch_size = batch_size

    def load_model(self) -> _LoadedModel:
        from .capture import _exposed_info, _runner, _trace
        from .inputs import input_specs
        from .loading import load_model
        from .rewrite.record import record_of

        local, directory = _local_copy(self.model_path)
        try:
            model = load_model(local, safe=self.safe)
        except ModelFileError as error:
            if local == self.model_path:
                raise
            raise type(error)(str(error).replace(repr(local), repr(self.model_path))) from None
        finally:
            if directory is not None:
                import shutil

                shutil.rmtree(directory, ignore_errors=True)
        states = self.states
        if states == AUDIT_STATES and record_of(model) is not None:
            states = None  # a traced model is audited with whatever it exposes, as by audit()
        traced, exposed, masks, reversed_layers = _trace(model, states, self.layers)
        state_names = [e.name for e in exposed]
        mask_names = [m for m in dict.fromkeys(masks.values()) if m is not None]
        run = _runner(traced, state_names + mask_names)
        layers = self.layers
        meta = StatesMeta(
            exposed={e.name: _exposed_info(e, reversed_layers) for e in exposed},
            layer_classes={e.layer: getattr(e, "layer_class", None) for e in exposed},
            time_orders={e.site: e.time_order for e in exposed},
            config={"states": list(dict.fromkeys(e.quantity for e in exposed)),
                    "layers": layers if layers is None or isinstance(layers, str) else list(layers),
                    "batch_size": int(self.batch_size), "model": getattr(traced, "name", None),
                    "flavour": backends.flavour_of(traced)},
        )
        return _LoadedModel(run, input_specs(traced), state_names, masks, meta)

    def run_inference(self, batch: Sequence[Example], model: _LoadedModel,
                      inference_args: dict | None = None) -> Iterable[ExampleStates]:
        from .inputs import validate_batch

        names = [s.name for s in model.specs]
        mapped = [_inputs_of(e.arrays, names, e.where) for e in batch]
        results: list[ExampleStates] = []
        start = 0
        while start < len(batch):
            shapes = [{n: np.shape(m[n]) for n in names} for m in mapped[start:]]
            stop = start + next((i for i, s in enumerate(shapes) if s != shapes[0]), len(shapes))
            group = batch[start:stop]
            stacked = {n: np.stack([np.asarray(m[n]) for m in mapped[start:stop]]) for n in names}
            try:
                arrays = validate_batch(stacked, model.specs, f"in {group[0].where}..{group[-1].where}")
            except DataError:
                for example, one in zip(group, mapped[start:stop]):  # name the example at fault
                    validate_batch({n: np.asarray(one[n])[None] for n in names}, model.specs,
                                   f"in {example.where}")
                raise
            results += self._split(group, arrays, stacked, model)
            start = stop
        return results

    def _split(self, group, arrays, raw, model) -> list[ExampleStates]:
        values = model.run(arrays)
        named = dict(zip(model.state_names + [m for m in dict.fromkeys(model.masks.values()) if m is not None],
                         values))
        states = {n: np.asarray(named[n], dtype=np.float32) for n in model.state_names}  # [batch, time, units]
        masks = {p: (None if m is None else np.asarray(named[m], dtype=np.float32)) for p, m in model.masks.items()}
        tokens = None
        if len(model.specs) == 1:
            # As audit() reads its data: one 2-D numeric input may be token ids (audit's _sample_tokens decides).
            ids = next(iter(raw.values()))
            tokens = ids if ids.ndim == 2 and ids.dtype.kind in "iuf" else None
        steps = next(iter(states.values())).shape[1]
        out = []
        for row, example in enumerate(group):
            mask = {p: (None if m is None else m[row]) for p, m in masks.items()}
            out.append(ExampleStates(
                key=example.key,
                states={n: v[row] for n, v in states.items()},
                mask=mask,
                lengths={p: (steps if m is None else int(m.sum())) for p, m in mask.items()},
                labels=example.labels,
                tokens=None if tokens is None else tokens[row],
                meta=model.meta,
            ))
        return out

    def get_num_bytes(self, batch: Sequence[Example]) -> int:
        return sum(int(np.asarray(a).nbytes) for e in batch for a in e.arrays.values())

    def get_metrics_namespace(self) -> str:
        return "lstm_rewrite"


class ExtractStates(beam.PTransform):
    """``Example`` elements -> ``ExampleStates`` (keyed per-example states, masks and lengths).

    Args:
        model_path, states, layers, safe, batch_size: as for ``StatesModelHandler``.

    Example:
        >>> states = p | ReadExamples("data/*.npz") | ExtractStates("model.keras", states="c,h")  # doctest: +SKIP
    """

    def __init__(self, model_path: str, *, states=None, layers=None, safe: bool = True, batch_size: int = 32):
        super().__init__()
        self.handler = StatesModelHandler(model_path, states=states, layers=layers, safe=safe,
                                          batch_size=batch_size)

    def expand(self, examples):
        return examples | "RunInference" >> RunInference(self.handler)


# --------------------------------------------------------------------------------------------
# The shard sink and its index.
# --------------------------------------------------------------------------------------------


def _shard_of(key, rows_per_shard: int) -> tuple[int, int]:
    if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, (int, np.integer)) for k in key)):
        raise InvalidArgumentError(
            f"WriteStates shards by the (source index, row) keys that ReadExamples gives; key your "
            f"examples the same way. Received: key={key!r}"
        )
    return int(key[0]), int(key[1]) // rows_per_shard


def _shard_name(shard: tuple[int, int]) -> str:
    return f"part-{shard[0]:05d}-{shard[1]:05d}.h5"


def _is_local(path: str) -> bool:
    return "://" not in path


def write_shard(directory: str, shard: tuple[int, int], elements: Iterable[ExampleStates],
                compression: str | None = None) -> dict[str, Any]:
    """Write one shard's states (sorted by key) as a states file in ``directory``; return its info.

    The file is written under a temporary name (``.part-....partial``) and renamed when complete, so
    an attempt that fails or is killed never leaves a file under the shard's name, and a retried
    attempt replaces the shard with the same content instead of adding a second one.

    Example:
        >>> write_shard("out/states-shards", (0, 0), elements)["rows"]  # doctest: +SKIP
        64
    """
    from .capture import StateBatch, _H5Sink

    elements = sorted(elements, key=lambda e: e.key)
    if not elements:
        raise InvalidArgumentError(f"Shard {shard} of {directory!r} has no sequence to write. Received: 0 elements")
    meta = elements[0].meta
    name = _shard_name(shard)
    local_dir = directory if _is_local(directory) else tempfile.mkdtemp(prefix="lstm_rewrite_shard_")
    target = os.path.join(local_dir, name)
    sink = _H5Sink(target, compression)
    try:
        start = 0
        while start < len(elements):
            shape = {n: v.shape for n, v in elements[start].states.items()}
            stop = next((i for i in range(start, len(elements))
                         if {n: v.shape for n, v in elements[i].states.items()} != shape), len(elements))
            run = elements[start:stop]
            masks = {}
            for prefix in run[0].mask:
                parts = [e.mask[prefix] for e in run]
                masks[prefix] = None if all(m is None for m in parts) else np.stack(
                    [np.ones(run[0].states[next(iter(shape))].shape[0], np.float32) if m is None else m
                     for m in parts])
            sink.append(StateBatch(states={n: np.stack([e.states[n] for e in run]) for n in shape}, mask=masks))
            start = stop
        sink.finish(meta.exposed, {**meta.config, "shard": list(shard)}).close()
    except BaseException:
        sink.abort()
        raise
    import h5py

    with h5py.File(target, "r") as handle:
        info = {
            "shard": list(shard), "file": name, "rows": len(elements),
            "first_key": list(elements[0].key), "last_key": list(elements[-1].key),
            "steps": int(handle["states"][next(iter(handle["states"]))].shape[1]),
            "shapes": {n: list(d.shape[2:]) for n, d in handle["states"].items()},
            "masks": json.loads(handle.attrs["masks"]),
        }
    if not _is_local(directory):
        remote = FileSystems.join(directory, name)
        partial = FileSystems.join(directory, f".{name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            FileSystems.copy([target], [partial])
            FileSystems.rename([partial], [remote])
        finally:
            import shutil

            shutil.rmtree(local_dir, ignore_errors=True)
    return {**info, "meta": meta}


def shards_directory(index_path: str) -> str:
    """Where ``WriteStates(index_path)`` puts the shards: ``<index stem>-shards/`` beside it."""
    stem = re.sub(r"\.(h5|hdf5)$", "", index_path)
    return f"{stem}-shards"


def write_index(index_path: str, shards: Sequence[dict[str, Any]]) -> str:
    """Write the index: a states file whose datasets are virtual views over the shards, in key order.

    Layers whose shards all lack a mask and share one length keep no mask (as a single capture);
    otherwise a shard without a mask gets a block of ones stored in the index itself, and steps past
    a shorter shard's end read as padding (states 0, mask 0). Shard paths are stored relative to the
    index, so the directory can be moved or downloaded as a whole.

    Example:
        >>> write_index("out/states.h5", shard_infos)  # doctest: +SKIP
        'out/states.h5'
    """
    import h5py

    from .capture import FILE_FORMAT, FILE_FORMAT_VERSION

    if not shards:
        raise DataError(f"No shard was written for {index_path!r}: the data held no sequence. Received: 0 shards")
    shards = sorted(shards, key=lambda s: tuple(s["shard"]))
    meta = shards[0]["meta"]
    rows = sum(s["rows"] for s in shards)
    steps = max(s["steps"] for s in shards)
    ragged = len({s["steps"] for s in shards}) > 1
    relative = os.path.basename(shards_directory(index_path))
    names = [n for n in meta.exposed if n in shards[0]["shapes"]]  # the model's order, as in memory
    prefixes = list(shards[0]["masks"])
    local_dir = os.path.dirname(os.path.abspath(index_path)) if _is_local(index_path) else \
        tempfile.mkdtemp(prefix="lstm_rewrite_index_")
    target = os.path.join(local_dir, os.path.basename(index_path))
    tmp = os.path.join(local_dir, f".{os.path.basename(index_path)}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with h5py.File(tmp, "w") as handle:
            for name in names:
                shape = shards[0]["shapes"][name]
                layout = h5py.VirtualLayout((rows, steps, *shape), dtype="float32")
                start = 0
                for s in shards:
                    source = h5py.VirtualSource(f"{relative}/{s['file']}", f"states/{name}",
                                                shape=(s["rows"], s["steps"], *shape))
                    layout[start:start + s["rows"], :s["steps"]] = source
                    start += s["rows"]
                dataset = handle.require_group("states").create_virtual_dataset(name, layout, fillvalue=0)
                for key, value in meta.exposed[name].items():
                    if value is not None:
                        dataset.attrs[key] = np.asarray(value) if isinstance(value, list) else value
            mask_paths = {}
            for prefix in prefixes:
                lengths = h5py.VirtualLayout((rows,), dtype="int32")
                needed = ragged or any(s["masks"][prefix] is not None for s in shards)
                mask = h5py.VirtualLayout((rows, steps), dtype="float32") if needed else None
                start = 0
                for number, s in enumerate(shards):
                    stop = start + s["rows"]
                    lengths[start:stop] = h5py.VirtualSource(f"{relative}/{s['file']}", f"lengths/{prefix}",
                                                             shape=(s["rows"],))
                    if mask is not None and s["masks"][prefix] is not None:
                        mask[start:stop, :s["steps"]] = h5py.VirtualSource(
                            f"{relative}/{s['file']}", s["masks"][prefix], shape=(s["rows"], s["steps"]))
                    elif mask is not None:  # every step of this shard is valid
                        ones = handle.require_group(f"fill/{prefix}").create_dataset(
                            str(number), data=np.ones((s["rows"], s["steps"]), np.float32))
                        mask[start:stop, :s["steps"]] = h5py.VirtualSource(ones)
                    start = stop
                handle.require_group("lengths").create_virtual_dataset(prefix, lengths, fillvalue=0)
                if mask is not None:
                    handle.require_group("masks").create_virtual_dataset(prefix, mask, fillvalue=0)
                mask_paths[prefix] = f"masks/{prefix}" if mask is not None else None
            attrs = handle.attrs
            attrs["format"] = FILE_FORMAT
            attrs["format_version"] = FILE_FORMAT_VERSION
            attrs["names"] = json.dumps(names)
            attrs["exposed"] = json.dumps(meta.exposed)
            attrs["masks"] = json.dumps(mask_paths)
            attrs["config"] = json.dumps({**meta.config, "runner": "beam"})
            attrs["shards"] = json.dumps([f"{relative}/{s['file']}" for s in shards])
            attrs["shard_rows"] = json.dumps([s["rows"] for s in shards])
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if not _is_local(index_path):
        FileSystems.copy([target], [index_path])
    return index_path


class _WriteShard(beam.DoFn):
    def __init__(self, directory: str, compression: str | None):
        self._directory, self._compression = directory, compression

    def setup(self):
        if _is_local(self._directory):
            os.makedirs(self._directory, exist_ok=True)

    def process(self, item):
        shard, elements = item
        yield write_shard(self._directory, tuple(shard), elements, self._compression)


class WriteStates(beam.PTransform):
    """``ExampleStates`` -> shard files under ``<index stem>-shards/`` and the index ``index_path``.

    Args:
        index_path: the states file to write (``out/states.h5``); ``CellStates.open`` reads it.
        rows_per_shard: most sequences per shard; a shard holds rows of one source only.
        compression: HDF5 filter for the shards (``"gzip"``, ``"lzf"`` or None).

    Returns:
        A PCollection of the one index path.

    Example:
        >>> states | WriteStates("out/states.h5")  # doctest: +SKIP
    """

    def __init__(self, index_path: str, *, rows_per_shard: int = 4096, compression: str | None = None):
        super().__init__()
        if not isinstance(rows_per_shard, int) or rows_per_shard < 1:
            raise InvalidArgumentError(f"rows_per_shard must be a positive integer. Received: {rows_per_shard!r}")
        self.index_path = os.fspath(index_path)
        if _is_local(self.index_path):
            directory = os.path.dirname(os.path.abspath(self.index_path))
            if not os.path.isdir(directory):
                raise InvalidArgumentError(
                    f"Cannot write states to {self.index_path!r}: the directory {directory!r} does not exist. "
                    f"Create it first or pick another path. Received: out={self.index_path!r}")
        self.rows_per_shard = rows_per_shard
        self.compression = compression

    def expand(self, states):
        rows, index_path = self.rows_per_shard, self.index_path
        return (states
                | "ByShard" >> beam.Map(lambda e: (_shard_of(e.key, rows), e))
                | "Group" >> beam.GroupByKey()
                | "WriteShard" >> beam.ParDo(_WriteShard(shards_directory(index_path), self.compression))
                | "Collect" >> beam.combiners.ToList()
                | "WriteIndex" >> beam.Map(lambda shards: write_index(index_path, shards)))


# --------------------------------------------------------------------------------------------
# The audit as a CombineFn.
# --------------------------------------------------------------------------------------------


class _AuditAccumulator:
    """Per-layer accumulators, a buffer of not yet folded sequences and the lowest-key samples."""

    def __init__(self):
        self.layers: dict[str, _LayerAccumulator] = {}
        self.sequences = 0
        self.pending: list[ExampleStates] = []
        self.samples: list[tuple[Any, dict, dict, np.ndarray | None]] = []  # (key, per layer, labels, tokens)


class AuditCombineFn(beam.CombineFn):
    """The audit as a ``beam.CombineFn``: ``ExampleStates`` -> the ``AuditReport`` of ``audit()``.

    Sequences are buffered and folded ``batch_size`` at a time into the same per-layer
    accumulators ``audit()`` uses, which merge exactly (counts and sums, Chan's moments and
    co-moments, histograms on power-of-two ranges), so the report does not depend on how Beam
    splits the data. The report's sample sequences are those of the lowest keys, as ``audit()``
    keeps the leading sequences.

    Args:
        labels: names of the per-step labels each example carries (correlations are computed for
            each).
        thresholds: ``AuditThresholds`` or a dict overriding some of its fields.
        samples: sequences kept for the figures and the explorer.
        vocab: id -> token text for the explorer's sample (as for ``audit``).
        batch_size: sequences folded at a time.

    Example:
        >>> report = states | beam.CombineGlobally(AuditCombineFn(labels=["depth"]))  # doctest: +SKIP
    """

    def __init__(self, *, labels: Sequence[str] = (), thresholds=None, samples: int = EXPLORER_SEQUENCES,
                 vocab=None, batch_size: int = 64):
        self.labels = tuple(labels)
        self.thresholds = AuditThresholds.coerce(thresholds)
        self.samples = int(samples)
        self.vocab = vocab
        self.batch_size = int(batch_size)

    def create_accumulator(self) -> _AuditAccumulator:
        return _AuditAccumulator()

    def add_input(self, acc: _AuditAccumulator, element: ExampleStates) -> _AuditAccumulator:
        missing = [n for n in self.labels if n not in element.labels]
        if missing:
            raise DataError(f"The example with key {element.key} carries no label {missing}. Read the labels "
                            f"with ReadExamples(..., labels=...). Received labels: {sorted(element.labels)}")
        acc.pending.append(element)
        self._keep_sample(acc, element)
        if len(acc.pending) >= self.batch_size:
            self._flush(acc)
        return acc

    def merge_accumulators(self, accumulators: Iterable[_AuditAccumulator]) -> _AuditAccumulator:
        import copy

        accumulators = iter(accumulators)
        merged = next(accumulators, None) or _AuditAccumulator()  # Beam lets the first one change
        self._flush(merged)
        for acc in accumulators:
            self._flush(acc)
            for prefix, layer in acc.layers.items():
                if prefix in merged.layers:
                    merged.layers[prefix].merge(layer)
                else:
                    merged.layers[prefix] = copy.deepcopy(layer)
            merged.sequences += acc.sequences
            merged.samples = sorted(merged.samples + acc.samples, key=lambda s: s[0])[:self.samples]
        return merged

    def compact(self, acc: _AuditAccumulator) -> _AuditAccumulator:
        self._flush(acc)
        return acc

    def extract_output(self, acc: _AuditAccumulator) -> AuditReport:
        self._flush(acc)
        if acc.sequences == 0:
            raise DataError("The audit saw no sequence: the data held none. Received: 0 sequences")
        samples = sorted(acc.samples, key=lambda s: s[0])
        for prefix, layer in acc.layers.items():
            layer.samples = [s[1][prefix] for s in samples]
        report = AuditReport(
            layers={p: layer.finish() for p, layer in acc.layers.items()},
            thresholds=self.thresholds, sequences=acc.sequences, labels=self.labels,
            sample_labels={n: _stack_padded([s[2][n] for s in samples]) for n in self.labels},
        )
        tokens = [s[3] for s in samples]
        if tokens and all(t is not None for t in tokens):
            rows = [_sample_tokens(t[None, :], self.vocab, explicit=False) for t in tokens]
            report.sample_tokens = None if any(r is None for r in rows) else [r[0] for r in rows]
        return report

    # The per-layer work is audit.py's: _LayerAccumulator.update on stacked batches.

    def _new_layer(self, prefix: str, element: ExampleStates, samples: int) -> _LayerAccumulator:
        units = next(v for n, v in element.states.items() if _split_name(n)[0] == prefix).shape[-1]
        return _LayerAccumulator(prefix, element.meta.layer_classes.get(prefix), units, self.thresholds,
                                 self.labels, samples, element.meta.time_orders.get(prefix, "forward"))

    def _update(self, layers: dict[str, _LayerAccumulator], run: Sequence[ExampleStates], samples: int) -> None:
        first = run[0]
        steps = next(iter(first.states.values())).shape[0]
        by_layer: dict[str, dict[str, np.ndarray]] = {}
        for name in first.states:
            prefix, quantity = _split_name(name)
            by_layer.setdefault(prefix, {})[quantity] = np.stack([e.states[name] for e in run])
        labels = {}
        for name in self.labels:
            for e in run:
                if e.labels[name].shape[0] < steps:
                    raise DataError(
                        f"Label {name!r} of the example with key {e.key} has {e.labels[name].shape[0]} steps "
                        f"but its states have {steps}. Pass one label per step. Received: shape {e.labels[name].shape}")
            labels[name] = np.stack([e.labels[name][:steps] for e in run])  # [batch, time]
        for prefix, quantities in by_layer.items():
            if prefix not in layers:
                layers[prefix] = self._new_layer(prefix, first, samples)
            parts = [e.mask.get(prefix) for e in run]
            mask = None if all(m is None for m in parts) else np.stack(
                [np.ones(steps, np.float32) if m is None else m for m in parts])
            layers[prefix].update(quantities, mask, labels)

    def _flush(self, acc: _AuditAccumulator) -> None:
        pending, acc.pending = acc.pending, []
        start = 0
        while start < len(pending):
            shape = {n: v.shape for n, v in pending[start].states.items()}
            stop = next((i for i in range(start, len(pending))
                         if {n: v.shape for n, v in pending[i].states.items()} != shape), len(pending))
            self._update(acc.layers, pending[start:stop], samples=0)
            acc.sequences += stop - start
            start = stop

    def _keep_sample(self, acc: _AuditAccumulator, element: ExampleStates) -> None:
        if self.samples <= 0 or (len(acc.samples) >= self.samples and element.key >= acc.samples[-1][0]):
            return
        # The sample's content is exactly what audit() keeps: a one-sequence accumulator's sample.
        single: dict[str, _LayerAccumulator] = {}
        self._update(single, [element], samples=1)
        acc.samples.append((element.key, {p: layer.samples[0] for p, layer in single.items()},
                            {n: np.asarray(element.labels[n], dtype=np.float64) for n in self.labels},
                            element.tokens))
        acc.samples = sorted(acc.samples, key=lambda s: s[0])[:self.samples]


def _stack_padded(rows: Sequence[np.ndarray]) -> np.ndarray:
    """(rows, longest) float64, NaN past each row's end (no label there)."""
    if not rows:
        return np.zeros((0, 0))
    longest = max(r.shape[0] for r in rows)
    out = np.full((len(rows), longest), np.nan)
    for i, r in enumerate(rows):
        out[i, :r.shape[0]] = r
    return out


# --------------------------------------------------------------------------------------------
# Whole pipelines.
# --------------------------------------------------------------------------------------------


def _pipeline(runner=None, options=None):
    from apache_beam.options.pipeline_options import PipelineOptions

    if options is None:
        options = PipelineOptions([])
    elif isinstance(options, (list, tuple)):
        options = PipelineOptions(list(options))
    return beam.Pipeline(runner=runner, options=options)


_WORKER_ERROR = re.compile(r"lstm_rewrite\.errors\.(\w+): (.*?)(?: \[while running '[^']*'\])?$", re.MULTILINE)


def _reraise_worker_error(error: BaseException) -> None:
    """Raise the library error a worker raised, with its own message, from Beam's wrapped error."""
    from . import errors

    if isinstance(error, LstmRewriteError):
        message = re.sub(r" \[while running '[^']*'\]$", "", str(error).strip().splitlines()[-1]
                         if "\n" in str(error) else str(error))
        raise type(error)(message) from None
    found = _WORKER_ERROR.findall(str(error))
    if found:
        kind, message = found[-1]
        cls = getattr(errors, kind, None)
        if isinstance(cls, type) and issubclass(cls, LstmRewriteError):
            raise cls(message.strip()) from None


def _result_location(options, fallback: str) -> str:
    from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

    if isinstance(options, (list, tuple)):
        options = PipelineOptions(list(options))
    temp = None if options is None else options.view_as(GoogleCloudOptions).temp_location
    return temp or fallback


def _write_pickle(report: AuditReport, path: str) -> None:
    import pickle

    with FileSystems.create(path) as handle:
        handle.write(pickle.dumps(report, protocol=pickle.HIGHEST_PROTOCOL))


def audit_on_beam(
    model_path: str,
    data: str | Sequence[str],
    *,
    labels: Sequence[str] = (),
    feature_spec: Mapping[str, Any] | str | None = None,
    thresholds: AuditThresholds | Mapping[str, float] | None = None,
    batch_size: int = 32,
    vocab=None,
    safe: bool = True,
    runner=None,
    options=None,
) -> AuditReport:
    """Audit ``model_path`` over the files ``data`` matches, on Beam; return the ``AuditReport``.

    The report equals ``audit(load_model(model_path), concatenated data, labels=...)`` up to
    float64 rounding. It travels back through a file under the pipeline's ``--temp_location``
    (or the system's temporary directory with a local runner), written by the job itself.

    Args:
        model_path: model file (local or ``gs://``), loaded on each worker with the safe loader.
        data: file pattern(s) of ``.npy`` / ``.npz`` shards or TFRecord files.
        labels: names of per-step label arrays in each shard (``.npz`` keys, TFRecord features).
        feature_spec: for TFRecord data, name -> {"dtype", "shape"} or a JSON file of it.
        thresholds, batch_size, vocab: as for ``audit``.
        safe: refuse models carrying Python code (False = ``--unsafe``).
        runner: a Beam runner (tests pass ``FnApiRunner()``); None = from ``options``.
        options: ``PipelineOptions`` or a list of pipeline arguments.

    Raises:
        DataError, InvalidArgumentError, ModelFileError: as raised by the workers, with their message.

    Example:
        >>> from apache_beam.runners.portability.fn_api_runner import FnApiRunner
        >>> report = audit_on_beam("model.keras", "data/*.npz", labels=["depth"], runner=FnApiRunner())  # doctest: +SKIP
    """
    read = ReadExamples(data, labels=labels, feature_spec=feature_spec)
    combine = AuditCombineFn(labels=labels, thresholds=thresholds, vocab=vocab, batch_size=max(batch_size, 1))
    location = _result_location(options, tempfile.gettempdir())
    result = FileSystems.join(location, f"lstm_rewrite_audit_{uuid.uuid4().hex}.pickle")
    try:
        with _pipeline(runner, options) as pipeline:
            _ = (pipeline
                 | "ReadExamples" >> read
                 | "ExtractStates" >> ExtractStates(model_path, states=AUDIT_STATES, safe=safe, batch_size=batch_size)
                 | "Audit" >> beam.CombineGlobally(combine)
                 | "WriteReport" >> beam.Map(_write_pickle, result))
    except Exception as error:
        _reraise_worker_error(error)
        raise
    import pickle

    try:
        with FileSystems.open(result) as handle:
            # The job's own output, in a location this run named with a fresh random name.
            return pickle.loads(handle.read())
    finally:
        FileSystems.delete([result])


def cell_states_on_beam(
    model_path: str,
    data: str | Sequence[str],
    out: str,
    *,
    states: Sequence[str] | str | None = None,
    layers=None,
    feature_spec: Mapping[str, Any] | str | None = None,
    batch_size: int = 32,
    rows_per_shard: int = 4096,
    compression: str | None = None,
    safe: bool = True,
    runner=None,
    options=None,
) -> str:
    """Capture states over the files ``data`` matches, on Beam, into shards and the index ``out``.

    ``CellStates.open(out)`` then reads the states like ``cell_states(model, data, out=...)`` on
    the concatenated data, in key order (sources sorted by name, rows in order).

    Args:
        model_path: model file (local or ``gs://``), loaded on each worker with the safe loader.
        data: file pattern(s) of ``.npy`` / ``.npz`` shards or TFRecord files.
        out: the index file (``out/states.h5``); shards go to ``out/states-shards/``.
        states, layers, batch_size, compression: as for ``cell_states``.
        feature_spec: for TFRecord data.
        rows_per_shard: most sequences per shard file.
        safe, runner, options: as for ``audit_on_beam``.

    Returns:
        The index path.

    Example:
        >>> path = cell_states_on_beam("model.keras", "data/*.npz", "out/states.h5", runner=FnApiRunner())  # doctest: +SKIP
        >>> CellStates.open(path)["lstm.c"].shape  # doctest: +SKIP
    """
    read = ReadExamples(data, feature_spec=feature_spec)
    write = WriteStates(out, rows_per_shard=rows_per_shard, compression=compression)
    if isinstance(states, str):
        states = [s.strip() for s in states.split(",") if s.strip()]
    try:
        with _pipeline(runner, options) as pipeline:
            _ = (pipeline
                 | "ReadExamples" >> read
                 | "ExtractStates" >> ExtractStates(model_path, states=states, layers=layers, safe=safe,
                                                    batch_size=batch_size)
                 | "WriteStates" >> write)
    except Exception as error:
        _reraise_worker_error(error)
        raise
    return os.fspath(out)
