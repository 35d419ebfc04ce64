"""The plan: what the rewrite will replace, every call classified once, refused before anything is built.

`plan_model` walks the model's call graph level by level (nested models included) and classifies
each call once (`lstm_rewrite.rewrite.match`): a `RecurrentSite` for a recurrent call, a
`PlannedModel` for a nested model, nothing for a layer that is copied as it is. A recurrent call
holds one `PlannedLayer` per direction (one, or a Bidirectional's two), and each of those one
`ExposedCell` per cell (the layer's cell, or every cell of a stack) with what that cell exposes. The rebuild
(`lstm_rewrite.rewrite.rebuild`) consumes this plan; nothing is classified twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Union

import networkx as nx

from .. import backends
from ..errors import InvalidArgumentError, UnsupportedLayerError, UnsupportedModelError
from ..graph import build_graph, walk
from ..kinds import RecurrentKind
from ..naming import output_name, parse_states, site_name
from .match import (
    cell_kind,
    describe_layer,
    flat_state_sizes,
    is_bidirectional,
    matchers,
    recurrent_kind,
    refuse_wrapped,
    wrapped_recurrent,
    wrapping_subclass,
)
from .record import BACKWARD_ALIGNED, FORWARD, GO_BACKWARDS

LayerSelector = Union[None, str, Iterable[str], Callable[[object], bool]]


@dataclasses.dataclass(frozen=True)
class Selector:
    """A parsed ``layers=`` argument: ``selector(site, layer) -> bool``.

    A name selects a call when it equals the layer's name, the call's dotted site, or a dotted
    prefix of it (so a nested model's name selects every recurrent layer inside it).
    """

    names: tuple | None = None  # the names given (each must name a recurrent call); None: every call
    predicate: Callable | None = None  # a predicate on the layer, when one was given (then names is None)

    def __call__(self, site: str, layer) -> bool:
        if self.predicate is not None:
            return bool(self.predicate(layer))
        if self.names is None:
            return True
        return any(self.names_call(name, site, layer) for name in self.names)

    @staticmethod
    def names_call(name: str, site: str, layer) -> bool:
        """Whether ``name`` (one entry of ``layers=``) names the call ``site`` of ``layer``."""
        return name == layer.name or name == site or site.startswith(name + ".")


def make_selector(layers: LayerSelector) -> Selector:
    """Parse a ``layers=`` argument: None (every recurrent call), a name, names, or a predicate.

    Example:
        >>> make_selector(["encoder"])("encoder", model.get_layer("encoder"))
        True

    Raises:
        InvalidArgumentError: an element of a list that is not a name.
    """
    if layers is None:
        return Selector()
    if callable(layers):
        return Selector(predicate=layers)
    names = (layers,) if isinstance(layers, str) else tuple(layers)
    for name in names:
        if not isinstance(name, str):
            raise InvalidArgumentError(
                f"layers= takes a layer name, a list of names or a predicate. Received an element {name!r} "
                f"of type {type(name).__name__}"
            )
    return Selector(names=names)


@dataclasses.dataclass(frozen=True)
class ExposedCell:
    """One cell of a recurrent layer as the rewrite exposes it: the layer's cell, or one cell of a stack."""

    suffix: str  # "" for the layer's own cell; "cell0", "cell1", ... for the cells of a stack
    cell: object
    kind: RecurrentKind  # the cell's own kind (a custom cell's specialised to its states)
    quantities: tuple  # what it exposes, in output order

    def site(self, layer_site: str) -> str:
        """The dotted site of this cell within the layer at ``layer_site``: ``stack.cell1``."""
        return f"{layer_site}.{self.suffix}" if self.suffix else layer_site


@dataclasses.dataclass(frozen=True)
class PlannedLayer:
    """One recurrent layer the rewrite traces: the layer of a call, or one direction of a Bidirectional."""

    site: str  # dotted site: "encoder", "bi.backward", "body.inner", "shared.call1"
    traced_name: str  # its traced replacement's name: the layer's, or "forward" / "backward"
    layer: object
    kind: RecurrentKind
    layer_class: str  # as reports show it: "GRU", "RNN(LSTMCell)", "RNN(StackedRNNCells)"
    time_order: str  # one of `lstm_rewrite.rewrite.record.TIME_ORDERS`
    cells: tuple  # (ExposedCell, ...): the cells whose quantities it exposes, in output order
    subclass: type | None = None  # the layer's class, when its own call wraps the Keras one

    @property
    def quantities(self) -> tuple:
        """What it exposes, relative to its site: ``"c"``, or ``"cell1.c"`` for a stack."""
        return tuple(f"{c.suffix}.{q}" if c.suffix else q for c in self.cells for q in c.quantities)


@dataclasses.dataclass(frozen=True)
class RecurrentSite:
    """One call of a recurrent layer (or of a Bidirectional) somewhere in the model, as planned."""

    site: str  # dotted name of the call, e.g. "body.encoder"
    layer: object
    selected: bool
    layer_class: str  # e.g. "GRU", "Bidirectional(LSTM)", "RNN(StackedRNNCells)"
    directions: tuple  # (PlannedLayer,): the layer itself, or a Bidirectional's forward and backward
    bidirectional: bool = False

    @property
    def kind(self) -> str:
        """The registry name of its kind ("lstm", "stacked", ...), or "bidirectional"."""
        return "bidirectional" if self.bidirectional else self.directions[0].kind.name

    @property
    def quantities(self) -> tuple:
        """What it exposes, relative to the site: ``"c"``, ``"forward.h"``, ``"cell1.c"``."""
        if not self.bidirectional:
            return self.directions[0].quantities
        return tuple(f"{d.traced_name}.{q}" for d in self.directions for q in d.quantities)

    @property
    def output_names(self) -> tuple:
        """The names of the outputs the rewrite adds for this call (when it is selected)."""
        return tuple(output_name(self.site, q) for q in self.quantities)


@dataclasses.dataclass
class PlannedModel:
    """One functional level of the model: the model itself, or a nested model at one call path."""

    model: object
    functional: object  # the functional model whose graph this is
    graph: nx.DiGraph  # its call graph (`lstm_rewrite.graph.build_graph`)
    prefix: str  # "" at the top; "body." inside the nested model called as "body"
    order: list = dataclasses.field(default_factory=list)  # its calls' node keys, in `walk` order (no inputs)
    # node key -> RecurrentSite (a recurrent call) or PlannedModel (a nested model); every other
    # call is absent: it is copied as it is.
    calls: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Plan:
    """What a rewrite will do to a model: every recurrent call, classified once."""

    model: object
    backend: object
    requested: tuple  # the parsed states= request; each layer takes what it has
    selector: Selector
    top: PlannedModel
    sites: list  # [RecurrentSite], every recurrent call in walk order, nested models included

    @property
    def selected(self) -> list:
        """The sites the rewrite replaces."""
        return [s for s in self.sites if s.selected]


def plan_model(model, states=("c",), layers: LayerSelector = None) -> Plan:
    """Classify every call of ``model`` once and refuse, before anything is built, what the rewrite cannot do.

    Example:
        >>> plan = plan_model(model, states=("c", "gates"))
        >>> [s.site for s in plan.selected]
        ['encoder', 'decoder']

    Raises:
        UnsupportedModelError: subclassed or unbuilt model, or no recurrent layer at all.
        UnsupportedLayerError: a selected recurrent layer the rewrite cannot reproduce (see
            `lstm_rewrite.rewrite.match.recurrent_kind`).
        InvalidArgumentError: a name in ``layers`` that matches no recurrent layer, or ``states``
            naming nothing that a selected layer has.
    """
    backend = backend_of(model)
    plan = _plan(model, backend, parse_states(states), make_selector(layers))
    sites, names = plan.sites, plan.selector.names or ()
    if not sites:
        raise UnsupportedModelError(
            f"Model {model.name!r} has no LSTM or other recurrent layer (GRU, SimpleRNN, ConvLSTM, RNN; inside "
            f"Bidirectional and nested models included), so there is no state to expose. "
            f"Received layers: {[l.name for l in model.layers]}"
        )
    for name in names:
        if not any(Selector.names_call(name, s.site, s.layer) for s in sites):
            raise InvalidArgumentError(
                f"layers= names {name!r}, but model {model.name!r} has no LSTM of that name, nor any other "
                f"recurrent layer. Its recurrent layers are: {sorted({s.site for s in sites})}. "
                f"Received: layers={list(names)!r}"
            )
    if not plan.selected:
        raise InvalidArgumentError(
            f"layers= selects none of the recurrent layers of model {model.name!r}: {sorted({s.site for s in sites})}."
        )
    for site in plan.selected:
        if not site.quantities:
            _refuse_states(site, plan.requested)
    return plan


def plan_rewrite(model, layers: LayerSelector = None, states=("c",)) -> list:
    """List every recurrent call of ``model`` (nested models included), what it would expose, and
    whether ``layers`` selects it (`plan_model`'s sites).

    Example:
        >>> [(s.site, s.layer_class, s.quantities) for s in plan_rewrite(model, states=("c", "gates"))]
        [('encoder', 'LSTM', ('c', 'i', 'f', 'g', 'o')), ('decoder', 'GRU', ('h', 'z', 'r', 'n'))]

    Raises:
        UnsupportedModelError, UnsupportedLayerError, InvalidArgumentError: as `plan_model`.
    """
    return plan_model(model, states, layers).sites


def recurrent_sites(model) -> list:
    """Every recurrent call of ``model`` that the rewrite can trace, none selected (what
    interventions can target); those it cannot trace are left out, and nothing is refused.

    Example:
        >>> [d.site for s in recurrent_sites(model) for d in s.directions]
        ['lstm', 'bi.forward', 'bi.backward']
    """
    return _plan(model, backend_of(model), ("c",), Selector(predicate=lambda layer: False)).sites


def _plan(model, backend, requested: tuple, selector: Selector) -> Plan:
    sites = []
    top = _plan_level(model, backend, "", selector, requested, sites, graphs={})
    return Plan(model, backend, requested, selector, top, sites)


def _plan_level(model, backend, prefix, selector, requested, sites, graphs) -> PlannedModel:
    functional = functional_of(model, backend)
    # A nested model called twice is planned per call path, over the one graph of its calls.
    known = graphs.get(id(functional))
    if known is None:
        graph = build_graph(functional, backend)
        known = graphs[id(functional)] = (graph, [k for k in walk(graph) if not graph.nodes[k]["is_input"]])
    graph, order = known
    level = PlannedModel(model, functional, graph, prefix, order)
    for key in order:
        data = graph.nodes[key]
        layer = data["layer"]
        site = site_name(layer.name, data["call_index"], prefix)
        if backend.is_model(layer):
            level.calls[key] = _plan_level(layer, backend, site + ".", selector, requested, sites, graphs)
            continue
        try:
            planned = _plan_call(layer, site, backend, selector, requested)
        except UnsupportedLayerError:
            # A recurrent layer the rewrite cannot handle stays a plain layer when layers= leaves
            # it out: excluding it is the way out that the messages offer.
            if selector(site, layer):
                raise
            continue
        if planned is not None:
            level.calls[key] = planned
            sites.append(planned)
    return level


def _plan_call(layer, site, backend, selector, requested) -> RecurrentSite | None:
    """The RecurrentSite of a recurrent call; None for any other layer (not a nested model)."""
    if is_bidirectional(layer, backend):
        directions = tuple(
            _plan_layer(sub, f"{site}.{name}", name, recurrent_kind(sub, backend, owner=layer), order,
                        requested, backend)
            for name, sub, order in (("forward", layer.forward_layer, FORWARD),
                                     ("backward", layer.backward_layer, BACKWARD_ALIGNED)))
        return RecurrentSite(site, layer, selector(site, layer), describe_layer(layer, backend), directions,
                             bidirectional=True)
    if isinstance(layer, backend.RNN):
        kind = recurrent_kind(layer, backend)
        order = GO_BACKWARDS if layer.go_backwards else FORWARD
        direction = _plan_layer(layer, site, layer.name, kind, order, requested, backend)
        return RecurrentSite(site, layer, selector(site, layer), direction.layer_class, (direction,))
    inner = wrapped_recurrent(layer, backend)
    if inner is not None:
        refuse_wrapped(layer, inner)
    return None


def _plan_layer(layer, site, traced_name, kind, time_order, requested, backend) -> PlannedLayer:
    return PlannedLayer(site, traced_name, layer, kind, describe_layer(layer, backend), time_order,
                        exposed_cells(layer, kind, requested, backend), wrapping_subclass(layer, backend))


def exposed_cells(layer, kind: RecurrentKind, requested, backend) -> tuple:
    """The cells of one recurrent layer (not Bidirectional) and the quantities each exposes.

    Example:
        >>> [(c.suffix, c.quantities) for c in exposed_cells(stack, stacked_kind, ("c",), backend)]
        [('cell0', ('c',)), ('cell1', ('h',))]
    """
    if not kind.stacks:
        return (_exposed_cell("", layer.cell, kind, requested),)
    custom = matchers(backend).custom
    return tuple(_exposed_cell(f"cell{k}", cell, cell_kind(cell, backend) or custom, requested)
                 for k, cell in enumerate(layer.cell.cells))


def _exposed_cell(suffix, cell, kind, requested) -> ExposedCell:
    if kind.numbered:
        kind = kind.with_states(len(flat_state_sizes(cell.state_size)))
    return ExposedCell(suffix, cell, kind, kind.select(requested))


def _refuse_states(site: RecurrentSite, requested) -> None:
    offers = []
    for cell in site.directions[0].cells:
        kind = cell.kind
        gates = f"; 'gates' means {', '.join(kind.gates)}" if kind.gates else "; it has no gates"
        where = f"{cell.suffix}: " if cell.suffix else ""
        offers.append(f"{where}{', '.join(kind.quantities)}{gates}")
    raise InvalidArgumentError(
        f"states= names nothing that layer {site.site!r} ({site.layer_class}) has. It exposes {'; '.join(offers)}. "
        f"Ask for one of those, or leave the layer out with layers=[...]. Received: states={requested!r}"
    )


def functional_of(model, backend):
    """The functional model behind ``model`` (itself, or a Sequential's), refusing any other.

    Raises:
        UnsupportedModelError: an unbuilt or subclassed model, naming it.
    """
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


def backend_of(model):
    """The backend of ``model``'s flavour, refusing what is not a Keras model."""
    if not hasattr(model, "layers") or not hasattr(model, "name"):
        raise UnsupportedModelError(
            f"expose_cell_states takes a Keras model (Keras 3 or tf-keras). Received: {type(model).__name__}"
        )
    return backends.for_model(model)
