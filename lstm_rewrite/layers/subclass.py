"""A user's recurrent-layer subclass whose ``call`` wraps ``super().call``, run over a TracedRNN.

`wrapping_call` decides whether a subclass can be run this way (the rewrite asks it before it
builds anything); `TracedSubclassRNN` runs that ``call`` with its ``super().call`` resolving to
the traced layer, which puts the exposed sequences aside for it.
"""

from __future__ import annotations

import contextvars
import types

from .flavour import plain_python
from .traced_rnn import TracedRNN

# What a recurrent-layer subclass may define besides ``call`` and still be exposed: its
# construction and config (the traced copy reads the configuration from the layer's attributes).
# Any other method (compute_mask, build, get_initial_state, inner_loop, ...) changes what the
# layer computes in a way the traced call does not run, so such a subclass is refused.
_SUBCLASS_MAY_DEFINE = {"call", "__init__", "get_config", "from_config"}

# The traced parent call puts each call's exposed sequences here for the subclass's call to return.
_PARENT_RESULTS = contextvars.ContextVar("lstm_rewrite_parent_results", default=None)


def wrapping_call(layer_class: type, base: type):
    """The ``call`` function of a subclass of ``base`` (a Keras recurrent layer) that only wraps
    ``super().call(...)``, or None when the subclass does not define ``call``.

    Raises:
        ValueError: saying why the subclass's ``call`` cannot be run over the traced layer (two
            classes define it, it does not call ``super().call``, the subclass defines other methods).

    Example:
        >>> wrapping_call(ReversingLSTM, keras.layers.LSTM) is ReversingLSTM.call
        True
    """
    chain = [k for k in layer_class.__mro__[:layer_class.__mro__.index(base)]]
    defining = [k for k in chain if "call" in vars(k)]
    if not defining:
        return None
    others = sorted({name for k in chain for name, value in vars(k).items()
                     if name not in _SUBCLASS_MAY_DEFINE and not name.startswith("__")
                     and (callable(value) or isinstance(value, (property, staticmethod, classmethod)))})
    if others:
        raise ValueError(f"it also defines {others}, which the traced layer does not run")
    if len(defining) > 1:
        raise ValueError(f"{[k.__name__ for k in defining]} each define call; only one wrapping call is supported")
    call = vars(defining[0])["call"]
    code = getattr(call, "__code__", None)
    if code is None or "__class__" not in code.co_freevars or "super" not in code.co_names:
        raise ValueError("its call does not run super().call(...), so its states are not the Keras layer's")
    return call


def call_with_super(call, owner: type):
    """``call`` (a function using zero-argument ``super()``) with ``super()`` resolving from ``owner``.

    Example:
        >>> call = call_with_super(ReversingLSTM.call, TracedSubclassRNN)  # super().call: the traced parent
    """
    closure = list(call.__closure__ or ())
    closure[call.__code__.co_freevars.index("__class__")] = types.CellType(owner)
    rebound = types.FunctionType(call.__code__, call.__globals__, call.__name__, call.__defaults__, tuple(closure))
    rebound.__kwdefaults__ = call.__kwdefaults__
    return rebound


class TracedParentCall(TracedRNN):
    """``super().call`` of a wrapped subclass: what the Keras layer's call returns, the exposed
    sequences put aside (see TracedSubclassRNN)."""

    aligns_input_time = False  # the subclass's call decides its output's order

    def call(self, inputs, initial_state=None, mask=None, training=None):
        results = super().call(inputs, initial_state=initial_state, mask=mask, training=training)
        count = 1 + (self.num_states if self.return_state else 0)
        aside = _PARENT_RESULTS.get()
        if aside is None or aside:
            raise ValueError("its call runs super().call(...) more than once, or outside call")
        aside.append(results[count:])
        return results[0] if count == 1 else results[:count]


class TracedSubclassRNN(TracedParentCall):
    """A TracedRNN running the ``call`` of a user's recurrent-layer subclass around its own.

    For a subclass (e.g. ``class ReversingLSTM(LSTM)`` reversing its output back to input
    order) whose ``call`` only wraps ``super().call(...)``: that ``call`` runs with this layer
    as ``self``, and its ``super().call`` runs the traced layer, which returns what the Keras
    layer's call would and keeps the exposed sequences aside. Returns

        [*what the subclass's call returns, *exposed, mask (if expose_mask)]

    The exposed sequences are the traced layer's, in its processing order (reversed input time
    for ``go_backwards``): what the subclass does to its output is not applied to them. The
    subclass's call can only use what this layer has (``go_backwards``, ``return_sequences``,
    ``return_state``, ``rnn``): an attribute of its own fails when the rewrite calls it.

    Saving: the config names the subclass by its registered Keras name, so loading needs the
    class, as loading the original model does (``keras.saving.register_keras_serializable``,
    or ``custom_objects={"ReversingLSTM": ReversingLSTM}``).

    Args:
        rnn: the inner ``RNN``, as for TracedRNN.
        subclass: the user's class, or its registered name (in a config).
        **kwargs: TracedRNN's.
    """

    def __init__(self, rnn, subclass=None, **kwargs):
        super().__init__(rnn, **kwargs)
        saving = self.flavour.keras.saving
        if isinstance(subclass, str):
            found = saving.get_registered_object(subclass)
            if found is None:
                raise ValueError(
                    f"Layer {self.name!r} (TracedSubclassRNN) runs the call of {subclass!r}, which is not "
                    f"registered. Register the class with keras.saving.register_keras_serializable, or pass it "
                    f"in custom_objects, when loading. Received: subclass={subclass!r}"
                )
            subclass = found
        self.subclass = subclass
        base = next(k for k in subclass.__mro__ if k.__module__.split(".")[0] in ("keras", "tf_keras"))
        # super() from this class: the next call in a bound class's order is TracedParentCall's.
        self._subclass_call = call_with_super(wrapping_call(subclass, base), TracedSubclassRNN)

    @plain_python
    def call(self, inputs, initial_state=None, mask=None, training=None):
        kwargs = {"mask": mask, "training": training} if mask is not None else {"training": training}
        if initial_state is not None:
            kwargs["initial_state"] = initial_state
        aside = []
        token = _PARENT_RESULTS.set(aside)
        try:
            result = self._subclass_call(self, inputs, **kwargs)
        finally:
            _PARENT_RESULTS.reset(token)
        if not aside:
            raise ValueError("its call did not run super().call(...)")
        return [*self.flavour.tree.flatten(result), *aside[0]]

    def compute_output_spec(self, inputs, initial_state=None, mask=None, training=None):
        # The subclass's call may use framework ops that take no symbolic tensor: trace it as
        # Keras does for any layer.
        return self.flavour.keras.layers.Layer.compute_output_spec(
            self, inputs, initial_state=initial_state, mask=mask, training=training)

    def get_config(self):
        return {**super().get_config(), "subclass": self.flavour.keras.saving.get_registered_name(self.subclass)}
