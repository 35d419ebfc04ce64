"""lstm_rewrite: expose the cell state (and h, gates) of every LSTM of a trained Keras model.

    >>> from lstm_rewrite import expose_cell_states
    >>> traced = expose_cell_states(model)        # same outputs, plus "<layer>.c" for every LSTM
"""

from __future__ import annotations

from .api import expose_cell_states
# `audit` is also the name of its submodule: imported here, before anything can import
# `lstm_rewrite.audit` some other way, so that the package attribute is the function. (A lazy
# name equal to a submodule's would become the module as soon as the submodule is imported:
# Python's import system binds each newly imported submodule on its package.) audit.py needs only
# NumPy, so this keeps `import lstm_rewrite` cheap.
from .audit import AuditReport, AuditThresholds, audit
from .errors import (
    DataError,
    InvalidArgumentError,
    LstmRewriteError,
    ModelFileError,
    UnsafeModelError,
    UnsupportedLayerError,
    UnsupportedModelError,
    VerificationError,
)
from .verify import VerificationReport, verify

# The later stages load on first use, so that `import lstm_rewrite` (and the CLI's --help) stays
# quick and a model-only user never imports h5py or matplotlib.
_LAZY = {
    "cell_states": "capture",
    "CellStates": "capture",
    "iter_state_batches": "capture",
    "load_model": "loading",
    "export_lstmvis": "lstmvis",
    "intervene": "interventions",
    "Ablate": "interventions",
    "Clamp": "interventions",
    "Scale": "interventions",
    "Add": "interventions",
    "Patch": "interventions",
    "run_intervened": "interventions",
    "unit_importance": "interventions",
    "patch_sweep": "interventions",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lstm_rewrite' has no attribute {name!r}")


__all__ = [
    "expose_cell_states",
    "verify",
    "audit",
    "AuditReport",
    "AuditThresholds",
    *_LAZY,
    "VerificationReport",
    "LstmRewriteError",
    "InvalidArgumentError",
    "UnsupportedModelError",
    "UnsupportedLayerError",
    "VerificationError",
    "DataError",
    "ModelFileError",
    "UnsafeModelError",
]
