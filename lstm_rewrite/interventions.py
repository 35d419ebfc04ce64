"""Interventions: rebuild a model whose recurrent steps edit chosen units at chosen steps, inside the recurrence.

Correlation says ``lstm.c[11]`` tracks the nesting depth; an intervention asks whether the model
*uses* it. ``intervene(model, [Ablate("lstm.c", units=[11], steps="20:")])`` returns a Keras model
(same flavour) whose LSTM step sets c[11] to zero from input step 20 on, where c is computed, so
that h at that step, every later step and every layer downstream see the edited state. Editing an
exposed output afterwards would change nothing downstream.

Design (what is where):

- An intervention is plain data: a kind (`Ablate`, `Clamp`, `Scale`, `Add`, `Patch`), a target
  ``"<site>.<quantity>"`` (``"lstm.c"``, ``"bi.backward.h"``, ``"gru.z"``, ``"body.inner.f"``), a
  set of units and a set of steps. ``to_dict``/``from_dict`` give it as JSON.
- `intervene` resolves each target against the model's recurrent calls, compiles the
  interventions into one ``edits`` list per call (plain data in the traced cell's config), and
  runs the rewrite pass (`lstm_rewrite.rewrite`) with it. The traced cells (`lstm_rewrite.layers`)
  apply each edit where its quantity is computed in the step: a gate (i, f, g, o; z, r, n) before
  it enters c (or the GRU candidate), c before h is computed from it, h before it is output and
  carried. One edited quantity at a time, in list order.
- Time: steps are **input-time** indices (0 = the first input step), for ``go_backwards`` layers
  and a Bidirectional's backward half too. The edited layer's input is widened to
  ``concat([x, t, *channels])``: ``t`` is the input-time index of each step, so it is reversed
  together with x for go_backwards and survives masking (masked steps are discarded by the loop
  as usual: an edit on a masked step changes nothing).
- Call-time data travel as extra, named model inputs after the original ones:
  ``edit<k>.steps`` ``[batch, time]`` (a per-sample step mask, ``steps="mask"``),
  ``edit<k>.units`` ``[batch, time, units]`` (a per-sample unit mask, ``units="mask"``) and
  ``edit<k>.source`` ``[batch, time, units]`` (the values a `Patch` writes, in input time), ``k``
  being the intervention's index. `intervened_inputs` builds them (running the model once on a
  patch's ``source`` inputs) and `run_intervened` runs the model on them in batches. Without
  call-time data the intervened model takes exactly the original inputs.
- Sweeps (`unit_importance`, `patch_sweep`) build one intervened model with per-sample unit and
  step masks and run every variant (one unit ablated, one unit and step patched) as rows of the
  same batches: ``units + 1`` passes over the data for `unit_importance`, no predict per unit.

Limits: only LSTM, GRU and SimpleRNN layers (also ``RNN`` over their cells, inside Bidirectional
and nested models) take edits; call-time data (``steps="mask"``, `Patch`) reach top-level layers
only. An intervened model saves and loads (the edits are in its cells' configs), but its
`InterventionRecord` is an attribute of the returned object, not saved.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from . import kinds
from .errors import InvalidArgumentError, UnsupportedLayerError


def editable_quantities(kind_name: str) -> tuple:
    """What interventions can edit in a layer of this kind: every quantity of a kind whose traced
    cell runs its step with edit points (`RecurrentKind.has_flat_step`); nothing for the others."""
    kind = kinds.get(kind_name)
    return kind.quantities if kind.has_flat_step else ()


def _edited_labels() -> str:
    return ", ".join(k.label for k in kinds.all_kinds() if k.has_flat_step)


# --- steps and units -------------------------------------------------------------------------


def normalise_steps(steps, target: str = "?") -> dict:
    """A ``steps=`` argument as plain data: ``{"start", "stop", "every"}``, ``{"at": [...]}`` or ``{"mask": True}``.

    Accepted: None (every step), an int (one step), a slice, a ``range``, a list of ints, a string
    ``"20"``, ``"20:"``, ``"5:10"``, ``"0::2"``, or ``"mask"`` (a per-sample mask fed at call time).
    Steps are input-time indices, 0 = the first input step.

    Example:
        >>> normalise_steps("20:")
        {'start': 20, 'stop': None, 'every': 1}
    """
    def bad(why):
        return InvalidArgumentError(
            f"steps= of the intervention on {target!r} {why}. Give an int, a slice, a list of ints, a string "
            f"like '20:' or '5:10', None for every step, or 'mask' for a per-sample mask. Received: steps={steps!r}")

    if isinstance(steps, dict):
        return dict(steps)
    if steps is None:
        return {"start": 0, "stop": None, "every": 1}
    if isinstance(steps, str):
        text = steps.strip()
        if text == "mask":
            return {"mask": True}
        try:
            if ":" not in text:
                return {"at": [_step_int(int(text), bad)]}
            fields = [f.strip() for f in text.split(":")]
            if len(fields) > 3:
                raise ValueError
            values = [int(f) if f else None for f in fields] + [None] * (3 - len(fields))
        except ValueError:
            raise bad("is not a step or a slice") from None
        steps = slice(*values)
    if isinstance(steps, range):
        steps = slice(steps.start, steps.stop, steps.step)
    if isinstance(steps, slice):
        start = _step_int(0 if steps.start is None else steps.start, bad)
        stop = None if steps.stop is None else _step_int(steps.stop, bad)
        every = 1 if steps.step is None else _step_int(steps.step, bad)
        if every < 1:
            raise bad("has a step of less than 1")
        if stop is not None and stop <= start:
            raise bad("selects no step")
        return {"start": start, "stop": stop, "every": every}
    if isinstance(steps, (int, np.integer)) and not isinstance(steps, bool):
        return {"at": [_step_int(steps, bad)]}
    if isinstance(steps, (list, tuple, np.ndarray)):
        values = [_step_int(s, bad) for s in steps]
        if not values:
            raise bad("is empty")
        return {"at": sorted(set(values))}
    raise bad(f"is a {type(steps).__name__}")


def _step_int(value, bad) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise bad(f"holds {value!r}, not an int")
    if value < 0:
        raise bad("holds a negative step (steps are input-time indices, 0 = the first step)")
    return int(value)


def normalise_units(units, target: str = "?"):
    """A ``units=`` argument as plain data: None (every unit), a sorted list of ints, or "mask"."""
    if units is None or (isinstance(units, str) and units == "mask"):
        return units
    if isinstance(units, (int, np.integer)) and not isinstance(units, bool):
        units = [units]
    if isinstance(units, range):
        units = list(units)
    if isinstance(units, (list, tuple, np.ndarray)) and all(
            isinstance(u, (int, np.integer)) and not isinstance(u, bool) for u in units) and len(units):
        return sorted({int(u) for u in units})
    raise InvalidArgumentError(
        f"units= of the intervention on {target!r} takes a unit index, a list of them, None for every unit, or "
        f"'mask' for a per-sample mask. Received: units={units!r}")


# --- the interventions -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Intervention:
    """One edit of one quantity of one recurrent call: ``target`` = ``"<site>.<quantity>"``.

    Attributes:
        target: e.g. ``"lstm.c"``, ``"bi.backward.h"``, ``"gru.z"``, ``"body.inner.f"``.
        units: the units edited: an index, a list, None (every unit), or "mask" (per sample, fed
            at call time as ``edit<k>.units``).
        steps: the input-time steps edited (see `normalise_steps`); "mask" feeds a per-sample
            ``[batch, time]`` mask at call time as ``edit<k>.steps``.
    """

    target: str
    units: Any = None
    steps: Any = None
    kind: ClassVar[str] = ""

    def _params(self) -> dict:
        return {}

    def to_dict(self) -> dict:
        """The intervention as JSON-ready plain data (``from_dict`` reads it back).

        Example:
            >>> Ablate("lstm.c", units=11, steps="20:").to_dict()["steps"]
            {'start': 20, 'stop': None, 'every': 1}
        """
        return {"kind": self.kind, "target": self.target, "units": normalise_units(self.units, self.target),
                "steps": normalise_steps(self.steps, self.target), **self._params()}

    @staticmethod
    def from_dict(data: dict) -> "Intervention":
        """The intervention ``to_dict`` gave (or one parsed from JSON).

        Example:
            >>> Intervention.from_dict(Scale("gru.h", factor=2.0).to_dict())
            Scale(target='gru.h', units=None, steps={'start': 0, 'stop': None, 'every': 1}, factor=2.0)
        """
        data = dict(data)
        kind = data.pop("kind", None)
        if kind not in KINDS:
            raise InvalidArgumentError(
                f"An intervention's kind is one of {sorted(KINDS)}. Received: kind={kind!r}")
        if kind == "patch" and isinstance(data.get("source"), list):
            data["source"] = np.asarray(data["source"])
        return KINDS[kind](**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


@dataclasses.dataclass(frozen=True)
class Ablate(Intervention):
    """Set the units to ``value``: "zero", "mean" (per unit, over the valid steps of ``data=``
    given to `intervene`), a float, or one float per selected unit.

    Example:
        >>> Ablate("lstm.c", units=[11], steps="20:")
    """

    value: Any = "zero"
    kind: ClassVar[str] = "ablate"

    def _params(self):
        value = self.value
        if isinstance(value, np.ndarray):
            value = value.tolist()
        return {"value": value}


@dataclasses.dataclass(frozen=True)
class Clamp(Intervention):
    """Clip the units to ``[low, high]`` (None: no bound on that side)."""

    low: float | None = None
    high: float | None = None
    kind: ClassVar[str] = "clamp"

    def _params(self):
        return {"low": None if self.low is None else float(self.low),
                "high": None if self.high is None else float(self.high)}


@dataclasses.dataclass(frozen=True)
class Scale(Intervention):
    """Multiply the units by ``factor``."""

    factor: float = 1.0
    kind: ClassVar[str] = "scale"

    def _params(self):
        return {"factor": float(self.factor)}


@dataclasses.dataclass(frozen=True)
class Add(Intervention):
    """Steer: add ``alpha * direction`` (one entry per selected unit, or per unit of the layer)."""

    direction: Any = ()
    alpha: float = 1.0
    kind: ClassVar[str] = "add"

    def _params(self):
        return {"direction": [float(v) for v in np.asarray(self.direction, dtype=float).ravel()],
                "alpha": float(self.alpha)}


@dataclasses.dataclass(frozen=True)
class Patch(Intervention):
    """Activation patching: the units take the values they had when the model ran on ``source``
    (inputs shaped like the inputs the intervened model runs on), at the chosen steps.

    ``source`` None: give it at call time, ``intervened_inputs(..., sources={k: inputs})``.
    """

    source: Any = None
    kind: ClassVar[str] = "patch"

    def _params(self):
        if self.source is None:
            return {"source": None}
        return {"source": np.asarray(self.source).tolist()}


KINDS = {k.kind: k for k in (Ablate, Clamp, Scale, Add, Patch)}


# --- resolving targets -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EditSite:
    """One recurrent call (one direction of a Bidirectional) that can be edited."""

    site: str  # "lstm", "bi.backward", "body.inner", "shared.call1"
    call_site: str  # the call as layers= names it: "bi" for "bi.backward"
    layer: Any
    kind: str  # the registry name of its kind (lstm_rewrite.kinds)
    layer_class: str
    units: int
    time_order: str  # "forward", "go_backwards", "backward_aligned"


def edit_sites(model) -> dict:
    """Every recurrent call of ``model`` that an intervention can name, by its dotted site.

    Example:
        >>> sorted(edit_sites(model))
        ['bi.backward', 'bi.forward', 'lstm']
    """
    from .rewrite import recurrent_sites

    sites = {}
    for call in recurrent_sites(model):
        for planned in call.directions:
            units = int(getattr(planned.layer.cell, "units", 0) or 0)
            sites[planned.site] = EditSite(planned.site, call.site, planned.layer, planned.kind.name,
                                           planned.layer_class, units, planned.time_order)
    return sites


def _resolve(target: str, sites: dict) -> tuple:
    """``(EditSite, quantity)`` for a target like ``"bi.backward.h"``, or a clear error."""
    if not isinstance(target, str) or "." not in target:
        raise InvalidArgumentError(
            f"An intervention's target is '<site>.<quantity>', e.g. 'lstm.c' or 'bi.backward.h'. The model's "
            f"recurrent sites are {sorted(sites)}. Received: target={target!r}")
    site, _, quantity = target.rpartition(".")
    entry = sites.get(site)
    if entry is None:
        raise InvalidArgumentError(
            f"The intervention on {target!r} names the site {site!r}, which is not a recurrent layer call of this "
            f"model. Its recurrent sites are {sorted(sites)} (a Bidirectional's as '<name>.forward' / "
            f"'<name>.backward'). Received: target={target!r}")
    editable = editable_quantities(entry.kind)
    if not editable:
        raise UnsupportedLayerError(
            f"Layer {site!r} ({entry.layer_class}) takes no interventions: only {_edited_labels()} steps "
            f"(and RNN over their cells) are edited. Target another layer. Received: target={target!r}")
    if quantity not in editable:
        raise InvalidArgumentError(
            f"The intervention on {target!r}: layer {site!r} ({entry.layer_class}) has no quantity {quantity!r}; it "
            f"edits {', '.join(editable)}. Received: target={target!r}")
    return entry, quantity


# --- compiling interventions into cell edits --------------------------------------------------


@dataclasses.dataclass
class InterventionRecord:
    """What `intervene` built: the interventions (as dicts), the call-time inputs, the resolved constants.

    Attributes:
        interventions: the interventions as `Intervention.to_dict` gives them (JSON-ready).
        edits: site -> the compiled edit list each edited cell runs.
        inputs: the names of the call-time inputs after the original inputs, in order.
        original_inputs: how many inputs the original model takes.
        original_output_names: the original outputs (they come first, edited).
        exposed: the names of the exposed state outputs after them.
    """

    interventions: list
    edits: dict
    inputs: list
    original_inputs: int
    original_output_names: list
    exposed: list = dataclasses.field(default_factory=list)
    # internal: intervention index -> (target, site entry, quantity)
    targets: dict = dataclasses.field(default_factory=dict, repr=False)
    model: Any = dataclasses.field(default=None, repr=False)  # the user's model (patch sources run on it)
    sources: dict = dataclasses.field(default_factory=dict, repr=False)  # k -> Patch.source given at build

    def to_dict(self) -> dict:
        return {"interventions": self.interventions, "inputs": self.inputs,
                "original_output_names": self.original_output_names, "exposed": self.exposed}


def _constants(kind, params, units_sel, width, target, means):
    """The per-unit constants an edit carries (full layer width), checked."""
    if kind == "ablate":
        value = params["value"]
        if isinstance(value, str):
            if value == "zero":
                vector = np.zeros(width)
            elif value == "mean":
                if means is None:
                    raise InvalidArgumentError(
                        f"Ablate(value='mean') on {target!r} needs the data to take the mean over: pass "
                        f"intervene(..., data=inputs). Received: data=None")
                vector = np.asarray(means, dtype=float)
            else:
                raise InvalidArgumentError(
                    f"Ablate on {target!r} takes value='zero', 'mean', a float or one float per unit. "
                    f"Received: value={value!r}")
        else:
            vector = _per_unit(value, units_sel, width, target, "value")
        return {"value": [float(v) for v in vector]}
    if kind == "add":
        return {"direction": [float(v) for v in _per_unit(params["direction"], units_sel, width, target, "direction")],
                "alpha": params["alpha"]}
    if kind == "clamp":
        return {"low": params["low"], "high": params["high"]}
    if kind == "scale":
        return {"factor": params["factor"]}
    return {}


def _per_unit(value, units_sel, width, target, what):
    """A scalar, one value per selected unit or one per unit, as a full-width vector."""
    array = np.asarray(value, dtype=float).ravel()
    if array.size == 1:
        return np.full(width, float(array[0]))
    vector = np.zeros(width)
    if isinstance(units_sel, list) and array.size == len(units_sel):
        vector[units_sel] = array
        return vector
    if array.size == width:
        return array
    chosen = "every unit" if not isinstance(units_sel, list) else f"{len(units_sel)} selected units"
    raise InvalidArgumentError(
        f"{what}= of the intervention on {target!r} needs one value, one per selected unit ({chosen}) or one per unit "
        f"of the layer ({width}). Received: {array.size} values")


def compile_interventions(interventions: Sequence[Intervention], sites: dict, means: dict | None = None):
    """Per site, the edits its cell runs and the call-time inputs it reads.

    Returns:
        ``(edits, targets)``: ``edits`` maps a site to ``{"edits": [...], "inputs": [(name, width,
        is_steps_mask)]}`` (what `lstm_rewrite.rewrite.RewritePass` takes); ``targets`` maps each
        intervention's index to ``(EditSite, quantity)``.
    """
    edits, targets = {}, {}
    for k, item in enumerate(interventions):
        if not isinstance(item, Intervention):
            raise InvalidArgumentError(
                f"intervene takes a list of interventions (Ablate, Clamp, Scale, Add, Patch). Item {k} is a "
                f"{type(item).__name__}. Received: {item!r}")
        entry, quantity = _resolve(item.target, sites)
        data = item.to_dict()
        width = entry.units
        units = data["units"]
        if isinstance(units, list) and units[-1] >= width:
            raise InvalidArgumentError(
                f"units= of the intervention on {item.target!r} names unit {units[-1]}, but layer {entry.site!r} "
                f"({entry.layer_class}) has {width} units (0 to {width - 1}). Received: units={item.units!r}")
        spec = edits.setdefault(entry.site, {"edits": [], "inputs": []})
        channels = 1 + sum(w for _, w, _ in spec["inputs"])  # the time channel comes first
        edit = {"target": item.target, "quantity": quantity, "kind": item.kind,
                "steps_given": repr(item.steps), "units": units if isinstance(units, list) else list(range(width))}
        steps = data["steps"]
        if steps.get("mask"):
            spec["inputs"].append((f"edit{k}.steps", 1, True))
            edit["steps"] = {"channel": channels - 1}
            channels += 1
        else:
            edit["steps"] = steps
        if units == "mask":
            spec["inputs"].append((f"edit{k}.units", width, False))
            edit["units_channel"] = channels - 1
            channels += width
        if item.kind == "patch":
            spec["inputs"].append((f"edit{k}.source", width, False))
            edit["source_channel"] = channels - 1
            channels += width
        edit.update(_constants(item.kind, data, units, width, item.target,
                               None if means is None else means.get(item.target)))
        spec["edits"].append(edit)
        targets[k] = (entry, quantity)
    return edits, targets


# --- the entry point ---------------------------------------------------------------------------


def intervene(
    model,
    interventions: Sequence[Intervention],
    *,
    states=(),
    verify: bool = True,
    sample_inputs=None,
    data=None,
):
    """Return a copy of ``model`` whose recurrent steps apply ``interventions`` inside the recurrence.

    The result is a Keras model of the same flavour: its outputs are the original outputs (now
    computed with the edits), then, for ``states=`` (as in `lstm_rewrite.expose_cell_states`),
    every recurrent layer's states at every step (edited where edited). Its inputs are the
    original inputs, then the call-time inputs the interventions need (``edit<k>.steps``,
    ``edit<k>.units``, ``edit<k>.source``; see the module docstring): use `run_intervened` or
    `intervened_inputs` for those. ``intervened.intervention_record`` says what was built. The
    user's model is never changed.

    Args:
        model: a functional or Sequential model (Keras 3 or tf-keras) with LSTM, GRU or SimpleRNN
            layers.
        interventions: `Ablate`, `Clamp`, `Scale`, `Add`, `Patch`; several on one quantity apply
            in list order. An empty list gives the traced model, outputs unchanged.
        states: quantities to expose as extra outputs, as in ``expose_cell_states``; () for none.
        verify: check, on ``sample_inputs``, that the rewrite without the edits reproduces the
            original outputs (the edits themselves are tested against tests/reference.py).
        sample_inputs: inputs for the check; synthesized when None.
        data: inputs to take per-unit means over, for ``Ablate(value="mean")``.

    Returns:
        The intervened Keras model.

    Raises:
        InvalidArgumentError: an unknown site or quantity, units or steps out of range, bad constants.
        UnsupportedLayerError: an intervention on a layer that takes none (ConvLSTM, custom cells).
        VerificationError: the rewrite does not reproduce the original outputs.

    Example:
        >>> ablated = intervene(model, [Ablate("lstm.c", units=[11], steps="20:")])
        >>> ablated.predict(x)   # the model's predictions with c[11] zeroed from step 20 on
    """
    from . import backends
    from .api import expose_cell_states
    from .rewrite import rewrite_model
    from .verify import check

    if isinstance(interventions, Intervention):
        interventions = [interventions]
    interventions = list(interventions)
    sites = edit_sites(model)
    for item in interventions:
        if isinstance(item, Intervention):
            _resolve(item.target, sites)
            if _wrapped_subclass_layer(sites[item.target.rpartition(".")[0]]):
                entry = sites[item.target.rpartition(".")[0]]
                raise UnsupportedLayerError(
                    f"Layer {entry.site!r} ({type(entry.layer).__name__}) is a subclass running its own call; the "
                    f"intervened step would run inside it unverified. Target another layer. "
                    f"Received: target={item.target!r}")
    means = _means(model, interventions, sites, data) if data is not None else None
    edits, targets = compile_interventions(interventions, sites, means)
    backend = backends.for_model(model)
    original_names = backend.output_names(model)
    exposing = bool(states) and states != ()
    layers = None if exposing else sorted({sites[s].call_site for s in edits}) or None
    if not edits and not exposing:
        layers = None
    traced, record = rewrite_model(model, states=states if exposing else ("c",), layers=layers,
                                   method="trace", edits=edits)
    if verify:
        plain = expose_cell_states(model, states=states if exposing else ("c",), layers=layers, verify=False,
                                   method="trace")
        check(model, plain, sample_inputs)
    outputs = list(traced.outputs)
    names = [n for spec in edits.values() for n, _, _ in spec["inputs"]]
    if not exposing:
        outputs = outputs[:len(original_names)]
        inputs = traced.inputs[0] if len(traced.inputs) == 1 else traced.inputs
        result = backend.make_model(inputs, outputs[0] if len(outputs) == 1 else outputs, name=model.name)
    else:
        result = traced
    original_inputs = len(backend.flatten(model.inputs))
    result.intervention_record = InterventionRecord(
        interventions=[i.to_dict() for i in interventions], edits=edits, inputs=names,
        original_inputs=original_inputs, original_output_names=original_names,
        exposed=record.output_names if exposing else [], targets=targets, model=model,
        sources={k: i.source for k, i in enumerate(interventions) if isinstance(i, Patch) and i.source is not None},
    )
    return result


def _wrapped_subclass_layer(entry) -> bool:
    from . import backends
    from .rewrite import wrapping_subclass

    return wrapping_subclass(entry.layer, backends.for_model(entry.layer)) is not None


# --- running -----------------------------------------------------------------------------------


def _as_list(inputs) -> list:
    if isinstance(inputs, (list, tuple)):
        return [np.asarray(a) for a in inputs]
    return [np.asarray(inputs)]


def _state_runner(model, targets: Sequence[str], expose_masks=False):
    """``run(inputs) -> {target: [batch, time, units] in input time}`` for state targets of ``model``."""
    from .rewrite import rewrite_model

    sites = edit_sites(model)
    wanted = sorted({t.rpartition(".")[2] for t in targets})
    layers = sorted({sites[t.rpartition(".")[0]].call_site for t in targets})
    traced, record = rewrite_model(model, states=wanted, layers=layers, method="trace", expose_masks=expose_masks)
    names = list(traced.output_names)
    order = {e.name: e.time_order for e in record.exposed}

    def run(inputs, batch_size=256):
        arrays = _as_list(inputs)
        outputs = _predict(traced, arrays, batch_size)
        named = dict(zip(names, outputs))
        found = {}
        for target in list(targets) + ([f"{t.rpartition('.')[0]}.mask" for t in targets] if expose_masks else []):
            value = named[target]
            if order.get(target, "forward") == "go_backwards" or (
                    target.endswith(".mask") and order.get(targets[0]) == "go_backwards"):
                value = value[:, ::-1]
            found[target] = value
        return found

    return run


def _compiled(model):
    """``model``'s forward pass compiled once for any batch and length, on the active backend
    (`backends` ``compiled_predict``): ``f([input arrays]) -> [NumPy outputs]``. Cached on the model."""
    from . import backends
    from .capture import input_specs

    def make():
        signature = [((None, *s.shape), s.dtype) for s in input_specs(model)]
        return backends.for_model(model).compiled_predict(model, signature)

    return backends.cached_on_model(model, "compiled", make)


def _predict(model, arrays: list, batch_size: int) -> list:
    """Run ``model`` on ``arrays`` in batches (one compiled call per batch, no predict()); NumPy outputs."""
    count = arrays[0].shape[0]
    chunks = []
    run = _compiled(model)
    for start in range(0, count, batch_size):
        chunks.append(run([a[start:start + batch_size] for a in arrays]))
    return [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]


def _means(model, interventions, sites, data) -> dict:
    """Per target of an ``Ablate("mean")``, the mean of each unit over the valid steps of ``data``."""
    targets = sorted({i.target for i in interventions if isinstance(i, Ablate) and isinstance(i.value, str)
                      and i.value == "mean"})
    if not targets:
        return {}
    for target in targets:
        _resolve(target, sites)
    found = _state_runner(model, targets, expose_masks=True)(data)
    means = {}
    for target in targets:
        mask = found[f"{target.rpartition('.')[0]}.mask"][..., None]  # [batch, time, 1]
        means[target] = (found[target] * mask).sum(axis=(0, 1)) / max(float(mask.sum()), 1.0)
    return means


def intervened_inputs(intervened, inputs, *, masks: dict | None = None, sources: dict | None = None) -> list:
    """The full input list of an intervened model: the original inputs, then its call-time inputs.

    Args:
        intervened: what `intervene` returned.
        inputs: the original model's inputs (an array, or a list of arrays).
        masks: per call-time mask input, by name (``"edit0.steps"``: ``[batch, time]`` bool, input
            time; ``"edit1.units"``: ``[batch, units]`` or ``[batch, time, units]``), or by the
            intervention's index for its steps mask.
        sources: per `Patch` (by its index), the source inputs, when the Patch was built without one.

    Example:
        >>> out = intervened(intervened_inputs(intervened, x, masks={0: deep_positions}))
    """
    record = _record_of(intervened)
    arrays = _as_list(inputs)
    batch = arrays[0].shape[0]
    time = arrays[0].shape[1] if arrays[0].ndim > 1 else None
    masks = dict(masks or {})
    sources = {**record.sources, **(sources or {})}
    patched = {}
    extra = []
    for name in record.inputs:
        k = int(name.split(".")[0][len("edit"):])
        entry, quantity = record.targets[k]
        target = record.interventions[k]["target"]
        what = name.split(".")[1]
        if what == "source":
            source = sources.get(k)
            if source is None:
                raise InvalidArgumentError(
                    f"The Patch on {target!r} (intervention {k}) has no source: give its source inputs, "
                    f"intervened_inputs(..., sources={{{k}: inputs}}). Received: sources={sorted(sources)}")
            source_arrays = _as_list(source)
            if [a.shape for a in source_arrays] != [a.shape for a in arrays]:
                raise InvalidArgumentError(
                    f"The Patch on {target!r} (intervention {k}): its source inputs have shape "
                    f"{[a.shape for a in source_arrays]}, the inputs {[a.shape for a in arrays]}; a patch writes "
                    f"the source's values step by step into the same samples, so both need the same shape. "
                    f"Received: source shapes {[a.shape for a in source_arrays]}")
            key = (k, id(source))
            if key not in patched:
                patched[key] = _state_runner(record.model, [target])(source_arrays)[target]
            extra.append(patched[key].astype("float32"))
            continue
        value = masks.get(name, masks.get(k) if what == "steps" else None)
        if value is None:
            raise InvalidArgumentError(
                f"The intervention on {target!r} (intervention {k}) takes a per-sample mask at call time: give it as "
                f"masks={{{name!r}: array}}. Received: masks={sorted(masks, key=str)}")
        value = np.asarray(value, dtype="float32")
        if what == "units" and value.ndim == 2:
            value = np.repeat(value[:, None, :], time, axis=1)
        expected = (batch, time) if what == "steps" else (batch, time, entry.units)
        if value.shape != expected:
            raise InvalidArgumentError(
                f"The mask {name!r} of the intervention on {target!r} must have shape {expected} (batch, time"
                f"{'' if what == 'steps' else ', units'}). Received: shape={value.shape}")
        extra.append(value)
    if time is not None:
        _check_call_steps(record, time)
    return arrays + extra


def _check_call_steps(record, time: int) -> None:
    from .rewrite import check_edit_steps

    for spec in record.edits.values():
        for edit in spec["edits"]:
            check_edit_steps(edit, time)


def _record_of(intervened) -> InterventionRecord:
    record = getattr(intervened, "intervention_record", None)
    if record is None:
        raise InvalidArgumentError(
            f"This takes a model that intervene() returned; {getattr(intervened, 'name', intervened)!r} has no "
            f"intervention record. Build it with lstm_rewrite.intervene(model, [...]). "
            f"Received: {type(intervened).__name__}")
    return record


def run_intervened(intervened, inputs, *, masks=None, sources=None, batch_size: int = 256) -> list:
    """Run an intervened model on ``inputs`` (with its call-time data) in batches; NumPy outputs.

    Example:
        >>> outputs = run_intervened(intervened, x, sources={0: corrupt})
    """
    return _predict(intervened, intervened_inputs(intervened, inputs, masks=masks, sources=sources), batch_size)


# --- sweeps ------------------------------------------------------------------------------------


@dataclasses.dataclass
class SweepResult:
    """A labelled array of metric values: ``values`` has axes ``dims`` whose labels are ``coords``.

    Attributes:
        values: the metric with the intervention, per unit (``dims=("unit",)``), per unit and step,
            or per step.
        effect: ``values - baseline``: what the intervention changes.
        baseline: the metric without any intervention.
        passes: how many times each sample went through the model (the variants run as rows of
            the same batches).
    """

    values: np.ndarray
    dims: tuple
    coords: dict
    baseline: float
    target: str
    kind: str
    passes: int

    @property
    def effect(self) -> np.ndarray:
        return self.values - self.baseline

    def to_dict(self) -> dict:
        return {"target": self.target, "kind": self.kind, "dims": list(self.dims),
                "coords": {k: list(map(int, v)) for k, v in self.coords.items()}, "baseline": float(self.baseline),
                "values": np.asarray(self.values).tolist(), "passes": int(self.passes)}


def _default_target(model) -> str:
    sites = edit_sites(model)
    for site, entry in sites.items():
        if editable_quantities(entry.kind):
            return f"{site}.{kinds.get(entry.kind).recurrent[0]}"
    raise InvalidArgumentError(
        f"Model {model.name!r} has no LSTM, GRU or SimpleRNN call to intervene on. Received sites: {sorted(sites)}")


def _run_variants(edited, arrays, channels, variants: int, targets, metric, max_rows: int):
    """Metric per variant: each variant's call-time arrays (``channels(v_indices) -> {name: [len, n, ...]}``)
    run on every sample, many variants per batch; the metric sees each variant's outputs whole."""
    record = _record_of(edited)
    count = arrays[0].shape[0]
    per_batch = max(1, max_rows // max(count, 1))
    collected = [[] for _ in range(variants)]
    for start in range(0, variants, per_batch):
        chosen = list(range(start, min(variants, start + per_batch)))
        extra = channels(chosen)  # name -> [len(chosen), count, ...]
        tiled = [np.concatenate([a] * len(chosen)) for a in arrays]
        feed = tiled + [extra[name].reshape((-1,) + extra[name].shape[2:]).astype("float32") for name in record.inputs]
        outputs = _predict(edited, feed, max(max_rows, count))
        for j, v in enumerate(chosen):
            collected[v] = [o[j * count:(j + 1) * count] for o in outputs]
    return np.array([float(metric(outs, targets)) for outs in collected])


def unit_importance(model, data, metric: Callable, target: str | None = None, *, value="mean", steps=None,
                    targets=None, mean_data=None, max_rows: int = 4096) -> SweepResult:
    """Each unit's ablation effect on ``metric``: ``units + 1`` batched passes over ``data``.

    One intervened model ablates, per sample, the unit its call-time unit mask names; every unit's
    variant (and the unablated baseline) runs as rows of the same batches.

    Args:
        model: the model (not intervened).
        data: its inputs (an array or a list of arrays).
        metric: ``metric(outputs, targets) -> float``, ``outputs`` the list of the model's outputs
            over all of ``data`` (see `accuracy_metric`, `loss_metric`, `logit_difference_metric`).
        target: ``"<site>.<quantity>"``; the first recurrent layer's state when None.
        value: the Ablate value ("mean": over ``mean_data``, default ``data``; "zero"; a float).
        steps: the input-time steps ablated (see `normalise_steps`; not "mask").
        targets: passed to ``metric``.
        max_rows: at most this many rows per batch.

    Returns:
        A SweepResult with ``dims=("unit",)``.

    Example:
        >>> result = unit_importance(model, x, accuracy_metric(), "lstm.c", targets=y)
        >>> result.effect.argmin()   # the unit whose ablation hurts accuracy most
    """
    target = target or _default_target(model)
    values, units = _ablate_sets(model, data, metric, target, lambda units: [[u] for u in range(units)],
                                 value=value, steps=steps, targets=targets, mean_data=mean_data, max_rows=max_rows)
    return SweepResult(values[1:], ("unit",), {"unit": np.arange(units)}, values[0], target, "ablate", units + 1)


def patch_sweep(model, clean, corrupt, metric: Callable, target: str | None = None, *, over=("unit", "step"),
                targets=None, max_rows: int = 4096) -> SweepResult:
    """Activation patching swept over units and/or steps: run on ``clean`` with one unit (and/or one step)
    taking its value from the run on ``corrupt``; swap the two for the other direction.

    Args:
        over: ``("unit", "step")`` (one unit at one step per variant), ``("unit",)`` (one unit at
            every step) or ``("step",)`` (every unit at one step).

    Returns:
        A SweepResult with those dims; ``baseline`` is the metric of the clean run.

    Example:
        >>> result = patch_sweep(model, clean, corrupt, logit_difference_metric(3, 4), "lstm.c")
        >>> result.values.shape   # (units, steps)
    """
    target = target or _default_target(model)
    over = tuple(over)
    if over not in (("unit", "step"), ("unit",), ("step",)):
        raise InvalidArgumentError(
            f"patch_sweep over= takes ('unit', 'step'), ('unit',) or ('step',). Received: over={over!r}")
    arrays, source_arrays = _as_list(clean), _as_list(corrupt)
    if [a.shape for a in arrays] != [a.shape for a in source_arrays]:
        raise InvalidArgumentError(
            f"patch_sweep on {target!r}: corrupt inputs have shape {[a.shape for a in source_arrays]}, clean "
            f"{[a.shape for a in arrays]}; a patch writes values step by step into the same samples, so both need "
            f"the same shape. Received: corrupt shapes {[a.shape for a in source_arrays]}")
    edited = intervene(model, [Patch(target, units="mask", steps="mask")], verify=False)
    entry, _ = _record_of(edited).targets[0]
    units, count, time = entry.units, arrays[0].shape[0], arrays[0].shape[1]
    source = _state_runner(model, [target])(source_arrays)[target].astype("float32")  # [count, time, units]
    grid = [(u, t) for u in range(units) for t in range(time)] if over == ("unit", "step") else (
        [(u, None) for u in range(units)] if over == ("unit",) else [(None, t) for t in range(time)])

    def channels(chosen):
        steps = np.zeros((len(chosen), count, time), "float32")
        unit_masks = np.zeros((len(chosen), count, time, units), "float32")
        for j, v in enumerate(chosen):
            if v == 0:
                continue  # the clean baseline: no step patched
            u, t = grid[v - 1]
            steps[j, :, slice(None) if t is None else t] = 1.0
            unit_masks[j, :, :, slice(None) if u is None else u] = 1.0
        return {"edit0.steps": steps, "edit0.units": unit_masks, "edit0.source": np.stack([source] * len(chosen))}

    values = _run_variants(edited, arrays, channels, len(grid) + 1, targets, metric, max_rows)
    shape = {("unit", "step"): (units, time), ("unit",): (units,), ("step",): (time,)}[over]
    coords = {"unit": np.arange(units), "step": np.arange(time)}
    return SweepResult(values[1:].reshape(shape), over, {d: coords[d] for d in over}, values[0], target, "patch",
                       len(grid) + 1)


# --- ready metrics -----------------------------------------------------------------------------


def _output(outputs, output):
    return np.asarray(outputs[output] if isinstance(outputs, (list, tuple)) else outputs)


def accuracy_metric(output: int = 0, where=None) -> Callable:
    """``metric(outputs, targets)``: accuracy of ``argmax(outputs[output])`` on the labelled steps
    (``targets >= 0``, and ``where`` when given: a boolean array shaped like ``targets``).

    Example:
        >>> accuracy_metric()([np.eye(3)[None]], np.array([[0, 1, 1]]))
        0.6666666666666666
    """
    def metric(outputs, targets):
        predicted = _output(outputs, output).argmax(-1)
        labels = np.asarray(targets)
        keep = labels >= 0 if where is None else (labels >= 0) & np.asarray(where, bool)
        return float((predicted == labels)[keep].mean()) if keep.any() else float("nan")

    return metric


def loss_metric(output: int = 0, from_logits: bool = False, where=None) -> Callable:
    """``metric(outputs, targets)``: mean sparse categorical cross-entropy on the labelled steps."""
    def metric(outputs, targets):
        scores = _output(outputs, output).astype("float64")
        if from_logits:
            scores = scores - scores.max(-1, keepdims=True)
            log_p = scores - np.log(np.exp(scores).sum(-1, keepdims=True))
        else:
            log_p = np.log(np.clip(scores, 1e-12, 1.0))
        labels = np.asarray(targets)
        keep = labels >= 0 if where is None else (labels >= 0) & np.asarray(where, bool)
        picked = np.take_along_axis(log_p, np.clip(labels, 0, None)[..., None], -1)[..., 0]
        return float(-picked[keep].mean())

    return metric


def logit_difference_metric(correct: int, wrong: int, output: int = 0, step: int | None = -1) -> Callable:
    """``metric(outputs, targets)``: mean of ``outputs[..., correct] - outputs[..., wrong]`` (at ``step``
    of a sequence output; None for every step). A probability output gives the probability difference."""
    def metric(outputs, targets=None):
        scores = _output(outputs, output)
        if scores.ndim == 3 and step is not None:
            scores = scores[:, step]
        return float((scores[..., correct] - scores[..., wrong]).mean())

    return metric


def output_change_metric(reference_outputs, output: int = 0) -> Callable:
    """``metric(outputs, targets)``: mean |outputs[output] - reference_outputs[output]| (how much an
    intervention moves the model's output; 0 for the unedited model)."""
    reference = _output(reference_outputs, output)

    def metric(outputs, targets=None):
        return float(np.abs(_output(outputs, output) - reference).mean())

    return metric


def ablate_unit_sets(model, data, metric: Callable, target: str, unit_sets: Sequence[Sequence[int]], *,
                     value="mean", steps=None, targets=None, mean_data=None, max_rows: int = 4096) -> np.ndarray:
    """The metric with each set of units ablated together (one batched run for every set), and the
    unablated baseline first: ``[baseline, set 0, set 1, ...]``.

    Example:
        >>> baseline, tracking, *random = ablate_unit_sets(model, x, metric, "lstm.c", [[11], [3], [7]])
    """
    values, _ = _ablate_sets(model, data, metric, target, lambda units: unit_sets, value=value, steps=steps,
                             targets=targets, mean_data=mean_data, max_rows=max_rows)
    return values


def _ablate_sets(model, data, metric, target, choose, *, value, steps, targets, mean_data, max_rows):
    """``([baseline, set 0, set 1, ...], units)``: one intervened model whose call-time unit mask
    ablates each set of ``choose(units)`` in its own rows of the same batches."""
    arrays = _as_list(data)
    mean_source = data if mean_data is None else mean_data
    edited = intervene(model, [Ablate(target, units="mask", steps=steps, value=value)], verify=False,
                       data=mean_source if isinstance(value, str) and value == "mean" else None)
    entry, _ = _record_of(edited).targets[0]
    units, count, time = entry.units, arrays[0].shape[0], arrays[0].shape[1]
    unit_sets = [list(chosen) for chosen in choose(units)]

    def channels(chosen):
        masks = np.zeros((len(chosen), count, time, units), "float32")
        for j, v in enumerate(chosen):
            if v > 0:
                masks[j, :, :, unit_sets[v - 1]] = 1.0
        return {"edit0.units": masks}

    return _run_variants(edited, arrays, channels, len(unit_sets) + 1, targets, metric, max_rows), units


def causal_section(model, data, report, metric: Callable, *, targets=None, draws: int = 5, seed: int = 0,
                   value: str = "mean") -> dict:
    """The audit's causal section: per recurrent layer, each unit's ablation effect on ``metric``;
    per label, ablating the units that track it against ablating random units of the same count.

    The tracking units of a label are the layer's units whose state (c for an LSTM, h otherwise)
    correlates with it at ``|r| >= thresholds.strong_correlation``, or the best one if none does;
    ``draws`` random sets of as many other units give the spread.

    Returns:
        ``{site: {"target", "baseline", "unit_effect": [...], "labels": {label: {"units",
        "effect", "random_effects": [...], "random_mean", "random_std"}}}}`` (JSON-ready).
    """
    sites = edit_sites(model)
    generator = np.random.default_rng(seed)
    section = {}
    for prefix, layer in report.layers.items():
        entry = sites.get(prefix)
        if entry is None or not editable_quantities(entry.kind):
            continue
        quantity = kinds.get(entry.kind).recurrent[0]
        target = f"{prefix}.{quantity}"
        importance = unit_importance(model, data, metric, target, value=value, targets=targets)
        found = {"target": target, "baseline": importance.baseline, "passes": importance.passes,
                 "unit_effect": [float(v) for v in importance.effect], "labels": {}}
        for label, per_quantity in layer.label_correlation.items():
            r = np.asarray(per_quantity.get(quantity, []), dtype=float)
            if r.size == 0 or np.all(np.isnan(r)):
                continue
            strong = [int(u) for u in np.flatnonzero(np.abs(np.nan_to_num(r)) >= report.thresholds.strong_correlation)]
            chosen = strong or [int(np.nanargmax(np.abs(r)))]
            others = [u for u in range(entry.units) if u not in chosen]
            if len(others) < len(chosen):
                continue
            random_sets = [sorted(generator.choice(others, size=len(chosen), replace=False).tolist())
                           for _ in range(draws)]
            values = ablate_unit_sets(model, data, metric, target, [chosen] + random_sets, value=value,
                                      targets=targets)
            effects = values[1:] - values[0]
            found["labels"][label] = {
                "units": chosen, "r": [float(r[u]) for u in chosen], "effect": float(effects[0]),
                "random_units": random_sets, "random_effects": [float(v) for v in effects[1:]],
                "random_mean": float(np.mean(effects[1:])), "random_std": float(np.std(effects[1:])),
            }
        section[prefix] = found
    return section


def causal_summary(section: dict) -> list:
    """One line per layer and label of a causal section."""
    lines = []
    for prefix, found in section.items():
        effects = np.asarray(found["unit_effect"])
        worst = int(np.argmax(np.abs(effects))) if effects.size else None
        if worst is not None:
            lines.append(f"Causal {found['target']}: ablating one unit (mean) moves the metric by at most "
                         f"{effects[worst]:+.3f} (unit {worst}); baseline {found['baseline']:.3f}.")
        for label, row in found["labels"].items():
            lines.append(f"Causal {label!r}: ablating {found['target']}{row['units']} moves the metric by "
                         f"{row['effect']:+.3f}; {len(row['random_effects'])} random sets of {len(row['units'])} "
                         f"unit(s): {row['random_mean']:+.3f} +/- {row['random_std']:.3f}.")
    return lines


def causal_figure(section: dict, path: str, label: str | None = None) -> str | None:
    """Write a PNG of a causal section: per layer, each unit's ablation effect, and per label the
    tracking units' effect against the random draws. Returns the path (None for an empty section)."""
    if not section:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A Figure on the Agg canvas, not pyplot: writing it neither changes the caller's backend
    # nor needs a display (as the report's own figures).
    rows = list(section.items())
    figure = Figure(figsize=(10, 3.2 * len(rows)))
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), 2, squeeze=False)
    for (prefix, found), (left, right) in zip(rows, axes):
        effects = np.asarray(found["unit_effect"])
        left.bar(np.arange(effects.size), effects, color="#4477aa")
        left.axhline(0, color="black", linewidth=0.5)
        left.set_title(f"{found['target']}: ablating one unit (mean)")
        left.set_xlabel("unit")
        left.set_ylabel("metric change")
        labels = [lab for lab in found["labels"] if label is None or lab == label]
        for k, name in enumerate(labels):
            row = found["labels"][name]
            right.bar([2 * k], [row["effect"]], color="#cc6677", label=f"{name}: units {row['units']}")
            right.scatter([2 * k + 1] * len(row["random_effects"]), row["random_effects"], color="#999999",
                          label="random units, same count" if k == 0 else None)
            right.errorbar([2 * k + 1], [row["random_mean"]], yerr=[row["random_std"]], color="black", capsize=4)
        right.axhline(0, color="black", linewidth=0.5)
        right.set_xticks([2 * k + j for k in range(len(labels)) for j in (0, 1)],
                         [t for name in labels for t in (f"{name} units", "random")])
        right.set_title("tracking units against random units")
        if labels:
            right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path
