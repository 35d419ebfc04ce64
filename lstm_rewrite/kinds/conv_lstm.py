"""The ConvLSTM kind: ``ConvLSTM1D/2D/3D``; an LSTM whose states are feature maps."""

from .registry import RecurrentKind, register

CONV_LSTM = register(RecurrentKind(
    name="conv_lstm", label="ConvLSTM",
    quantities=("c", "h", "i", "f", "g", "o"),
    state_index={"h": 0, "c": 1},
    recurrent=("c",),
    layer="ConvLSTM", cell="ConvLSTMCell", traced_cell="TracedConvLSTMCell",
    # Keras runs a ConvLSTMCell only inside its ConvLSTM layers, never in a plain RNN.
    standalone_cell=False,
    spatial=True,
))
