"""The rewrite pass: find the LSTM calls, build traced replacements, copy weights, rebuild the model.

The pass re-calls every layer of the model, in topological order of its call graph, on new
inputs. Layers are copies of the user's (``from_config`` + weights), so the user's model never
changes; shared layers stay shared. Each selected LSTM call becomes a `TracedRNN` (an ``RNN``
over a `TracedLSTMCell`), each selected ``Bidirectional(LSTM)`` a `TracedBidirectional`, and
nested models are rewritten recursively. What *matches* (`match_call`) is kept apart from what
*replaces* it (`ReplacementBuilder`); everything unsupported is refused in `plan_rewrite`,
before anything is built.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Union

import numpy as np

from . import backends
from .cells import LSTM_STATE_INDEX
from .errors import InvalidArgumentError, UnsupportedLayerError, UnsupportedModelError
from .graph import build_graph, walk
from .naming import MASK, output_name, parse_states, site_name

LayerSelector = Union[None, str, Iterable[str], Callable[[object], bool]]


@dataclasses.dataclass(frozen=True)
class ExposedOutput:
    """One extra output of a traced model: ``name`` = ``layer`` + "." + ``quantity``."""

    name: str
    layer: str  # dotted site, e.g. "bi.forward" or "body.encoder.call1"
    quantity: str  # c, h, i, f, g, o
    layer_class: str
    units: int
    dtype: str = "float32"  # the layer's dtype policy; the exposed sequence has its compute dtype


@dataclasses.dataclass
class RewriteRecord:
    """What a rewrite did: which calls were replaced and which outputs it added, in order."""

    original_output_names: list
    exposed: list = dataclasses.field(default_factory=list)  # [ExposedOutput]
    masks: dict = dataclasses.field(default_factory=dict)  # site -> mask output name
    replaced: list = dataclasses.field(default_factory=list)  # sites replaced by traced layers
    reused_layers: list = dataclasses.field(default_factory=list)  # layers called as-is (no copy)

    @property
    def output_names(self) -> list:
        """Names of the added outputs, in output order (states, then masks)."""
        return [e.name for e in self.exposed] + list(self.masks.values())


@dataclasses.dataclass(frozen=True)
class RecurrentSite:
    """One call of a recurrent layer somewhere in the model, as `plan_rewrite` finds it."""

    site: str  # dotted name of the call, e.g. "body.encoder"
    layer: object
    kind: str  # "lstm" or "bidirectional"
    selected: bool


# --- what matches ------------------------------------------------------------------------


def match_call(layer, backend) -> str:
    """Classify one layer call: "lstm", "bidirectional", "model" or "layer".

    Raises:
        UnsupportedLayerError: for an LSTM the rewrite cannot reproduce exactly (an overridden
            ``call``, time-major input) or an LSTM inside a wrapper other than Bidirectional.
    """
    if isinstance(layer, backend.Bidirectional) and isinstance(layer.forward_layer, backend.LSTM):
        for sub in (layer.forward_layer, layer.backward_layer):
            _check_lstm(sub, backend, owner=layer)
        return "bidirectional"
    if isinstance(layer, backend.LSTM):
        _check_lstm(layer, backend)
        return "lstm"
    if backend.is_model(layer):
        return "model"
    if isinstance(layer, backend.Wrapper) and _contains_lstm(layer, backend):
        raise UnsupportedLayerError(
            f"Layer {layer.name!r} ({type(layer).__name__}) wraps an LSTM, and the rewrite handles LSTMs "
            f"directly in the model or inside Bidirectional only. Rebuild the model with the LSTM outside the "
            f"wrapper, or exclude it with layers=[...] naming the other LSTMs. Received: {type(layer).__name__}"
            f"({type(layer.layer).__name__})"
        )
    return "layer"


def _contains_lstm(layer, backend) -> bool:
    inner = getattr(layer, "layer", None)
    if inner is None:
        return False
    return isinstance(inner, backend.LSTM) or _contains_lstm(inner, backend)


def _check_lstm(layer, backend, owner=None) -> None:
    where = f" (inside {owner.name!r})" if owner is not None else ""
    if type(layer).call is not backend.LSTM.call or type(layer.cell).call is not backend.LSTMCell.call:
        raise UnsupportedLayerError(
            f"Layer {layer.name!r}{where} ({type(layer).__name__}) is an LSTM whose call or cell is overridden; "
            f"the traced cell reproduces only the Keras LSTM step, so its states would not be the layer's. "
            f"Exclude it with layers=[...]. Received: {type(layer).__module__}.{type(layer).__name__}"
        )
    if getattr(layer, "time_major", False):
        raise UnsupportedLayerError(
            f"Layer {layer.name!r}{where} (LSTM) is time-major; the rewrite supports batch-major LSTMs only. "
            f"Rebuild it with time_major=False. Received: time_major=True"
        )


def make_selector(layers: LayerSelector):
    """Turn a ``layers=`` argument into ``select(site, layer) -> bool`` and the names it expects.

    A name selects a call when it equals the layer's name, the call's dotted site, or a dotted
    prefix of it (so a nested model's name selects every LSTM inside it).
    """
    if layers is None:
        return (lambda site, layer: True), ()
    if callable(layers):
        return (lambda site, layer: bool(layers(layer))), ()
    names = (layers,) if isinstance(layers, str) else tuple(layers)
    for name in names:
        if not isinstance(name, str):
            raise InvalidArgumentError(
                f"layers= takes a layer name, a list of names or a predicate. Received an element {name!r} "
                f"of type {type(name).__name__}"
            )

    def select(site, layer):
        return any(n == layer.name or n == site or site.startswith(n + ".") for n in names)

    return select, names


def plan_rewrite(model, layers: LayerSelector = None) -> list:
    """List every LSTM call of ``model`` (nested models included) and whether ``layers`` selects it.

    Refuses, before anything is built, what the rewrite cannot do.

    Example:
        >>> [s.site for s in plan_rewrite(model)]
        ['encoder', 'decoder']

    Raises:
        UnsupportedModelError: subclassed or unbuilt model, or no LSTM at all.
        UnsupportedLayerError: an LSTM the rewrite cannot reproduce (see `match_call`).
        InvalidArgumentError: a name in ``layers`` that matches no LSTM.
    """
    backend = _backend_of(model)
    select, names = make_selector(layers)
    sites = []
    _collect_sites(model, backend, "", select, sites, seen_models=[])
    if not sites:
        raise UnsupportedModelError(
            f"Model {model.name!r} has no LSTM layer (Bidirectional(LSTM) and nested models included), so "
            f"there is no cell state to expose. Received layers: {[l.name for l in model.layers]}"
        )
    for name in names:
        if not any(name == s.layer.name or name == s.site or s.site.startswith(name + ".") for s in sites):
            raise InvalidArgumentError(
                f"layers= names {name!r}, but model {model.name!r} has no LSTM of that name. Its LSTMs are: "
                f"{sorted({s.site for s in sites})}. Received: layers={list(names)!r}"
            )
    if not any(s.selected for s in sites):
        raise InvalidArgumentError(
            f"layers= selects none of the LSTMs of model {model.name!r}: {sorted({s.site for s in sites})}."
        )
    return sites


def _collect_sites(model, backend, prefix, select, sites, seen_models):
    functional = _functional(model, backend)
    graph = build_graph(functional, backend)
    for key in walk(graph):
        data = graph.nodes[key]
        if data["is_input"]:
            continue
        layer = data["layer"]
        kind = match_call(layer, backend)
        site = site_name(layer.name, data["call_index"], prefix)
        if kind in ("lstm", "bidirectional"):
            sites.append(RecurrentSite(site, layer, kind, select(site, layer)))
        elif kind == "model":
            _collect_sites(layer, backend, site + ".", select, sites, seen_models)


def _functional(model, backend):
    functional = backend.functional_of(model)
    if functional is None:
        if backend.is_model(model) and not getattr(model, "built", True):
            raise UnsupportedModelError(
                f"Model {model.name!r} ({type(model).__name__}) is not built, so it has no graph to rewrite. "
                f"Build it first: start it with keras.Input(shape=...) or call model.build(input_shape). "
                f"Received: an unbuilt {type(model).__name__}"
            )
        raise UnsupportedModelError(
            f"Model {model.name!r} ({type(model).__name__}) is a subclassed model: its computation lives in "
            f"Python code, not in a graph of layer calls, so it cannot be rewritten. Rebuild it with the "
            f"functional API (keras.Model(inputs, outputs)) or Sequential, reusing its layers. "
            f"Received: {type(model).__module__}.{type(model).__name__}"
        )
    return functional


def _backend_of(model):
    if not hasattr(model, "layers") or not hasattr(model, "name"):
        raise UnsupportedModelError(
            f"expose_cell_states takes a Keras model (Keras 3 or tf-keras). Received: {type(model).__name__}"
        )
    return backends.for_model(model)


# --- what replaces it --------------------------------------------------------------------


class ReplacementBuilder:
    """Builds, once per original layer, the traced layer that replaces it, and copies weights."""

    def __init__(self, backend, quantities: tuple, expose_masks: bool):
        self.backend = backend
        self.quantities = quantities
        self.extras = tuple(q for q in quantities if q != "h")
        self.expose_masks = expose_masks

    def traced_lstm(self, lstm, name: str, return_sequences=None, return_state=None):
        """A TracedRNN configured like ``lstm`` (weights not yet copied: it is unbuilt)."""
        backend = self.backend
        cell = backend.TracedLSTMCell.from_config({**lstm.cell.get_config(), "extras": list(self.extras)})
        rnn = backend.RNN(
            cell, return_sequences=True, return_state=True, go_backwards=lstm.go_backwards,
            stateful=lstm.stateful, unroll=lstm.unroll, zero_output_for_mask=False, name="rnn",
            dtype=backend.dtype_policy(lstm),
        )
        return backend.TracedRNN(
            rnn, extras=self.extras, exposed=self.quantities, state_index=LSTM_STATE_INDEX,
            return_sequences=lstm.return_sequences if return_sequences is None else return_sequences,
            return_state=lstm.return_state if return_state is None else return_state,
            zero_output_for_mask=bool(getattr(lstm, "zero_output_for_mask", False)),
            expose_mask=self.expose_masks, name=name, dtype=backend.dtype_policy(lstm),
        )

    def traced_bidirectional(self, bi):
        forward = self.traced_lstm(bi.forward_layer, "forward", bi.return_sequences, bi.return_state)
        backward = self.traced_lstm(bi.backward_layer, "backward", bi.return_sequences, bi.return_state)
        return self.backend.TracedBidirectional(
            forward, backward, merge_mode=bi.merge_mode, return_sequences=bi.return_sequences,
            return_state=bi.return_state, name=bi.name, dtype=self.backend.dtype_policy(bi),
        )

    def copy_lstm_weights(self, source_lstm, traced) -> None:
        """Copy kernel, recurrent kernel, bias (and stateful states) by role, checking shapes."""
        pairs = [(source_lstm.cell.kernel, traced.rnn.cell.kernel),
                 (source_lstm.cell.recurrent_kernel, traced.rnn.cell.recurrent_kernel)]
        if source_lstm.cell.use_bias:
            pairs.append((source_lstm.cell.bias, traced.rnn.cell.bias))
        source_states = _state_variables(source_lstm)
        pairs += list(zip(source_states, _state_variables(traced.rnn)))
        for source, target in pairs:
            value = np.asarray(self.backend.to_numpy(source))
            if tuple(value.shape) != tuple(target.shape):
                raise UnsupportedLayerError(
                    f"Layer {source_lstm.name!r} (LSTM): weight {source.name!r} has shape {value.shape}, but the "
                    f"traced copy expects {tuple(target.shape)}. This is a bug in lstm_rewrite; please report it."
                )
            target.assign(value)


def _state_variables(layer):
    states = getattr(layer, "states", None)
    if not getattr(layer, "stateful", False) or states is None:
        return []
    return [s for s in (states if isinstance(states, (list, tuple)) else [states]) if hasattr(s, "assign")]


# --- the pass ----------------------------------------------------------------------------


class _Level:
    """What rebuilding one functional level produced: the new model and its added outputs."""

    def __init__(self, inputs, model, exposed, masks):
        self.inputs = inputs  # the new model's inputs, in the original input structure
        self.model = model
        self.exposed = exposed  # [ExposedOutput] with names relative to this level
        self.masks = masks  # {relative site: relative mask name}


class RewritePass:
    """Rebuild a model level by level, replacing the selected LSTM calls."""

    def __init__(self, model, states=("c",), layers: LayerSelector = None, expose_masks: bool = False):
        self.backend = _backend_of(model)
        self.quantities = parse_states(states)
        self.sites = plan_rewrite(model, layers)
        self.select, _ = make_selector(layers)
        self.builder = ReplacementBuilder(self.backend, self.quantities, expose_masks)
        self.model = model
        self.layer_copies = {}  # id(original layer) -> its copy (or traced replacement)
        self.level_copies = {}  # id(nested model) -> _Level
        self.reused = []

    def run(self):
        """Return ``(traced_model, RewriteRecord)``."""
        level = self._rebuild(self.model, prefix="")
        backend = self.backend
        record = RewriteRecord(original_output_names=backend.output_names(self.model))
        functional = _functional(self.model, backend)
        outputs = list(backend.flatten(level.model.outputs))
        original_count = len(backend.outputs_of(functional))
        named = []
        taken = {l.name for l in level.model.layers}
        extra = outputs[original_count:]
        exposed_names = [e.name for e in level.exposed] + list(level.masks.values())
        dtypes = {e.name: e.dtype for e in level.exposed}
        for name, tensor in zip(exposed_names, extra):
            if name in taken:
                raise UnsupportedModelError(
                    f"Model {self.model.name!r} already has a layer named {name!r}, the name of an exposed output. "
                    f"Rename that layer before rewriting. Received: layer {name!r}"
                )
            named.append(backend.Identity(name=name, dtype=dtypes.get(name, "float32"))(tensor))
        traced = backend.make_model(level.inputs, outputs[:original_count] + named, name=self.model.name)
        record.exposed = list(level.exposed)
        record.masks = dict(level.masks)
        record.replaced = sorted({e.layer for e in level.exposed})
        record.reused_layers = self.reused
        return traced, record

    def _rebuild(self, model, prefix: str) -> _Level:
        backend = self.backend
        functional = _functional(model, backend)
        graph = build_graph(functional, backend)
        inputs = backend.map_structure(backend.make_input, graph.graph["inputs"])
        tensors = {}
        for old, new in zip(backend.flatten(graph.graph["inputs"]), backend.flatten(inputs)):
            tensors[id(old)] = new
        exposed, masks, extra_tensors, mask_tensors = [], {}, [], []

        def new_tensor(obj):
            return tensors[id(obj)] if backend.is_tensor(obj) else obj

        for key in walk(graph):
            data = graph.nodes[key]
            if data["is_input"]:
                continue
            layer = data["layer"]
            args = backend.map_structure(new_tensor, list(data["args"]))
            kwargs = backend.map_structure(new_tensor, dict(data["kwargs"]))
            site = site_name(layer.name, data["call_index"])
            kind = match_call(layer, backend)
            if kind in ("lstm", "bidirectional") and self.select(prefix + site, layer):
                outputs, added = self._call_traced(layer, kind, site, data, args, kwargs)
            elif kind == "model":
                outputs, added = self._call_nested(layer, site, prefix, args, kwargs, len(data["outputs"]))
            else:
                outputs, added = self._call_copy(layer, args, kwargs), []
            outputs = backend.flatten(outputs)
            for old, new in zip(data["outputs"], outputs):
                tensors[id(old)] = new
            for entry, tensor in added:
                if isinstance(entry, ExposedOutput):
                    exposed.append(entry)
                    extra_tensors.append(tensor)
                else:
                    masks[entry[0]] = entry[1]
                    mask_tensors.append(tensor)
        outputs = [tensors[id(t)] for t in graph.graph["outputs"]]
        if prefix == "" and model is self.model:
            # The top level names its outputs itself (identity layers), see `run`.
            new_model = backend.make_model(inputs, outputs + extra_tensors + mask_tensors, name=model.name)
        else:
            named = [backend.Identity(name=e.name, dtype=e.dtype)(t) for e, t in zip(exposed, extra_tensors)]
            named += [backend.Identity(name=name)(t) for name, t in zip(masks.values(), mask_tensors)]
            new_model = backend.make_model(inputs, outputs + named, name=model.name)
        return _Level(inputs, new_model, exposed, masks)

    def _call_copy(self, layer, args, kwargs):
        copy = self.layer_copies.get(id(layer))
        fresh = copy is None
        if fresh:
            copy = _clone_layer(layer)
            if copy is layer:
                self.reused.append(layer.name)
            self.layer_copies[id(layer)] = copy
        outputs = copy(*args, **kwargs)
        if fresh and copy is not layer and hasattr(layer, "get_weights"):
            try:
                copy.set_weights(layer.get_weights())
            except ValueError as error:
                raise UnsupportedLayerError(
                    f"Layer {layer.name!r} ({type(layer).__name__}) could not be copied: its copy made from "
                    f"get_config() has different weights ({error}). Give the layer a get_config() that "
                    f"rebuilds it exactly."
                ) from error
        return outputs

    def _call_traced(self, layer, kind, site, data, args, kwargs):
        backend, builder = self.backend, self.builder
        inputs, initial_state, mask, rest = backend.recurrent_call(args, kwargs)
        traced = self.layer_copies.get(id(layer))
        fresh = traced is None
        if fresh:
            traced = builder.traced_bidirectional(layer) if kind == "bidirectional" else builder.traced_lstm(layer, layer.name)
            self.layer_copies[id(layer)] = traced
        outputs = backend.flatten(backend.call_traced(traced, inputs, initial_state, mask, rest))
        if fresh:
            if kind == "bidirectional":
                builder.copy_lstm_weights(layer.forward_layer, traced.forward_layer)
                builder.copy_lstm_weights(layer.backward_layer, traced.backward_layer)
            else:
                builder.copy_lstm_weights(layer, traced)
        original_count = len(data["outputs"])
        extra = outputs[original_count:]
        directions = [(f"{site}.forward", layer.forward_layer), (f"{site}.backward", layer.backward_layer)] \
            if kind == "bidirectional" else [(site, layer)]
        entries = []
        for sub_site, lstm in directions:
            entries += [ExposedOutput(output_name(sub_site, q), sub_site, q, "LSTM", int(lstm.units),
                                      backend.dtype_policy(lstm)) for q in builder.quantities]
        if builder.expose_masks:
            if kind == "bidirectional":
                # Forward and backward states were aligned to input time: one mask serves both,
                # but each direction's output carries it so that selection per site stays simple.
                per_direction = len(builder.quantities)
                states_f = extra[:per_direction]
                mask_f = extra[per_direction]
                states_b = extra[per_direction + 1:2 * per_direction + 1]
                mask_b = extra[2 * per_direction + 1]
                extra = states_f + states_b + [mask_f, mask_b]
            entries += [(sub_site, output_name(sub_site, MASK)) for sub_site, _ in directions]
        return outputs[:original_count], list(zip(entries, extra))

    def _call_nested(self, model, site, prefix, args, kwargs, original_count):
        level = self.level_copies.get(id(model))
        if level is None:
            level = self._rebuild(model, prefix + site + ".")
            self.level_copies[id(model)] = level
        outputs = backend_flatten = self.backend.flatten(level.model(*args, **kwargs))
        extra = backend_flatten[original_count:]
        entries = [dataclasses.replace(e, name=f"{site}.{e.name}", layer=f"{site}.{e.layer}") for e in level.exposed]
        entries += [(f"{site}.{s}", f"{site}.{n}") for s, n in level.masks.items()]
        return outputs[:original_count], list(zip(entries, extra))


def _clone_layer(layer):
    """An exact, unbuilt copy of ``layer`` from its config; the layer itself if it cannot be copied."""
    try:
        return layer.__class__.from_config(layer.get_config())
    except Exception:  # noqa: BLE001 - any failure to copy means: call the original, as Keras would
        # A layer without a faithful get_config (custom code) is called as it is. It then shares its
        # weights with the user's model; the record lists it in reused_layers.
        return layer


def rewrite_model(model, states=("c",), layers: LayerSelector = None, expose_masks: bool = False):
    """Rebuild ``model`` with every selected LSTM call traced. Returns ``(traced, RewriteRecord)``.

    This is the pass alone, without verification; `lstm_rewrite.expose_cell_states` adds it.

    Example:
        >>> traced, record = rewrite_model(model, states=("c", "h"))
        >>> record.output_names
        ['encoder.c', 'encoder.h']
    """
    return RewritePass(model, states, layers, expose_masks).run()
