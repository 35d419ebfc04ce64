"""Interventions (issue 13): edits inside the recurrence, checked against tests/reference.py on both flavours.

Every edited model is compared with the NumPy reference run with the same edits (written from the
equations: the edit applies where its quantity is computed, in input time); invariants (empty and
identity interventions, full patching, edits after the last valid step) and bad inputs follow.
Step sets are written here as boolean arrays, independently of the library's parsing.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import (
    Untouched,
    outputs_by_name,
    reference_gru,
    reference_lstm,
    reference_simple_rnn,
    run,
    to_numpy,
)

from lstm_rewrite import InvalidArgumentError
from lstm_rewrite.interventions import (
    Ablate,
    Add,
    Clamp,
    Intervention,
    Patch,
    Scale,
    intervene,
    intervened_inputs,
    run_intervened,
)

rng = np.random.default_rng(13)
T = 6


def float_batch(batch=3, time=T, features=4, seed=None):
    r = rng if seed is None else np.random.default_rng(seed)
    return r.standard_normal((batch, time, features)).astype("float32")


def steps_from(batch, time, start=0, stop=None, every=1):
    m = np.zeros((batch, time), bool)
    m[:, slice(start, stop, every)] = True
    return m


def steps_at(batch, time, *at):
    m = np.zeros((batch, time), bool)
    m[:, list(at)] = True
    return m


def assert_close(got, want, what, atol=2e-5):
    assert got.shape == want.shape, f"{what}: shape {got.shape} != reference {want.shape}"
    np.testing.assert_allclose(got, want, atol=atol, rtol=1e-4, err_msg=what)


def dense_of(model, name, h):
    w, b = model.get_layer(name).get_weights()
    return h @ w + b


# --- the reference itself ------------------------------------------------------------------


def test_reference_edit_of_c_feeds_h_and_the_next_step():
    """Hand-checked: ablating c at step 2 gives h_2 = o_2 tanh(0) = 0 and c_3 = f_3 * 0 + i_3 g_3."""
    from reference import lstm

    r = np.random.default_rng(0)
    x, k, u, b = r.normal(size=(2, 4, 3)), r.normal(size=(3, 8)), r.normal(size=(2, 8)), r.normal(size=8)
    plain = lstm(x, k, u, b)
    edited = lstm(x, k, u, b, interventions=[
        {"quantity": "c", "units": [0, 1], "steps": steps_at(2, 4, 2), "kind": "ablate", "value": 0.0}])
    np.testing.assert_array_equal(edited["c"][:, :2], plain["c"][:, :2])
    np.testing.assert_allclose(edited["c"][:, 2], 0.0)
    np.testing.assert_allclose(edited["h"][:, 2], 0.0)
    np.testing.assert_allclose(edited["c"][:, 3], edited["i"][:, 3] * edited["g"][:, 3])
    assert not np.allclose(edited["h"][:, 3], plain["h"][:, 3])
    identity = lstm(x, k, u, b, interventions=[
        {"quantity": "f", "units": [1], "steps": np.ones((2, 4), bool), "kind": "scale", "factor": 1.0}])
    np.testing.assert_array_equal(identity["h"], plain["h"])


# --- every kind, against the reference -----------------------------------------------------


def lstm_model(flavour, go_backwards=False, time=T):
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((time, 4))
    lstm = layers.LSTM(5, return_sequences=True, go_backwards=go_backwards, name="lstm")
    return keras.Model(inputs, layers.Dense(3, name="head")(lstm(inputs))), lstm


@pytest.mark.parametrize("go_backwards", [False, True])
def test_every_kind_on_every_lstm_quantity(flavour, go_backwards):
    model, lstm = lstm_model(flavour, go_backwards)
    x = float_batch()
    guard = Untouched(model, x)
    direction = np.array([0.5, -1.0])
    interventions = [
        Ablate("lstm.c", units=[1, 3], steps="2:"),
        Ablate("lstm.c", units=4, steps=0, value=0.7),
        Clamp("lstm.f", units=[0, 2], steps=[1, 3], high=0.3),
        Scale("lstm.g", steps="0::2", factor=-1.0),
        Add("lstm.o", units=[2, 4], steps=4, direction=direction, alpha=0.5),
        Scale("lstm.h", units=[0], steps="1:4", factor=0.5),
        Clamp("lstm.i", steps="3:", low=0.4, high=0.6),
    ]
    edited = intervene(model, interventions, states=("c", "h", "gates"))
    named = outputs_by_name(edited, x)

    b = x.shape[0]
    expected = reference_lstm(lstm, x, flavour.name, interventions=[
        {"quantity": "c", "units": [1, 3], "steps": steps_from(b, T, 2), "kind": "ablate", "value": 0.0},
        {"quantity": "c", "units": [4], "steps": steps_at(b, T, 0), "kind": "ablate", "value": 0.7},
        {"quantity": "f", "units": [0, 2], "steps": steps_at(b, T, 1, 3), "kind": "clamp", "low": None, "high": 0.3},
        {"quantity": "g", "units": list(range(5)), "steps": steps_from(b, T, 0, None, 2), "kind": "scale",
         "factor": -1.0},
        {"quantity": "o", "units": [2, 4], "steps": steps_at(b, T, 4), "kind": "add", "direction": direction,
         "alpha": 0.5},
        {"quantity": "h", "units": [0], "steps": steps_from(b, T, 1, 4), "kind": "scale", "factor": 0.5},
        {"quantity": "i", "units": list(range(5)), "steps": steps_from(b, T, 3), "kind": "clamp", "low": 0.4,
         "high": 0.6},
    ])
    for q in ("c", "h", "i", "f", "g", "o"):
        assert_close(named[f"lstm.{q}"], expected[q], f"lstm.{q}")
    assert_close(named["head"], dense_of(model, "head", expected["output"]), "head")
    assert not np.allclose(named["head"], guard.outputs[0], atol=1e-3)
    guard.check()


def test_edit_of_c_at_one_step_changes_h_at_the_next(flavour):
    model, lstm = lstm_model(flavour)
    x = float_batch()
    named = outputs_by_name(intervene(model, [Ablate("lstm.c", units=[2], steps=3)], states=("c", "h")), x)
    plain = reference_lstm(lstm, x, flavour.name)
    expected = reference_lstm(lstm, x, flavour.name, interventions=[
        {"quantity": "c", "units": [2], "steps": steps_at(3, T, 3), "kind": "ablate", "value": 0.0}])
    assert_close(named["lstm.h"], expected["h"], "lstm.h")
    np.testing.assert_allclose(named["lstm.h"][:, :3], plain["h"][:, :3], atol=1e-5)
    assert np.abs(named["lstm.h"][:, 4] - plain["h"][:, 4]).max() > 1e-4  # the edit is in the loop


def test_ablate_mean_takes_the_per_unit_mean_of_the_data(flavour):
    model, lstm = lstm_model(flavour)
    x, data = float_batch(), float_batch(batch=8, seed=5)
    named = outputs_by_name(intervene(model, [Ablate("lstm.h", units=[0, 4], value="mean")], states=("h",),
                                      data=data), x)
    mean = reference_lstm(lstm, data, flavour.name)["h"].mean(axis=(0, 1))
    expected = reference_lstm(lstm, x, flavour.name, interventions=[
        {"quantity": "h", "units": [0, 4], "steps": np.ones((3, T), bool), "kind": "ablate", "value": mean[[0, 4]]}])
    assert_close(named["lstm.h"], expected["h"], "lstm.h")


@pytest.mark.parametrize("reset_after", [True, False])
def test_every_kind_on_gru(flavour, reset_after):
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((T, 4))
    gru = layers.GRU(4, return_sequences=True, reset_after=reset_after, name="gru")
    model = keras.Model(inputs, gru(inputs))
    x = float_batch()
    edited = intervene(model, [Ablate("gru.z", units=[0], steps="1:"), Scale("gru.r", units=[1, 2], factor=0.0),
                               Add("gru.n", steps=[2, 5], direction=[1.0, 0.0, -1.0, 0.5], alpha=0.3),
                               Clamp("gru.h", units=3, low=-0.1, high=0.1)],
                       states=("h", "gates"))
    named = outputs_by_name(edited, x)
    every = np.ones((3, T), bool)
    expected = reference_gru(gru, x, flavour.name, interventions=[
        {"quantity": "z", "units": [0], "steps": steps_from(3, T, 1), "kind": "ablate", "value": 0.0},
        {"quantity": "r", "units": [1, 2], "steps": every, "kind": "scale", "factor": 0.0},
        {"quantity": "n", "units": [0, 1, 2, 3], "steps": steps_at(3, T, 2, 5), "kind": "add",
         "direction": np.array([1.0, 0.0, -1.0, 0.5]), "alpha": 0.3},
        {"quantity": "h", "units": [3], "steps": every, "kind": "clamp", "low": -0.1, "high": 0.1},
    ])
    for q in ("h", "z", "r", "n"):
        assert_close(named[f"gru.{q}"], expected[q], f"gru.{q}")
    assert_close(named[edited.output_names[0]], expected["output"], "output")


def test_simple_rnn_go_backwards(flavour):
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((T, 4))
    rnn = layers.SimpleRNN(3, go_backwards=True, name="rnn")
    model = keras.Model(inputs, rnn(inputs))
    x = float_batch()
    edited = intervene(model, [Scale("rnn.h", units=[1], steps="3:", factor=2.0)], states=("h",))
    named = outputs_by_name(edited, x)
    expected = reference_simple_rnn(rnn, x, flavour.name, interventions=[
        {"quantity": "h", "units": [1], "steps": steps_from(3, T, 3), "kind": "scale", "factor": 2.0}])
    assert_close(named["rnn.h"], expected["h"], "rnn.h")
    assert_close(named[edited.output_names[0]], expected["last_output"], "output")


def test_bidirectional_over_masked_embedding(flavour):
    """Steps are input time in both directions; edits on masked steps change nothing."""
    keras, layers = flavour.keras, flavour.layers
    tokens = keras.Input((T,), dtype="int32")
    embedding = layers.Embedding(10, 4, mask_zero=True, name="embedding")
    bi = layers.Bidirectional(layers.LSTM(3, return_sequences=True), name="bi")
    model = keras.Model(tokens, bi(embedding(tokens)))
    ids = rng.integers(1, 10, size=(3, T)).astype("int32")
    ids[1, 4:] = 0
    ids[2, 2:] = 0
    mask = ids != 0
    guard = Untouched(model, ids)
    edited = intervene(model, [Ablate("bi.forward.c", units=[0, 2], steps="1:"),
                               Scale("bi.backward.h", units=[1], steps=[0, 3], factor=-2.0)],
                       states=("c", "h"))
    named = outputs_by_name(edited, ids)
    embedded = to_numpy(embedding(ids))
    forward = reference_lstm(bi.forward_layer, embedded, flavour.name, mask=mask, interventions=[
        {"quantity": "c", "units": [0, 2], "steps": steps_from(3, T, 1), "kind": "ablate", "value": 0.0}])
    backward = reference_lstm(bi.backward_layer, embedded, flavour.name, mask=mask, interventions=[
        {"quantity": "h", "units": [1], "steps": steps_at(3, T, 0, 3), "kind": "scale", "factor": -2.0}])
    for q in ("c", "h"):
        assert_close(named[f"bi.forward.{q}"], forward[q], f"bi.forward.{q}")
        assert_close(named[f"bi.backward.{q}"], backward[q][:, ::-1], f"bi.backward.{q}")
    guard.check()


def test_stacked_layers_in_a_nested_model(flavour):
    keras, layers = flavour.keras, flavour.layers
    inner_in = keras.Input((T, 4))
    first = layers.LSTM(4, return_sequences=True, name="first")
    second = layers.GRU(3, return_sequences=True, name="second")
    body = keras.Model(inner_in, second(first(inner_in)), name="body")
    inputs = keras.Input((T, 4))
    model = keras.Model(inputs, layers.Dense(2, name="head")(body(inputs)))
    x = float_batch()
    edited = intervene(model, [Ablate("body.first.c", units=[1], steps="2:")], states=("h",))
    named = outputs_by_name(edited, x)
    expected_first = reference_lstm(first, x, flavour.name, interventions=[
        {"quantity": "c", "units": [1], "steps": steps_from(3, T, 2), "kind": "ablate", "value": 0.0}])
    expected_second = reference_gru(second, expected_first["output"], flavour.name)
    assert_close(named["body.first.h"], expected_first["h"], "body.first.h")
    assert_close(named["body.second.h"], expected_second["h"], "body.second.h")
    assert_close(named["head"], dense_of(model, "head", expected_second["output"]), "head")


def test_per_sample_step_mask_at_call_time(flavour):
    model, lstm = lstm_model(flavour)
    x = float_batch()
    steps = np.zeros((3, T), bool)
    steps[0, 1:] = True
    steps[2, [0, 4]] = True
    edited = intervene(model, [Ablate("lstm.c", units=[0, 1], steps="mask")], states=("c",))
    assert edited.intervention_record.inputs == ["edit0.steps"]
    outputs = run_intervened(edited, x, masks={0: steps})
    expected = reference_lstm(lstm, x, flavour.name, interventions=[
        {"quantity": "c", "units": [0, 1], "steps": steps, "kind": "ablate", "value": 0.0}])
    assert_close(outputs[1], expected["c"], "lstm.c")


def test_patch_at_chosen_steps(flavour):
    model, lstm = lstm_model(flavour, go_backwards=True)
    x, source = float_batch(), float_batch(seed=3)
    edited = intervene(model, [Patch("lstm.c", units=[1, 2], steps="3:", source=source)], states=("c",))
    outputs = run_intervened(edited, x)
    source_c = reference_lstm(lstm, source, flavour.name)["c"][:, ::-1]  # input time
    expected = reference_lstm(lstm, x, flavour.name, interventions=[
        {"quantity": "c", "units": [1, 2], "steps": steps_from(3, T, 3), "kind": "patch",
         "source": source_c[:, :, [1, 2]]}])
    assert_close(outputs[1], expected["c"], "lstm.c")


# --- invariants ------------------------------------------------------------------------------


def test_empty_and_identity_interventions_reproduce_the_original(flavour):
    model, _ = lstm_model(flavour)
    x = float_batch()
    guard = Untouched(model, x)
    for interventions in ([], [Scale("lstm.c", factor=1.0), Clamp("lstm.f"), Add("lstm.h", direction=0.0)]):
        edited = intervene(model, interventions)
        np.testing.assert_allclose(run(edited, x)[0], guard.outputs[0], atol=1e-6)
    guard.check()


def test_patching_every_step_reproduces_the_source_run(flavour):
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((T, 4))
    bi = layers.Bidirectional(layers.LSTM(3, return_sequences=True), name="bi")
    gru = layers.GRU(2, name="gru")
    model = keras.Model(inputs, gru(bi(inputs)))
    x, source = float_batch(), float_batch(seed=4)
    edited = intervene(model, [Patch(f"bi.{d}.{q}", source=source) for d in ("forward", "backward") for q in "ch"],
                       states=("c", "h"))
    outputs = dict(zip(edited.output_names, run_intervened(edited, x)))
    np.testing.assert_allclose(outputs["gru"], run(model, source)[0], atol=1e-5)
    expected = reference_lstm(bi.forward_layer, source, flavour.name)
    assert_close(outputs["bi.forward.c"], expected["c"], "bi.forward.c")


def test_edits_after_the_last_valid_step_change_nothing(flavour):
    keras, layers = flavour.keras, flavour.layers
    tokens = keras.Input((T,), dtype="int32")
    lstm = layers.LSTM(3, name="lstm")
    model = keras.Model(tokens, lstm(layers.Embedding(8, 4, mask_zero=True)(tokens)))
    ids = rng.integers(1, 8, size=(2, T)).astype("int32")
    ids[:, 3:] = 0  # valid steps 0, 1, 2
    edited = intervene(model, [Ablate("lstm.c", steps="3:"), Scale("lstm.h", steps=[4, 5], factor=9.0)])
    np.testing.assert_allclose(run(edited, ids)[0], run(model, ids)[0], atol=1e-6)


def test_interventions_round_trip_through_json():
    items = [Ablate("lstm.c", units=[11], steps="20:"), Ablate("gru.h", value=0.5, steps=3),
             Clamp("bi.backward.f", units=[0, 1], steps=[2, 4], low=0.0, high=0.5), Scale("enc.g", factor=2.0),
             Add("lstm.h", units=[1, 2], direction=[1.0, -1.0], alpha=0.25), Patch("lstm.c", steps="mask"),
             Patch("lstm.h", source=np.zeros((1, 2, 3)))]
    for item in items:
        back = Intervention.from_dict(json.loads(item.to_json()))
        assert back.to_dict() == item.to_dict()
        assert type(back) is type(item)


def test_intervened_model_saves_and_loads_with_its_edits(flavour, tmp_path):
    model, _ = lstm_model(flavour)
    x = float_batch()
    edited = intervene(model, [Ablate("lstm.c", units=[1, 3], steps="2:")], verify=False)
    path = tmp_path / "edited.keras"
    edited.save(path)
    loaded = flavour.keras.models.load_model(path)
    np.testing.assert_allclose(run(loaded, x)[0], run(edited, x)[0], atol=1e-6)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("intervention, match", [
    (Ablate("encoder.c"), r"'encoder'.*recurrent sites are \['lstm'\]"),
    (Ablate("lstm.z"), r"'lstm' \(LSTM\) has no quantity 'z'; it edits c, h, i, f, g, o"),
    (Ablate("lstm.c", units=[2, 5]), r"names unit 5, but layer 'lstm' \(LSTM\) has 5 units"),
    (Ablate("lstm.c", steps="6:"), r"'lstm.c' edits step 6, but that layer's input has 6 steps"),
    (Ablate("lstm.c", steps=-1), r"'lstm.c'.*negative step"),
    (Add("lstm.c", units=[0, 1], direction=[1.0, 2.0, 3.0]), r"direction= of the intervention on 'lstm.c'"),
    (Ablate("lstm.c", value="median"), r"Ablate on 'lstm.c' takes value='zero', 'mean'"),
], ids=["unknown site", "unknown quantity", "units out of range", "steps out of range", "negative step",
        "direction of another length", "unknown ablate value"])
def test_bad_interventions_name_the_site_and_the_fix(flavour, intervention, match):
    model, _ = lstm_model(flavour)
    with pytest.raises(InvalidArgumentError, match=match):
        intervene(model, [intervention], verify=False)


def test_patch_source_of_another_shape(flavour):
    model, _ = lstm_model(flavour)
    edited = intervene(model, [Patch("lstm.c", units=[0])], verify=False)
    with pytest.raises(InvalidArgumentError, match=r"Patch on 'lstm.c'.*same shape"):
        intervened_inputs(edited, float_batch(), sources={0: float_batch(batch=2)})


# --- sweeps ----------------------------------------------------------------------------------


def small_model(flavour):
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((4, 3))
    lstm = layers.LSTM(3, return_sequences=True, name="lstm")
    model = keras.Model(inputs, layers.Dense(2, name="head")(lstm(inputs)))
    return model, lstm


def test_unit_importance_against_the_reference(flavour):
    from lstm_rewrite.interventions import logit_difference_metric, unit_importance

    model, lstm = small_model(flavour)
    x = float_batch(batch=5, time=4, features=3)
    metric = logit_difference_metric(0, 1, step=None)
    result = unit_importance(model, x, metric, "lstm.c", value="zero", steps="1:")
    assert result.dims == ("unit",) and result.passes == 4 and result.values.shape == (3,)

    def reference_metric(interventions):
        out = dense_of(model, "head", reference_lstm(lstm, x, flavour.name, interventions=interventions)["output"])
        return float((out[..., 0] - out[..., 1]).mean())

    assert result.baseline == pytest.approx(reference_metric([]), abs=1e-5)
    for u in range(3):
        want = reference_metric([{"quantity": "c", "units": [u], "steps": steps_from(5, 4, 1), "kind": "ablate",
                                  "value": 0.0}])
        assert result.values[u] == pytest.approx(want, abs=1e-5)


def test_patch_sweep_against_the_reference(flavour):
    from lstm_rewrite.interventions import logit_difference_metric, patch_sweep

    model, lstm = small_model(flavour)
    clean, corrupt = float_batch(batch=3, time=4, features=3), float_batch(batch=3, time=4, features=3, seed=9)
    metric = logit_difference_metric(0, 1, step=-1)
    result = patch_sweep(model, clean, corrupt, metric, "lstm.h", max_rows=16)
    assert result.dims == ("unit", "step") and result.values.shape == (3, 4)
    source_h = reference_lstm(lstm, corrupt, flavour.name)["h"]
    for u, t in [(0, 0), (1, 3), (2, 2)]:
        out = dense_of(model, "head", reference_lstm(lstm, clean, flavour.name, interventions=[
            {"quantity": "h", "units": [u], "steps": steps_at(3, 4, t), "kind": "patch",
             "source": source_h[:, :, [u]]}])["output"])
        assert result.values[u, t] == pytest.approx(float((out[:, -1, 0] - out[:, -1, 1]).mean()), abs=1e-5)


# --- the audit's causal section and the command line -----------------------------------------


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference_demo(model, x, flavour_name, interventions=()):
    """The demo model (Embedding, masked LSTM, softmax Dense) in NumPy."""
    embedded = model.get_layer("embed").get_weights()[0][x]
    states = reference_lstm(model.get_layer("lstm"), embedded, flavour_name, mask=x != 0,
                            interventions=list(interventions))
    w, b = model.get_layer("next_char").get_weights()
    return softmax(states["output"] @ w + b), states


def test_cli_intervene_on_the_demo_model(capsys, tmp_path):
    from lstm_rewrite.cli import main
    from lstm_rewrite.demo import demo_data, demo_model_path, load_demo_model

    x = demo_data()[0][:12]
    np.save(tmp_path / "x.npy", x)
    code = main(["intervene", str(demo_model_path()), "--data", str(tmp_path / "x.npy"),
                 "--ablate", "lstm.c:11,3-4@20:", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["interventions"][0]["units"] == [3, 4, 11]
    model = load_demo_model("keras3")
    plain, _ = reference_demo(model, x, "keras3")
    edited, _ = reference_demo(model, x, "keras3", [
        {"quantity": "c", "units": [3, 4, 11], "steps": steps_from(*x.shape, 20), "kind": "ablate", "value": 0.0}])
    row = result["outputs"][0]
    assert row["output"] == "next_char"
    assert row["mean_abs_change"] == pytest.approx(float(np.abs(edited - plain).mean()), rel=1e-3, abs=1e-6)
    assert main(["intervene", str(demo_model_path()), "--data", str(tmp_path / "x.npy"), "--ablate", "lstm.c:x"]) == 2
    assert "TARGET[:UNITS][@STEPS]" in capsys.readouterr().err


def test_audit_causal_section(flavour, tmp_path):
    from lstm_rewrite import audit
    from lstm_rewrite.demo import demo_data, load_demo_model, next_char_targets
    from lstm_rewrite.interventions import accuracy_metric

    model = load_demo_model(flavour.name)
    x, depth, _ = demo_data()
    x, depth = x[:40], depth[:40]
    plain = audit(model, x, labels={"depth": depth}, progress=False)
    assert plain.causal is None and "causal" not in plain.to_dict()
    targets = next_char_targets(x, depth)
    report = audit(model, x, labels={"depth": depth}, progress=False, causal=True, metric=accuracy_metric(),
                   targets=targets, causal_draws=3)
    section = report.causal["lstm"]
    assert section["target"] == "lstm.c" and len(section["unit_effect"]) == 16 and section["passes"] == 17
    row = section["labels"]["depth"]
    assert report.best_tracking("depth").unit in row["units"]
    assert len(row["random_effects"]) == 3
    assert all(len(s) == len(row["units"]) and not set(s) & set(row["units"]) for s in row["random_units"])
    # The tracking units' effect, recomputed with the reference (mean ablation over the valid steps).
    probs, states = reference_demo(model, x, flavour.name)
    valid = (x != 0)
    mean = states["c"][valid].mean(axis=0)
    edited, _ = reference_demo(model, x, flavour.name, [
        {"quantity": "c", "units": row["units"], "steps": np.ones(x.shape, bool), "kind": "ablate",
         "value": mean[row["units"]]}])
    keep = targets >= 0
    effect = (edited.argmax(-1) == targets)[keep].mean() - (probs.argmax(-1) == targets)[keep].mean()
    assert row["effect"] == pytest.approx(float(effect), abs=1e-6)
    assert "Causal 'depth'" in report.summary()
    json.dumps(report.to_dict(), allow_nan=False)
    # The report shows each unit's effect in its audit table and the explorer's unit rows, and the figure.
    from lstm_rewrite.report import explorer_data

    (layer,) = explorer_data(report)["layers"]
    column = layer["columns"].index("ablation effect")
    np.testing.assert_allclose([row[column] for row in layer["rows"]], section["unit_effect"], atol=1e-5)
    page = open(report.to_html(tmp_path / "report"), encoding="utf-8").read()
    assert "<th>ablation effect</th>" in page and "src='causal.png'" in page
    assert (tmp_path / "report" / "causal.png").stat().st_size > 0


@pytest.mark.backend_independent(
    reason="the CLI's --causal flag; test_audit_causal_section runs the demo's causal audit on this backend")
def test_cli_audit_causal_on_the_demo(capsys, tmp_path):
    from lstm_rewrite.cli import main

    assert main(["audit", "--causal", "--quiet", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "Causal 'depth': ablating lstm.c[" in out and "next-character accuracy" in out
    assert (tmp_path / "demo" / "causal.png").stat().st_size > 0
    assert "causal" in json.loads((tmp_path / "demo" / "report.json").read_text())


def test_interventions_on_layers_that_take_none(flavour):
    from lstm_rewrite import UnsupportedLayerError

    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input((T, 4))
    stack = layers.RNN(layers.StackedRNNCells([layers.LSTMCell(3), layers.LSTMCell(2)]), name="stack")
    model = keras.Model(inputs, stack(inputs))
    with pytest.raises(UnsupportedLayerError, match=r"Layer 'stack' .* takes no interventions"):
        intervene(model, [Ablate("stack.c")], verify=False)


def test_call_time_mask_of_another_shape(flavour):
    model, _ = lstm_model(flavour)
    edited = intervene(model, [Ablate("lstm.c", steps="mask")], verify=False)
    with pytest.raises(InvalidArgumentError, match=r"'edit0.steps' of the intervention on 'lstm.c' must have shape"):
        intervened_inputs(edited, float_batch(), masks={0: np.ones((3, T + 1))})
    with pytest.raises(InvalidArgumentError, match=r"masks=\{'edit0.steps': array\}"):
        intervened_inputs(edited, float_batch())
