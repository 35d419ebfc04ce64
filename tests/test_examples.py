"""The examples build on both flavours and their models rewrite; states checked against the reference."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
from conftest import Untouched, outputs_by_name, reference_lstm

from lstm_rewrite import expose_cell_states

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seq2seq_example(flavour):
    example = load_example("seq2seq")
    model = example.build(flavour.keras)
    source, target_in, _ = example.copy_task(np.random.default_rng(0), n=4)
    guard = Untouched(model, [source, target_in])

    named = outputs_by_name(expose_cell_states(model, states=("c", "h")), [source, target_in])

    embedded = np.asarray(model.get_layer("source_embedding")(source))
    expected = reference_lstm(model.get_layer("encoder"), embedded, flavour.name, mask=source != 0)
    np.testing.assert_allclose(named["encoder.c"], expected["c"], atol=1e-5)
    guard.check()


def test_bidirectional_tagger_example(flavour):
    example = load_example("bidirectional_tagger")
    model = example.build(flavour.keras)
    tokens, _ = example.sentences(np.random.default_rng(0), n=4)
    guard = Untouched(model, tokens)

    named = outputs_by_name(expose_cell_states(model, expose_masks=True), tokens)

    embedded = np.asarray(model.get_layer("embedding")(tokens))
    bi = model.get_layer("bi")
    expected = reference_lstm(bi.forward_layer, embedded, flavour.name, mask=tokens != 0)
    np.testing.assert_allclose(named["bi.forward.c"], expected["c"], atol=1e-5)
    np.testing.assert_array_equal(named["bi.forward.mask"], (tokens != 0).astype("float32"))
    guard.check()
