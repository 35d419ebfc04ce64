"""The LSTM kind: ``LSTM`` and ``RNN(LSTMCell)``; states [h, c], gates i, f, g, o."""

from .registry import RecurrentKind, register

LSTM = register(RecurrentKind(
    name="lstm", label="LSTM",
    quantities=("c", "h", "i", "f", "g", "o"),
    state_index={"h": 0, "c": 1},
    recurrent=("c",),
    layer="LSTM", cell="LSTMCell", traced_cell="TracedLSTMCell",
    fast_path="reconstruct",
    # Unrolled, the RNN stacks the steps' outputs itself, which needs one tensor per step.
    split_outputs=True,
))
