"""Capture and audit on Apache Beam: equal to the single-machine capture and audit, and safe under faults.

Pipelines run on Beam's in-process FnApiRunner, given explicitly (the default DirectRunner first
tries to download a Prism binary), and once with two worker processes.
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

beam = pytest.importorskip("apache_beam", reason="the beam extra is not installed: pip install 'lstm_rewrite[beam]'")

from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402
from apache_beam.runners.portability.fn_api_runner import FnApiRunner  # noqa: E402

from lstm_rewrite import audit  # noqa: E402
from lstm_rewrite.beam import (  # noqa: E402
    AuditCombineFn,
    ExtractStates,
    ReadExamples,
    audit_on_beam,
    cell_states_on_beam,
    shards_directory,
    write_shard,
)
from lstm_rewrite.capture import CellStates, cell_states  # noqa: E402
from lstm_rewrite.errors import DataError, InvalidArgumentError, ModelFileError, UnsafeModelError  # noqa: E402
from lstm_rewrite.loading import load_model  # noqa: E402

T, VOCAB, UNITS = 8, 7, 4
SHARDS = (7, 5, 9)  # uneven shards: 21 sequences


def padded_ids(n: int, rng) -> np.ndarray:
    x = rng.integers(1, VOCAB, size=(n, T)).astype("int32")
    lengths = rng.integers(2, T + 1, size=n)
    x[np.arange(T)[None, :] >= lengths[:, None]] = 0
    return x


@pytest.fixture
def corpus(flavour, tmp_path):
    """A saved masked LSTM model and its data as three .npz shards with a per-step label."""
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input(shape=(T,), dtype="int32", name="tokens")
    seq = layers.Embedding(VOCAB, 3, mask_zero=True, name="embed")(inputs)
    seq = layers.LSTM(UNITS, return_sequences=True, name="enc")(seq)
    seq = layers.LSTM(3, return_sequences=True, go_backwards=True, name="back")(seq)
    model = keras.Model(inputs, layers.Dense(2, name="head")(seq))
    path = str(tmp_path / ("model.keras" if flavour.name == "keras3" else "model.h5"))
    model.save(path)
    rng = np.random.default_rng(3)
    xs, ys = [], []
    for i, n in enumerate(SHARDS):
        x = padded_ids(n, rng)
        depth = np.cumsum(np.where(x % 2 == 0, 1.0, -1.0), axis=1)
        depth[rng.random(depth.shape) < 0.1] = np.nan  # skipped steps
        # Written out of name order, so the keys come from the sorted names, not from writing order.
        np.savez(tmp_path / f"part-{i}.npz", tokens=x, depth=depth)
        xs.append(x)
        ys.append(depth)
    return path, str(tmp_path / "part-*.npz"), np.concatenate(xs), np.concatenate(ys)


def assert_same_numbers(beam_value, local_value, where="report", rel=1e-9, abs_=1e-12):
    """Every number within ``rel`` relative (``abs_`` absolute near 0); structure, ints and None equal."""
    if isinstance(local_value, dict):
        assert set(beam_value) == set(local_value), where
        for key in local_value:
            if rel > 1e-9 and key in ("histograms", "counts"):
                continue  # a value moved by float32 noise may cross a bin edge
            assert_same_numbers(beam_value[key], local_value[key], f"{where}.{key}", rel, abs_)
    elif isinstance(local_value, list):
        assert len(beam_value) == len(local_value), where
        for i, (a, b) in enumerate(zip(beam_value, local_value)):
            assert_same_numbers(a, b, f"{where}[{i}]", rel, abs_)
    elif isinstance(local_value, float):
        assert isinstance(beam_value, float) and math.isclose(beam_value, local_value, rel_tol=rel,
                                                              abs_tol=abs_), (where, beam_value, local_value)
    else:
        assert beam_value == local_value, where


def assert_same_samples(beam_report, local_report):
    for prefix, layer in local_report.layers.items():
        ours = beam_report.layers[prefix].samples
        assert len(ours) == len(layer.samples) == 12
        for a, b in zip(ours, layer.samples):
            np.testing.assert_array_equal(a["steps"], b["steps"])
            for q in b["states"]:
                np.testing.assert_array_equal(a["states"][q], b["states"][q])
            for n in b["labels"]:
                np.testing.assert_array_equal(a["labels"][n], b["labels"][n])
    assert beam_report.sample_tokens == local_report.sample_tokens
    for name, value in local_report.sample_labels.items():
        np.testing.assert_array_equal(beam_report.sample_labels[name], value)


# --------------------------------------------------------------------------------------------
# Equal to the single machine.
# --------------------------------------------------------------------------------------------


def test_beam_audit_equals_local_audit(corpus, tmp_path):
    path, pattern, x, depth = corpus
    # On this CPU the model's float32 states depend on the batch size at the last bit (TensorFlow
    # picks other kernels): the same batches (here, one sequence each) on both sides give the same
    # states, and then every statistic agrees to float64 rounding.
    local = audit(load_model(path), x, labels={"depth": depth}, progress=False, batch_size=1)
    ours = audit_on_beam(path, pattern, labels=["depth"], batch_size=1, runner=FnApiRunner())
    assert ours.sequences == len(x) and ours.labels == ("depth",)
    assert_same_numbers(ours.to_dict(), local.to_dict())
    # Batched as each side likes, they differ only by that float32 noise.
    batched = audit_on_beam(path, pattern, labels=["depth"], batch_size=5, runner=FnApiRunner())
    assert_same_numbers(batched.to_dict(), local.to_dict(), rel=1e-5, abs_=1e-6)
    assert ours.layers["enc"].label_correlation["depth"]["c"].shape == (UNITS,)
    assert_same_samples(ours, local)
    page = ours.to_html(tmp_path / "report")
    assert os.path.isfile(page) and os.path.isfile(tmp_path / "report" / "report.json")


def test_combine_fn_merges_in_any_order(corpus):
    """The CombineFn's accumulators, merged in shuffled groups, give the report of one pass."""
    path, pattern, x, depth = corpus
    with beam.Pipeline(runner=FnApiRunner()) as pipeline:
        states = pipeline | ReadExamples(pattern, labels=["depth"]) | ExtractStates(
            path, states=("c", "h", "gates"))
        _ = states | beam.combiners.ToList() | beam.Map(_keep)
    captured = list(_KEPT)
    fn = AuditCombineFn(labels=["depth"], batch_size=4)
    order = np.random.default_rng(0).permutation(len(captured))
    accumulators = []
    for part in np.array_split(order, 5):
        acc = fn.create_accumulator()
        for i in part:
            acc = fn.add_input(acc, captured[i])
        accumulators.append(acc)
    merged = fn.merge_accumulators([fn.merge_accumulators(accumulators[3:]), *accumulators[:3]])
    one = fn.create_accumulator()
    for element in sorted(captured, key=lambda e: e.key):
        one = fn.add_input(one, element)
    assert_same_numbers(fn.extract_output(merged).to_dict(), fn.extract_output(one).to_dict())
    assert_same_samples(fn.extract_output(merged), fn.extract_output(one))


# Elements collected in this process (the FnApiRunner runs in it): a module-level function is
# pickled by reference, so it fills this very list.
_KEPT: list = []


def _keep(items) -> None:
    _KEPT[:] = items


def test_beam_states_equal_cell_states(corpus, tmp_path):
    path, pattern, x, _ = corpus
    index = str(tmp_path / "out" / "states.h5")
    os.makedirs(tmp_path / "out")
    cell_states_on_beam(path, pattern, index, states=("c", "h"), rows_per_shard=4, batch_size=1,
                        runner=FnApiRunner())
    shards = sorted(os.listdir(shards_directory(index)))
    assert shards == [f"part-{s:05d}-{p:05d}.h5" for s, n in enumerate(SHARDS) for p in range(-(-n // 4))]
    local = cell_states(load_model(path), x, states=("c", "h"), progress=False, batch_size=1)
    with CellStates.open(index) as ours:
        assert list(ours) == list(local) and ours.exposed == local.exposed
        for name in local:
            np.testing.assert_array_equal(np.asarray(ours[name]), local[name])
        for prefix, mask in local.masks.items():
            np.testing.assert_array_equal(np.asarray(ours.masks[prefix]), mask)
            np.testing.assert_array_equal(ours.lengths[prefix], local.lengths[prefix])
    # The index reads its shards in place: without one it refuses to open.
    os.remove(os.path.join(shards_directory(index), shards[-1]))
    with pytest.raises(ModelFileError, match=r"missing.*part-00002-00002\.h5"):
        CellStates.open(index)


# Keras 3 only: one multi-process run is enough; the subprocess start dominates its time.
@pytest.mark.parametrize("flavour", ["keras3"], indirect=True)
@pytest.mark.backend_independent(
    reason="Beam's multi-process runner; the in-process pipelines above run the model on this backend")
def test_two_worker_processes_give_the_local_audit(corpus, flavour):
    path, pattern, x, depth = corpus
    options = PipelineOptions(direct_num_workers=2, direct_running_mode="multi_processing")
    ours = audit_on_beam(path, pattern, labels=["depth"], runner=FnApiRunner(), options=options,
                         batch_size=1)
    local = audit(load_model(path), x, labels={"depth": depth}, progress=False, batch_size=1)
    assert_same_numbers(ours.to_dict(), local.to_dict())
    assert_same_samples(ours, local)


# Keras 3 only: the reader does not depend on the flavour.
@pytest.mark.parametrize("flavour", ["keras3"], indirect=True)
def test_tfrecord_with_feature_spec(corpus, flavour, tmp_path):
    import tensorflow as tf

    path, _, x, depth = corpus
    record = str(tmp_path / "data.tfrecord")
    with tf.io.TFRecordWriter(record) as writer:
        for row, labels in zip(x, depth):
            features = {"tokens": tf.train.Feature(int64_list=tf.train.Int64List(value=row)),
                        "depth": tf.train.Feature(float_list=tf.train.FloatList(value=labels))}
            writer.write(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())
    spec = {"tokens": {"dtype": "int64", "shape": [None]}, "depth": {"dtype": "float32", "shape": [None]}}
    with pytest.raises(InvalidArgumentError, match=r"data\.tfrecord.*needs a feature spec.*Received: feature_spec=None"):
        audit_on_beam(path, record, labels=["depth"], runner=FnApiRunner())
    ours = audit_on_beam(path, record, labels=["depth"], feature_spec=spec, runner=FnApiRunner(), batch_size=1)
    local = audit(load_model(path), x, labels={"depth": depth.astype(np.float32)}, progress=False, batch_size=1)
    assert_same_numbers(ours.to_dict(), local.to_dict())


# --------------------------------------------------------------------------------------------
# Faults.
# --------------------------------------------------------------------------------------------


class _FailOnce(beam.DoFn):
    """Raises on the first element it sees in the first attempt only (a marker file remembers)."""

    def __init__(self, marker: str):
        self.marker = marker

    def process(self, element):
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise RuntimeError("injected bundle failure")
        yield element


# Keras 3 only: the sink does not depend on the flavour.
@pytest.mark.parametrize("flavour", ["keras3"], indirect=True)
def test_failed_bundle_rerun_leaves_no_duplicate_and_no_lost_row(corpus, tmp_path, flavour):
    from lstm_rewrite.beam import WriteStates

    path, pattern, x, _ = corpus
    index = str(tmp_path / "states.h5")

    def run():
        with beam.Pipeline(runner=FnApiRunner()) as pipeline:
            _ = (pipeline | ReadExamples(pattern) | ExtractStates(path, states="c", batch_size=1)
                 | beam.ParDo(_FailOnce(str(tmp_path / "failed-once"))) | WriteStates(index, rows_per_shard=4))

    # The FnApiRunner does not retry a failed bundle (Dataflow and Flink do): the job fails, and
    # nothing that looks whole is left: no index. Running it again is the retry.
    with pytest.raises(Exception, match="injected bundle failure"):
        run()
    assert not os.path.exists(index)
    run()
    run()  # and a second, complete retry replaces each shard rather than adding one
    shards = sorted(glob.glob(os.path.join(shards_directory(index), "*")))
    assert len(shards) == sum(-(-n // 4) for n in SHARDS)
    assert not glob.glob(os.path.join(shards_directory(index), ".*"))
    local = cell_states(load_model(path), x, states="c", progress=False, batch_size=1)
    with CellStates.open(index) as ours:
        np.testing.assert_array_equal(np.asarray(ours["enc.c"]), local["enc.c"])


# Keras 3 only: the sink does not depend on the flavour.
@pytest.mark.parametrize("flavour", ["keras3"], indirect=True)
def test_interrupted_shard_write_leaves_nothing_that_looks_whole(corpus, tmp_path, monkeypatch, flavour):
    from lstm_rewrite import capture

    path, pattern, _, _ = corpus
    with beam.Pipeline(runner=FnApiRunner()) as pipeline:
        _ = (pipeline | ReadExamples(pattern) | ExtractStates(path, states="c")
             | beam.combiners.ToList() | beam.Map(_keep))
    shard = [e for e in _KEPT if e.key[0] == 0]
    directory = str(tmp_path / "shards")
    os.makedirs(directory)
    appended = capture._H5Sink.append

    def append_then_die(self, batch):
        appended(self, batch)
        raise KeyboardInterrupt  # the worker is stopped halfway through the shard

    monkeypatch.setattr(capture._H5Sink, "append", append_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_shard(directory, (0, 0), shard)
    assert os.listdir(directory) == []
    monkeypatch.undo()
    # A worker killed outright leaves its temporary file: named so that no reader takes it for a shard.
    first = write_shard(directory, (0, 0), shard)
    again = write_shard(directory, (0, 0), list(reversed(shard)))  # a retry, elements in another order
    assert os.listdir(directory) == ["part-00000-00000.h5"] and first["rows"] == again["rows"] == SHARDS[0]
    with CellStates.open(os.path.join(directory, "part-00000-00000.h5")) as one:
        assert one["enc.c"].shape[0] == SHARDS[0]



def test_worker_refuses_a_hostile_model(flavour, tmp_path):
    keras, layers = flavour.keras, flavour.layers
    inputs = keras.Input(shape=(T, 2))
    seq = layers.Lambda(lambda t: t * 2.0, name="payload")(inputs)
    model = keras.Model(inputs, layers.LSTM(UNITS, name="enc")(seq))
    path = str(tmp_path / ("hostile.keras" if flavour.name == "keras3" else "hostile.h5"))
    model.save(path)
    np.save(tmp_path / "x.npy", np.zeros((3, T, 2), np.float32))
    with pytest.raises(UnsafeModelError, match=r"'payload' \(Lambda\).*--unsafe.*Received: .*hostile"):
        audit_on_beam(path, str(tmp_path / "x.npy"), runner=FnApiRunner())


def test_bad_data_patterns(tmp_path):
    with pytest.raises(DataError, match=r"pattern .*nothing-\*\.npz.* matches no file.*Received: --data"):
        ReadExamples(str(tmp_path / "nothing-*.npz"))
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(DataError, match=r"format of .*data\.csv"):
        ReadExamples(str(tmp_path / "data.csv"))
    with pytest.raises(InvalidArgumentError, match=r"Feature 'x' of the feature spec"):
        ReadExamples(str(tmp_path / "data.csv"), feature_spec={"x": {"dtype": "str"}})
    np.savez(tmp_path / "part.npz", tokens=np.ones((2, T), np.int32))
    with pytest.raises(DataError, match=r"part\.npz' has no label array \['depth'\].*holds \['tokens'\]"):
        with beam.Pipeline(runner=FnApiRunner()) as pipeline:
            _ = pipeline | ReadExamples(str(tmp_path / "part.npz"), labels=["depth"])


# --------------------------------------------------------------------------------------------
# Optional: nothing imports Beam unless asked to.
# --------------------------------------------------------------------------------------------


@pytest.mark.backend_independent(reason="imports in a fresh interpreter; no model runs")
def test_library_and_cli_do_not_import_beam():
    code = (
        "import sys, lstm_rewrite, lstm_rewrite.cli, lstm_rewrite.capture, lstm_rewrite.audit\n"
        "from lstm_rewrite.cli import build_parser\n"
        "build_parser().parse_args(['audit', 'm.keras', '--data', 'x.npz'])\n"
        "assert not [m for m in sys.modules if m.startswith('apache_beam')], 'beam imported'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# Keras 3 only: the CLI does not depend on the flavour.
@pytest.mark.parametrize("flavour", ["keras3"], indirect=True)
def test_cli_audit_and_states_on_beam(corpus, tmp_path, flavour, capsys):
    from lstm_rewrite.cli import main

    path, pattern, x, depth = corpus
    out = str(tmp_path / "audit")
    assert main(["audit", path, "--data", pattern, "--beam", "--label-keys", "depth", "--out", out,
                 "--batch-size", "1", "--quiet"]) == 0
    written = json.load(open(os.path.join(out, "report.json")))
    local = audit(load_model(path), x, labels={"depth": depth}, progress=False, batch_size=1)
    assert written["sequences"] == len(x)
    assert_same_numbers(written["layers"]["enc"]["stats"], json.loads(json.dumps(local.to_dict()))["layers"]["enc"]["stats"])
    index = str(tmp_path / "states.h5")
    assert main(["states", path, "--data", pattern, "--beam", "-o", index, "--states", "c,h", "--",
                 "--direct_num_workers=1"]) == 0
    assert "wrote" in capsys.readouterr().out
    with CellStates.open(index) as cs:
        assert cs["enc.h"].shape == (len(x), T, UNITS)
    assert main(["audit", path, "--data", str(tmp_path / "none-*.npz"), "--beam", "--out", out]) == 2
    assert "matches no file" in capsys.readouterr().err
    assert main(["audit", path, "--data", pattern, "--", "--runner=DataflowRunner"]) == 2
    assert "--beam" in capsys.readouterr().err
    assert main(["audit", path, "--data", pattern, "--beam", "--labels", "depth.npy"]) == 2
    assert "--label-keys" in capsys.readouterr().err
