"""The GRU kind: ``GRU`` and ``RNN(GRUCell)``, either ``reset_after``; state [h], gates z, r, n."""

from .registry import RecurrentKind, register

GRU = register(RecurrentKind(
    name="gru", label="GRU",
    quantities=("h", "z", "r", "n"),
    state_index={"h": 0},
    recurrent=("h",),
    layer="GRU", cell="GRUCell", traced_cell="TracedGRUCell",
))
