"""The generic kind: ``RNN`` over a custom cell with flat states; it exposes those states,
numbered ``state0``, ``state1``, ..., at every step (`RecurrentKind.with_states`)."""

from .registry import RecurrentKind, register

GENERIC = register(RecurrentKind(
    name="generic", label="custom cell",
    quantities=(),
    state_index={},
    recurrent=(),
    traced_cell="TracedCell",
    # A custom cell's weights have no known roles: they are copied in order.
    weight_roles=(),
    numbered=True,
    copies_cell=True,
))
