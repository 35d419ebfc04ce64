"""The report's explorer data: a bounded sample of whole sequences, in input time, with tokens.

The values the explorer colours text with are checked against tests/reference.py, not against
the library; the browser tests (test_explorer.py) check that the page shows these values.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import reference_lstm, to_numpy

from lstm_rewrite import InvalidArgumentError, audit
from lstm_rewrite.audit import EXPLORER_SEQUENCES
from lstm_rewrite.cli import main
from lstm_rewrite.report import explorer_data, unit_row_id

VOCAB = 7
WORDS = {i: "<pad>" if i == 0 else chr(ord("a") + i - 1) for i in range(VOCAB)}


def two_lstms(keras):
    """Embedding(mask_zero) -> LSTM (forward) -> LSTM (go_backwards): both time orders."""
    layers = keras.layers
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    x = layers.Embedding(VOCAB, 3, mask_zero=True, name="emb")(tokens)
    seq = layers.LSTM(4, return_sequences=True, name="enc")(x)
    back = layers.LSTM(3, return_sequences=True, go_backwards=True, name="back")(seq)
    return keras.Model(tokens, layers.Dense(2, name="out")(back), name="two")


def padded_ids(n=EXPLORER_SEQUENCES + 5, t=9):
    rng = np.random.default_rng(7)
    x = rng.integers(1, VOCAB, size=(n, t)).astype("int32")
    for row, length in enumerate(rng.integers(3, t + 1, size=n)):
        x[row, length:] = 0
    return x


def test_the_sample_holds_every_state_in_input_time(flavour):
    model = two_lstms(flavour.keras)
    x = padded_ids()
    depth = np.cumsum(x > 3, axis=1).astype("float64")
    data = explorer_data(audit(model, x, labels={"depth": depth}, vocab=WORDS, progress=False))

    assert data["sequences"] == len(x) and data["shown"] == EXPLORER_SEQUENCES  # bounded sample
    assert data["tokens"] == [[WORDS[int(i)] for i in row] for row in x[:EXPLORER_SEQUENCES]]
    np.testing.assert_allclose(np.array(data["labels"]["depth"], dtype=float), depth[:EXPLORER_SEQUENCES])

    mask = x != 0
    embedded = to_numpy(model.get_layer("emb")(x))
    enc = reference_lstm(model.get_layer("enc"), embedded, flavour.name, mask=mask)
    back = reference_lstm(model.get_layer("back"), enc["output"], flavour.name, mask=mask)
    # The reference gives a go_backwards layer's states in processing order: flip to input time.
    back = {q: v[:, ::-1] for q, v in back.items() if v.ndim == 3}
    layers = {layer["prefix"]: layer for layer in data["layers"]}
    assert set(layers) == {"enc", "back"}
    for prefix, want in (("enc", enc), ("back", back)):
        layer = layers[prefix]
        assert layer["quantities"] == ["c", "h", "i", "f", "g", "o"]
        assert len(layer["sequences"]) == EXPLORER_SEQUENCES
        for k, sequence in enumerate(layer["sequences"]):
            assert sequence["steps"] == np.flatnonzero(mask[k]).tolist(), (prefix, k)
            for q in layer["quantities"]:
                np.testing.assert_allclose(np.array(sequence["values"][q]), want[q][k, mask[k]],
                                           atol=2e-5, err_msg=f"{prefix}.{q} sequence {k}")
        # Each unit's audit row is the table's: c mean over every valid step of the data set.
        c_mean = layer["rows"][0][layer["columns"].index("c mean")]
        np.testing.assert_allclose(c_mean, want["c"][mask][:, 0].mean(), atol=2e-5)
    assert data["initial"] == {"layer": data["tracking"][0]["layer"], "unit": data["tracking"][0]["unit"],
                               "quantity": data["tracking"][0]["quantity"], "sequence": 0}
    for prefix, units in data["active_units"].items():
        std = np.array([row[layers[prefix]["columns"].index("c std")] for row in layers[prefix]["rows"]])
        assert units == np.argsort(-std, kind="stable")[:len(units)].tolist()


@pytest.mark.backend_independent(
    reason="which tokens the page shows, read from the data or the caller; the sample's values are checked on "
           "this backend above")
def test_tokens_come_from_the_data_or_the_caller(flavour):
    model = two_lstms(flavour.keras)
    x = padded_ids(4)
    assert explorer_data(audit(model, x, progress=False))["tokens"][1] == [str(i) for i in x[1]]
    assert explorer_data(audit(model, x, vocab=list(WORDS.values()), progress=False))["tokens"][0] == \
        [WORDS[int(i)] for i in x[0]]
    with pytest.raises(InvalidArgumentError, match="tokens= takes the token ids"):
        audit(model, x, tokens="abc", progress=False)

    features = flavour.keras.Input((None, 2), name="f")
    plain = flavour.keras.Model(features, flavour.keras.layers.GRU(3, name="gru")(features))
    values = np.random.default_rng(0).normal(size=(3, 5, 2)).astype("float32")
    data = explorer_data(audit(plain, values, progress=False))
    assert data["tokens"] is None  # features, not ids: the page shows step numbers
    (gru,) = data["layers"]
    assert gru["quantities"] == ["h", "z", "r", "n"] and data["initial"]["quantity"] == "h"


@pytest.mark.backend_independent(
    reason="the page's files and markup, written from the report; the sample's values are checked on this "
           "backend above")
def test_the_page_carries_the_explorer_and_stays_a_report(flavour, tmp_path, capsys):
    model = two_lstms(flavour.keras)
    x = padded_ids(5)
    model_path, data_path = str(tmp_path / "m.keras"), str(tmp_path / "x.npy")
    model.save(model_path)
    np.save(data_path, x)
    out = tmp_path / "report"
    assert main(["audit", model_path, "--data", data_path, "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"Report: {(out / 'report.html').resolve().as_uri()}" in printed
    for name in ("report.html", "report.json", "explorer_data.js", "explorer.js", "explorer.css"):
        assert os.path.getsize(out / name) > 0, name
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<pre>Audited 5 sequences" in page  # readable without JavaScript
    assert f"id='{unit_row_id('back', 2)}'" in page and "id='unit-enc-3'" in page
    assert page.index("explorer_data.js") < page.index("explorer.js'")
    script = (out / "explorer_data.js").read_text(encoding="utf-8")
    assert script.startswith("window.LSTM_REPORT = ")
    data = json.loads(script[len("window.LSTM_REPORT = "):].rstrip().rstrip(";"))
    assert data["shown"] == 5 and {layer["prefix"] for layer in data["layers"]} == {"enc", "back"}
