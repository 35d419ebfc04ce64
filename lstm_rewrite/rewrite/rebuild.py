"""The rebuild: re-call every layer of the planned model on new inputs, the selected calls replaced.

`RewritePass` consumes a `lstm_rewrite.rewrite.plan.Plan`: it walks each planned level's call graph
in the plan's order and looks every call up in the plan (``PlannedModel.calls``), so nothing is
classified twice. A selected recurrent call is replaced by the traced layer the builder makes; a
nested model is rebuilt recursively; any other layer is called as a copy of itself
(``from_config`` + weights), so the user's model never changes and shared layers stay shared. Each
traced call names its added outputs from its plan; the record lists them with their tensors.
"""

from __future__ import annotations

import dataclasses

from ..layers.shapes import shapes_only
from ..errors import InvalidArgumentError, UnsupportedLayerError, UnsupportedModelError
from ..naming import MASK, output_name, site_name
from . import weights
from .build import ReplacementBuilder
from .edits import CallEdits
from .plan import LayerSelector, PlannedModel, RecurrentSite, plan_model
from .record import ExposedOutput, RewriteRecord


@dataclasses.dataclass
class _Level:
    """What rebuilding one functional level produced, with names relative to the level."""

    inputs: object  # the new inputs, in the original input structure
    outputs: list  # the new tensors of the level's original outputs
    exposed: list  # [ExposedOutput]
    masks: dict  # {site: mask output name}
    tensors: dict  # output name (exposed or mask) -> its tensor
    model: object = None  # the rebuilt nested model (a nested level only)

    @property
    def added_names(self) -> list:
        """The names of the added outputs, in output order: states, then masks."""
        return [e.name for e in self.exposed] + list(self.masks.values())


class RewritePass:
    """Rebuild a model level by level, replacing the selected recurrent calls of its plan."""

    def __init__(self, model, states=("c",), layers: LayerSelector = None, expose_masks: bool = False,
                 method: str = "trace", edits=None):
        self.plan = plan_model(model, states, layers)
        self.backend = self.plan.backend
        self.model = model
        # Interventions (lstm_rewrite.interventions), and the call-time inputs made for them.
        self.edits = CallEdits(edits, self.backend.keras) if edits else None
        self.layer_edits = {}  # id(original layer) -> the edits its traced copy was built with
        self.builder = ReplacementBuilder(self.backend, expose_masks, method)
        self.expose_masks = expose_masks
        self.layer_copies = {}  # id(original layer) -> its copy (or traced replacement)
        self.level_copies = {}  # id(nested model) -> _Level
        self.reused = []

    def run(self):
        """Return ``(traced_model, RewriteRecord)``."""
        backend, top = self.backend, self.plan.top
        # Every layer is called on symbolic inputs here: the traced ones need not build their loops.
        with shapes_only():
            level = self._rebuild(top)
        inputs = self.edits.with_inputs(level.inputs) if self.edits else level.inputs
        taken = {data["layer"].name for _, data in top.graph.nodes(data=True)}
        if self.edits:
            taken.update(self.edits.inputs)
        dtypes = {e.name: e.dtype for e in level.exposed}
        named = []
        for name in level.added_names:
            if name in taken:
                raise UnsupportedModelError(
                    f"Model {self.model.name!r} already has a layer named {name!r}, the name of an exposed output. "
                    f"Rename that layer before rewriting. Received: layer {name!r}"
                )
            named.append(backend.Identity(name=name, dtype=dtypes.get(name, "float32"))(level.tensors[name]))
        record = RewriteRecord(
            original_output_names=backend.output_names(self.model),
            exposed=list(level.exposed),
            masks=dict(level.masks),
            replaced=sorted({e.site for e in level.exposed}),
            reused_layers=self.reused,
        )
        # The record is a field of the traced model, saved with it (see `lstm_rewrite.rewrite.record`).
        traced = backend.make_traced_model(inputs, level.outputs + named, name=self.model.name)
        traced.rewrite_record = record
        return traced, record

    def _rebuild(self, planned: PlannedModel) -> _Level:
        backend, graph = self.backend, planned.graph
        inputs = backend.map_structure(backend.make_input, graph.graph["inputs"])
        tensors = {}
        for old, new in zip(backend.flatten(graph.graph["inputs"]), backend.flatten(inputs)):
            tensors[id(old)] = new
        level = _Level(inputs, [], [], {}, {})

        def new_tensor(obj):
            return tensors[id(obj)] if backend.is_tensor(obj) else obj

        for key in planned.order:
            data = graph.nodes[key]
            layer = data["layer"]
            args = backend.map_structure(new_tensor, list(data["args"]))
            kwargs = backend.map_structure(new_tensor, dict(data["kwargs"]))
            call = planned.calls.get(key)
            if isinstance(call, RecurrentSite) and call.selected:
                outputs, exposed, masks, added = self._call_traced(call, planned.prefix, data, args, kwargs)
            elif isinstance(call, PlannedModel):
                outputs, exposed, masks, added = self._call_nested(call, data, args, kwargs)
            else:
                outputs, exposed, masks, added = self._call_copy(layer, args, kwargs), [], {}, {}
            for old, new in zip(data["outputs"], backend.flatten(outputs)):
                tensors[id(old)] = new
            level.exposed += exposed
            level.masks.update(masks)
            level.tensors.update(added)
        level.outputs = [tensors[id(t)] for t in graph.graph["outputs"]]
        return level

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

    def _call_traced(self, site: RecurrentSite, prefix: str, data, args, kwargs):
        """Call the traced replacement of a selected recurrent call; its outputs and what it adds."""
        backend, layer = self.backend, site.layer
        inputs, initial_state, mask, rest = backend.recurrent_call(args, kwargs)
        pending, rest = self.edits.for_call(site, prefix, inputs, rest) if self.edits else ({}, rest)
        traced = self.layer_copies.get(id(layer))
        fresh = traced is None
        if not fresh and self.layer_edits.get(id(layer)) != pending:
            raise InvalidArgumentError(
                f"Layer {layer.name!r} ({site.layer_class}) is shared, called more than once, and the "
                f"interventions differ between its calls ({site.site}): one traced copy runs every call. Give "
                f"every call of the layer the same interventions. Received: {sorted(pending) or 'none'} here")
        if fresh:
            self.layer_edits[id(layer)] = pending
            traced = self.builder.traced_site(site, tuple(data["outputs"][0].shape), pending)
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
                f"Layer {layer.name!r} ({site.layer_class}) overrides call, and its call fails when "
                f"run over the traced layer ({type(cause).__name__}: {' '.join(str(cause).split())[:300]}); "
                f"the traced layer has the Keras layer's call and configuration, not the subclass's own "
                f"attributes or methods. Exclude it with layers=[...]. "
                f"Received: {type(layer).__module__}.{type(layer).__name__}"
            ) from error
        if fresh:
            for planned, traced_layer in zip(site.directions, _traced_directions(traced, site)):
                weights.copy_weights(backend, planned, traced_layer)
        original_count = len(data["outputs"])
        exposed, masks, added = self._name_outputs(site, prefix, outputs[original_count:])
        return outputs[:original_count], exposed, masks, added

    def _name_outputs(self, site: RecurrentSite, prefix: str, extra):
        """The record entries of one traced call, named from its plan, and their tensors by name.

        Per direction the traced layer returns what its plan lists (each cell's quantities, in
        order), then with expose_masks its mask. States come first in the record, then one mask
        per exposed cell: a Bidirectional's directions (aligned to input time) and a stack's cells
        each name the mask of their call.
        """
        exposed, masks, added, position = [], {}, {}, 0
        for planned in site.directions:
            layer_site = planned.site[len(prefix):]
            dtype = self.backend.dtype_policy(planned.layer)
            mask_sites = []
            for cell in planned.cells:
                cell_site = cell.site(layer_site)
                layer_class = type(cell.cell).__name__ if cell.suffix else planned.layer_class
                for quantity in cell.quantities:
                    tensor = extra[position]  # [batch, time, units] ([batch, time, *spatial, filters])
                    position += 1
                    shape = tuple(int(d) for d in tensor.shape[2:])
                    units = int(cell.cell.filters) if cell.kind.spatial else shape[-1]
                    entry = ExposedOutput(output_name(cell_site, quantity), cell_site, quantity, layer_class, units,
                                          dtype, shape, time_order=planned.time_order)
                    exposed.append(entry)
                    added[entry.name] = tensor
                if cell.quantities:
                    mask_sites.append(cell_site)
            if self.expose_masks:
                for cell_site in mask_sites:
                    masks[cell_site] = output_name(cell_site, MASK)
                    added[masks[cell_site]] = extra[position]
                position += 1
        return exposed, masks, added

    def _call_nested(self, planned: PlannedModel, data, args, kwargs):
        """Call the rebuilt nested model; its outputs and what it adds, named under its call's site."""
        level = self.level_copies.get(id(planned.model))
        if level is None:
            level = self._rebuild(planned)
            named = [self.backend.Identity(name=e.name, dtype=e.dtype)(level.tensors[e.name]) for e in level.exposed]
            named += [self.backend.Identity(name=name)(level.tensors[name]) for name in level.masks.values()]
            level.model = self.backend.make_model(level.inputs, level.outputs + named, name=planned.model.name)
            self.level_copies[id(planned.model)] = level
        outputs = self.backend.flatten(level.model(*args, **kwargs))
        original_count = len(data["outputs"])
        # The nested model returns its added outputs after its own, in `added_names` order.
        added = dict(zip(level.added_names, outputs[original_count:]))
        site = site_name(data["layer"].name, data["call_index"])
        exposed = [dataclasses.replace(e, name=f"{site}.{e.name}", site=f"{site}.{e.site}") for e in level.exposed]
        masks = {f"{site}.{s}": f"{site}.{n}" for s, n in level.masks.items()}
        return outputs[:original_count], exposed, masks, {f"{site}.{n}": t for n, t in added.items()}


def _traced_directions(traced, site: RecurrentSite) -> list:
    """The traced layer of each planned direction: the layer itself, or a Bidirectional's two."""
    return [traced.forward_layer, traced.backward_layer] if site.bidirectional else [traced]


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
    ``method`` is "trace" or "reconstruct" (see `lstm_rewrite.reconstruct`), already resolved.

    Example:
        >>> traced, record = rewrite_model(model, states=("c", "h"))
        >>> record.output_names
        ['encoder.c', 'encoder.h']
    """
    return RewritePass(model, states, layers, expose_masks, method, edits).run()
