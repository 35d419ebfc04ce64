"""The rewrite: plan what matches (`plan`, asking the registry through `match`) apart from rebuilding
what replaces it (`rebuild`, with `build`, `weights` and `edits`); `record` says what it did.

    >>> traced, record = rewrite_model(model, states=("c", "h"))
    >>> [s.site for s in plan_rewrite(model)]
    ['encoder']
"""

from __future__ import annotations

from .build import ReplacementBuilder
from .edits import check_edit_steps
from .match import describe_layer, recurrent_kind, wrapping_subclass
from .plan import (
    ExposedCell,
    LayerSelector,
    Plan,
    PlannedLayer,
    PlannedModel,
    RecurrentSite,
    Selector,
    make_selector,
    plan_model,
    plan_rewrite,
    recurrent_sites,
)
from .rebuild import RewritePass, rewrite_model
from .record import (
    RECORD_FORMAT,
    TIME_ORDERS,
    CarriesRecord,
    ExposedOutput,
    RewriteRecord,
    record_of,
    recover_record,
)

__all__ = [
    "rewrite_model",
    "plan_rewrite",
    "plan_model",
    "recurrent_sites",
    "LayerSelector",
    "Selector",
    "make_selector",
    "Plan",
    "PlannedModel",
    "RecurrentSite",
    "PlannedLayer",
    "ExposedCell",
    "RewritePass",
    "ReplacementBuilder",
    "describe_layer",
    "recurrent_kind",
    "wrapping_subclass",
    "check_edit_steps",
    "RewriteRecord",
    "ExposedOutput",
    "CarriesRecord",
    "RECORD_FORMAT",
    "TIME_ORDERS",
    "record_of",
    "recover_record",
]
