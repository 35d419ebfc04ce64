"""LSTMVis export: the project layout LSTMVis documents, read back file by file."""

from __future__ import annotations

import importlib

import h5py
import numpy as np
import pytest
import yaml

import reference
from lstm_rewrite.capture import cell_states
from lstm_rewrite.errors import DataError, InvalidArgumentError
from lstm_rewrite.lstmvis import export_lstmvis

FLAVOURS = ("keras3", "tfkeras")
WORDS = ["<pad>", "the", "cat", "sat on", "mat", ""]  # "sat on" and "" must be made LSTMVis-safe
T = 6


@pytest.fixture(params=FLAVOURS)
def flavour(request) -> str:
    return request.param


def two_direction_model(flavour: str):
    """Embedding(mask_zero) feeding a forward LSTM "fwd" and a go_backwards LSTM "back"."""
    k = importlib.import_module("keras" if flavour == "keras3" else "tf_keras")
    k.utils.set_random_seed(3)
    tokens = k.Input((None,), dtype="int32", name="tokens")
    e = k.layers.Embedding(len(WORDS), 3, mask_zero=True, name="emb")(tokens)
    f = k.layers.LSTM(4, return_sequences=True, name="fwd")(e)
    b = k.layers.LSTM(2, return_sequences=True, go_backwards=True, name="back")(e)
    return k.Model(tokens, k.layers.Concatenate(name="cat")([f, b]))


_TRACED: dict = {}


def traced_model(flavour: str):
    """The model and its traced copy (c, h, f of both layers), built once per flavour."""
    from lstm_rewrite import expose_cell_states

    if flavour not in _TRACED:
        model = two_direction_model(flavour)
        _TRACED[flavour] = model, expose_cell_states(model, states=("c", "h", "f"), expose_masks=True)
    return _TRACED[flavour]


def tokens_with_lengths():
    rng = np.random.default_rng(5)
    lengths = np.array([6, 2, 4, 5])
    x = rng.integers(1, len(WORDS), size=(len(lengths), T)).astype("int32")
    for row, n in enumerate(lengths):
        x[row, n:] = 0
    return x, lengths


def test_project_layout_and_values(flavour, tmp_path):
    model = two_direction_model(flavour)
    x, lengths = tokens_with_lengths()
    # The original model, traced here: the capture knows that "back" runs backwards.
    cs = cell_states(model, x, states=("c", "h", "f"), progress=False)
    config_path = export_lstmvis(cs, tmp_path / "proj", tokens=x, vocab=WORDS, name="toy")
    assert config_path == str(tmp_path / "proj" / "lstm.yml")

    config = yaml.safe_load(open(config_path))
    assert config["name"] == "toy" and config["description"]
    assert config["files"] == {"states": "states.hdf5", "word_ids": "words.hdf5", "words": "words.dict"}
    assert config["word_sequence"] == {"file": "word_ids", "path": "word_ids", "dict_file": "words"}
    assert config["states"]["file"] == "states"
    types = {t["path"]: t for t in config["states"]["types"]}
    assert types["fwd.c"] == {"type": "state", "layer": 1, "path": "fwd.c"}
    assert types["fwd.h"] == {"type": "output", "layer": 1, "path": "fwd.h", "transform": "none"}
    assert types["back.f"] == {"type": "state", "layer": 2, "path": "back.f", "unsigned": True, "transform": "none"}

    positions = int(lengths.sum())
    with h5py.File(tmp_path / "proj" / "words.hdf5", "r") as handle:
        np.testing.assert_array_equal(handle["word_ids"][()], np.concatenate([x[i, :n] for i, n in enumerate(lengths)]))

    # Expected rows from the NumPy reference: real tokens only, every row at its token's position.
    table = model.get_layer("emb").get_weights()[0]
    fwd = reference.lstm(table[x], *model.get_layer("fwd").get_weights(), mask=x != 0, flavour=flavour)
    back = reference.lstm(table[x], *model.get_layer("back").get_weights(), mask=x != 0, go_backwards=True,
                          flavour=flavour)
    back_c_input_order = back["c"][:, ::-1]
    with h5py.File(tmp_path / "proj" / "states.hdf5", "r") as handle:
        assert set(handle) == {"fwd.c", "fwd.h", "fwd.f", "back.c", "back.h", "back.f"}
        assert handle["fwd.c"].shape == (positions, 4) and handle["back.c"].shape == (positions, 2)
        np.testing.assert_allclose(handle["fwd.c"][()], np.concatenate([fwd["c"][i, :n] for i, n in enumerate(lengths)]),
                                   atol=1e-5)
        np.testing.assert_allclose(handle["back.c"][()],
                                   np.concatenate([back_c_input_order[i, :n] for i, n in enumerate(lengths)]), atol=1e-5)
        # The backward layer reads the last token first: at that position its state is one step old.
        first_seq_last_row = handle["back.c"][lengths[0] - 1]
        np.testing.assert_allclose(first_seq_last_row, back["c"][0, 0], atol=1e-5)

    lines = (tmp_path / "proj" / "words.dict").read_text(encoding="utf-8").splitlines()
    assert lines == ["<pad> 0", "the 1", "cat 2", "sat_on 3", "mat 4", "<empty> 5"]
    assert all(len(line.split()) == 2 for line in lines)  # how LSTMVis parses each line


def test_hdf5_backed_states_and_explicit_mask(flavour, tmp_path):
    _, traced = traced_model(flavour)
    x, lengths = tokens_with_lengths()
    with cell_states(traced, x, states="c", layers="fwd", out=tmp_path / "s.h5", progress=False) as cs:
        export_lstmvis(cs, tmp_path / "a", tokens=x, vocab={i: w for i, w in enumerate(WORDS)})
        memory = {"fwd.c": np.asarray(cs["fwd.c"])}
    every_step = np.ones_like(x)
    export_lstmvis(memory, tmp_path / "b", tokens=x, vocab={w: i for i, w in enumerate(WORDS)}, mask=every_step)
    with h5py.File(tmp_path / "a" / "states.hdf5", "r") as a, h5py.File(tmp_path / "b" / "states.hdf5", "r") as b:
        assert a["fwd.c"].shape == (lengths.sum(), 4)
        assert b["fwd.c"].shape == (x.size, 4)  # mask=all ones keeps the padding
        np.testing.assert_array_equal(b["fwd.c"][:T], memory["fwd.c"][0])
    assert yaml.safe_load(open(tmp_path / "b" / "lstm.yml"))["name"] == "b"


def test_errors_leave_nothing_behind(flavour, tmp_path):
    x, _ = tokens_with_lengths()
    states = {"enc.c": np.zeros((4, T, 3), "float32")}
    with pytest.raises(DataError, match="tokens must be integer word ids of shape"):
        export_lstmvis(states, tmp_path / "p", tokens=x[:, :3], vocab=WORDS)
    with pytest.raises(DataError, match="not in vocab"):
        export_lstmvis(states, tmp_path / "p", tokens=x, vocab=WORDS[:2])
    with pytest.raises(DataError, match="mask has shape"):
        export_lstmvis(states, tmp_path / "p", tokens=x, vocab=WORDS, mask=np.ones((4, 2)))
    with pytest.raises(InvalidArgumentError, match="No states named \\['enc.h'\\]"):
        export_lstmvis(states, tmp_path / "p", tokens=x, vocab=WORDS, names=["enc.h"])
    with pytest.raises(InvalidArgumentError, match="vocab must"):
        export_lstmvis(states, tmp_path / "p", tokens=x, vocab="the cat")
    assert not (tmp_path / "p").exists() or list((tmp_path / "p").iterdir()) == []
