"""lstm_rewrite: expose the cell state (and h, gates) of every LSTM of a trained Keras model.

    >>> from lstm_rewrite import expose_cell_states
    >>> traced = expose_cell_states(model)        # same outputs, plus "<layer>.c" for every LSTM
"""

from __future__ import annotations

from .api import expose_cell_states
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

__all__ = [
    "expose_cell_states",
    "verify",
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
