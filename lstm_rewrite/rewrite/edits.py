"""Edits: the interventions the pass threads into the traced cells of the calls they target.

`lstm_rewrite.interventions` compiles interventions into per-site edit specs, ``{site: {"edits":
[...], "inputs": [(name, width, is_steps_mask)]}}``; `CallEdits` hands each traced call its own,
and creates the call-time inputs (per-sample step masks, patch sources) that some of them read.
"""

from __future__ import annotations

from ..errors import InvalidArgumentError


class CallEdits:
    """The edit specs of one rewrite, and the call-time inputs made for them."""

    def __init__(self, specs, keras):
        self.specs = dict(specs or {})
        self.keras = keras
        self.inputs = {}  # input name -> the keras.Input made for it

    def __bool__(self) -> bool:
        return bool(self.specs)

    def for_call(self, site, prefix: str, inputs, rest: dict):
        """``(edits per traced name, call kwargs)`` for one planned call (a `RecurrentSite`).

        Raises:
            InvalidArgumentError: steps out of the call's range, or call-time data for a call
                inside a nested model.
        """
        pending, tensors = {}, []
        for direction in site.directions:
            where = direction.site
            spec = self.specs.get(where)
            if not spec:
                continue
            steps = inputs.shape[1]
            for edit in spec["edits"]:
                check_edit_steps(edit, steps)
            if spec.get("inputs") and prefix:
                raise InvalidArgumentError(
                    f"The interventions on {where!r} need call-time data (a per-sample step mask or a patch source), "
                    f"and {where!r} is inside the nested model {prefix[:-1]!r}: call-time data reach top-level "
                    f"recurrent layers only. Give fixed steps (an int, a slice, a list), or flatten the model. "
                    f"Received: {[e['target'] for e in spec['edits']]}")
            for input_name, width, is_mask in spec.get("inputs", ()):
                if input_name not in self.inputs:
                    shape = (None, steps) if is_mask else (None, steps, width)
                    self.inputs[input_name] = self.keras.Input(batch_shape=shape, name=input_name)
                tensors.append(self.inputs[input_name])
            pending[direction.traced_name] = {"edits": spec["edits"], "input_width": int(inputs.shape[-1]),
                                              "channels": [w for _, w, _ in spec.get("inputs", ())]}
        if tensors:
            rest = {**rest, "edit_inputs": tensors}
        return pending, rest

    def input_order(self) -> list:
        """The names of the call-time edit inputs, in the order the intervened model takes them."""
        order = [name for spec in self.specs.values() for name, _, _ in spec.get("inputs", ())]
        return [name for name in dict.fromkeys(order) if name in self.inputs]

    def with_inputs(self, inputs):
        """The model's inputs followed by the call-time edit inputs (a dict gains their names)."""
        extra = [self.inputs[n] for n in self.input_order()]
        if not extra:
            return inputs
        if isinstance(inputs, dict):
            return {**inputs, **{t.name if hasattr(t, "name") else str(k): t for k, t in enumerate(extra)}}
        if isinstance(inputs, (list, tuple)):
            return list(inputs) + list(extra)
        return [inputs] + list(extra)


def check_edit_steps(edit: dict, steps) -> None:
    """Refuse fixed steps that a call's (static) time axis does not have.

    Args:
        edit: one compiled edit (`lstm_rewrite.interventions`), with ``steps`` and ``target``.
        steps: the call's number of steps, or None where it is not static.

    Raises:
        InvalidArgumentError: naming the target and the steps it has.

    Example:
        >>> check_edit_steps({"steps": {"at": [2]}, "target": "lstm.c", "steps_given": 2}, 5)
    """
    if steps is None:
        return
    spec, latest = edit["steps"], None
    if "at" in spec:
        latest = max(spec["at"])
    elif "channel" not in spec:
        latest = int(spec.get("start", 0))
    if latest is not None and latest >= int(steps):
        raise InvalidArgumentError(
            f"The intervention on {edit['target']!r} edits step {latest}, but that layer's input has {steps} steps "
            f"(0 to {steps - 1}, input time). Give steps within range. Received: steps={edit['steps_given']!r}")
