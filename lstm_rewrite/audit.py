"""Audit stage: stream a traced model's states once and summarise every recurrent unit.

``audit`` runs the model batch by batch (through ``capture.iter_state_batches``) and folds each
batch into running statistics that merge exactly (Chan et al.'s parallel update of the mean and of
the sums of squared deviations), so memory does not grow with the number of sequences: only
per-unit accumulators, one (time, units) profile of |c| per layer and a few sample sequences for the
figures are kept. Only valid steps count: a step whose layer mask is 0 (padding) is skipped.

Statistics, per recurrent layer prefix (``"encoder"``, ``"bi.forward"``) and per unit:

* ``c``, ``h`` and each gate: mean, std (population), min, max over valid steps.
* gate saturation: fraction of valid steps with a sigmoid gate (i, f, o) above
  ``AuditThresholds.gate_high`` or below ``gate_low``; for c, fraction with |tanh(c)| above
  ``tanh_high``.
* forget gate mean and the implied memory horizon ``1 / (1 - mean f)`` steps: with a constant
  forget gate f a contribution to c is scaled by f at every later step, and the sum of that decay,
  1 + f + f^2 + ..., is 1 / (1 - f): f = 0.9 keeps information for about 10 steps. ``inf`` when
  the mean is 1.
* dead units: |h| below ``dead_eps`` on every valid step.
* growth of |c| over time: the step index of a valid step is the number of valid steps the
  layer processed before it in its sequence (so left and right padding agree, and the backward
  half of ``Bidirectional`` counts from the end). ``growth.slope`` is the
  least-squares slope of |c| against that index over all valid steps; ``growth.ratio`` is the mean
  |c| over the last quarter of step indices divided by the mean over the second quarter (the first
  quarter, where c leaves its initial value, is left out). A unit drifts when the ratio exceeds
  ``drift_ratio`` while its late mean |c| exceeds ``drift_min_abs_c``.
* with ``labels``: Pearson r between each unit's c (and h) and each label over valid steps whose
  label is finite, from merged co-moments. Labels are given in input time, like the data; for a
  ``go_backwards`` layer, whose states run in reversed input time, they are flipped to match.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DataError, InvalidArgumentError
from .kinds import quantities
from .report import AuditReport, LayerAudit, TrackingUnit
from .rewrite.record import TIME_ORDERS

__all__ = [
    "AuditThresholds",
    "AuditReport",
    "LayerAudit",
    "TrackingUnit",
    "RunningMoments",
    "RunningCoMoments",
    "StreamingHistogram",
    "audit",
    "audit_batches",
]

# Sequences kept whole (every state at every valid step) for the report's explorer: a bounded
# sample, whatever the size of the data set.
EXPLORER_SEQUENCES = 12


@dataclass(frozen=True)
class AuditThresholds:
    """Limits used to flag units; every default is documented with its reason.

    Attributes:
        gate_high: a sigmoid gate above this is saturated open (0.95: the gradient through it is
            below 0.05 of its maximum).
        gate_low: a sigmoid gate below this is saturated shut (0.05, symmetric to ``gate_high``).
        tanh_high: |tanh(c)| above this counts as saturated (0.95, i.e. |c| > 1.83).
        dead_eps: a unit whose |h| stays below this on every valid step is dead (1e-3: three
            orders below the range of h, far below what a following layer can use).
        drift_ratio: a unit drifts when its late mean |c| exceeds its early mean |c| by this
            factor (2.0: doubling over the sequence is not a stable regime) ...
        drift_min_abs_c: ... and its late mean |c| exceeds this (1.0: below it tanh(c) is still
            nearly linear, and ratios of tiny values are noise).
        saturated_fraction: a unit is listed as saturated when one of its gates (or tanh(c)) is
            saturated on more than this fraction of valid steps (0.9: it almost never moves).
        strong_correlation: |r| from which the summary calls a unit a strong label tracker (0.8).

    Example:
        >>> AuditThresholds(gate_high=0.99, gate_low=0.01).gate_high
        0.99
    """

    gate_high: float = 0.95
    gate_low: float = 0.05
    tanh_high: float = 0.95
    dead_eps: float = 1e-3
    drift_ratio: float = 2.0
    drift_min_abs_c: float = 1.0
    saturated_fraction: float = 0.9
    strong_correlation: float = 0.8

    def __post_init__(self):
        problems = []
        if not 0.0 <= self.gate_low < self.gate_high <= 1.0:
            problems.append("0 <= gate_low < gate_high <= 1")
        if not 0.0 < self.tanh_high < 1.0:
            problems.append("0 < tanh_high < 1")
        if not self.dead_eps > 0.0:
            problems.append("dead_eps > 0")
        if not self.drift_ratio > 1.0:
            problems.append("drift_ratio > 1")
        if not self.drift_min_abs_c >= 0.0:
            problems.append("drift_min_abs_c >= 0")
        if not 0.0 < self.saturated_fraction <= 1.0:
            problems.append("0 < saturated_fraction <= 1")
        if not 0.0 < self.strong_correlation <= 1.0:
            problems.append("0 < strong_correlation <= 1")
        if problems:
            raise InvalidArgumentError(
                f"AuditThresholds must satisfy {', '.join(problems)}. Received: {self!r}"
            )

    @classmethod
    def coerce(cls, value: "AuditThresholds | Mapping[str, float] | None") -> "AuditThresholds":
        """Return ``value`` as thresholds: ``None`` gives the defaults, a dict overrides some.

        Example:
            >>> AuditThresholds.coerce({"dead_eps": 1e-4}).dead_eps
            0.0001
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise InvalidArgumentError(
                    f"Unknown audit threshold(s) {unknown}; known: {sorted(known)}. "
                    f"Received: thresholds={dict(value)!r}"
                )
            return cls(**{k: float(v) for k, v in value.items()})
        raise InvalidArgumentError(
            f"thresholds must be an AuditThresholds, a dict of its fields or None. "
            f"Received: thresholds={value!r}"
        )


# --------------------------------------------------------------------------------------------
# Mergeable running statistics.
# --------------------------------------------------------------------------------------------


class RunningMoments:
    """Count, mean, sum of squared deviations, min and max per column, merged exactly.

    ``update`` folds in a block of rows; ``merge`` combines two accumulators with the pairwise
    formula of Chan, Golub and LeVeque (1979), so any split of the rows gives the same result up
    to rounding.

    Example:
        >>> m = RunningMoments(2)
        >>> m.update(np.array([[1.0, 2.0], [3.0, 6.0]]))
        >>> m.mean.tolist(), m.std.tolist()
        ([2.0, 4.0], [1.0, 2.0])
    """

    def __init__(self, width: int):
        self.count = 0
        self.mean_ = np.zeros(width)
        self.m2 = np.zeros(width)
        self.min_ = np.full(width, np.inf)
        self.max_ = np.full(width, -np.inf)

    def update(self, rows: np.ndarray) -> None:
        """Fold in ``rows`` of shape (n, width)."""
        rows = np.asarray(rows, dtype=np.float64)
        if rows.shape[0] == 0:
            return
        other = RunningMoments(rows.shape[1])
        other.count = rows.shape[0]
        other.mean_ = rows.mean(axis=0)
        other.m2 = ((rows - other.mean_) ** 2).sum(axis=0)
        other.min_ = rows.min(axis=0)
        other.max_ = rows.max(axis=0)
        self.merge(other)

    def merge(self, other: "RunningMoments") -> "RunningMoments":
        """Fold ``other`` into this accumulator (in place) and return it."""
        if other.count == 0:
            return self
        if self.count == 0:
            self.count, self.mean_, self.m2 = other.count, other.mean_.copy(), other.m2.copy()
            self.min_, self.max_ = other.min_.copy(), other.max_.copy()
            return self
        n = self.count + other.count
        delta = other.mean_ - self.mean_
        self.mean_ = self.mean_ + delta * (other.count / n)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        self.count = n
        self.min_ = np.minimum(self.min_, other.min_)
        self.max_ = np.maximum(self.max_, other.max_)
        return self

    @property
    def mean(self) -> np.ndarray:
        return self.mean_ if self.count else np.full_like(self.mean_, np.nan)

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (divides by the count)."""
        return np.sqrt(self.m2 / self.count) if self.count else np.full_like(self.m2, np.nan)

    @property
    def min(self) -> np.ndarray:
        return self.min_ if self.count else np.full_like(self.min_, np.nan)

    @property
    def max(self) -> np.ndarray:
        return self.max_ if self.count else np.full_like(self.max_, np.nan)


class RunningCoMoments:
    """Running co-moments of several columns x against one series y, for Pearson r.

    Example:
        >>> m = RunningCoMoments(1)
        >>> m.update(np.array([[1.0], [2.0], [3.0]]), np.array([2.0, 4.0, 7.0]))
        >>> round(float(m.pearson()[0]), 4)
        0.9934
    """

    def __init__(self, width: int):
        self.count = 0
        self.mean_x = np.zeros(width)
        self.mean_y = 0.0
        self.m2_x = np.zeros(width)
        self.m2_y = 0.0
        self.c_xy = np.zeros(width)

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        """Fold in ``x`` (n, width) and ``y`` (n,)."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.shape[0] == 0:
            return
        other = RunningCoMoments(x.shape[1])
        other.count = x.shape[0]
        other.mean_x, other.mean_y = x.mean(axis=0), float(y.mean())
        dx, dy = x - other.mean_x, y - other.mean_y
        other.m2_x = (dx**2).sum(axis=0)
        other.m2_y = float((dy**2).sum())
        other.c_xy = (dx * dy[:, None]).sum(axis=0)
        self.merge(other)

    def merge(self, other: "RunningCoMoments") -> "RunningCoMoments":
        """Fold ``other`` into this accumulator (in place) and return it."""
        if other.count == 0:
            return self
        if self.count == 0:
            for name in ("count", "mean_y", "m2_y"):
                setattr(self, name, getattr(other, name))
            for name in ("mean_x", "m2_x", "c_xy"):
                setattr(self, name, getattr(other, name).copy())
            return self
        n = self.count + other.count
        w = self.count * other.count / n
        dx = other.mean_x - self.mean_x
        dy = other.mean_y - self.mean_y
        self.m2_x = self.m2_x + other.m2_x + dx**2 * w
        self.m2_y = self.m2_y + other.m2_y + dy**2 * w
        self.c_xy = self.c_xy + other.c_xy + dx * dy * w
        self.mean_x = self.mean_x + dx * (other.count / n)
        self.mean_y = self.mean_y + dy * (other.count / n)
        self.count = n
        return self

    def pearson(self) -> np.ndarray:
        """Pearson r per column; NaN where x or y is constant (or nothing was seen)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            r = self.c_xy / np.sqrt(self.m2_x * self.m2_y)
        # A column that never moves has m2 of exactly 0 (or rounding dust): no correlation defined.
        scale_x = self.count * np.maximum(self.mean_x**2, 1.0)
        scale_y = self.count * max(self.mean_y**2, 1.0)
        flat = (self.m2_x <= 1e-24 * scale_x) | (self.m2_y <= 1e-24 * scale_y)
        return np.where(flat, np.nan, np.clip(r, -1.0, 1.0))


class StreamingHistogram:
    """Per-column histograms, each on a symmetric range [-R, R] that doubles when a value falls outside.

    The bin count stays fixed; doubling a column's R merges its neighbouring bins pairwise, which
    is exact because the old bin edges are a subset of the new ones. Each column's R starts at the
    power of two just above the first values it sees, so small and large units both get fine bins.

    Example:
        >>> hist = StreamingHistogram(1, bins=8)
        >>> hist.update(np.array([[0.1], [3.0]]))
        >>> hist.limits.tolist(), int(hist.counts.sum())
        ([4.0], 2)
    """

    _SMALLEST = 2.0**-20

    def __init__(self, width: int, bins: int = 64):
        if bins % 4:
            raise InvalidArgumentError(f"bins must be a multiple of 4. Received: bins={bins}")
        self.bins = bins
        self.limits = np.zeros(width)  # 0 = nothing seen yet
        self.counts = np.zeros((width, bins), dtype=np.int64)

    def edges(self, column: int) -> np.ndarray:
        """Bin edges of one column."""
        limit = self.limits[column] or 1.0
        return np.linspace(-limit, limit, self.bins + 1)

    def _limit_above(self, values: np.ndarray) -> np.ndarray:
        # Strictly above the largest |value|: a value equal to the limit would be clipped into the
        # top bin, and after a doubling it would sit one bin below where a wider first range puts
        # it. With every value strictly inside, the counts do not depend on how the data were
        # split into batches or shards, and merges are exact.
        return 2.0 ** (np.floor(np.log2(np.maximum(values, self._SMALLEST))) + 1.0)

    def _grow_to(self, needed: np.ndarray) -> None:
        """Widen each column so that it holds |values| up to ``needed`` strictly inside."""
        fresh = self.limits == 0
        self.limits[fresh] = self._limit_above(needed[fresh])
        self._widen(np.maximum(self.limits, self._limit_above(needed)))

    def _widen(self, target: np.ndarray) -> None:
        """Double each column's limit (a power of two) until it reaches ``target`` (powers of two)."""
        quarter = self.bins // 4
        for column in np.flatnonzero(self.limits < target):
            counts = self.counts[column]
            while self.limits[column] < target[column]:
                merged = counts[0::2] + counts[1::2]  # [bins / 2]
                counts = np.zeros_like(counts)
                counts[quarter : quarter + self.bins // 2] = merged
                self.limits[column] *= 2.0
            self.counts[column] = counts

    def update(self, rows: np.ndarray) -> None:
        """Fold in ``rows`` (n, width); non-finite values are skipped."""
        rows = np.asarray(rows, dtype=np.float64)
        finite = np.isfinite(rows)
        if not finite.any():
            return
        self._grow_to(np.where(finite, np.abs(rows), 0.0).max(axis=0))
        limits = np.where(self.limits > 0, self.limits, 1.0)
        index = np.floor((rows + limits) / (2.0 * limits) * self.bins)
        index = np.clip(np.nan_to_num(index), 0, self.bins - 1).astype(np.int64)
        column = np.broadcast_to(np.arange(rows.shape[1]), rows.shape)
        flat = (column * self.bins + index)[finite]
        self.counts += np.bincount(flat, minlength=self.counts.size).reshape(self.counts.shape)

    def merge(self, other: "StreamingHistogram") -> "StreamingHistogram":
        """Fold ``other`` into this histogram (in place) and return it."""
        other = _copy_histogram(other)
        # Columns one side has not seen take the other side's range as they are.
        self.limits = np.where(self.limits == 0, other.limits, self.limits)
        other.limits = np.where(other.limits == 0, self.limits, other.limits)
        target = np.maximum(self.limits, other.limits)
        self._widen(target)
        other._widen(target)
        self.counts += other.counts
        return self


def _copy_histogram(hist: StreamingHistogram) -> StreamingHistogram:
    copy = StreamingHistogram(hist.counts.shape[0], hist.bins)
    copy.limits, copy.counts = hist.limits.copy(), hist.counts.copy()
    return copy


# --------------------------------------------------------------------------------------------
# One layer's accumulators.
# --------------------------------------------------------------------------------------------


def _split_name(name: str) -> tuple[str, str]:
    """``"bi.forward.c"`` -> ``("bi.forward", "c")``: the quantity is the last dotted part."""
    prefix, _, quantity = name.rpartition(".")
    if not prefix:
        raise InvalidArgumentError(
            f"State output {name!r} has no layer prefix; expected '<layer>.<quantity>' such as "
            f"'encoder.c'. Received: {name!r}"
        )
    return prefix, quantity


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """``array`` with zero rows appended up to ``rows`` (per-step-index sums of a longer side)."""
    return np.concatenate([array, np.zeros((rows - array.shape[0], *array.shape[1:]), array.dtype)])


class _LayerAccumulator:
    """Everything the audit keeps about one recurrent layer while batches stream by."""

    def __init__(self, prefix: str, layer_class: str | None, units: int, thresholds: AuditThresholds,
                 labels: tuple[str, ...], samples: int, time_order: str = "forward"):
        self.prefix = prefix
        self.time_order = time_order
        self.layer_class = layer_class
        self.units = units
        self.t = thresholds
        self.moments: dict[str, RunningMoments] = {}
        self.hist: dict[str, StreamingHistogram] = {}
        self.high: dict[str, np.ndarray] = {}
        self.low: dict[str, np.ndarray] = {}
        self.tanh_sat = np.zeros(units, dtype=np.int64)
        self.max_abs_h = np.full(units, -np.inf)
        self.abs_c_sum = np.zeros((0, units))  # [step index, units]
        self.step_count = np.zeros(0, dtype=np.int64)  # [step index]
        self.corr = {name: {} for name in labels}  # label -> quantity -> RunningCoMoments
        self.n_samples = samples
        self.samples: list[dict[str, Any]] = []

    def update(self, states: dict[str, np.ndarray], mask: np.ndarray | None,
               labels: dict[str, np.ndarray]) -> None:
        first = next(iter(states.values()))
        b, steps = first.shape[:2]
        valid = np.ones((b, steps), dtype=bool) if mask is None else np.asarray(mask) > 0.5
        if self.time_order == "go_backwards":
            # States (and mask) run in reversed input time; labels are given in input time.
            labels = {name: label[:, ::-1] for name, label in labels.items()}
        for quantity, value in states.items():
            rows = value[valid]  # [valid steps, units]
            self.moments.setdefault(quantity, RunningMoments(self.units)).update(rows)
            if quantity in quantities.STATES:
                self.hist.setdefault(quantity, StreamingHistogram(self.units)).update(rows)
            if quantity in quantities.SATURATING:
                self.high[quantity] = self.high.get(quantity, 0) + (rows > self.t.gate_high).sum(axis=0)
                self.low[quantity] = self.low.get(quantity, 0) + (rows < self.t.gate_low).sum(axis=0)
            if quantity == "h" and rows.shape[0]:
                self.max_abs_h = np.maximum(self.max_abs_h, np.abs(rows).max(axis=0))
            if quantity == "c":
                self.tanh_sat += (np.abs(np.tanh(rows)) > self.t.tanh_high).sum(axis=0)
                if self.time_order == "backward_aligned":
                    # Aligned with input time but processed from the end: count steps from there.
                    self._update_growth(np.abs(value)[:, ::-1], valid[:, ::-1])
                else:
                    self._update_growth(np.abs(value), valid)
            if quantity in quantities.STATES:
                for name, label in labels.items():
                    keep = valid & np.isfinite(label)
                    self.corr[name].setdefault(quantity, RunningCoMoments(self.units)).update(
                        value[keep], label[keep])
        self._keep_samples(states, valid, labels)

    def _update_growth(self, abs_c: np.ndarray, valid: np.ndarray) -> None:
        # Index each valid step by how many valid steps precede it, so left and right padding agree.
        index = np.cumsum(valid, axis=1) - 1  # [batch, time]
        longest = int(valid.sum(axis=1).max()) if valid.size else 0
        if longest > self.step_count.shape[0]:
            grow = longest - self.step_count.shape[0]
            self.abs_c_sum = np.concatenate([self.abs_c_sum, np.zeros((grow, self.units))])
            self.step_count = np.concatenate([self.step_count, np.zeros(grow, dtype=np.int64)])
        idx = index[valid]
        length = self.step_count.shape[0]
        self.step_count += np.bincount(idx, minlength=length)
        steps = valid.shape[1]
        if (idx == np.nonzero(valid)[1]).all():
            # Right padding (or none): the index is the position, a plain masked sum over the batch.
            upto = min(steps, length)  # positions past either end hold no valid step
            masked = np.where(valid[:, :upto, None], abs_c[:, :upto], 0.0)
            self.abs_c_sum[:upto] += masked.sum(axis=0, dtype=np.float64)
        else:
            rows = abs_c[valid].astype(np.float64)  # [valid steps, units]
            for unit in range(self.units):
                self.abs_c_sum[:, unit] += np.bincount(idx, weights=rows[:, unit], minlength=length)

    def _keep_samples(self, states, valid, labels) -> None:
        row = 0
        b = valid.shape[0]
        if self.time_order == "go_backwards":
            # Figures read left to right in input time.
            states = {q: v[:, ::-1] for q, v in states.items()}
            labels = {n: l[:, ::-1] for n, l in labels.items()}
            valid = valid[:, ::-1]
        while len(self.samples) < self.n_samples and row < b:
            keep = valid[row]
            self.samples.append({
                "states": {q: np.asarray(v[row][keep], dtype=np.float32) for q, v in states.items()},
                "labels": {n: np.asarray(l[row][keep], dtype=np.float64) for n, l in labels.items()},
                "steps": np.flatnonzero(keep),  # input-time index of each kept (valid) step
            })
            row += 1

    def merge(self, other: "_LayerAccumulator") -> "_LayerAccumulator":
        """Fold ``other`` (the same layer, audited over other sequences) into this one, in place.

        Counts and sums add, moments and co-moments merge with Chan's update and histograms on
        power-of-two ranges, so any split of the sequences gives the same statistics up to
        rounding. Kept samples are this side's, then ``other``'s: merge in sequence order to keep
        the leading sequences (``lstm_rewrite.beam`` keeps its own, ordered by example key).
        """
        for quantity, moments in other.moments.items():
            self.moments.setdefault(quantity, RunningMoments(self.units)).merge(moments)
        for quantity, hist in other.hist.items():
            self.hist.setdefault(quantity, StreamingHistogram(self.units, hist.bins)).merge(hist)
        for quantity in other.high:
            self.high[quantity] = self.high.get(quantity, 0) + other.high[quantity]
            self.low[quantity] = self.low.get(quantity, 0) + other.low[quantity]
        self.tanh_sat = self.tanh_sat + other.tanh_sat
        self.max_abs_h = np.maximum(self.max_abs_h, other.max_abs_h)
        longest = max(self.step_count.shape[0], other.step_count.shape[0])
        self.abs_c_sum = _pad_rows(self.abs_c_sum, longest) + _pad_rows(other.abs_c_sum, longest)
        self.step_count = _pad_rows(self.step_count, longest) + _pad_rows(other.step_count, longest)
        for name, per_quantity in other.corr.items():
            for quantity, co in per_quantity.items():
                self.corr.setdefault(name, {}).setdefault(quantity, RunningCoMoments(self.units)).merge(co)
        self.samples.extend(other.samples[:max(0, self.n_samples - len(self.samples))])
        return self

    def finish(self) -> "LayerAudit":
        t = self.t
        stats = {q: {"mean": m.mean, "std": m.std, "min": m.min, "max": m.max}
                 for q, m in sorted(self.moments.items(), key=lambda kv: quantities.order_key(kv[0]))}
        steps = self.moments[next(iter(self.moments))].count if self.moments else 0
        saturation = {}
        for gate in (g for g in quantities.SATURATING if g in self.high):
            high = self.high[gate] / max(steps, 1)
            low = self.low[gate] / max(steps, 1)
            saturation[gate] = {"high": high, "low": low, "total": high + low}
        has_c = "c" in self.moments
        tanh_sat = self.tanh_sat / max(steps, 1) if has_c else None
        forget = self.moments["f"].mean if "f" in self.moments else None
        horizon = None
        if forget is not None:
            with np.errstate(divide="ignore"):
                horizon = np.where(forget >= 1.0, np.inf, 1.0 / (1.0 - forget))
        dead = [int(u) for u in np.flatnonzero(self.max_abs_h < t.dead_eps)] if "h" in self.moments else []
        growth = self._growth() if has_c else None
        saturated = set()
        for parts in saturation.values():
            saturated.update(np.flatnonzero(parts["total"] > t.saturated_fraction).tolist())
        if tanh_sat is not None:
            saturated.update(np.flatnonzero(tanh_sat > t.saturated_fraction).tolist())
        correlation = {name: {q: m.pearson() for q, m in per_q.items()} for name, per_q in self.corr.items()}
        return LayerAudit(
            prefix=self.prefix, layer_class=self.layer_class, units=self.units, valid_steps=int(steps),
            stats=stats, gate_saturation=saturation, tanh_c_saturation=tanh_sat,
            forget_gate_mean=forget, memory_horizon=horizon,
            max_abs_h=self.max_abs_h if "h" in self.moments else None, dead_units=dead,
            growth=growth, saturated_units=sorted(int(u) for u in saturated),
            label_correlation=correlation,
            histograms={q: (h.limits.copy(), h.counts.copy()) for q, h in self.hist.items()},
            samples=self.samples,
        )

    def _growth(self) -> dict[str, Any]:
        counts = self.step_count.astype(np.float64)
        seen = counts > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            profile = np.where(seen[:, None], self.abs_c_sum / counts[:, None], np.nan)  # [steps, units]
        n = counts.sum()
        index = np.arange(counts.shape[0], dtype=np.float64)
        slope = np.full(self.units, np.nan)
        if n > 0:
            # Least squares of |c| on the step index over every valid step, from per-index sums.
            mean_t = (counts * index).sum() / n
            var_t = (counts * (index - mean_t) ** 2).sum()
            if var_t > 0:
                cov = (self.abs_c_sum * (index - mean_t)[:, None]).sum(axis=0)
                slope = cov / var_t
        length = counts.shape[0]
        ratio = np.full(self.units, np.nan)
        late_mean = np.zeros(self.units)
        if length >= 4:
            early = slice(length // 4, length // 2)
            late = slice(length - length // 4, length)
            early_mean = self.abs_c_sum[early].sum(axis=0) / max(counts[early].sum(), 1.0)
            late_mean = self.abs_c_sum[late].sum(axis=0) / max(counts[late].sum(), 1.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = np.where(early_mean > 0, late_mean / early_mean, np.nan)
        drifts = (np.nan_to_num(ratio, nan=0.0) > self.t.drift_ratio) & (late_mean > self.t.drift_min_abs_c)
        drifting = [int(u) for u in np.flatnonzero(drifts)]
        return {"slope": slope, "ratio": ratio, "late_mean_abs_c": late_mean, "drifting_units": drifting,
                "mean_abs_c_by_step": profile, "steps_count": self.step_count.copy()}


# --------------------------------------------------------------------------------------------
# Entry points.
# --------------------------------------------------------------------------------------------


def _normalise_labels(labels) -> dict[str, np.ndarray]:
    if labels is None:
        return {}
    if isinstance(labels, Mapping):
        items = dict(labels)
    else:
        items = {"label": labels}
    out = {}
    for name, value in items.items():
        try:
            array = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise DataError(f"Label {name!r} cannot be read as numbers ({exc}). Pass a (sequences, time) "
                            f"array of per-step values. Received: {type(value).__name__}") from None
        if array.ndim != 2:
            raise DataError(f"Label {name!r} must have shape (sequences, time), one value per step. "
                            f"Received: shape {array.shape}")
        out[str(name)] = array
    return out


def _as_batch(item) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray | None]]:
    """Accept a ``StateBatch`` (``.states``, ``.mask``) or a ``(states, masks)`` pair."""
    if hasattr(item, "states"):
        return dict(item.states), dict(getattr(item, "mask", None) or {})
    states, masks = item
    return dict(states), dict(masks or {})


def audit_batches(
    batches: Iterable,
    *,
    labels: np.ndarray | Mapping[str, np.ndarray] | None = None,
    thresholds: AuditThresholds | Mapping[str, float] | None = None,
    layer_classes: Mapping[str, str] | None = None,
    time_orders: Mapping[str, str] | None = None,
    samples: int = EXPLORER_SEQUENCES,
) -> AuditReport:
    """Fold a stream of state batches into an ``AuditReport`` (the array-level core of ``audit``).

    Args:
        batches: iterable of ``StateBatch`` objects or ``(states, masks)`` pairs, where
            ``states`` maps output names ``"<layer>.<quantity>"`` to arrays (batch, time, units)
            and ``masks`` maps layer prefixes to (batch, time) arrays (1 = valid step) or None.
        labels: one (sequences, time) array, or a dict name -> array, of per-step values aligned
            with the batches in order; non-finite label values are skipped.
        thresholds: ``AuditThresholds``, a dict overriding some of its fields, or None.
        layer_classes: layer prefix -> class name, for the report.
        time_orders: layer prefix -> how its state sequences run in time: ``"forward"`` (the
            default: input time, processed forwards), ``"go_backwards"`` (processing order of a
            ``go_backwards`` layer, i.e. reversed input time: labels are flipped to match) or
            ``"backward_aligned"`` (input time, processed from the end, like the backward half of
            ``Bidirectional``: the growth step index counts from the end).
        samples: how many leading sequences to keep for the figures and the report's explorer.

    Returns:
        AuditReport.

    Raises:
        DataError: labels that do not cover the sequences or steps of the batches; no batch.

    Example:
        >>> c = np.random.default_rng(0).normal(size=(4, 5, 2))
        >>> report = audit_batches([({"enc.c": c}, {"enc": None})])
        >>> report.layers["enc"].stats["c"]["mean"].shape
        (2,)
    """
    t = AuditThresholds.coerce(thresholds)
    label_arrays = _normalise_labels(labels)
    names = tuple(label_arrays)
    layer_classes = dict(layer_classes or {})
    time_orders = dict(time_orders or {})
    bad = {p: o for p, o in time_orders.items() if o not in TIME_ORDERS}
    if bad:
        raise InvalidArgumentError(f"time_orders must be one of {TIME_ORDERS}. Received: {bad}")
    layers: dict[str, _LayerAccumulator] = {}
    seen = 0
    for item in batches:
        states, masks = _as_batch(item)
        if not states:
            continue
        by_layer: dict[str, dict[str, np.ndarray]] = {}
        for name, value in states.items():
            prefix, quantity = _split_name(name)
            by_layer.setdefault(prefix, {})[quantity] = np.asarray(value)
        b, steps = next(iter(states.values())).shape[:2]
        batch_labels = {}
        for label, array in label_arrays.items():
            if array.shape[0] < seen + b or array.shape[1] < steps:
                raise DataError(
                    f"Label {label!r} has shape {array.shape} but the data reaches sequence {seen + b} "
                    f"and {steps} steps. Pass one label per step of every sequence, shaped like the "
                    f"input's (sequences, time). Received: shape {array.shape}"
                )
            batch_labels[label] = array[seen:seen + b, :steps]
        for prefix, values in by_layer.items():
            if prefix not in layers:
                units = next(iter(values.values())).shape[-1]
                layers[prefix] = _LayerAccumulator(prefix, layer_classes.get(prefix), units, t, names,
                                                   samples, time_orders.get(prefix, "forward"))
            layers[prefix].update(values, masks.get(prefix), batch_labels)
        seen += b
    if seen == 0:
        raise DataError("The audit saw no batch of states: pass at least one sequence.")
    for label, array in label_arrays.items():
        if array.shape[0] != seen:
            raise DataError(
                f"Label {label!r} has {array.shape[0]} sequences but the data has {seen}. Pass one row "
                f"of labels per sequence. Received: shape {array.shape}"
            )
    return AuditReport(
        layers={p: acc.finish() for p, acc in layers.items()},
        thresholds=t, sequences=seen, labels=names,
        sample_labels={n: np.asarray(a[:samples], dtype=np.float64) for n, a in label_arrays.items()},
    )


def audit(
    model,
    data,
    *,
    labels: np.ndarray | Mapping[str, np.ndarray] | None = None,
    thresholds: AuditThresholds | Mapping[str, float] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    tokens=None,
    vocab: Mapping[int, str] | list[str] | None = None,
    causal: bool = False,
    metric=None,
    targets=None,
    causal_draws: int = 5,
) -> AuditReport:
    """Run ``model`` over ``data`` once and audit every recurrent unit (see the module docstring).

    The model is traced with ``expose_cell_states(model, states=("c", "h", "gates"),
    expose_masks=True)``; a model already traced is used as it is, with whatever it exposes.

    Args:
        model: a Keras 3 or tf-keras model with LSTM layers, or one returned by
            ``expose_cell_states``.
        data: what ``cell_states`` accepts: an array, a list/dict of arrays, a ``tf.data.Dataset``
            or a generator of batches.
        labels: optional per-step values shaped like the data's (sequences, time), one array or a
            dict name -> array; NaN steps are skipped. The report then names the units whose c or h
            correlates best with each label.
        thresholds: ``AuditThresholds`` or a dict overriding some of its defaults.
        batch_size: sequences per batch.
        progress: show a progress bar on stderr.
        tokens: the token ids of the sequences, (sequences, time), for the report's coloured text;
            by default the data itself when it is one 2-D integer array (a model whose input feeds
            an ``Embedding``). Only the explorer's sample is read from it.
        vocab: id -> token text (a dict, or a list indexed by id), as for ``export_lstmvis``;
            without it the text shows the ids.
        causal: also intervene (opt-in; costs units + 1 batched passes per layer and one per
            label): each unit's mean-ablation effect on ``metric``, and for the units tracking a
            label, their ablation against ``causal_draws`` random sets of as many units
            (`lstm_rewrite.interventions.causal_section`). Needs the original model and array data.
        metric: ``metric(outputs, targets) -> float`` for the causal section; by default how much
            the first output moves (`lstm_rewrite.interventions.output_change_metric`).
        targets: passed to ``metric``.
        causal_draws: random unit sets per label.

    Returns:
        AuditReport: ``.summary()``, ``.to_json(path)``, ``.to_html(out_dir)``.

    Raises:
        DataError: data or labels that do not fit the model.
        InvalidArgumentError: bad thresholds or batch size.

    Example:
        >>> from lstm_rewrite.demo import demo_data, load_demo_model
        >>> x, depth, _ = demo_data()
        >>> report = audit(load_demo_model(), x, labels={"depth": depth}, progress=False)
        >>> abs(report.best_tracking("depth").r) > 0.8
        True
    """
    from .capture import iter_state_batches
    from .rewrite.record import record_of

    thresholds = AuditThresholds.coerce(thresholds)
    record = record_of(model)
    if record is None:
        from .api import expose_cell_states

        traced = expose_cell_states(model, states=("c", "h", "gates"), expose_masks=True)
        record = traced.rewrite_record
    else:
        traced = model
    classes = {e.layer: getattr(e, "layer_class", None) for e in record.exposed}
    time_orders = {e.layer: e.time_order for e in record.exposed}
    batches = iter_state_batches(traced, data, states=None, layers=None, batch_size=batch_size,
                                 progress=progress)
    report = audit_batches(batches, labels=labels, thresholds=thresholds, layer_classes=classes,
                           time_orders=time_orders)
    report.sample_tokens = _sample_tokens(data if tokens is None else tokens, vocab, explicit=tokens is not None)
    if causal:
        if record_of(model) is not None:
            raise InvalidArgumentError(
                f"audit(..., causal=True) intervenes on the original model, and {model.name!r} is already traced. "
                f"Pass the model you traced it from. Received: a traced model")
        from .interventions import _as_list, _predict, causal_section, output_change_metric

        if metric is None:
            metric = output_change_metric(_predict(model, _as_list(data), max(batch_size, 64)))
        report.causal = causal_section(model, data, report, metric, targets=targets, draws=causal_draws)
    return report


def _sample_tokens(tokens, vocab, explicit: bool) -> list[list[str]] | None:
    """The explorer sample's tokens as display strings, one per input step; None without tokens."""
    array = np.asarray(tokens) if isinstance(tokens, (np.ndarray, list)) else None
    if array is None or array.ndim != 2 or array.dtype.kind not in "iuf" or (
            array.dtype.kind == "f" and not np.all(np.isfinite(array) & (array == np.round(array)))):
        if explicit:
            raise InvalidArgumentError(
                f"tokens= takes the token ids of the audited sequences, an integer array of shape "
                f"(sequences, time). Received: {type(tokens).__name__} of shape {getattr(array, 'shape', None)}"
            )
        return None  # data that are not token ids (features, several inputs, a generator)
    ids = array[:EXPLORER_SEQUENCES].astype(np.int64)
    if vocab is None:
        return [[str(int(i)) for i in row] for row in ids]
    lookup = (lambda i: vocab[i] if 0 <= i < len(vocab) else str(i)) if isinstance(vocab, (list, tuple)) \
        else (lambda i: vocab.get(i, vocab.get(str(i), str(i))))
    return [[str(lookup(int(i))) for i in row] for row in ids]
