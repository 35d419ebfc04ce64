"""The exception hierarchy: every error the library raises on purpose derives from LstmRewriteError.

Messages name the layer (or file) concerned, say what was found and what to do, and end with
what was received, so that a user can act on them without reading our code.
"""


class LstmRewriteError(Exception):
    """Root of every error raised on purpose by lstm_rewrite."""


class InvalidArgumentError(LstmRewriteError, ValueError):
    """A caller passed an argument the library cannot use (unknown layer or state name, bad selector)."""


class UnsupportedModelError(LstmRewriteError):
    """The model as a whole cannot be rewritten (subclassed, unbuilt, no recurrent layer)."""


class UnsupportedLayerError(LstmRewriteError):
    """One layer of the model cannot be rewritten (an LSTM inside an unknown wrapper, an overridden call)."""


class VerificationError(LstmRewriteError):
    """The traced model's original outputs differ from the model's beyond the tolerance."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class DataError(LstmRewriteError, ValueError):
    """Input data does not fit the model (shape, dtype, number of inputs, NaN/Inf, empty)."""


class ModelFileError(LstmRewriteError):
    """A model file is missing, unreadable, corrupt, or not a Keras model."""


class UnsafeModelError(ModelFileError):
    """A model file carries code that would run on load (a Lambda layer); refused unless the user trusts it."""
