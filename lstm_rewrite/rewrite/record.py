"""The rewrite record: what a rewrite added to a model, kept in the traced model and saved with it.

A traced model is a functional model of its flavour's `TracedModel` class, which carries its
`RewriteRecord` as a declared field of its config. Saving writes the record with the model
(``.keras`` in both flavours, legacy ``.h5`` in tf-keras) and loading brings it back, so a traced
model read from a file is recognised as traced by every later stage (capture, audit, the CLI)
without tracing it again. This module imports no Keras: both backends mix `CarriesRecord` into
their functional class. It is also the home of the time-order vocabulary (`TIME_ORDERS`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

# Bumped when the stored form changes; `RewriteRecord.from_config` reads every version up to it.
RECORD_FORMAT = 1

# How an exposed sequence runs in time, the one vocabulary for it: "forward" (input time);
# "go_backwards" (a backward layer's processing order, index 0 = last input step);
# "backward_aligned" (a Bidirectional's backward half, flipped back to input time).
FORWARD, GO_BACKWARDS, BACKWARD_ALIGNED = "forward", "go_backwards", "backward_aligned"
TIME_ORDERS = (FORWARD, GO_BACKWARDS, BACKWARD_ALIGNED)


@dataclasses.dataclass(frozen=True)
class ExposedOutput:
    """One extra output of a traced model: ``name`` = ``site`` + "." + ``quantity``.

    Stored under the keys of `to_config`; the site's key is ``"layer"``, as in every saved file.
    """

    name: str
    site: str  # dotted site, e.g. "bi.forward", "body.encoder.call1", "stack.cell0"
    quantity: str  # c, h, i, f, g, o; z, r, n; state0, state1, ...
    layer_class: str  # "LSTM", "GRU", "RNN(GRUCell)", "ConvLSTM2D", "LSTMCell" (a stacked cell), ...
    units: int  # units (filters for ConvLSTM, width for a custom cell's state)
    dtype: str = "float32"  # the layer's dtype policy; the exposed sequence has its compute dtype
    shape: tuple = ()  # one step's shape: (units,), or (*spatial, filters) for ConvLSTM
    time_order: str = FORWARD  # one of TIME_ORDERS

    @property
    def layer(self) -> str:
        """The site, under the name the stored record gives it (``"layer"``)."""
        return self.site

    @property
    def reversed(self) -> bool:
        """Whether the sequence runs in reversed input time (only a plain go_backwards layer's)."""
        return self.time_order == GO_BACKWARDS

    def to_config(self) -> dict[str, Any]:
        config = {_STORED_AS.get(k, k): v for k, v in dataclasses.asdict(self).items()}
        return {**config, "shape": list(self.shape)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ExposedOutput":
        fields = {f.name for f in dataclasses.fields(cls)}
        read = {_READ_AS.get(k, k): v for k, v in config.items()}
        known = {k: v for k, v in read.items() if k in fields}
        return cls(**{**known, "units": int(known["units"]), "shape": tuple(int(d) for d in known.get("shape", ()))})


# Field -> key in the stored record, where they differ (files keep the key they always had).
_STORED_AS = {"site": "layer"}
_READ_AS = {key: field for field, key in _STORED_AS.items()}


@dataclasses.dataclass
class RewriteRecord:
    """What a rewrite did: which calls were replaced and which outputs it added, in order.

    ``method`` is how the LSTMs were rewritten ("trace" or "reconstruct"); ``verification`` the
    `lstm_rewrite.verify.VerificationReport` of the check that ran (None without one).
    ``source`` says where the record came from: "rewrite" (this process), "stored" (read back
    with the model from its file) or "output names" (a file saved before records were stored,
    recovered from its outputs).
    """

    original_output_names: list
    exposed: list = dataclasses.field(default_factory=list)  # [ExposedOutput]
    masks: dict = dataclasses.field(default_factory=dict)  # site -> mask output name
    replaced: list = dataclasses.field(default_factory=list)  # sites replaced by traced layers
    reused_layers: list = dataclasses.field(default_factory=list)  # layers called as-is (no copy)
    method: str | None = None
    verification: Any = None
    source: str = dataclasses.field(default="rewrite", compare=False)

    @property
    def output_names(self) -> list:
        """Names of the added outputs, in output order (states, then masks)."""
        return [e.name for e in self.exposed] + list(self.masks.values())

    def to_config(self) -> dict[str, Any]:
        """The record as plain JSON data, the form stored in the traced model's config."""
        report = self.verification
        verification = None
        if report is not None:
            verification = {"batch_size": int(report.batch_size),
                            "outputs": [dataclasses.asdict(o) for o in report.outputs]}
        return {
            "format": RECORD_FORMAT,
            "original_output_names": [str(n) for n in self.original_output_names],
            "exposed": [e.to_config() for e in self.exposed],
            "masks": {str(k): str(v) for k, v in self.masks.items()},
            "replaced": [str(s) for s in self.replaced],
            "reused_layers": [str(s) for s in self.reused_layers],
            "method": self.method,
            "verification": verification,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "RewriteRecord":
        """The record stored by `to_config`, as it was when the model was saved."""
        if not isinstance(config, dict) or int(config.get("format", 0)) > RECORD_FORMAT:
            raise ValueError(
                f"This traced model stores a rewrite record of format {config.get('format')!r} "
                f"(this release reads up to {RECORD_FORMAT}): it was written by a newer lstm_rewrite. "
                f"Upgrade lstm_rewrite to read it."
            )
        verification = config.get("verification")
        if verification is not None:
            from ..verify import OutputComparison, VerificationReport

            verification = VerificationReport(
                outputs=[OutputComparison(**o) for o in verification["outputs"]],
                batch_size=int(verification["batch_size"]),
            )
        return cls(
            original_output_names=list(config["original_output_names"]),
            exposed=[ExposedOutput.from_config(e) for e in config.get("exposed", [])],
            masks=dict(config.get("masks", {})),
            replaced=list(config.get("replaced", [])),
            reused_layers=list(config.get("reused_layers", [])),
            method=config.get("method"),
            verification=verification,
            source="stored",
        )


class CarriesRecord:
    """Mixed into each flavour's functional model class: the record as a declared config field.

    The class keeps the functional constructor (no ``__init__`` of its own), which is what lets
    both Keras flavours save it as a graph of layers and rebuild it from that config.
    """

    rewrite_record: RewriteRecord | None = None

    def get_config(self):
        config = super().get_config()
        if self.rewrite_record is not None:
            config["rewrite_record"] = self.rewrite_record.to_config()
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        stored = config.pop("rewrite_record", None)
        model = super().from_config(config, custom_objects=custom_objects)
        if stored is not None:
            model.rewrite_record = RewriteRecord.from_config(stored)
        return model


def record_of(model) -> RewriteRecord | None:
    """The rewrite record of a traced model (fresh or loaded), or None for a model not traced.

    Traced models saved by release 0.1.0 stored no record; theirs is recovered from their output
    names and traced layers (`recover_record`).
    """
    record = getattr(model, "rewrite_record", None)
    return record if record is not None else recover_record(model)


def recover_record(model) -> RewriteRecord | None:
    """A record for a traced model saved before records were stored, read off the model itself.

    The exposed outputs are the trailing outputs named ``<site>.<quantity>`` whose site is a traced
    layer of the model (the rewrite appends them after the original outputs). What the file does
    not say is left at what the layers show: the class is the traced cell's kind (``LSTM`` for an
    ``RNN(LSTMCell)`` too), the verification and method are unknown. None when the model holds no
    traced layer.
    """
    from .. import backends
    from ..naming import MASK, parse_states, split_output_name

    try:
        backend = backends.for_model(model)
        names = list(backend.output_names(model))
        tensors = list(backend.flatten(model.outputs))
    except (AttributeError, TypeError, ValueError, LookupError):
        return None
    exposed, masks = [], {}
    first_exposed = len(names)
    for index in range(len(names) - 1, -1, -1):
        site, quantity = split_output_name(names[index])
        try:
            known = quantity == MASK or parse_states(quantity) == (quantity,)
        except ValueError:
            known = False
        found = _resolve_site(model, site) if site and known else None
        if found is None:
            break
        first_exposed = index
        if quantity == MASK:
            masks[site] = names[index]
            continue
        layer, time_order, cell = found
        shape = tuple(int(d) for d in tensors[index].shape[2:])
        exposed.append(ExposedOutput(
            names[index], site, quantity, _traced_kind(cell), shape[-1] if shape else 0,
            backend.dtype_policy(layer), shape, time_order=time_order,
        ))
    if not exposed:
        return None
    exposed.reverse()
    masks = dict(reversed(list(masks.items())))
    return RewriteRecord(
        original_output_names=names[:first_exposed], exposed=exposed, masks=masks,
        replaced=sorted({e.site for e in exposed}), source="output names",
    )


def _resolve_site(model, site: str):
    """(traced recurrent layer, time order, its cell) for a dotted site of ``model``, or None."""
    segments, current, time_order = site.split("."), model, FORWARD
    position = 0
    while position < len(segments):
        segment = segments[position]
        if hasattr(current, "get_layer") and hasattr(current, "layers"):  # a (nested) model
            try:
                current = current.get_layer(segment)
            except ValueError:
                return None
            position += 1
            if position < len(segments) and re.fullmatch(r"call\d+", segments[position]):
                position += 1
        elif hasattr(current, "forward_layer") and segment in ("forward", "backward"):
            current = getattr(current, f"{segment}_layer")
            time_order = BACKWARD_ALIGNED if segment == "backward" else time_order
            position += 1
        else:
            break
    rnn = getattr(current, "rnn", None)
    if rnn is None or not type(current).__module__.startswith("lstm_rewrite"):
        return None
    cell = rnn.cell
    rest = segments[position:]
    if rest and re.fullmatch(r"cell\d+", rest[0]) and hasattr(cell, "cells"):
        cell = cell.cells[int(rest[0][4:])]
        rest = rest[1:]
    if rest:
        return None
    if time_order == FORWARD and rnn.go_backwards:
        time_order = GO_BACKWARDS
    return current, time_order, cell


def _traced_kind(cell) -> str:
    """The label of a traced cell's kind (``LSTM``, ``GRU``, ``SimpleRNN``, ``ConvLSTM``); for the
    traced copy of a custom cell, the custom cell's class."""
    from .. import kinds

    name = type(cell).__name__
    for kind in kinds.all_kinds():
        if kind.traced_cell == name and not (kind.copies_cell or kind.stacks):
            return kind.label
    return getattr(getattr(cell, "cell", None), "__class__", type(cell)).__name__
