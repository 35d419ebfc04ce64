"""The rewrite pass: find the recurrent-layer calls, build traced replacements, copy weights, rebuild the model.

The pass re-calls every layer of the model, in topological order of its call graph, on new
inputs. Layers are copies of the user's (``from_config`` + weights), so the user's model never
changes; shared layers stay shared. Each selected recurrent call (LSTM, GRU, SimpleRNN,
ConvLSTM1D/2D/3D, an ``RNN`` over a Keras cell, over ``StackedRNNCells`` or over a custom cell)
becomes a `TracedRNN`, an ``RNN`` over the traced cell that `cell_kinds` pairs with the layer's
cell; each selected ``Bidirectional`` a `TracedBidirectional`; nested models are rewritten
recursively. What *matches* (`match_call`) is kept apart from what *replaces* it
(`ReplacementBuilder`); everything unsupported is refused in `plan_rewrite`, before anything is
built.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Union

import numpy as np

from . import backends, kinds
from .kinds import RecurrentKind as CellFamily
from .kinds.conv_lstm import CONV_LSTM as CONV_LSTM_FAMILY
from .kinds.gru import GRU as GRU_FAMILY
from .kinds.lstm import LSTM as LSTM_FAMILY
from .kinds.simple_rnn import SIMPLE_RNN as SIMPLE_RNN_FAMILY
from .layers import reconstructed as reconstruct
from .layers.shapes import shapes_only
from .layers.subclass import wrapping_call
from .errors import InvalidArgumentError, UnsupportedLayerError, UnsupportedModelError
from .graph import build_graph, walk
from .naming import MASK, output_name, parse_states, quantities_for, site_name
from .record import ExposedOutput, RewriteRecord  # noqa: F401 - re-exported: the record's public home was here

LayerSelector = Union[None, str, Iterable[str], Callable[[object], bool]]

# The kinds of recurrent call the rewrite traces (`match_call` also answers "bidirectional",
# "model" and "layer").
RECURRENT_KINDS = ("lstm", "gru", "simple_rnn", "conv_lstm", "stacked", "generic")


@dataclasses.dataclass(frozen=True)
class RecurrentSite:
    """One call of a recurrent layer somewhere in the model, as `plan_rewrite` finds it."""

    site: str  # dotted name of the call, e.g. "body.encoder"
    layer: object
    kind: str  # one of RECURRENT_KINDS, or "bidirectional"
    selected: bool
    layer_class: str = ""  # e.g. "GRU", "Bidirectional(LSTM)", "RNN(StackedRNNCells)"
    quantities: tuple = ()  # what it exposes, relative to the site: "c", "forward.h", "cell1.c"

    @property
    def output_names(self) -> tuple:
        """The names of the outputs the rewrite adds for this call (when it is selected)."""
        return tuple(output_name(self.site, q) for q in self.quantities)


@dataclasses.dataclass(frozen=True)
class CellKind:
    """One row of the table of Keras cells the rewrite knows, and the traced cell replacing each."""

    kind: str
    cell_class: type
    traced_cell: type
    family: CellFamily


@dataclasses.dataclass(frozen=True)
class ExposedUnit:
    """One cell of a recurrent layer as the rewrite exposes it: the layer's cell, or one stacked cell."""

    suffix: str  # "" for the layer's own cell, "cell0", "cell1", ... for StackedRNNCells
    cell: object
    family: CellFamily
    quantities: tuple  # what it exposes, in output order


def cell_kinds(backend) -> tuple:
    """The table: Keras cell class -> traced cell class and what it exposes, for one flavour."""
    return (
        CellKind("lstm", backend.LSTMCell, backend.TracedLSTMCell, LSTM_FAMILY),
        CellKind("gru", backend.GRUCell, backend.TracedGRUCell, GRU_FAMILY),
        CellKind("simple_rnn", backend.SimpleRNNCell, backend.TracedSimpleRNNCell, SIMPLE_RNN_FAMILY),
        CellKind("conv_lstm", backend.ConvLSTMCell, backend.TracedConvLSTMCell, CONV_LSTM_FAMILY),
    )


def _layer_kinds(backend) -> tuple:
    # The Keras recurrent layers that build their own cell; any other RNN is classified by its cell.
    return ((backend.LSTM, "lstm"), (backend.GRU, "gru"), (backend.SimpleRNN, "simple_rnn"),
            (backend.ConvLSTM, "conv_lstm"))


def _cell_kind(cell, backend):
    """The table row of a Keras cell, or None for a custom cell (or one whose step is overridden)."""
    for row in cell_kinds(backend):
        if isinstance(cell, row.cell_class) and type(cell).call is row.cell_class.call:
            return row
    return None


# --- what matches ------------------------------------------------------------------------


def match_call(layer, backend) -> str:
    """Classify one layer call: a recurrent kind (see RECURRENT_KINDS), "bidirectional", "model" or "layer".

    Raises:
        UnsupportedLayerError: for a recurrent layer the rewrite cannot reproduce exactly (an
            overridden ``call`` or cell step, time-major input, a custom cell it cannot trace) or
            one inside a wrapper other than Bidirectional.
    """
    if isinstance(layer, backend.Bidirectional) and isinstance(layer.forward_layer, backend.RNN):
        for sub in (layer.forward_layer, layer.backward_layer):
            recurrent_kind(sub, backend, owner=layer)
        return "bidirectional"
    if isinstance(layer, backend.RNN):
        return recurrent_kind(layer, backend)
    if backend.is_model(layer):
        return "model"
    inner = _wrapped_recurrent(layer, backend) if isinstance(layer, backend.Wrapper) else None
    if inner is not None:
        kind = type(inner).__name__
        raise UnsupportedLayerError(
            f"Layer {layer.name!r} ({type(layer).__name__}) wraps {_article(kind)} {kind} ({inner.name!r}), and "
            f"the rewrite handles recurrent layers directly in the model or inside Bidirectional only. Rebuild "
            f"the model with the {kind} outside the wrapper, or leave it out with layers=[...] naming the other "
            f"recurrent layers. Received: {type(layer).__name__}({kind})"
        )
    return "layer"


def _wrapped_recurrent(layer, backend):
    inner = getattr(layer, "layer", None)
    if inner is None:
        return None
    if isinstance(inner, backend.RNN):
        return inner
    return _wrapped_recurrent(inner, backend) if isinstance(inner, backend.Wrapper) else None


def _article(word: str) -> str:
    # "an LSTM", "an RNN", "a GRU", "a SimpleRNN": acronyms read letter by letter.
    spelled = len(word) > 1 and word[1].isupper()
    return "an" if word[0] in "AEIOU" or (spelled and word[0] in "FHLMNRSX") else "a"


def recurrent_kind(layer, backend, owner=None) -> str:
    """The kind of one recurrent layer (not Bidirectional): one of RECURRENT_KINDS.

    Raises:
        UnsupportedLayerError: naming the layer, when the rewrite cannot reproduce it exactly.
    """
    where = f" (inside {owner.name!r})" if owner is not None else ""
    known = dict(_layer_kinds(backend))
    base = next((k for k in known if isinstance(layer, k)), backend.RNN)
    kind = known.get(base)
    row = _cell_kind(layer.cell, backend)
    cell_kept = kind is None or (row is not None and row.kind == kind)
    why = None if cell_kept else f"its cell ({type(layer.cell).__name__}) is not the Keras one"
    if cell_kept and type(layer).call is not base.call:
        # A subclass whose call only wraps super().call runs its own call over the traced layer
        # (TracedSubclassRNN), and verification decides; anything else is refused here.
        try:
            wrapping_call(type(layer), base)
            why = "it is inside a wrapper" if owner is not None else None
        except ValueError as error:
            why = str(error)
    if why is not None:
        name = base.__name__
        raise UnsupportedLayerError(
            f"Layer {layer.name!r}{where} ({type(layer).__name__}) is {_article(name)} {name} whose call or cell is "
            f"overridden, and {why}. The traced cell reproduces only the Keras {name} step, and runs a subclass's "
            f"own call only where that call wraps super().call(...) and the layer is not inside a wrapper; "
            f"otherwise the states would not be the layer's. Exclude it with layers=[...]. "
            f"Received: {type(layer).__module__}.{type(layer).__name__}"
        )
    if getattr(layer, "time_major", False):
        raise UnsupportedLayerError(
            f"Layer {layer.name!r}{where} ({type(layer).__name__}) is time-major; the rewrite supports batch-major "
            f"recurrent layers only. Rebuild it with time_major=False. Received: time_major=True"
        )
    if kind is not None:
        return kind
    cell = layer.cell
    if isinstance(cell, backend.StackedRNNCells):
        if type(cell).call is not backend.StackedRNNCells.call or getattr(cell, "reverse_state_order", False):
            raise UnsupportedLayerError(
                f"Layer {layer.name!r}{where} ({describe_layer(layer, backend)}) stacks its cells in a way the rewrite does "
                f"not reproduce (an overridden StackedRNNCells.call, or reverse_state_order=True). Exclude it "
                f"with layers=[...]. Received: {type(cell).__module__}.{type(cell).__name__}"
            )
        for inner in cell.cells:
            _check_cell(layer, inner, backend, where)
        return "stacked"
    return _check_cell(layer, cell, backend, where)


def _wrapped_subclass(layer, backend):
    """The class of a recurrent layer whose ``call`` wraps its Keras parent's, or None."""
    base = next((k for k, _ in _layer_kinds(backend) if isinstance(layer, k)), backend.RNN)
    return type(layer) if type(layer).call is not base.call else None


def _check_cell(layer, cell, backend, where) -> str:
    """The kind of the cell an ``RNN`` runs: a table row's, or "generic" for a custom cell it can trace."""
    row = _cell_kind(cell, backend)
    label = f"Layer {layer.name!r}{where} ({describe_layer(layer, backend)}) runs the cell {cell.name!r} ({type(cell).__name__})"
    if row is not None and row.kind == "conv_lstm":
        raise UnsupportedLayerError(
            f"{label}, which Keras runs only inside its ConvLSTM1D/2D/3D layers. Use those layers, or exclude it "
            f"with layers=[...]. Received: {type(cell).__name__}"
        )
    if row is not None:
        return row.kind
    sizes = getattr(cell, "state_size", None)
    if _flat_sizes(sizes) is None or not _is_width(getattr(cell, "output_size", None), allow_none=True):
        raise UnsupportedLayerError(
            f"{label}, a custom cell whose states or output are not flat vectors (state_size={sizes!r}, "
            f"output_size={getattr(cell, 'output_size', None)!r}): the traced cell emits each state at every "
            f"step as a [batch, n] slice, so it cannot trace this cell. Give the cell an int or a list of ints "
            f"as state_size, or exclude the layer with layers=[...]. Received: state_size={sizes!r}"
        )
    try:
        copy_cell(cell)
    except Exception as error:  # noqa: BLE001 - any failure to rebuild the cell from its config
        raise UnsupportedLayerError(
            f"{label}, a custom cell that cannot be rebuilt from its config ({type(error).__name__}: "
            f"{' '.join(str(error).split())}). "
            f"The rewrite traces a copy of the cell so that your model stays untouched: give the cell a "
            f"get_config() that returns its constructor arguments, or exclude the layer with layers=[...]. "
            f"Received: {type(cell).__module__}.{type(cell).__name__}"
        ) from error
    return "generic"


def _is_width(value, allow_none=False) -> bool:
    if value is None:
        return allow_none
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


def _flat_sizes(sizes):
    """``state_size`` as a list of ints, or None when it is nested or holds shapes."""
    if _is_width(sizes):
        return [int(sizes)]
    if sizes is None or isinstance(sizes, str) or hasattr(sizes, "as_list"):
        return None
    try:
        flat = list(sizes)
    except TypeError:
        return None
    return [int(s) for s in flat] if flat and all(_is_width(s) for s in flat) else None


def copy_cell(cell):
    """An unbuilt copy of a custom cell from its config (the traced cell runs the copy)."""
    return type(cell).from_config(cell.get_config())


def describe_layer(layer, backend) -> str:
    """The class of a recurrent layer as reports show it: ``GRU``, ``RNN(LSTMCell)``, ``Bidirectional(GRU)``."""
    if isinstance(layer, backend.Bidirectional):
        return f"{type(layer).__name__}({describe_layer(layer.forward_layer, backend)})"
    if any(isinstance(layer, k) for k, _ in _layer_kinds(backend)):
        return type(layer).__name__
    return f"{type(layer).__name__}({type(layer.cell).__name__})"


def exposed_units(layer, kind: str, requested, backend) -> list:
    """The cells of one recurrent layer (not Bidirectional) and the quantities each exposes."""
    cells = list(layer.cell.cells) if kind == "stacked" else [layer.cell]
    units = []
    for k, cell in enumerate(cells):
        row = _cell_kind(cell, backend)
        family = row.family if row is not None else kinds.get("generic").with_states(len(_flat_sizes(cell.state_size)))
        suffix = f"cell{k}" if kind == "stacked" else ""
        units.append(ExposedUnit(suffix, cell, family, quantities_for(requested, family)))
    return units


def make_selector(layers: LayerSelector):
    """Turn a ``layers=`` argument into ``select(site, layer) -> bool`` and the names it expects.

    A name selects a call when it equals the layer's name, the call's dotted site, or a dotted
    prefix of it (so a nested model's name selects every recurrent layer inside it).
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


def classify(layer, site: str, select, backend) -> str:
    """`match_call`, except that a recurrent layer the rewrite cannot handle is left as a plain
    layer when ``layers=`` does not select it (so that excluding it is a way out)."""
    try:
        return match_call(layer, backend)
    except UnsupportedLayerError:
        if select(site, layer):
            raise
        return "layer"


def plan_rewrite(model, layers: LayerSelector = None, states=("c",)) -> list:
    """List every recurrent call of ``model`` (nested models included), what it would expose, and
    whether ``layers`` selects it.

    Refuses, before anything is built, what the rewrite cannot do.

    Example:
        >>> [(s.site, s.layer_class, s.quantities) for s in plan_rewrite(model, states=("c", "gates"))]
        [('encoder', 'LSTM', ('c', 'i', 'f', 'g', 'o')), ('decoder', 'GRU', ('h', 'z', 'r', 'n'))]

    Raises:
        UnsupportedModelError: subclassed or unbuilt model, or no recurrent layer at all.
        UnsupportedLayerError: a selected recurrent layer the rewrite cannot reproduce (see `match_call`).
        InvalidArgumentError: a name in ``layers`` that matches no recurrent layer, or ``states``
            naming nothing that a selected layer has.
    """
    backend = _backend_of(model)
    requested = parse_states(states)
    select, names = make_selector(layers)
    sites = []
    _collect_sites(model, backend, "", select, requested, sites, seen_models=[])
    if not sites:
        raise UnsupportedModelError(
            f"Model {model.name!r} has no LSTM or other recurrent layer (GRU, SimpleRNN, ConvLSTM, RNN; inside "
            f"Bidirectional and nested models included), so there is no state to expose. "
            f"Received layers: {[l.name for l in model.layers]}"
        )
    for name in names:
        if not any(name == s.layer.name or name == s.site or s.site.startswith(name + ".") for s in sites):
            raise InvalidArgumentError(
                f"layers= names {name!r}, but model {model.name!r} has no LSTM of that name, nor any other "
                f"recurrent layer. Its recurrent layers are: {sorted({s.site for s in sites})}. "
                f"Received: layers={list(names)!r}"
            )
    if not any(s.selected for s in sites):
        raise InvalidArgumentError(
            f"layers= selects none of the recurrent layers of model {model.name!r}: {sorted({s.site for s in sites})}."
        )
    for site in sites:
        if site.selected and not site.quantities:
            _refuse_states(site, requested, backend)
    return sites


def _refuse_states(site, requested, backend):
    layer = site.layer.forward_layer if site.kind == "bidirectional" else site.layer
    kind = recurrent_kind(layer, backend)
    offers = []
    for unit in exposed_units(layer, kind, requested, backend):
        gates = f"; 'gates' means {', '.join(unit.family.gates)}" if unit.family.gates else "; it has no gates"
        where = f"{unit.suffix}: " if unit.suffix else ""
        offers.append(f"{where}{', '.join(unit.family.quantities)}{gates}")
    raise InvalidArgumentError(
        f"states= names nothing that layer {site.site!r} ({site.layer_class}) has. It exposes {'; '.join(offers)}. "
        f"Ask for one of those, or leave the layer out with layers=[...]. Received: states={requested!r}"
    )


def _collect_sites(model, backend, prefix, select, requested, sites, seen_models):
    functional = _functional(model, backend)
    graph = build_graph(functional, backend)
    for key in walk(graph):
        data = graph.nodes[key]
        if data["is_input"]:
            continue
        layer = data["layer"]
        site = site_name(layer.name, data["call_index"], prefix)
        kind = classify(layer, site, select, backend)
        if kind in RECURRENT_KINDS or kind == "bidirectional":
            sites.append(RecurrentSite(site, layer, kind, select(site, layer), describe_layer(layer, backend),
                                       _site_quantities(layer, kind, requested, backend)))
        elif kind == "model":
            _collect_sites(layer, backend, site + ".", select, requested, sites, seen_models)


def _site_quantities(layer, kind, requested, backend) -> tuple:
    if kind == "bidirectional":
        directions = [("forward.", layer.forward_layer), ("backward.", layer.backward_layer)]
    else:
        directions = [("", layer)]
    found = []
    for prefix, sub in directions:
        sub_kind = kind if kind != "bidirectional" else recurrent_kind(sub, backend)
        for unit in exposed_units(sub, sub_kind, requested, backend):
            where = f"{prefix}{unit.suffix}." if unit.suffix else prefix
            found += [f"{where}{q}" for q in unit.quantities]
    return tuple(found)


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
    """Builds, once per original layer, the traced layer that replaces it, and copies weights.

    One method per family of recurrent layer (``traced_lstm``, ``traced_gru``, ...); `traced`
    picks it by kind. Each returns an unbuilt `TracedRNN` whose exposed sequences come in the
    order of `exposed_units`; weights are copied once it is built (`copy_weights`).
    """

    def __init__(self, backend, quantities: tuple, expose_masks: bool, method: str = "trace"):
        self.backend = backend
        self.quantities = quantities  # the parsed states= request; each layer takes what it has
        self.extras = tuple(q for q in quantities_for(quantities, LSTM_FAMILY) if q != "h")
        self.expose_masks = expose_masks
        self.method = method  # "trace" or "reconstruct" (the GPU fast path, LSTM only)
        self.rows = {row.kind: row for row in cell_kinds(backend)}
        # Interventions for the call being built: builder name ("forward", "backward", the layer's
        # name) -> {"edits", "input_width", "channels"}; set by the pass before each call.
        self.pending_edits = {}

    def traced(self, layer, kind: str, name: str, return_sequences=None, return_state=None, output_shape=None):
        """The traced replacement of one recurrent layer (not Bidirectional) of the given kind."""
        if kind == "conv_lstm":
            return self.traced_conv_lstm(layer, name, return_sequences, return_state, output_shape)
        build = {"lstm": self.traced_lstm, "gru": self.traced_gru, "simple_rnn": self.traced_simple_rnn,
                 "stacked": self.traced_stacked, "generic": self.traced_generic}[kind]
        return build(layer, name, return_sequences, return_state)

    def traced_lstm(self, lstm, name: str, return_sequences=None, return_state=None):
        """A TracedRNN configured like ``lstm`` (an LSTM or RNN(LSTMCell); unbuilt, weights not copied).

        With ``method="reconstruct"`` a ReconstructedLSTM instead, where it supports the layer.
        """
        if (self.method == "reconstruct" and reconstruct.unsupported_reason(lstm) is None
                and _wrapped_subclass(lstm, self.backend) is None):
            return reconstruct.reconstructed_lstm(
                self.backend, lstm, name, quantities_for(self.quantities, self.rows["lstm"].family),
                expose_mask=self.expose_masks,
                return_sequences=lstm.return_sequences if return_sequences is None else return_sequences,
                return_state=lstm.return_state if return_state is None else return_state,
                dtype=self.backend.dtype_policy(lstm),
            )
        # Unrolled, the RNN stacks the steps' outputs itself, which needs one tensor per step.
        return self._traced_single(lstm, name, self.rows["lstm"], return_sequences, return_state,
                                   cell_config={"split_outputs": not lstm.unroll})

    def traced_gru(self, gru, name: str, return_sequences=None, return_state=None):
        """A TracedRNN configured like ``gru`` (a GRU or RNN(GRUCell), either reset_after)."""
        return self._traced_single(gru, name, self.rows["gru"], return_sequences, return_state)

    def traced_simple_rnn(self, rnn, name: str, return_sequences=None, return_state=None):
        """A TracedRNN configured like ``rnn`` (a SimpleRNN or RNN(SimpleRNNCell))."""
        return self._traced_single(rnn, name, self.rows["simple_rnn"], return_sequences, return_state)

    def traced_conv_lstm(self, layer, name: str, return_sequences=None, return_state=None, output_shape=None):
        """A TracedRNN configured like a ConvLSTM1D/2D/3D; ``output_shape`` is the shape of the
        call's (first) output, which gives the states' spatial shape."""
        state_shape = conv_state_shape(layer, output_shape)
        quantities = quantities_for(self.quantities, CONV_LSTM_FAMILY)
        parts = 1 + len([q for q in quantities if q != "h"])
        return self._traced_single(
            layer, name, self.rows["conv_lstm"], return_sequences, return_state,
            cell_config={"rank": layer.cell.rank, "state_shape": list(state_shape)},
            part_shapes=[state_shape] * parts, state_shapes=[state_shape] * 2,
        )

    def traced_stacked(self, layer, name: str, return_sequences=None, return_state=None):
        """A TracedRNN over TracedStackedCells, for an RNN(StackedRNNCells([...]))."""
        backend = self.backend
        cells, extras, exposed, sizes, state_index, offset = [], [], [], [], {}, 0
        for unit in exposed_units(layer, "stacked", self.quantities, backend):
            row = _cell_kind(unit.cell, backend)
            if row is not None:
                # Each stacked cell emits what it exposes (h too: the stack's output is the last cell's).
                cell = row.traced_cell.from_config({**unit.cell.get_config(), "extras": list(unit.quantities)})
                emitted, widths = unit.quantities, [int(unit.cell.units)] * len(unit.quantities)
            else:
                cell = backend.TracedCell(copy_cell(unit.cell), name=f"traced_{unit.cell.name}",
                                          dtype=backend.dtype_policy(unit.cell))
                emitted, widths = cell.extras, cell.state_widths
            cells.append(cell)
            extras += [f"{unit.suffix}.{q}" for q in emitted]
            sizes += widths
            exposed += [f"{unit.suffix}.{q}" for q in unit.quantities]
            state_index.update({f"{unit.suffix}.{q}": offset + k for q, k in unit.family.state_index.items()})
            offset += len(_flat_sizes(unit.cell.state_size))
        stack = backend.TracedStackedCells(cells, name=layer.cell.name, dtype=backend.dtype_policy(layer.cell))
        return self._wrap(layer, name, stack, return_sequences, return_state, extras=extras, exposed=exposed,
                          state_index=state_index, output_alias=None,
                          part_sizes=[stack.step_output_size] + sizes, state_count=offset)

    def traced_generic(self, layer, name: str, return_sequences=None, return_state=None):
        """A TracedRNN over a TracedCell wrapping a copy of ``layer``'s custom cell."""
        (unit,) = exposed_units(layer, "generic", self.quantities, self.backend)
        cell = self.backend.TracedCell(copy_cell(layer.cell), name=f"traced_{layer.cell.name}",
                                       dtype=self.backend.dtype_policy(layer.cell))
        return self._wrap(layer, name, cell, return_sequences, return_state, extras=cell.extras,
                          exposed=unit.quantities, state_index=unit.family.state_index, output_alias=None,
                          part_sizes=[cell.step_output_size, *cell.state_widths],
                          state_count=len(cell.state_widths))

    def traced_bidirectional(self, bi, output_shape=None):
        """A TracedBidirectional: each direction traced by its own kind, merged as ``bi`` merges."""
        directions = []
        for name, sub in (("forward", bi.forward_layer), ("backward", bi.backward_layer)):
            kind = recurrent_kind(sub, self.backend, owner=bi)
            directions.append(self.traced(sub, kind, name, bi.return_sequences, bi.return_state, output_shape))
        return reconstruct.bidirectional_class(self.backend, directions)(
            *directions, merge_mode=bi.merge_mode, return_sequences=bi.return_sequences,
            return_state=bi.return_state, name=bi.name, dtype=self.backend.dtype_policy(bi),
        )

    def _traced_single(self, layer, name, row, return_sequences, return_state, cell_config=None, **split):
        quantities = quantities_for(self.quantities, row.family)
        extras = tuple(q for q in quantities if q != "h")
        edits = self.pending_edits.get(name)
        if edits:
            cell_config = {**(cell_config or {}), "edits": edits["edits"], "input_width": edits["input_width"]}
            split = {**split, "edit_channels": edits["channels"]}
        cell = row.traced_cell.from_config({**layer.cell.get_config(), **(cell_config or {}), "extras": list(extras)})
        return self._wrap(layer, name, cell, return_sequences, return_state, extras=extras, exposed=quantities,
                          state_index=row.family.state_index, **split)

    def _wrap(self, layer, name, cell, return_sequences, return_state, **traced_config):
        backend = self.backend
        subclass = _wrapped_subclass(layer, backend)
        if subclass is not None:
            traced_config["subclass"] = subclass
        rnn = backend.InnerRNN(
            cell, return_sequences=True, return_state=True, go_backwards=layer.go_backwards,
            stateful=layer.stateful, unroll=layer.unroll, zero_output_for_mask=False, name="rnn",
            dtype=backend.dtype_policy(layer),
        )
        traced_class = backend.TracedRNN if subclass is None else backend.TracedSubclassRNN
        return traced_class(
            rnn,
            return_sequences=layer.return_sequences if return_sequences is None else return_sequences,
            return_state=layer.return_state if return_state is None else return_state,
            zero_output_for_mask=bool(getattr(layer, "zero_output_for_mask", False)),
            expose_mask=self.expose_masks, name=name, dtype=backend.dtype_policy(layer), **traced_config,
        )

    # Weights: by role (kernel, recurrent kernel, bias), shapes checked, once the traced layer is built.

    def copy_weights(self, source, traced, kind: str) -> None:
        """Copy ``source``'s weights (and stateful states) into its built traced replacement."""
        if kind == "bidirectional":
            for sub, traced_sub in ((source.forward_layer, traced.forward_layer),
                                    (source.backward_layer, traced.backward_layer)):
                self.copy_weights(sub, traced_sub, recurrent_kind(sub, self.backend))
        elif kind == "lstm":
            self.copy_lstm_weights(source, traced)
        else:
            self.copy_recurrent_weights(source, traced, kind)

    def copy_lstm_weights(self, source_lstm, traced) -> None:
        """Copy kernel, recurrent kernel, bias (and stateful states) by role, checking shapes."""
        self.copy_recurrent_weights(source_lstm, traced, "lstm")

    def copy_recurrent_weights(self, source, traced, kind: str) -> None:
        """`copy_lstm_weights` for every kind: per cell by role, a custom cell's weights in order."""
        if kind == "stacked":
            pairs = []
            for source_cell, traced_cell in zip(source.cell.cells, traced.rnn.cell.cells):
                pairs += self._cell_pairs(source, source_cell, traced_cell)
        else:
            pairs = self._cell_pairs(source, source.cell, traced.rnn.cell)
        backend = self.backend
        # Stateful states: a ConvLSTM's travel flat in the traced RNN, hence the reshape.
        states = list(zip(backend.stateful_variables(source), backend.stateful_variables(traced.rnn)))
        for source_weight, target, flat_ok in [(s, t, False) for s, t in pairs] + [(s, t, True) for s, t in states]:
            value = np.asarray(backend.to_numpy(source_weight))
            shape = tuple(target.shape)
            if tuple(value.shape) != shape:
                if not (flat_ok and value.size == math.prod(shape)):
                    raise UnsupportedLayerError(
                        f"Layer {source.name!r} ({describe_layer(source, backend)}): weight {source_weight.name!r} "
                        f"has shape {value.shape}, but the traced copy expects {shape}. This is a bug in "
                        f"lstm_rewrite; please report it."
                    )
                value = value.reshape(shape)
            target.assign(value)

    def _cell_pairs(self, layer, source_cell, traced_cell) -> list:
        if isinstance(traced_cell, self.backend.TracedCell):
            source_weights, traced_weights = list(source_cell.weights), list(traced_cell.cell.weights)
            if len(source_weights) != len(traced_weights):
                raise UnsupportedLayerError(
                    f"Layer {layer.name!r} ({describe_layer(layer, self.backend)}): the copy of its cell "
                    f"{source_cell.name!r} made from get_config() has {len(traced_weights)} weights, the cell "
                    f"{len(source_weights)}. Give the cell a get_config() that rebuilds it exactly, or exclude "
                    f"the layer with layers=[...]. Received: {[w.name for w in source_weights]}"
                )
            return list(zip(source_weights, traced_weights))
        roles = ["kernel", "recurrent_kernel"] + (["bias"] if source_cell.use_bias else [])
        return [(getattr(source_cell, role), getattr(traced_cell, role)) for role in roles]


def conv_state_shape(layer, output_shape) -> tuple:
    """One state's shape (no batch axis) of a ConvLSTM call whose first output has ``output_shape``."""
    cell = layer.cell
    rank = int(cell.rank)
    if cell.data_format == "channels_first":
        return (int(cell.filters),) + tuple(int(d) for d in output_shape[-rank:])
    return tuple(int(d) for d in output_shape[-(rank + 1):-1]) + (int(cell.filters),)


# --- the pass ----------------------------------------------------------------------------


class _Level:
    """What rebuilding one functional level produced: the new model and its added outputs."""

    def __init__(self, inputs, model, exposed, masks):
        self.inputs = inputs  # the new model's inputs, in the original input structure
        self.model = model
        self.exposed = exposed  # [ExposedOutput] with names relative to this level
        self.masks = masks  # {relative site: relative mask name}


class RewritePass:
    """Rebuild a model level by level, replacing the selected recurrent calls."""

    def __init__(self, model, states=("c",), layers: LayerSelector = None, expose_masks: bool = False,
                 method: str = "trace", edits=None):
        self.backend = _backend_of(model)
        # Interventions (lstm_rewrite.interventions): site -> {"edits": [...], "inputs": [(name, width,
        # is_steps_mask)]}, and the call-time inputs the pass creates for them, by name.
        self.edits = dict(edits or {})
        self.edit_inputs = {}
        self.layer_edits = {}
        self.quantities = parse_states(states)
        self.sites = plan_rewrite(model, layers, states)
        self.select, _ = make_selector(layers)
        self.builder = ReplacementBuilder(self.backend, self.quantities, expose_masks, method)
        self.model = model
        self.layer_copies = {}  # id(original layer) -> its copy (or traced replacement)
        self.level_copies = {}  # id(nested model) -> _Level
        self.reused = []

    def run(self):
        """Return ``(traced_model, RewriteRecord)``."""
        # Every layer is called on symbolic inputs here: the traced ones need not build their loops.
        with shapes_only():
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
        record.exposed = list(level.exposed)
        record.masks = dict(level.masks)
        record.replaced = sorted({e.layer for e in level.exposed})
        record.reused_layers = self.reused
        # The record is a field of the traced model, saved with it (see `lstm_rewrite.record`).
        traced = backend.make_traced_model(level.inputs, outputs[:original_count] + named, name=self.model.name)
        traced.rewrite_record = record
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
            kind = classify(layer, prefix + site, self.select, backend)
            if (kind in RECURRENT_KINDS or kind == "bidirectional") and self.select(prefix + site, layer):
                outputs, added = self._call_traced(layer, kind, site, data, args, kwargs, prefix)
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
        if prefix == "" and model is self.model and self.edit_inputs:
            inputs = _with_extra_inputs(inputs, [self.edit_inputs[n] for n in self.edit_input_order()])
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

    def edit_input_order(self) -> list:
        """The names of the call-time edit inputs, in the order the intervened model takes them."""
        order = [name for spec in self.edits.values() for name, _, _ in spec.get("inputs", ())]
        return [name for name in dict.fromkeys(order) if name in self.edit_inputs]

    def _pending_edits(self, layer, kind, site, prefix, inputs, rest):
        """Per direction name the builder uses, the edit config of this call (see lstm_rewrite.interventions)."""
        if kind == "bidirectional":
            directions = [("forward", f"{prefix}{site}.forward"), ("backward", f"{prefix}{site}.backward")]
        else:
            directions = [(layer.name, f"{prefix}{site}")]
        pending, tensors = {}, []
        for name, where in directions:
            spec = self.edits.get(where)
            if not spec:
                continue
            steps = inputs.shape[1]
            for edit in spec["edits"]:
                _check_steps(edit, steps)
            if spec.get("inputs") and prefix:
                raise InvalidArgumentError(
                    f"The interventions on {where!r} need call-time data (a per-sample step mask or a patch source), "
                    f"and {where!r} is inside the nested model {prefix[:-1]!r}: call-time data reach top-level "
                    f"recurrent layers only. Give fixed steps (an int, a slice, a list), or flatten the model. "
                    f"Received: {[e['target'] for e in spec['edits']]}")
            for input_name, width, is_mask in spec.get("inputs", ()):
                if input_name not in self.edit_inputs:
                    shape = (None, steps) if is_mask else (None, steps, width)
                    self.edit_inputs[input_name] = self.backend.keras.Input(batch_shape=shape, name=input_name)
                tensors.append(self.edit_inputs[input_name])
            pending[name] = {"edits": spec["edits"], "input_width": int(inputs.shape[-1]),
                             "channels": [w for _, w, _ in spec.get("inputs", ())]}
        if tensors:
            rest = {**rest, "edit_inputs": tensors}
        return pending, rest

    def _call_traced(self, layer, kind, site, data, args, kwargs, prefix=""):
        backend, builder = self.backend, self.builder
        inputs, initial_state, mask, rest = backend.recurrent_call(args, kwargs)
        pending, rest = self._pending_edits(layer, kind, site, prefix, inputs, rest) if self.edits else ({}, rest)
        traced = self.layer_copies.get(id(layer))
        fresh = traced is None
        if not fresh and self.layer_edits.get(id(layer)) != pending:
            raise InvalidArgumentError(
                f"Layer {layer.name!r} ({describe_layer(layer, backend)}) is shared, called more than once, and the "
                f"interventions differ between its calls ({prefix}{site}): one traced copy runs every call. Give "
                f"every call of the layer the same interventions. Received: {sorted(pending) or 'none'} here")
        builder.pending_edits = pending
        if fresh:
            self.layer_edits[id(layer)] = pending
            output_shape = tuple(data["outputs"][0].shape)
            if kind == "bidirectional":
                traced = builder.traced_bidirectional(layer, output_shape)
            elif kind == "lstm":
                traced = builder.traced_lstm(layer, layer.name)
            else:
                traced = builder.traced(layer, kind, layer.name, output_shape=output_shape)
            self.layer_copies[id(layer)] = traced
        try:
            outputs = backend.flatten(backend.call_traced(traced, inputs, initial_state, mask, rest))
        except Exception as error:  # noqa: BLE001 - whatever the subclass's own call raises
            if not isinstance(traced, backend.TracedSubclassRNN):
                raise
            cause = error
            while (cause.__cause__ or cause.__context__) is not None:  # Keras 3 wraps it in its own
                cause = cause.__cause__ or cause.__context__
            raise UnsupportedLayerError(
                f"Layer {layer.name!r} ({describe_layer(layer, backend)}) overrides call, and its call fails when "
                f"run over the traced layer ({type(cause).__name__}: {' '.join(str(cause).split())[:300]}); "
                f"the traced layer has the Keras layer's call and configuration, not the subclass's own "
                f"attributes or methods. Exclude it with layers=[...]. "
                f"Received: {type(layer).__module__}.{type(layer).__name__}"
            ) from error
        if fresh:
            builder.copy_weights(layer, traced, kind)
        original_count = len(data["outputs"])
        extra = outputs[original_count:]
        if kind == "bidirectional":
            directions = [(f"{site}.forward", layer.forward_layer), (f"{site}.backward", layer.backward_layer)]
        else:
            directions = [(site, layer)]
        # Per direction the traced layer returns its exposed sequences, then (with expose_masks) its
        # mask. States come first in the record, then one mask per exposed site; a Bidirectional's
        # directions (aligned to input time) and a stack's cells each name the mask of their call.
        states, masks, position = [], [], 0
        for sub_site, sub in directions:
            sub_kind = kind if kind != "bidirectional" else recurrent_kind(sub, backend)
            if kind == "bidirectional":
                time_order = "backward_aligned" if sub is layer.backward_layer else "forward"
            else:
                time_order = "go_backwards" if sub.go_backwards else "forward"
            unit_sites = []
            for unit in exposed_units(sub, sub_kind, builder.quantities, backend):
                unit_site = f"{sub_site}.{unit.suffix}" if unit.suffix else sub_site
                layer_class = type(unit.cell).__name__ if unit.suffix else describe_layer(sub, backend)
                for q in unit.quantities:
                    tensor = extra[position]
                    position += 1
                    shape = tuple(int(d) for d in tensor.shape[2:])
                    units = int(sub.cell.filters) if sub_kind == "conv_lstm" else shape[-1]
                    entry = ExposedOutput(output_name(unit_site, q), unit_site, q, layer_class, units,
                                          backend.dtype_policy(sub), shape,
                                          time_order=time_order)
                    states.append((entry, tensor))
                if unit.quantities:
                    unit_sites.append(unit_site)
            if builder.expose_masks:
                masks += [((u, output_name(u, MASK)), extra[position]) for u in unit_sites]
                position += 1
        return outputs[:original_count], states + masks

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


def _with_extra_inputs(inputs, extra):
    """The model's inputs followed by the call-time edit inputs (a dict gains their names)."""
    if isinstance(inputs, dict):
        return {**inputs, **{t.name if hasattr(t, "name") else str(k): t for k, t in enumerate(extra)}}
    if isinstance(inputs, (list, tuple)):
        return list(inputs) + list(extra)
    return [inputs] + list(extra)


def _check_steps(edit, steps) -> None:
    """Refuse fixed steps that the call's (static) time axis does not have."""
    if steps is None:
        return
    spec, latest = edit["steps"], None
    if "at" in spec:
        latest = max(spec["at"])
    elif "channel" not in spec:
        latest = int(spec.get("start", 0))
    if latest is not None and latest >= int(steps):
        raise InvalidArgumentError(
            f"The intervention on {edit['target']!r} edits step {latest}, but that layer's input has {steps} steps "
            f"(0 to {steps - 1}, input time). Give steps within range. Received: steps={edit['steps_given']!r}")


def _clone_layer(layer):
    """An exact, unbuilt copy of ``layer`` from its config; the layer itself if it cannot be copied."""
    try:
        return layer.__class__.from_config(layer.get_config())
    except Exception:  # noqa: BLE001 - any failure to copy means: call the original, as Keras would
        # A layer without a faithful get_config (custom code) is called as it is. It then shares its
        # weights with the user's model; the record lists it in reused_layers.
        return layer


def rewrite_model(model, states=("c",), layers: LayerSelector = None, expose_masks: bool = False,
                  method: str = "trace", edits=None):
    """Rebuild ``model`` with every selected recurrent call traced. Returns ``(traced, RewriteRecord)``.

    This is the pass alone, without verification; `lstm_rewrite.expose_cell_states` adds it.
    ``method`` is "trace" or "reconstruct" (see `lstm_rewrite.layers.reconstructed`), already resolved.

    Example:
        >>> traced, record = rewrite_model(model, states=("c", "h"))
        >>> record.output_names
        ['encoder.c', 'encoder.h']
    """
    return RewritePass(model, states, layers, expose_masks, method, edits).run()
