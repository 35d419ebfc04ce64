"""The audit: its statistics against plain NumPy over the full traced outputs, and its running merges."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lstm_rewrite import expose_cell_states
from lstm_rewrite.audit import (
    AuditThresholds,
    RunningCoMoments,
    RunningMoments,
    StreamingHistogram,
    audit,
    audit_batches,
)
from lstm_rewrite.errors import DataError, InvalidArgumentError

from conftest import as_list

N, T, VOCAB, UNITS = 23, 9, 6, 5
BATCH = 7  # 23 = 7 + 7 + 7 + 2: uneven batches, the last one short


def padded_ids(seed: int = 0) -> np.ndarray:
    """Right-padded token ids (N, T) with lengths 1..T, id 0 = padding."""
    rng = np.random.default_rng(seed)
    x = rng.integers(1, VOCAB, size=(N, T)).astype("int32")
    lengths = rng.integers(1, T + 1, size=N)
    lengths[0] = T
    x[np.arange(T)[None, :] >= lengths[:, None]] = 0
    return x


def masked_lstm(flavour, **lstm_kwargs):
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input(shape=(T,), dtype="int32")
    seq = layers.Embedding(VOCAB, 4, mask_zero=True, name="embed")(inputs)
    seq = layers.LSTM(UNITS, return_sequences=True, name="enc", **lstm_kwargs)(seq)
    out = layers.Dense(3, name="head")(seq)
    return keras.Model(inputs, out)


def traced_outputs(model, x) -> dict[str, np.ndarray]:
    """Every state output of the traced model over the full data, by name (float64)."""
    # The rewrite's own tests verify it; here it only supplies reference arrays.
    traced = expose_cell_states(model, states=("c", "h", "gates"), expose_masks=True, verify=False)
    values = as_list(traced(x, training=False))
    return {name: np.asarray(v, dtype=np.float64) for name, v in zip(traced.output_names, values)}


# --------------------------------------------------------------------------------------------
# The report against NumPy over the full arrays.
# --------------------------------------------------------------------------------------------


def test_statistics_match_numpy_over_valid_steps(flavour):
    model = masked_lstm(flavour)
    x = padded_ids()
    full = traced_outputs(model, x)
    valid = x != 0  # independent of the traced model's mask output
    rng = np.random.default_rng(1)
    noise = rng.normal(size=(N, T))
    # A label that is exactly linear in unit 3's c: r must be +1 there.
    labels = {"noise": noise, "c3": 2.0 * full["enc.c"][:, :, 3] - 1.0}
    t = AuditThresholds(gate_high=0.6, gate_low=0.4, tanh_high=0.3)

    report = audit(model, x, labels=labels, thresholds=t, batch_size=BATCH, progress=False)

    assert list(report.layers) == ["enc"]
    layer = report.layers["enc"]
    assert layer.layer_class == "LSTM" and layer.units == UNITS
    assert report.sequences == N and layer.valid_steps == int(valid.sum())
    for q in ("c", "h", "i", "f", "g", "o"):
        v = full[f"enc.{q}"][valid]  # [valid steps, units]
        np.testing.assert_allclose(layer.stats[q]["mean"], v.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.stats[q]["std"], v.std(0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(layer.stats[q]["min"], v.min(0), rtol=1e-6)
        np.testing.assert_allclose(layer.stats[q]["max"], v.max(0), rtol=1e-6)
    for g in ("i", "f", "o"):
        v = full[f"enc.{g}"][valid]
        np.testing.assert_allclose(layer.gate_saturation[g]["high"], (v > 0.6).mean(0))
        np.testing.assert_allclose(layer.gate_saturation[g]["low"], (v < 0.4).mean(0))
        np.testing.assert_allclose(layer.gate_saturation[g]["total"], ((v > 0.6) | (v < 0.4)).mean(0))
    c = full["enc.c"][valid]
    np.testing.assert_allclose(layer.tanh_c_saturation, (np.abs(np.tanh(c)) > 0.3).mean(0))
    f_mean = full["enc.f"][valid].mean(0)
    np.testing.assert_allclose(layer.forget_gate_mean, f_mean, rtol=1e-5)
    np.testing.assert_allclose(layer.memory_horizon, 1.0 / (1.0 - f_mean), rtol=1e-4)
    np.testing.assert_allclose(layer.max_abs_h, np.abs(full["enc.h"][valid]).max(0), rtol=1e-6)

    # Growth: |c| regressed on the position (right padding: position = valid-step index).
    steps = np.broadcast_to(np.arange(T), (N, T))[valid].astype(float)
    abs_c = np.abs(c)
    slope = [np.polyfit(steps, abs_c[:, u], 1)[0] for u in range(UNITS)]
    np.testing.assert_allclose(layer.growth["slope"], slope, rtol=1e-4, atol=1e-7)
    early = (steps >= T // 4) & (steps < T // 2)
    late = steps >= T - T // 4
    np.testing.assert_allclose(layer.growth["ratio"], abs_c[late].mean(0) / abs_c[early].mean(0), rtol=1e-5)

    for name, label in labels.items():
        for q in ("c", "h"):
            v = full[f"enc.{q}"][valid]
            expected = [np.corrcoef(v[:, u], label[valid])[0, 1] for u in range(UNITS)]
            np.testing.assert_allclose(layer.label_correlation[name][q], expected, atol=1e-6)
    best = report.best_tracking("c3")
    assert (best.layer, best.quantity, best.unit) == ("enc", "c", 3)
    assert best.r == pytest.approx(1.0, abs=1e-6)
    assert "enc.c[3]" in report.summary()


@pytest.mark.backend_independent(
    reason="the report's files, written from an audit; the audit's numbers are checked on this backend above")
def test_report_files(flavour, tmp_path):
    model = masked_lstm(flavour)
    x = padded_ids(2)
    depth = np.cumsum(x % 2, axis=1).astype(float)
    report = audit(model, x, labels={"depth": depth}, batch_size=BATCH, progress=False)

    html_path = report.to_html(tmp_path / "out")
    files = set(os.listdir(tmp_path / "out"))
    assert os.path.basename(html_path) == "report.html"
    for name in ("report.html", "report.json", "c_heatmap_enc.png", "tracking_depth.png",
                 "hist_c_enc.png", "hist_h_enc.png", "saturation_enc.png", "growth_enc.png"):
        assert name in files, name
        assert os.path.getsize(tmp_path / "out" / name) > 0
    for png in (f for f in files if f.endswith(".png")):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "out" / "report.html").read_text()
    assert "tracking_depth.png" in page and "enc" in page

    path = report.to_json(tmp_path / "solo" / "report.json")
    data = json.loads(open(path).read())  # strict JSON: NaN/inf written as null
    layer = data["layers"]["enc"]
    assert data["sequences"] == N and data["labels"] == ["depth"]
    for key in ("stats", "gate_saturation", "tanh_c_saturation", "forget_gate_mean", "memory_horizon",
                "max_abs_h", "dead_units", "saturated_units", "growth", "label_correlation", "histograms"):
        assert key in layer, key
    assert set(layer["stats"]) == {"c", "h", "i", "f", "g", "o"}
    assert len(layer["stats"]["c"]["mean"]) == UNITS
    assert layer["stats"]["c"]["mean"] == pytest.approx(report.layers["enc"].stats["c"]["mean"].tolist())
    best = data["best_tracking"]["depth"]
    assert best["layer"] == "enc" and best["quantity"] in ("c", "h")
    assert data["thresholds"]["gate_high"] == 0.95


def test_go_backwards_labels_are_read_in_input_time(flavour):
    # The rewrite exposes a go_backwards layer's states in processing order (reversed input
    # time); a label given in input time must be flipped to meet them.
    model = masked_lstm(flavour, go_backwards=True)
    x = padded_ids(3)
    full = traced_outputs(model, x)
    c_processing = full["enc.c"]
    label_input_time = c_processing[:, ::-1, 2]
    already_traced = expose_cell_states(model, states=("c", "h"), expose_masks=True, verify=False)
    for given in (model, already_traced):  # traced here, or by the caller: the record says which way
        report = audit(given, x, labels=label_input_time, batch_size=BATCH, progress=False)
        best = report.best_tracking()
        assert (best.quantity, best.unit) == ("c", 2)
        assert best.r == pytest.approx(1.0, abs=1e-6)
    mask = full["enc.mask"] > 0.5
    assert report.layers["enc"].valid_steps == int(mask.sum()) == int((x != 0).sum())


def test_bidirectional_backward_growth_counts_from_the_end(flavour):
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input(shape=(T, 3))
    seq = layers.Bidirectional(layers.LSTM(4, return_sequences=True), name="bi")(inputs)
    model = keras.Model(inputs, seq)
    x = np.random.default_rng(4).normal(size=(N, T, 3)).astype("float32")
    full = traced_outputs(model, x)
    already_traced = expose_cell_states(model, states=("c", "h", "gates"), expose_masks=True, verify=False)
    steps = np.broadcast_to(np.arange(T), (N, T)).ravel().astype(float)
    for given in (model, already_traced):
        report = audit(given, x, batch_size=BATCH, progress=False)
        assert set(report.layers) == {"bi.forward", "bi.backward"}
        for prefix, order in (("bi.forward", steps), ("bi.backward", T - 1 - steps)):
            abs_c = np.abs(full[f"{prefix}.c"]).reshape(N * T, 4)
            slope = [np.polyfit(order, abs_c[:, u], 1)[0] for u in range(4)]
            np.testing.assert_allclose(report.layers[prefix].growth["slope"], slope, rtol=1e-4, atol=1e-7)
            assert report.layers[prefix].valid_steps == N * T


# --------------------------------------------------------------------------------------------
# Running statistics: any split into batches gives the full-array result.
# --------------------------------------------------------------------------------------------


def uneven_splits(n: int, rng) -> list[tuple[int, int]]:
    cuts = np.sort(rng.choice(np.arange(1, n), size=5, replace=False))
    bounds = [0, *cuts.tolist(), n]
    return list(zip(bounds[:-1], bounds[1:]))


def test_running_moments_merge_matches_full_array():
    rng = np.random.default_rng(5)
    # Large offset: the naive sum-of-squares formula would lose most digits here.
    data = 1e6 + rng.normal(scale=3.0, size=(500, 4))
    parts = []
    for start, stop in uneven_splits(500, rng):
        part = RunningMoments(4)
        part.update(data[start:stop])
        parts.append(part)
    sequential = RunningMoments(4)
    for part in parts:
        sequential.merge(part)
    tree = RunningMoments(4)  # merge in another order and grouping: ((p0 p1) (p2 p3 ...))
    left, right = RunningMoments(4), RunningMoments(4)
    for part in parts[:2]:
        left.merge(part)
    for part in parts[2:][::-1]:
        right.merge(part)
    tree.merge(left).merge(right)
    for result in (sequential, tree):
        assert result.count == 500
        np.testing.assert_allclose(result.mean, data.mean(0), rtol=1e-12)
        np.testing.assert_allclose(result.std, data.std(0), rtol=1e-7)
        np.testing.assert_array_equal(result.min, data.min(0))
        np.testing.assert_array_equal(result.max, data.max(0))
    empty = RunningMoments(4)
    assert np.isnan(empty.mean).all() and empty.merge(RunningMoments(4)).count == 0


def test_running_comoments_merge_matches_corrcoef():
    rng = np.random.default_rng(6)
    y = rng.normal(size=400)
    x = np.stack([y * 2 + rng.normal(size=400), -y + 5, rng.normal(size=400), np.full(400, 3.0)], axis=1)
    running = RunningCoMoments(4)
    for start, stop in uneven_splits(400, rng):
        running.update(x[start:stop], y[start:stop])
    r = running.pearson()
    np.testing.assert_allclose(r[:3], [np.corrcoef(x[:, u], y)[0, 1] for u in range(3)], atol=1e-12)
    assert r[1] == pytest.approx(-1.0)
    assert np.isnan(r[3])  # a constant unit has no correlation


def test_streaming_histogram_merge_matches_one_pass():
    rng = np.random.default_rng(7)
    data = np.concatenate([rng.normal(scale=0.1, size=(50, 3)), rng.normal(scale=6.0, size=(150, 3))])
    data[:, 2] *= 0.01
    one_pass = StreamingHistogram(3, bins=16)
    one_pass.update(data)
    merged = StreamingHistogram(3, bins=16)
    for start, stop in uneven_splits(200, rng):
        part = StreamingHistogram(3, bins=16)
        part.update(data[start:stop])
        merged.merge(part)
    streamed = StreamingHistogram(3, bins=16)
    for start, stop in uneven_splits(200, rng):
        streamed.update(data[start:stop])
    for hist in (merged, streamed):
        np.testing.assert_array_equal(hist.limits, one_pass.limits)
        np.testing.assert_array_equal(hist.counts, one_pass.counts)
    # Independent check: NumPy's histogram on the final edges.
    for u in range(3):
        expected, _ = np.histogram(data[:, u], bins=one_pass.edges(u))
        np.testing.assert_array_equal(one_pass.counts[u], expected)
    assert one_pass.limits[0] >= np.abs(data[:, 0]).max() > one_pass.limits[0] / 2


# --------------------------------------------------------------------------------------------
# Flags on arrays with known behaviour, and layers without c.
# --------------------------------------------------------------------------------------------


def synthetic_batches(batch_sizes, steps=40, seed=8):
    """A layer "lay" with 4 units: 0 ordinary, 1 dead, 2 drifting, 3 saturated (f = 1)."""
    rng = np.random.default_rng(seed)
    n = sum(batch_sizes)
    t = np.arange(steps)
    c = rng.normal(scale=0.5, size=(n, steps, 4))
    c[:, :, 2] = 0.2 * t + rng.normal(scale=0.05, size=(n, steps))  # grows to 8
    h = np.tanh(c) * 0.5
    h[:, :, 1] = 1e-5 * rng.normal(size=(n, steps))
    f = np.full((n, steps, 4), 0.5)
    f[:, :, 3] = 0.999
    mask = np.ones((n, steps))
    mask[0, steps // 2 :] = 0  # a shorter sequence, with garbage on its padding
    c[0, steps // 2 :] = 1e9
    out, start = [], 0
    for b in batch_sizes:
        sl = slice(start, start + b)
        out.append(({"lay.c": c[sl], "lay.h": h[sl], "lay.f": f[sl]}, {"lay": mask[sl]}))
        start += b
    return out, c, mask


def test_flags_on_known_units():
    batches, c, mask = synthetic_batches([3, 5, 1, 7])
    report = audit_batches(batches)
    layer = report.layers["lay"]
    assert layer.dead_units == [1]
    assert layer.growth["drifting_units"] == [2]
    assert 3 in layer.saturated_units and 0 not in layer.saturated_units
    assert layer.memory_horizon[3] == pytest.approx(1000.0, rel=1e-6)
    valid = mask > 0.5
    assert layer.stats["c"]["max"][0] == pytest.approx(c[valid][:, 0].max())  # padding never counted
    text = report.summary()
    assert "1 dead unit(s) [1]" in text and "1 drifting unit(s) [2]" in text


def test_split_does_not_change_the_report():
    one, _, _ = synthetic_batches([16])
    many, _, _ = synthetic_batches([3, 5, 1, 7])
    a, b = audit_batches(one).to_dict(), audit_batches(many).to_dict()
    la, lb = a["layers"]["lay"], b["layers"]["lay"]
    for q in ("c", "h", "f"):
        for stat in ("mean", "std", "min", "max"):
            np.testing.assert_allclose(la["stats"][q][stat], lb["stats"][q][stat], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(la["growth"]["slope"], lb["growth"]["slope"], rtol=1e-10)
    assert la["histograms"] == lb["histograms"]


def test_layer_without_c_gets_the_h_statistics():
    # A GRU or SimpleRNN exposes h only: the statistics that need c are left out, nothing fails.
    rng = np.random.default_rng(9)
    h = np.tanh(rng.normal(size=(6, 5, 3)))
    h[:, :, 0] = 0.0
    label = h[:, :, 2] * 3
    report = audit_batches([({"gru.h": h[:4]}, {"gru": None}), ({"gru.h": h[4:]}, {})],
                           labels={"y": label}, layer_classes={"gru": "GRU"})
    layer = report.layers["gru"]
    assert set(layer.stats) == {"h"}
    assert layer.tanh_c_saturation is None and layer.growth is None and layer.forget_gate_mean is None
    assert layer.dead_units == [0]
    assert report.best_tracking("y").name == "gru.h[2]"
    json.dumps(report.to_dict(), allow_nan=False)
    assert "gru (GRU, 3 units" in report.summary()


def test_thresholds_and_labels_are_checked():
    batches, _, _ = synthetic_batches([4, 4, 8])
    with pytest.raises(InvalidArgumentError, match="gate_low < gate_high"):
        AuditThresholds(gate_high=0.2, gate_low=0.5)
    with pytest.raises(InvalidArgumentError, match="Unknown audit threshold"):
        audit_batches(batches, thresholds={"gate_hi": 0.9})
    assert audit_batches(batches, thresholds={"dead_eps": 1e-9}).layers["lay"].dead_units == []
    with pytest.raises(DataError, match="Label 'y' has shape"):
        audit_batches(batches, labels={"y": np.zeros((10, 40))})
    with pytest.raises(DataError, match="has 20 sequences but the data has 16"):
        audit_batches(batches, labels={"y": np.zeros((20, 40))})
    with pytest.raises(DataError, match="no batch"):
        audit_batches([])


def test_left_and_right_padding_give_the_same_growth():
    rng = np.random.default_rng(10)
    n, steps, units = 12, 15, 3
    lengths = rng.integers(4, steps + 1, size=n)
    right = np.zeros((n, steps, units))
    left = np.full((n, steps, units), 1e6)  # padding values must never count
    right_mask = np.zeros((n, steps))
    left_mask = np.zeros((n, steps))
    for row, length in enumerate(lengths):
        values = rng.normal(size=(length, units)) * np.arange(1, length + 1)[:, None]
        right[row, :length], right_mask[row, :length] = values, 1
        left[row, steps - length:], left_mask[row, steps - length:] = values, 1
    a = audit_batches([({"l.c": right[:5]}, {"l": right_mask[:5]}), ({"l.c": right[5:]}, {"l": right_mask[5:]})])
    b = audit_batches([({"l.c": left[:7]}, {"l": left_mask[:7]}), ({"l.c": left[7:]}, {"l": left_mask[7:]})])
    ga, gb = a.layers["l"].growth, b.layers["l"].growth
    np.testing.assert_allclose(ga["mean_abs_c_by_step"], gb["mean_abs_c_by_step"], rtol=1e-12)
    np.testing.assert_allclose(ga["slope"], gb["slope"], rtol=1e-10)
    assert ga["slope"].min() > 0  # |c| grows with the index by construction
