"""Report stage: draw an ``AuditReport`` as PNG figures and one HTML page with a state explorer.

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
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .audit import AuditReport, LayerAudit

__all__ = ["write_html", "write_figures", "explorer_data", "unit_columns"]

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


def plot_c_heatmaps(layer: "LayerAudit", out_dir: str) -> str | None:
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


def plot_tracking(report: "AuditReport", label: str, out_dir: str) -> str | None:
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


def plot_histograms(layer: "LayerAudit", quantity: str, out_dir: str) -> str | None:
    """Per-unit histograms of one quantity (``"c"`` or ``"h"``), one small panel per unit."""
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


def plot_c_histograms(layer: "LayerAudit", out_dir: str) -> str | None:
    """Per-unit histograms of c."""
    return plot_histograms(layer, "c", out_dir)


def plot_h_histograms(layer: "LayerAudit", out_dir: str) -> str | None:
    """Per-unit histograms of h."""
    return plot_histograms(layer, "h", out_dir)


def plot_saturation(layer: "LayerAudit", out_dir: str) -> str | None:
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


def plot_growth(layer: "LayerAudit", out_dir: str) -> str | None:
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


def write_figures(report: "AuditReport", out_dir: str) -> dict[str, list[str]]:
    """Write every PNG figure of ``report`` into ``out_dir``; return section -> file names.

    Example:
        >>> write_figures(report, "out")["lstm"]  # doctest: +SKIP
        ['c_heatmap_lstm.png', 'histograms_lstm.png', 'saturation_lstm.png', 'growth_lstm.png']
    """
    os.makedirs(out_dir, exist_ok=True)
    figures: dict[str, list[str]] = {}
    for label in report.labels:
        name = plot_tracking(report, label, out_dir)
        if name:
            figures.setdefault("", []).append(name)
    for prefix, layer in report.layers.items():
        names = [plot(layer, out_dir) for plot in (plot_c_heatmaps, plot_c_histograms, plot_h_histograms,
                                              plot_saturation, plot_growth)]
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


def unit_columns(layer: "LayerAudit", causal: dict | None = None
                 ) -> tuple[list[tuple[str, np.ndarray]], list[list[str]]]:
    """The audit table of one layer: (column name, per-unit values) pairs, and each unit's flags.

    ``causal`` is the report's causal section (``audit(..., causal=True)``): it adds each unit's
    ablation effect on the metric. The HTML table and the explorer's unit rows both read this,
    so they cannot disagree.
    """
    columns: list[tuple[str, np.ndarray]] = []
    for quantity in ("c", "h"):
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


def _unit_table(report: "AuditReport", layer: "LayerAudit") -> str:
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


def explorer_data(report: "AuditReport") -> dict:
    """What the explorer shows: the report's sample sequences, whole, and each unit's audit row.

    Every value comes from the report: the samples the audit kept (its first sequences, every
    exposed quantity at every valid step, in input time), the tokens and labels of those
    sequences, and the audit table (`unit_columns`).
    """
    layers = []
    shown = 0
    for prefix, layer in report.layers.items():
        columns, flags = unit_columns(layer, report.causal)
        quantities = [q for q in layer.samples[0]["states"]] if layer.samples else []
        shown = max(shown, len(layer.samples))
        layers.append({
            "prefix": prefix, "layer_class": layer.layer_class, "units": layer.units,
            "quantities": quantities,
            "sequences": [{"steps": [int(k) for k in sample["steps"]],
                           "values": {q: [[_number(v) for v in step] for step in sample["states"][q]]
                                      for q in quantities}}
                          for sample in layer.samples],
            "columns": [name for name, _ in columns],
            "rows": [[_number(values[unit]) for _, values in columns] for unit in range(layer.units)],
            "flags": flags,
        })
    tracking = [dataclasses.asdict(b) for b in (report.best_tracking(label) for label in report.labels) if b]
    active = {}
    for prefix, layer in report.layers.items():
        quantity = "c" if "c" in layer.stats else "h" if "h" in layer.stats else None
        std = layer.stats[quantity]["std"] if quantity else np.zeros(layer.units)
        active[prefix] = [int(u) for u in np.argsort(-np.nan_to_num(std, nan=-1.0), kind="stable")[:_ACTIVE_UNITS]]
    if tracking:
        first = tracking[0]
        initial = {"layer": first["layer"], "unit": first["unit"], "quantity": first["quantity"], "sequence": 0}
    elif layers:
        first = layers[0]
        quantity = next((q for q in ("c", "h") if q in first["quantities"]), (first["quantities"] or ["c"])[0])
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


def write_explorer(report: "AuditReport", out_dir: str) -> None:
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


def write_html(report: "AuditReport", out_dir: str) -> str:
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
