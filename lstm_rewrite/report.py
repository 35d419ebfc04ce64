"""Report stage: what the audit found (`AuditReport`, one `LayerAudit` per layer) and its forms:
a summary, strict JSON, PNG figures and one HTML page with a state explorer.

The audit (`lstm_rewrite.audit`) fills these classes in; this module reads nothing of the audit,
so the stages import one way, audit -> report (the layout of pytest's runner and reports).

The page reads as a static report (summary, figures, one audit table per layer) and, with
JavaScript, holds an explorer (``explorer.js``, written here, no library) over a bounded sample of
the audited sequences: text coloured by a unit's state, its states and gates over time, the units
on during a selected span. Everything sits next to ``report.html`` and opens from disk, offline.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas directly, never
through ``pyplot``, so writing a report neither changes the caller's backend nor needs a display.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InvalidArgumentError
from .kinds import quantities

__all__ = ["AuditReport", "LayerAudit", "TrackingUnit", "write_html", "write_figures", "explorer_data",
           "unit_columns"]

REPORT_FORMAT = "lstm_rewrite.audit"


# --------------------------------------------------------------------------------------------
# What the audit found.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrackingUnit:
    """The unit that tracks a label best: ``layer.quantity[unit]`` with Pearson ``r``."""

    label: str
    layer: str
    quantity: str
    unit: int
    r: float

    @property
    def name(self) -> str:
        """The output name and unit, e.g. ``"lstm.c[11]"``."""
        return f"{self.layer}.{self.quantity}[{self.unit}]"


@dataclass
class LayerAudit:
    """The audit of one recurrent layer call; per-unit arrays have shape (units,).

    Attributes:
        prefix: the layer prefix used in output names (``"encoder"``, ``"bi.forward"``).
        layer_class: ``"LSTM"``, ``"GRU"``, ... when the rewrite record names it.
        units: number of units.
        valid_steps: number of (sequence, step) pairs counted.
        stats: quantity -> {"mean", "std", "min", "max"} over valid steps.
        gate_saturation: sigmoid gate -> {"high", "low", "total"} fraction of valid steps.
        tanh_c_saturation: fraction of valid steps with |tanh(c)| > ``tanh_high`` (None without c).
        forget_gate_mean: mean of f (None without f).
        memory_horizon: ``1 / (1 - forget_gate_mean)`` in steps (None without f).
        max_abs_h: max |h| over valid steps (None without h).
        dead_units: units with |h| < ``dead_eps`` on every valid step.
        growth: {"slope", "ratio", "late_mean_abs_c", "drifting_units", "mean_abs_c_by_step",
            "steps_count"}
            (None without c); see `lstm_rewrite.audit`.
        saturated_units: units with a gate or tanh(c) saturated on more than
            ``saturated_fraction`` of valid steps.
        label_correlation: label -> quantity ("c", "h") -> Pearson r per unit (NaN if undefined).
        histograms: quantity -> (limits (units,), counts (units, bins)): unit u's bins split
            [-limits[u], limits[u]] evenly.
        samples: the first few sequences' states (every exposed quantity, valid steps only, in
            input time), labels and input-time step indices, for the figures and the explorer.
    """

    prefix: str
    layer_class: str | None
    units: int
    valid_steps: int
    stats: dict[str, dict[str, np.ndarray]]
    gate_saturation: dict[str, dict[str, np.ndarray]]
    tanh_c_saturation: np.ndarray | None
    forget_gate_mean: np.ndarray | None
    memory_horizon: np.ndarray | None
    max_abs_h: np.ndarray | None
    dead_units: list[int]
    growth: dict[str, Any] | None
    saturated_units: list[int]
    label_correlation: dict[str, dict[str, np.ndarray]]
    histograms: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False)
    samples: list[dict[str, Any]] = field(repr=False)

    def best_tracking(self, label: str) -> TrackingUnit | None:
        """The unit (over c and h) with the largest |r| with ``label``; None if none is defined."""
        best = None
        for quantity, r in self.label_correlation.get(label, {}).items():
            if np.all(np.isnan(r)):
                continue
            unit = int(np.nanargmax(np.abs(r)))
            if best is None or abs(r[unit]) > abs(best.r):
                best = TrackingUnit(label, self.prefix, quantity, unit, float(r[unit]))
        return best

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; NaN and infinity become null."""
        out: dict[str, Any] = {
            "layer_class": self.layer_class,
            "units": self.units,
            "valid_steps": self.valid_steps,
            "stats": {q: {k: _list(v) for k, v in s.items()} for q, s in self.stats.items()},
            "gate_saturation": {g: {k: _list(v) for k, v in s.items()} for g, s in self.gate_saturation.items()},
            "tanh_c_saturation": _list(self.tanh_c_saturation),
            "forget_gate_mean": _list(self.forget_gate_mean),
            "memory_horizon": _list(self.memory_horizon),
            "max_abs_h": _list(self.max_abs_h),
            "dead_units": list(self.dead_units),
            "saturated_units": list(self.saturated_units),
            "growth": None,
            "label_correlation": {},
            "histograms": {q: {"limits": _list(lim), "counts": c.tolist()}
                           for q, (lim, c) in self.histograms.items()},
        }
        if self.growth is not None:
            out["growth"] = {
                "slope": _list(self.growth["slope"]),
                "ratio": _list(self.growth["ratio"]),
                "late_mean_abs_c": _list(self.growth["late_mean_abs_c"]),
                "drifting_units": list(self.growth["drifting_units"]),
                "mean_abs_c_by_step": _list(self.growth["mean_abs_c_by_step"]),
                "steps_count": self.growth["steps_count"].tolist(),
            }
        for label, per_q in self.label_correlation.items():
            best = self.best_tracking(label)
            out["label_correlation"][label] = {
                **{q: _list(r) for q, r in per_q.items()},
                "best": None if best is None else dataclasses.asdict(best),
            }
        return out


DEFINITIONS = {
    "stats": "mean, population std, min, max of each quantity over valid (unmasked) steps",
    "gate_saturation": "fraction of valid steps with the sigmoid gate above gate_high (high) or "
                       "below gate_low (low); total = high + low",
    "tanh_c_saturation": "fraction of valid steps with |tanh(c)| above tanh_high",
    "forget_gate_mean": "mean of the forget gate f over valid steps",
    "memory_horizon": "1 / (1 - forget_gate_mean), in steps: the sum of the geometric decay "
                      "1 + f + f^2 + ... of a contribution to c; null when f's mean is 1",
    "max_abs_h": "max |h| over valid steps",
    "dead_units": "units with |h| below dead_eps on every valid step",
    "saturated_units": "units with a gate or tanh(c) saturated on more than saturated_fraction "
                       "of valid steps",
    "growth.slope": "least-squares slope of |c| against the valid-step index (|c| per step)",
    "growth.ratio": "mean |c| over the last quarter of step indices / mean |c| over the second quarter",
    "growth.drifting_units": "units whose growth.ratio exceeds drift_ratio and whose late mean |c| "
                             "exceeds drift_min_abs_c",
    "growth.late_mean_abs_c": "mean |c| over the last quarter of step indices",
    "growth.mean_abs_c_by_step": "mean |c| at each valid-step index, [step][unit]",
    "label_correlation": "Pearson r of each unit's c and h with each label over valid steps with a "
                         "finite label; best = the unit with the largest |r|",
    "histograms": "per-unit counts of c and h in equal bins splitting [-limit, limit] of that unit",
}


@dataclass
class AuditReport:
    """What ``audit`` found: one ``LayerAudit`` per recurrent layer prefix.

    Example:
        >>> report = audit(model, x, labels=depth, progress=False)
        >>> report.best_tracking("label").name
        'lstm.c[11]'
        >>> report.to_json("out/report.json"); report.to_html("out")
    """

    layers: dict[str, LayerAudit]
    # The `lstm_rewrite.audit.AuditThresholds` the units were flagged with (a dataclass; the report
    # reads its fields and never the audit module).
    thresholds: Any
    sequences: int
    labels: tuple[str, ...] = ()
    # The sample the explorer shows (the layers' ``samples`` sequences): each sequence's tokens as
    # display strings, one per input step (None without token input), and its labels per input step.
    sample_tokens: list[list[str]] | None = field(default=None, repr=False)
    sample_labels: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    # audit(..., causal=True): see lstm_rewrite.interventions.causal_section (None without it).
    causal: dict | None = None

    def best_tracking(self, label: str | None = None) -> TrackingUnit | None:
        """The unit of any layer that tracks ``label`` best (the only label when ``None``).

        Example:
            >>> report.best_tracking().r > 0.8
            True
        """
        if label is None:
            if not self.labels:
                return None
            label = self.labels[0]
        if label not in self.labels:
            raise InvalidArgumentError(f"No label named {label!r}; audited labels: {list(self.labels)}. "
                                       f"Received: label={label!r}")
        found = [b for b in (layer.best_tracking(label) for layer in self.layers.values()) if b]
        return max(found, key=lambda b: abs(b.r), default=None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every layer and unit statistic."""
        return {
            "format": REPORT_FORMAT,
            "version": 1,
            "sequences": self.sequences,
            "thresholds": dataclasses.asdict(self.thresholds),
            "definitions": DEFINITIONS,
            "labels": list(self.labels),
            "best_tracking": {
                label: (None if (b := self.best_tracking(label)) is None else dataclasses.asdict(b))
                for label in self.labels
            },
            "layers": {prefix: layer.to_dict() for prefix, layer in self.layers.items()},
            "summary": self.summary(),
            **({} if self.causal is None else {"causal": self.causal}),
        }

    def to_json(self, path: str | os.PathLike) -> str:
        """Write the report as JSON (strict: no NaN) to ``path``; return the path written.

        Example:
            >>> report.to_json("out/report.json")
            'out/report.json'
        """
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=1, allow_nan=False)
            handle.write("\n")
        return path

    def to_html(self, out_dir: str | os.PathLike) -> str:
        """Write ``report.html``, ``report.json`` and PNG figures into ``out_dir``; return the HTML path.

        Example:
            >>> report.to_html("out")
            'out/report.html'
        """
        return write_html(self, os.fspath(out_dir))

    def summary(self) -> str:
        """A few lines: layers, dead/saturated/drifting units, and which unit tracks each label.

        Example:
            >>> print(report.summary())  # doctest: +SKIP
            Audited 200 sequences, 1 recurrent layer(s).
            ...
        """
        t = self.thresholds
        lines = [f"Audited {self.sequences} sequences, {len(self.layers)} recurrent layer(s)."]
        for prefix, layer in self.layers.items():
            kind = f"{layer.layer_class}, " if layer.layer_class else ""
            parts = [f"{prefix} ({kind}{layer.units} units, {layer.valid_steps} valid steps)"]
            if layer.forget_gate_mean is not None:
                mean_f = float(np.nanmean(layer.forget_gate_mean))
                horizon = "inf" if mean_f >= 1 else f"{1.0 / (1.0 - mean_f):.1f}"
                parts.append(f"mean forget gate {mean_f:.2f} (memory horizon ~{horizon} steps)")
            if layer.gate_saturation:
                sat = ", ".join(f"{g} {float(np.nanmean(s['total'])):.0%}" for g, s in layer.gate_saturation.items())
                parts.append(f"gates saturated on {sat} of steps")
            if layer.tanh_c_saturation is not None:
                parts.append(f"tanh(c) saturated on {float(np.nanmean(layer.tanh_c_saturation)):.0%}")
            parts.append(_units_phrase("dead", layer.dead_units))
            parts.append(_units_phrase("saturated", layer.saturated_units))
            if layer.growth is not None:
                parts.append(_units_phrase("drifting", layer.growth["drifting_units"]))
            lines.append("; ".join(parts) + ".")
        for label in self.labels:
            best = self.best_tracking(label)
            if best is None:
                lines.append(f"Label {label!r}: no unit varies with it (correlation undefined).")
                continue
            strength = "strongly" if abs(best.r) >= t.strong_correlation else "weakly"
            lines.append(f"Label {label!r} is {strength} tracked by {best.name}: Pearson r = {best.r:+.3f}.")
        if self.causal is not None:
            from .interventions import causal_summary

            lines += causal_summary(self.causal)
        return "\n".join(lines)


def _units_phrase(what: str, units: list[int]) -> str:
    if not units:
        return f"no {what} unit"
    shown = ", ".join(str(u) for u in units[:10]) + (", ..." if len(units) > 10 else "")
    return f"{len(units)} {what} unit(s) [{shown}]"


def _list(value) -> Any:
    """NumPy -> nested lists with NaN/inf as None, so that the JSON is strict."""
    if value is None:
        return None
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 0:
        return float(array) if math.isfinite(float(array)) else None
    return [_list(v) for v in array] if array.ndim > 1 else [
        float(v) if math.isfinite(v) else None for v in array.tolist()]


# --------------------------------------------------------------------------------------------
# Figures and the page.
# --------------------------------------------------------------------------------------------


_SAMPLE_HEATMAPS = 3
_HISTOGRAM_UNITS = 32


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_dir: str, name: str) -> str:
    fig.savefig(os.path.join(out_dir, name), format="png")
    return name


def _slug(prefix: str) -> str:
    """A file-name-safe form of a layer prefix or label (dots kept, others become "_")."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", prefix)


def _symmetric_limit(arrays) -> float:
    values = [np.nanmax(np.abs(a)) for a in arrays if a.size and np.isfinite(a).any()]
    return float(max(values)) if values and max(values) > 0 else 1.0


def plot_c_heatmaps(layer: LayerAudit, out_dir: str) -> str | None:
    """c over time (units x valid steps) for the first few sequences of ``layer``."""
    samples = [s for s in layer.samples if "c" in s["states"] and s["states"]["c"].size][:_SAMPLE_HEATMAPS]
    if not samples:
        return None
    limit = _symmetric_limit([s["states"]["c"] for s in samples])
    fig = _figure(9, 1.2 + 0.12 * layer.units * len(samples) + 0.6 * len(samples))
    axes = fig.subplots(len(samples), 1, squeeze=False)[:, 0]
    image = None
    for k, (ax, sample) in enumerate(zip(axes, samples)):
        c = sample["states"]["c"]  # [steps, units]
        image = ax.imshow(c.T, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_ylabel(f"seq {k}\nunit")
        ax.set_xlabel("valid step")
    fig.colorbar(image, ax=list(axes), label="c")
    fig.suptitle(f"{layer.prefix}.c over time")
    return _save(fig, out_dir, f"c_heatmap_{_slug(layer.prefix)}.png")


def plot_tracking(report: AuditReport, label: str, out_dir: str) -> str | None:
    """The best label-tracking unit over the first sequence, against the label."""
    best = report.best_tracking(label)
    if best is None:
        return None
    layer = report.layers[best.layer]
    sample = next((s for s in layer.samples if best.quantity in s["states"] and s["states"][best.quantity].size), None)
    if sample is None:
        return None
    values = sample["states"][best.quantity][:, best.unit]
    fig = _figure(9, 3)
    ax = fig.subplots()
    ax.plot(values, color="tab:blue", label=best.name)
    ax.set_xlabel("valid step")
    ax.set_ylabel(best.name, color="tab:blue")
    target = sample["labels"].get(label)
    if target is not None:
        twin = ax.twinx()
        twin.step(np.arange(target.shape[0]), target, where="mid", color="tab:orange", label=label)
        twin.set_ylabel(label, color="tab:orange")
    ax.set_title(f"{best.name} tracks {label!r}: r = {best.r:+.3f} (sequence 0)")
    return _save(fig, out_dir, f"tracking_{_slug(label)}.png")


def plot_histograms(layer: LayerAudit, quantity: str, out_dir: str) -> str | None:
    """Per-unit histograms of one state (``"c"`` or ``"h"``), one small panel per unit."""
    if quantity not in layer.histograms:
        return None
    limits, counts = layer.histograms[quantity]
    shown = min(layer.units, _HISTOGRAM_UNITS)
    cols = min(shown, 8)
    rows = -(-shown // cols)
    fig = _figure(1.6 * cols + 0.5, 1.25 * rows + 0.8)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    bins = counts.shape[1]
    for unit, ax in enumerate(axes):
        if unit >= shown:
            ax.set_axis_off()
            continue
        limit = limits[unit] or 1.0
        edges = np.linspace(-limit, limit, bins + 1)
        used = np.flatnonzero(counts[unit])
        lo, hi = (used.min(), used.max() + 1) if used.size else (0, bins)
        share = counts[unit, lo:hi] / max(counts[unit].sum(), 1)
        ax.stairs(share, edges[lo : hi + 1], fill=True, color="tab:blue")
        ax.set_title(f"unit {unit}", fontsize="small")
        ax.tick_params(labelsize="x-small")
        ax.set_yticks([])
    more = f" (first {shown} of {layer.units} units; all in report.json)" if shown < layer.units else ""
    fig.suptitle(f"{layer.prefix}.{quantity}: per-unit histograms over valid steps{more}")
    return _save(fig, out_dir, f"hist_{quantity}_{_slug(layer.prefix)}.png")


def plot_saturation(layer: LayerAudit, out_dir: str) -> str | None:
    """Per-unit saturation bars for each sigmoid gate and for tanh(c)."""
    series = [(g, s["total"]) for g, s in layer.gate_saturation.items()]
    if layer.tanh_c_saturation is not None:
        series.append(("tanh(c)", layer.tanh_c_saturation))
    if not series:
        return None
    fig = _figure(max(6, 0.45 * layer.units + 2), 3.2)
    ax = fig.subplots()
    width = 0.8 / len(series)
    units = np.arange(layer.units)
    for k, (name, fraction) in enumerate(series):
        ax.bar(units + (k - (len(series) - 1) / 2) * width, fraction, width=width, label=name)
    ax.set_xlabel("unit")
    ax.set_ylabel("fraction of valid steps saturated")
    ax.set_ylim(0, 1.2)  # headroom for the legend above the bars
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_xticks(units if layer.units <= 64 else units[:: max(1, layer.units // 32)])
    ax.legend(ncol=len(series), fontsize="small", loc="upper center")
    ax.set_title(f"{layer.prefix}: saturation")
    return _save(fig, out_dir, f"saturation_{_slug(layer.prefix)}.png")


def plot_growth(layer: LayerAudit, out_dir: str) -> str | None:
    """Mean |c| per valid-step index, one line per unit; drifting units drawn thick."""
    if layer.growth is None or not layer.growth["mean_abs_c_by_step"].size:
        return None
    profile = layer.growth["mean_abs_c_by_step"]
    drifting = set(layer.growth["drifting_units"])
    fig = _figure(9, 3.2)
    ax = fig.subplots()
    for unit in range(layer.units):
        ax.plot(profile[:, unit], lw=2.2 if unit in drifting else 0.8,
                alpha=1.0 if unit in drifting else 0.6, label=f"unit {unit}" if unit in drifting else None)
    ax.set_xlabel("valid step index (processing order)")
    ax.set_ylabel("mean |c|")
    ax.set_title(f"{layer.prefix}: growth of |c|" + (f" ({len(drifting)} drifting)" if drifting else ""))
    if drifting:
        ax.legend(fontsize="small")
    return _save(fig, out_dir, f"growth_{_slug(layer.prefix)}.png")


def write_figures(report: AuditReport, out_dir: str) -> dict[str, list[str]]:
    """Write every PNG figure of ``report`` into ``out_dir``; return section -> file names.

    Example:
        >>> write_figures(report, "out")["lstm"]  # doctest: +SKIP
        ['c_heatmap_lstm.png', 'hist_c_lstm.png', 'hist_h_lstm.png', 'saturation_lstm.png', 'growth_lstm.png']
    """
    os.makedirs(out_dir, exist_ok=True)
    figures: dict[str, list[str]] = {}
    for label in report.labels:
        name = plot_tracking(report, label, out_dir)
        if name:
            figures.setdefault("", []).append(name)
    for prefix, layer in report.layers.items():
        names = [plot_c_heatmaps(layer, out_dir),
                 *(plot_histograms(layer, q, out_dir) for q in quantities.STATES),
                 plot_saturation(layer, out_dir), plot_growth(layer, out_dir)]
        figures[prefix] = [n for n in names if n]
    return figures


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return ""
    value = float(value)
    if np.isnan(value):
        return "–"
    if np.isinf(value):
        return "∞"
    return f"{value:.{digits}g}" if abs(value) >= 1e4 else f"{value:.{digits}f}"


def unit_columns(layer: LayerAudit, causal: dict | None = None
                 ) -> tuple[list[tuple[str, np.ndarray]], list[list[str]]]:
    """The audit table of one layer: (column name, per-unit values) pairs, and each unit's flags.

    ``causal`` is the report's causal section (``audit(..., causal=True)``): it adds each unit's
    ablation effect on the metric. The HTML table and the explorer's unit rows both read this,
    so they cannot disagree.
    """
    columns: list[tuple[str, np.ndarray]] = []
    for quantity in quantities.STATES:
        if quantity in layer.stats:
            for stat in ("mean", "std", "min", "max"):
                columns.append((f"{quantity} {stat}", layer.stats[quantity][stat]))
    for gate, parts in layer.gate_saturation.items():
        columns.append((f"{gate} sat.", parts["total"]))
    if layer.tanh_c_saturation is not None:
        columns.append(("tanh(c) sat.", layer.tanh_c_saturation))
    if layer.forget_gate_mean is not None:
        columns.append(("mean f", layer.forget_gate_mean))
        columns.append(("horizon", layer.memory_horizon))
    if layer.growth is not None:
        columns.append(("|c| late/early", layer.growth["ratio"]))
    for label, per_q in layer.label_correlation.items():
        for quantity, r in per_q.items():
            columns.append((f"r({quantity}, {label})", r))
    found = (causal or {}).get(layer.prefix)
    if found is not None and len(found["unit_effect"]) == layer.units:
        columns.append(("ablation effect", np.asarray(found["unit_effect"], dtype=float)))
    flags: list[list[str]] = [[] for _ in range(layer.units)]
    for u in layer.dead_units:
        flags[u].append("dead")
    for u in layer.saturated_units:
        flags[u].append("saturated")
    for u in (layer.growth or {}).get("drifting_units", []):
        flags[u].append("drifting")
    return columns, flags


def unit_row_id(prefix: str, unit: int) -> str:
    """The HTML id of a unit's audit row, which the explorer links to: ``unit-lstm-11``."""
    return f"unit-{_slug(prefix)}-{unit}"


def _unit_table(report: AuditReport, layer: LayerAudit) -> str:
    columns, flags = unit_columns(layer, report.causal)
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _ in columns)
    rows = []
    for unit in range(layer.units):
        cells = "".join(f"<td>{_fmt(values[unit])}</td>" for _, values in columns)
        rows.append(f"<tr id='{unit_row_id(layer.prefix, unit)}'><td>{unit}</td>{cells}"
                    f"<td>{', '.join(flags[unit])}</td></tr>")
    return (f"<table><thead><tr><th>unit</th>{head}<th>flags</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


# --- the explorer ---------------------------------------------------------------------------

EXPLORER_FORMAT = 1
_EXPLORER_ASSETS = ("explorer.js", "explorer.css")  # written here (lstm_rewrite/data), no library
_ACTIVE_UNITS = 5


def _number(value) -> float | None:
    """A JSON number (5 decimals keep the page small), or None for NaN and infinity."""
    value = float(value)
    return round(value, 5) if math.isfinite(value) else None


def explorer_data(report: AuditReport) -> dict:
    """What the explorer shows: the report's sample sequences, whole, and each unit's audit row.

    Every value comes from the report: the samples the audit kept (its first sequences, every
    exposed quantity at every valid step, in input time), the tokens and labels of those
    sequences, and the audit table (`unit_columns`).
    """
    layers = []
    shown = 0
    for prefix, layer in report.layers.items():
        columns, flags = unit_columns(layer, report.causal)
        kept = [q for q in layer.samples[0]["states"]] if layer.samples else []
        shown = max(shown, len(layer.samples))
        layers.append({
            "prefix": prefix, "layer_class": layer.layer_class, "units": layer.units,
            "quantities": kept,
            "sequences": [{"steps": [int(k) for k in sample["steps"]],
                           "values": {q: [[_number(v) for v in step] for step in sample["states"][q]]
                                      for q in kept}}
                          for sample in layer.samples],
            "columns": [name for name, _ in columns],
            "rows": [[_number(values[unit]) for _, values in columns] for unit in range(layer.units)],
            "flags": flags,
        })
    tracking = [dataclasses.asdict(b) for b in (report.best_tracking(label) for label in report.labels) if b]
    active = {}
    for prefix, layer in report.layers.items():
        # The most active units by their first state's spread (c, else h).
        quantity = next((q for q in quantities.STATES if q in layer.stats), None)
        std = layer.stats[quantity]["std"] if quantity else np.zeros(layer.units)
        active[prefix] = [int(u) for u in np.argsort(-np.nan_to_num(std, nan=-1.0), kind="stable")[:_ACTIVE_UNITS]]
    if tracking:
        first = tracking[0]
        initial = {"layer": first["layer"], "unit": first["unit"], "quantity": first["quantity"], "sequence": 0}
    elif layers:
        first = layers[0]
        quantity = next((q for q in quantities.STATES if q in first["quantities"]),
                        (first["quantities"] or [quantities.STATES[0]])[0])
        initial = {"layer": first["prefix"], "unit": active[first["prefix"]][0] if active[first["prefix"]] else 0,
                   "quantity": quantity, "sequence": 0}
    else:
        initial = None
    tokens = report.sample_tokens[:shown] if report.sample_tokens is not None else None
    return {
        "format": EXPLORER_FORMAT,
        "sequences": report.sequences,
        "shown": shown,
        "tokens": tokens,
        "labels": {name: [[_number(v) for v in row] for row in values[:shown]]
                   for name, values in report.sample_labels.items()},
        "layers": layers,
        "tracking": tracking,
        "active_units": active,
        "initial": initial,
    }


def write_explorer(report: AuditReport, out_dir: str) -> None:
    """Write ``explorer_data.js`` (the data, as a script: a page opened from disk cannot fetch a
    JSON file) and the explorer's own script and style next to ``report.html``."""
    import shutil
    from pathlib import Path

    data = json.dumps(explorer_data(report), allow_nan=False, separators=(",", ":"))
    with open(os.path.join(out_dir, "explorer_data.js"), "w", encoding="utf-8") as handle:
        handle.write(f"window.LSTM_REPORT = {data};\n")
    assets = Path(__file__).parent / "data"
    for name in _EXPLORER_ASSETS:
        shutil.copyfile(assets / name, os.path.join(out_dir, name))


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
pre { background: #f4f4f4; padding: 1em; white-space: pre-wrap; }
table { border-collapse: collapse; font-size: 12px; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #eee; position: sticky; top: 0; }
img { max-width: 100%; display: block; margin: 1em 0; }
"""


def write_html(report: AuditReport, out_dir: str) -> str:
    """Write ``report.html``, ``report.json``, the PNG figures and the explorer into ``out_dir``.

    Returns:
        The path of ``report.html``.

    Example:
        >>> write_html(report, "out")  # doctest: +SKIP
        'out/report.html'
    """
    os.makedirs(out_dir, exist_ok=True)
    figures = write_figures(report, out_dir)
    report.to_json(os.path.join(out_dir, "report.json"))
    write_explorer(report, out_dir)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>LSTM audit</title>",
        f"<style>{_STYLE}</style><link rel='stylesheet' href='explorer.css'></head><body>",
        "<h1>LSTM audit</h1>",
        f"<pre>{html.escape(report.summary())}</pre>",
        # The explorer (explorer.js) fills this in; without JavaScript the page is the summary,
        # the figures and the tables below.
        "<div id='explorer'></div>",
        "<p>Every statistic counts valid (unmasked) steps only; the full numbers are in "
        "<a href='report.json'>report.json</a>. Thresholds: "
        + ", ".join(f"{html.escape(k)} = {v}" for k, v in vars(report.thresholds).items()) + ".</p>",
    ]
    for name in figures.get("", []):
        parts.append(f"<img src='{html.escape(name)}' alt='{html.escape(name)}'>")
    if report.causal:
        from .interventions import causal_figure

        if causal_figure(report.causal, os.path.join(out_dir, "causal.png")):
            parts.append("<h2>Causal: what ablating units does</h2><img src='causal.png' alt='causal.png'>")
    for prefix, layer in report.layers.items():
        kind = f" ({html.escape(layer.layer_class)})" if layer.layer_class else ""
        parts.append(f"<h2>{html.escape(prefix)}{kind}</h2>")
        parts.append(f"<p>{layer.units} units, {layer.valid_steps} valid steps.</p>")
        for name in figures.get(prefix, []):
            parts.append(f"<img src='{html.escape(name)}' alt='{html.escape(name)}'>")
        parts.append(_unit_table(report, layer))
    parts.append("<script src='explorer_data.js'></script><script src='explorer.js'></script>")
    parts.append("</body></html>")
    path = os.path.join(out_dir, "report.html")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(parts))
    return path
