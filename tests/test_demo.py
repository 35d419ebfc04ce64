"""The bundled demo: the brackets model loads in both flavours and the audit finds its depth counter."""

from __future__ import annotations

import numpy as np
import pytest

from lstm_rewrite.audit import audit
from lstm_rewrite.demo import decode, demo_data, demo_model_path, load_demo_model

# examples/train_brackets.py reports r = +0.938 for lstm.c[11]; leave room for float32 rounding
# in either flavour but fail if the counter is lost.
MIN_DEPTH_R = 0.9


def test_bundled_data_is_a_nested_brackets_language():
    x, depth, vocab = demo_data()
    assert x.shape == depth.shape and x.shape[0] == 200
    assert vocab[0] == "<pad>" and {vocab[1], vocab[2]} == {"(", ")"}
    ids = {ch: i for i, ch in vocab.items()}
    valid = x != 0
    steps = np.where(x == ids["("], 1, np.where(x == ids[")"], -1, 0))
    # Depth recomputed from the characters, independently of how the file was written.
    np.testing.assert_array_equal(depth[valid], np.cumsum(steps, axis=1)[valid])
    assert (depth[~valid] == -1).all()
    assert depth[valid].min() == 0 and depth[valid].max() <= 5
    lengths = valid.sum(axis=1)
    assert (valid == (np.arange(x.shape[1]) < lengths[:, None])).all(), "right padding only"
    assert (x[np.arange(len(x)), lengths - 1] == ids["."]).all()
    assert decode(x[0], vocab).endswith(".") and 40 <= len(decode(x[0], vocab)) <= x.shape[1]
    assert demo_model_path().stat().st_size < 500_000


def test_demo_model_loads_in_both_flavours(flavour):
    model = load_demo_model(flavour.name)
    x, _, vocab = demo_data()
    probs = np.asarray(model(x[:8], training=False))
    assert probs.shape == (8, x.shape[1], len(vocab))
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    # After "(((((" (depth 5, the maximum), another "(" never occurs in the language.
    five_open = np.array([[1] * 5], dtype="int32")
    next_char = np.asarray(model(five_open, training=False))[0, -1]
    ids = {ch: i for i, ch in vocab.items()}
    assert next_char[ids[")"]] > 0.5 > next_char[ids["("]]


def test_audit_finds_the_depth_counter(flavour):
    model = load_demo_model(flavour.name)
    x, depth, _ = demo_data()
    report = audit(model, x, labels={"depth": depth}, batch_size=64, progress=False)
    best = report.best_tracking("depth")
    assert best.layer == "lstm" and best.quantity == "c"
    assert abs(best.r) > MIN_DEPTH_R
    assert report.layers["lstm"].valid_steps == int((x != 0).sum())
    assert f"lstm.c[{best.unit}]" in report.summary()


def test_unknown_flavour_is_refused():
    with pytest.raises(ValueError, match="flavour must be"):
        load_demo_model("torch")
