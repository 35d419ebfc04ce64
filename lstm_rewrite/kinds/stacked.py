"""The stacked kind: ``RNN(StackedRNNCells([...]))``; each cell exposes what its own kind has,
under ``cell0.``, ``cell1.``, ... (the stack itself has no quantities of its own)."""

from .registry import RecurrentKind, register

STACKED = register(RecurrentKind(
    name="stacked", label="StackedRNNCells",
    quantities=(),
    state_index={},
    recurrent=(),
    cell="StackedRNNCells", traced_cell="TracedStackedCells",
    weight_roles=(),
    stacks=True,
))
