"""The SimpleRNN kind: ``SimpleRNN`` and ``RNN(SimpleRNNCell)``; its only quantity is its state h."""

from .registry import RecurrentKind, register

SIMPLE_RNN = register(RecurrentKind(
    name="simple_rnn", label="SimpleRNN",
    quantities=("h",),
    state_index={"h": 0},
    recurrent=("h",),
    layer="SimpleRNN", cell="SimpleRNNCell", traced_cell="TracedSimpleRNNCell",
))
