"""The registry of recurrent kinds: what each kind of recurrent layer is, in one place.

One `RecurrentKind` per kind (LSTM, GRU, SimpleRNN, ConvLSTM, StackedRNNCells, a generic custom
cell), each in its own module of this package. An ``RNN`` over a built-in cell (``RNN(LSTMCell)``)
is the kind of its cell. The rewrite, capture, audit, LSTMVis export, report and CLI ask this
registry; no other module switches on kind names. Nothing here imports a Keras flavour: classes
are named by the backend attribute that holds them (``"LSTM"`` is ``backend.LSTM``).

Example:
    >>> from lstm_rewrite import kinds
    >>> kinds.get("gru").quantities
    ('h', 'z', 'r', 'n')
    >>> [k.name for k in kinds.all_kinds()]
    ['lstm', 'gru', 'simple_rnn', 'conv_lstm', 'stacked', 'generic']
"""

from __future__ import annotations

from . import quantities
from .registry import RecurrentKind, all_kinds, get, kinds_with, register

__all__ = ["RecurrentKind", "register", "get", "all_kinds", "kinds_with", "quantities"]

# The kinds, in the order a layer is matched (and reports list them).
from . import lstm, gru, simple_rnn, conv_lstm, stacked, generic  # noqa: F401,I001
