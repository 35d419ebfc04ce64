"""Capture stage: cell_states / iter_state_batches in memory and streamed to HDF5, on both flavours."""

from __future__ import annotations

import errno
import importlib
import os

import h5py
import numpy as np
import pytest
import tensorflow as tf

import reference
from lstm_rewrite import capture
from lstm_rewrite.capture import CellStates, StateBatch, cell_states, iter_state_batches
from lstm_rewrite.errors import DataError, InvalidArgumentError

FLAVOURS = ("keras3", "tfkeras")
VOCAB, EMBED, UNITS, T = 9, 3, 4, 7


@pytest.fixture(params=FLAVOURS)
def flavour(request) -> str:
    return request.param


def kmod(flavour: str):
    return importlib.import_module("keras" if flavour == "keras3" else "tf_keras")


def token_model(flavour: str, backwards: bool = False):
    """Embedding(mask_zero) -> LSTM "encoder" (sequences) -> Dense: a padded-sequence model."""
    k = kmod(flavour)
    k.utils.set_random_seed(1)
    tokens = k.Input((None,), dtype="int32", name="tokens")
    x = k.layers.Embedding(VOCAB, EMBED, mask_zero=True, name="emb")(tokens)
    x = k.layers.LSTM(UNITS, return_sequences=True, go_backwards=backwards, name="encoder")(x)
    return k.Model(tokens, k.layers.Dense(2, name="head")(x))


def two_input_model(flavour: str):
    k = kmod(flavour)
    k.utils.set_random_seed(2)
    a = k.Input((None, 3), name="a")
    b = k.Input((None, 2), name="b")
    ya = k.layers.LSTM(3, return_sequences=True, name="left")(a)
    yb = k.layers.LSTM(2, return_sequences=True, name="right")(b)
    return k.Model([a, b], k.layers.Concatenate(name="cat")([ya, yb]))


_CACHE: dict = {}


def cached(flavour: str, kind: str):
    """Models and traced models shared by the tests of this module (tracing costs seconds)."""
    from lstm_rewrite import expose_cell_states

    key = (flavour, kind)
    if key not in _CACHE:
        if kind == "token":
            _CACHE[key] = token_model(flavour)
        elif kind == "two":
            _CACHE[key] = two_input_model(flavour)
        elif kind == "token traced":
            _CACHE[key] = expose_cell_states(cached(flavour, "token"), states=("c", "h", "gates"),
                                             expose_masks=True)
        elif kind == "two traced":
            _CACHE[key] = expose_cell_states(cached(flavour, "two"), expose_masks=True)
    return _CACHE[key]


def padded_tokens(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.integers(1, VOCAB, size=(n, T)).astype("int32")
    lengths = rng.integers(2, T + 1, size=n)
    for row, length in enumerate(lengths):
        x[row, length:] = 0
    return x


def reference_states(model, x: np.ndarray, backwards: bool = False, flavour: str = "keras3") -> dict:
    """Cell states from the NumPy LSTM of tests/reference.py, fed the model's own embedding."""
    table = model.get_layer("emb").get_weights()[0]
    kernel, recurrent, bias = model.get_layer("encoder").get_weights()
    return reference.lstm(table[x], kernel, recurrent, bias, mask=x != 0, go_backwards=backwards, flavour=flavour)


# ---------------------------------------------------------------------------------------------
# In memory
# ---------------------------------------------------------------------------------------------


def test_cell_states_match_the_reference_with_masks(flavour):
    model = cached(flavour, "token")
    x = padded_tokens(11)
    cs = cell_states(model, x, states=("c", "h"), batch_size=4, progress=False)
    ref = reference_states(model, x, flavour=flavour)
    assert set(cs) == {"encoder.c", "encoder.h"}
    assert cs["encoder.c"].shape == (11, T, UNITS)
    np.testing.assert_allclose(cs["encoder.c"], ref["c"], atol=1e-5)
    np.testing.assert_allclose(cs["encoder.h"], ref["h"], atol=1e-5)
    np.testing.assert_array_equal(cs.masks["encoder"], (x != 0).astype("float32"))
    np.testing.assert_array_equal(cs.lengths["encoder"], (x != 0).sum(axis=1))
    assert cs.exposed["encoder.c"]["quantity"] == "c" and cs.exposed["encoder.c"]["reversed"] is False
    assert cs.layer_of("encoder.h") == "encoder" and cs.path is None


def test_go_backwards_layer_is_flagged_reversed(flavour):
    model = token_model(flavour, backwards=True)
    x = padded_tokens(5)
    cs = cell_states(model, x, progress=False)
    ref = reference_states(model, x, backwards=True, flavour=flavour)
    np.testing.assert_allclose(cs["encoder.c"], ref["c"], atol=1e-5)
    np.testing.assert_array_equal(cs.masks["encoder"], ref["mask"])
    assert cs.exposed["encoder.c"]["reversed"] is True


def test_iter_state_batches_yields_each_batch(flavour):
    model = cached(flavour, "token traced")
    x = padded_tokens(10)
    batches = list(iter_state_batches(model, x, batch_size=4, progress=False))
    assert [b.size for b in batches] == [4, 4, 2]
    assert all(isinstance(b, StateBatch) for b in batches)
    assert batches[0].states["encoder.c"].dtype == np.float32
    np.testing.assert_array_equal(batches[2].mask["encoder"], (x[8:] != 0).astype("float32"))
    ref = reference_states(model, x, flavour=flavour)
    np.testing.assert_allclose(np.concatenate([b.states["encoder.c"] for b in batches]), ref["c"], atol=1e-5)


def test_unmasked_layers_have_no_mask_and_full_lengths(flavour):
    model = cached(flavour, "two")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 5, 3)), rng.normal(size=(6, 5, 2))
    by_list = cell_states(model, [a, b], progress=False)
    by_dict = cell_states(cached(flavour, "two traced"), {"b": b, "a": a}, progress=False, batch_size=4)
    assert set(by_list) == {"left.c", "right.c"}
    # No layer receives a mask: either none is recorded or it marks every step valid.
    for layer in ("left", "right"):
        assert by_list.masks[layer] is None or np.all(np.asarray(by_list.masks[layer]) == 1.0)
    np.testing.assert_array_equal(by_list.lengths["left"], np.full(6, 5))
    for name in by_list:
        np.testing.assert_allclose(by_list[name], by_dict[name], atol=1e-6)
    kernel, recurrent, bias = model.get_layer("right").get_weights()
    np.testing.assert_allclose(by_list["right.c"], reference.lstm(b, kernel, recurrent, bias)["c"], atol=1e-5)


def test_traced_model_is_used_as_it_is(flavour):
    model, traced = cached(flavour, "token"), cached(flavour, "token traced")
    x = padded_tokens(6)
    only_h = cell_states(traced, x, states=("h",), progress=False)
    everything = cell_states(traced, x, progress=False)  # a traced model: all it exposes
    assert list(only_h) == ["encoder.h"]
    assert set(everything) == {f"encoder.{q}" for q in "chifgo"}
    ref = reference_states(model, x, flavour=flavour)
    np.testing.assert_allclose(only_h["encoder.h"], ref["h"], atol=1e-5)
    np.testing.assert_allclose(everything["encoder.f"], ref["f"], atol=1e-5)
    np.testing.assert_array_equal(only_h.masks["encoder"], (x != 0).astype("float32"))
    with pytest.raises(InvalidArgumentError, match="asks for \\['h'\\]"):
        cell_states(cached(flavour, "two traced"), [np.zeros((1, 5, 3)), np.zeros((1, 5, 2))], states=("h",),
                    progress=False)
    with pytest.raises(InvalidArgumentError, match="decoder"):
        cell_states(traced, x, layers=["decoder"], progress=False)
    assert set(cell_states(traced, x, layers="encoder", states="c", progress=False)) == {"encoder.c"}
    assert set(cell_states(model, x, progress=False)) == {"encoder.c"}  # a model: c by default


def test_datasets_batched_unbatched_and_with_targets(flavour):
    model = cached(flavour, "token traced")
    x = padded_tokens(9)
    expected = cell_states(model, x, progress=False)["encoder.c"]
    y = np.zeros((9, T, 2), "float32")
    cases = {
        "unbatched": tf.data.Dataset.from_tensor_slices(x),
        "batched": tf.data.Dataset.from_tensor_slices(x).batch(4),
        "with targets": tf.data.Dataset.from_tensor_slices((x, y)).batch(2),
    }
    for label, dataset in cases.items():
        got = cell_states(model, dataset, batch_size=5, progress=False)["encoder.c"]
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=label)


def test_generator_with_batches_of_different_lengths(flavour):
    model = cached(flavour, "token traced")
    x = padded_tokens(8)

    def batches():
        yield x[:3, :4]  # shorter batch first: the file grows its time axis later
        yield x[3:]

    memory = cell_states(model, batches(), progress=False)
    assert memory["encoder.c"].shape == (8, T, UNITS)
    np.testing.assert_array_equal(memory["encoder.c"][:3, 4:], 0.0)
    expected_mask = (x != 0).astype("float32")
    expected_mask[:3, 4:] = 0.0
    np.testing.assert_array_equal(memory.masks["encoder"], expected_mask)
    ref = reference_states(model, x[3:], flavour=flavour)
    np.testing.assert_allclose(memory["encoder.c"][3:], ref["c"], atol=1e-5)


def test_progress_bar_only_when_asked(flavour, capsys):
    model = cached(flavour, "token traced")
    cell_states(model, padded_tokens(4), progress=False)
    assert "cell states" not in capsys.readouterr().err
    cell_states(model, padded_tokens(4), progress=True)
    assert "cell states" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# HDF5
# ---------------------------------------------------------------------------------------------


def test_hdf5_round_trip_equals_memory(flavour, tmp_path):
    model = cached(flavour, "token traced")
    x = padded_tokens(13)
    memory = cell_states(model, x, states=("c", "gates"), batch_size=5, progress=False)
    path = tmp_path / "states.h5"
    with cell_states(model, x, states=("c", "gates"), batch_size=5, out=path, progress=False,
                     compression="gzip") as disk:
        assert disk.path == str(path)
        assert isinstance(disk["encoder.c"], h5py.Dataset)  # lazy, not loaded
        assert set(disk) == set(memory) == {"encoder.c", "encoder.i", "encoder.f", "encoder.g", "encoder.o"}
        for name in memory:
            np.testing.assert_array_equal(disk[name][:], memory[name])
        np.testing.assert_array_equal(disk.masks["encoder"][:], memory.masks["encoder"])
        np.testing.assert_array_equal(disk.lengths["encoder"], memory.lengths["encoder"])
        assert disk.config["states"] == ["c", "i", "f", "g", "o"] and disk.config["flavour"] == flavour
        assert disk.masks["encoder"].shape == (13, T)
    with h5py.File(path, "r") as handle:
        dataset = handle["states"]["encoder.c"]
        assert dataset.compression == "gzip" and dataset.chunks is not None
        assert dataset.maxshape == (None, None, UNITS) and dataset.chunks[1:] == (T, UNITS)
        assert dataset.attrs["quantity"] == "c" and dataset.attrs["layer"] == "encoder"
        assert handle.attrs["format"] == capture.FILE_FORMAT
    reopened = CellStates.open(path)
    np.testing.assert_array_equal(reopened["encoder.g"][2:4], memory["encoder.g"][2:4])
    reopened.close()
    assert [p.name for p in tmp_path.iterdir()] == ["states.h5"]  # no temporary file left


def test_hdf5_ragged_batches_equal_memory(flavour, tmp_path):
    model = cached(flavour, "two traced")
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(7, 5, 3)), rng.normal(size=(7, 5, 2))

    def batches():
        yield [a[:2, :3], b[:2, :3]]
        yield {"a": a[2:], "b": b[2:]}
        yield [a[:1, :2], b[:1, :2]]

    memory = cell_states(model, batches(), progress=False)
    with cell_states(model, batches(), out=tmp_path / "s.h5", progress=False) as disk:
        for name in memory:
            np.testing.assert_array_equal(disk[name][:], memory[name])
        for layer in ("left", "right"):
            np.testing.assert_array_equal(disk.masks[layer][:], memory.masks[layer])
            np.testing.assert_array_equal(disk.lengths[layer], [3, 3, 5, 5, 5, 5, 5, 2])


def test_failure_midway_removes_the_partial_file(flavour, tmp_path):
    model = cached(flavour, "token traced")
    x = padded_tokens(6)
    path = tmp_path / "states.h5"

    def broken():
        yield x[:3]
        raise RuntimeError("source went away")

    with pytest.raises(RuntimeError, match="went away"):
        cell_states(model, broken(), out=path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_keeps_the_previous_file(flavour, tmp_path, monkeypatch):
    model = cached(flavour, "token traced")
    x = padded_tokens(6)
    path = tmp_path / "states.h5"
    path.write_bytes(b"previous")
    calls = []
    original = capture._H5Sink.append

    def append(self, batch):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, batch)

    monkeypatch.setattr(capture._H5Sink, "append", append)
    with pytest.raises(OSError, match="No space"):
        cell_states(model, x, batch_size=3, out=path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["states.h5"]
    assert path.read_bytes() == b"previous"


def test_memory_stays_bounded_while_streaming(flavour, tmp_path, monkeypatch):
    """The sink never keeps more than one batch of states: check what it holds after each append."""
    model = cached(flavour, "token traced")
    held = []
    original = capture._H5Sink.append

    def array_bytes(obj) -> int:
        if isinstance(obj, np.ndarray):
            return obj.nbytes
        if isinstance(obj, dict):
            return sum(array_bytes(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(array_bytes(v) for v in obj)
        return 0

    def append(self, batch):
        original(self, batch)
        held.append(array_bytes(vars(self)))

    monkeypatch.setattr(capture._H5Sink, "append", append)
    with cell_states(model, padded_tokens(40), batch_size=8, out=tmp_path / "s.h5", progress=False) as cs:
        assert cs["encoder.c"].shape == (40, T, UNITS)
    assert held == [0] * 5


def test_bad_out_paths(flavour, tmp_path):
    model = cached(flavour, "token")
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        cell_states(model, padded_tokens(2), out=tmp_path / "missing" / "s.h5", progress=False)
    with pytest.raises(InvalidArgumentError, match="is a directory"):
        cell_states(model, padded_tokens(2), out=tmp_path, progress=False)


def test_conv_lstm_states_keep_their_spatial_axes(flavour, tmp_path):
    k = kmod(flavour)
    k.utils.set_random_seed(6)
    frames = k.Input((None, 4, 4, 1), name="frames")
    conv = k.layers.ConvLSTM2D(2, 3, padding="same", return_sequences=True, name="conv")
    model = k.Model(frames, conv(frames))
    x = np.random.default_rng(0).normal(size=(3, 5, 4, 4, 1)).astype("float32")
    memory = cell_states(model, x, progress=False)
    expected = reference.conv_lstm2d(x, *conv.get_weights(), padding="same", flavour=flavour)["c"]
    np.testing.assert_allclose(memory["conv.c"], expected, atol=1e-5)
    with cell_states(model, x, out=tmp_path / "conv.h5", batch_size=2, progress=False) as disk:
        assert disk["conv.c"].maxshape == (None, None, 4, 4, 2)
        assert disk.exposed["conv.c"]["shape"] == [4, 4, 2]
        np.testing.assert_allclose(disk["conv.c"][:], memory["conv.c"], atol=1e-6)  # batch size 2 vs 32


def test_stacked_cells_share_the_mask_of_their_call(flavour):
    k = kmod(flavour)
    k.utils.set_random_seed(7)
    tokens = k.Input((None,), dtype="int32", name="tokens")
    e = k.layers.Embedding(VOCAB, EMBED, mask_zero=True, name="emb")(tokens)
    stack = k.layers.RNN([k.layers.LSTMCell(3), k.layers.GRUCell(2)], return_sequences=True, name="stack")(e)
    gru = k.layers.GRU(2, return_sequences=True, name="gru")
    model = k.Model(tokens, [stack, gru(e)])
    x = padded_tokens(5)
    cs = cell_states(model, x, states=("c", "h"), progress=False)
    assert {"stack.cell0.c", "stack.cell1.h", "gru.h"} <= set(cs)
    for layer in ("stack.cell0", "stack.cell1", "gru"):
        np.testing.assert_array_equal(cs.masks[layer], (x != 0).astype("float32"), err_msg=layer)
    table = model.get_layer("emb").get_weights()[0]
    expected = reference.gru(table[x], *gru.get_weights(), mask=x != 0, flavour=flavour)["h"]
    np.testing.assert_allclose(cs["gru.h"], expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Data validation
# ---------------------------------------------------------------------------------------------

BAD_TOKENS = {
    "fractional ids": (np.full((2, T), 1.5), "fractional"),
    "extra axis": (np.ones((2, T, 1), "int32"), "3 dimension"),
    "empty": (np.zeros((0, T), "int32"), "empty"),
    "strings": (np.array([["a", "b"]]), "dtype <U1"),
    "wrong key": ({"words": np.ones((2, T), "int32")}, "missing \\['tokens'\\]"),
    "two arrays": ([np.ones((2, T), "int32"), np.ones((2, T), "int32")], "dimension"),
    "not data": (object(), "Cannot read data"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_bad_data_for_a_token_model(flavour, case, tmp_path):
    data, message = BAD_TOKENS[case]
    with pytest.raises(DataError, match=message):
        cell_states(cached(flavour, "token"), data, out=tmp_path / "s.h5", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_data_for_a_two_input_model(flavour):
    model = cached(flavour, "two")
    good = np.zeros((2, 5, 3)), np.zeros((2, 5, 2))
    nan = good[0].copy()
    nan[1, 2, 0] = np.nan
    cases = [
        (good[0], "takes 2 inputs"),
        ([good[0]], "holds 1 array"),
        ([good[0], np.zeros((2, 5, 4))], "'b' .* size 4 on axis 2; the model expects 2"),
        ([good[0], np.zeros((2, 2))], "'b' .* 2 dimension"),
        ([nan, good[1]], "'a' .*NaN or Inf .*index \\(1, 2, 0\\)"),
        ([good[0], np.full((2, 5, 2), np.inf)], "'b' .*NaN or Inf"),
        ([good[0], np.zeros((3, 5, 2))], "different numbers of sequences"),
        ({"a": good[0]}, "missing \\['b'\\]"),
    ]
    for data, message in cases:
        with pytest.raises(DataError, match=message):
            cell_states(model, data, progress=False)


def test_bad_streamed_batch_names_its_index(flavour):
    model = cached(flavour, "token traced")

    def batches():
        yield padded_tokens(2)
        yield np.ones((2, T, 2), "int32")

    with pytest.raises(DataError, match="in batch 1"):
        cell_states(model, batches(), progress=False)
    with pytest.raises(DataError, match="yielded no batch"):
        cell_states(model, iter([]), progress=False)


def test_bad_batch_size(flavour):
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        cell_states(cached(flavour, "token"), padded_tokens(2), batch_size=0, progress=False)


def test_open_refuses_foreign_files(tmp_path):
    from lstm_rewrite.errors import ModelFileError

    with h5py.File(tmp_path / "other.h5", "w") as handle:
        handle["x"] = np.zeros(3)
    with pytest.raises(ModelFileError, match="not a states file"):
        CellStates.open(tmp_path / "other.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(ModelFileError, match="Cannot open states file"):
        CellStates.open(tmp_path / "text.h5")
    assert os.path.exists(tmp_path / "other.h5")
