"""Shared pieces of the benchmark scripts: grid, model builders, the baselines users write today, timing.

Timing convention (used by every script here): a *compiled call*, ``tf.function`` over
``model(x, training=False)`` with a fixed input signature (on JAX, ``jax.jit`` over the model's
``stateless_call``), traced once before timing, each output converted to NumPy inside the timed
region. It is what ``lstm_rewrite.capture`` runs, and it leaves
out ``model.predict``'s per-call set-up (data adapter, callbacks), which would otherwise dilute the
ratios. ``--call predict_on_batch`` switches every model to ``model.predict_on_batch``.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

# name -> (batch, time, features, units)
SIZES = {
    "small": (256, 50, 16, 32),
    "medium": (64, 100, 32, 128),
    "large": (32, 200, 64, 256),
    "xlarge": (16, 500, 128, 512),
}
QUICK_SIZES = ("small", "medium")
KINDS = ("lstm", "stacked", "bidirectional", "masked")
FLAVOURS = ("keras3", "tfkeras")
ALL_STATES = ("c", "h", "gates")


def keras_of(flavour: str):
    """The ``keras`` (Keras 3) or ``tf_keras`` module."""
    if flavour == "keras3":
        import keras
    else:
        import tf_keras as keras
    return keras


def machine_info() -> dict:
    """CPU model, core count, load, GPU and library versions: the context every figure needs."""
    import tensorflow as tf

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "gpus": [],
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
    }
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        info["gpus"].append(details.get("device_name", gpu.name))
    for flavour in FLAVOURS:
        try:
            info[flavour] = keras_of(flavour).__version__
        except ImportError:
            info[flavour] = None
    return info


def make_data(flavour_seed: int, batch: int, time_steps: int, features: int, masked: bool) -> np.ndarray:
    """Standard normal inputs; masked data has trailing zero padding (lengths T/2..T) per sample."""
    rng = np.random.default_rng(flavour_seed)
    x = rng.standard_normal((batch, time_steps, features)).astype("float32")
    if masked:
        lengths = rng.integers(time_steps // 2, time_steps + 1, size=batch)
        for b, length in enumerate(lengths):
            x[b, length:] = 0.0
    return x


def build_model(keras, kind: str, time_steps: int, features: int, units: int):
    """One of the benchmark models: "lstm", "stacked" (two LSTMs), "bidirectional", "masked"."""
    layers = keras.layers
    inputs = keras.Input((time_steps, features), name="x")
    if kind == "lstm":
        out = layers.LSTM(units, return_sequences=True, name="lstm")(inputs)
    elif kind == "stacked":
        first = layers.LSTM(units, return_sequences=True, name="lstm1")(inputs)
        out = layers.LSTM(units, return_sequences=True, name="lstm2")(first)
    elif kind == "bidirectional":
        out = layers.Bidirectional(layers.LSTM(units, return_sequences=True), name="bi")(inputs)
    elif kind == "masked":
        masked = layers.Masking(0.0, name="masking")(inputs)
        out = layers.LSTM(units, return_sequences=True, name="lstm")(masked)
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    return keras.Model(inputs, out, name=f"bench_{kind}")


def concat_rnn_model(keras, lstm, time_steps: int, features: int):
    """The hand-written baseline: ``RNN`` over an LSTMCell subclass whose output is concat([h, c])."""
    layers = keras.layers
    units = int(lstm.units)
    tf = _tf()

    class ConcatCell(layers.LSTMCell):
        def __init__(self, units, **kwargs):
            super().__init__(units, **kwargs)
            self.output_size = 2 * units

        def call(self, inputs, states, training=False):
            h, (_, c) = super().call(inputs, states, training=training)
            return tf.concat([h, c], axis=-1), [h, c]

    inputs = keras.Input((time_steps, features))
    rnn = layers.RNN(ConcatCell(units), return_sequences=True, name="concat_rnn")
    seq = rnn(inputs)
    model = keras.Model(inputs, [seq[..., :units], seq[..., units:]], name="concat_rnn")
    rnn.set_weights(lstm.get_weights())
    return model


def _tf():
    import tensorflow as tf

    return tf


def loop_cell_runner(keras, lstm):
    """The other baseline: the LSTM's cell called step by step in an eager Python loop.

    Returns ``run(x) -> (h sequence, c sequence)`` as NumPy arrays.
    """
    tf = _tf()
    cell = lstm.cell

    def run(x):
        x = tf.convert_to_tensor(x)
        h = tf.zeros((x.shape[0], int(lstm.units)), x.dtype)
        c = tf.zeros_like(h)
        hs, cs = [], []
        for t in range(x.shape[1]):
            h, (h, c) = cell(x[:, t], [h, c])
            hs.append(h)
            cs.append(c)
        return np.stack([np.asarray(v) for v in hs], 1), np.stack([np.asarray(v) for v in cs], 1)

    return run


def compiled_runner(model, x, call: str = "compiled"):
    """``run() -> [numpy outputs]`` for ``model`` on ``x`` (see the module docstring), warmed up."""
    if call == "predict_on_batch":
        def run():
            out = model.predict_on_batch(x)
            return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]
    elif on_jax(model):
        import jax

        fn, tensor = jax_forward(model), jax.numpy.asarray(x)

        def run():
            out = fn(tensor)
            return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]
    else:
        tf = _tf()
        fn = tf.function(lambda t: model(t, training=False), input_signature=[tf.TensorSpec(x.shape, x.dtype)])
        tensor = tf.constant(x)

        def run():
            out = fn(tensor)
            return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]
    run()
    return run


def on_jax(model) -> bool:
    """Whether ``model`` is a Keras 3 model on the JAX backend."""
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(model, keras.Model) and keras.backend.backend() == "jax"


def jax_forward(model):
    """JAX's compiled call, ``f(x) -> outputs``: the jitted stateless forward pass (JAX has no
    tf.function), retraced only for a new shape."""
    import jax

    fn = jax.jit(lambda trainable, other, t: model.stateless_call(trainable, other, t, training=False)[0])
    # The values are read at each call: Keras's JAX predict donates them, deleting the arrays.
    return lambda t: fn([v.value for v in model.trainable_variables],
                        [v.value for v in model.non_trainable_variables], t)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired_timings(baseline, variants: dict, repeats: int) -> dict:
    """Time each variant right after a run of ``baseline``, ``repeats`` rounds, interleaved.

    Returns {name: {"median_s", "baseline_median_s", "ratio" (median of per-pair ratios), "ratios",
    "times"}}; pairing each run with the baseline run just before it cancels machine noise that
    drifts slower than a pair.
    """
    times = {name: [] for name in variants}
    base = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            base[name].append(timed(baseline))
            times[name].append(timed(fn))
    result = {}
    for name in variants:
        ratios = [t / b for t, b in zip(times[name], base[name])]
        result[name] = {
            "median_s": statistics.median(times[name]),
            "baseline_median_s": statistics.median(base[name]),
            "ratio": statistics.median(ratios),
            "ratios": ratios,
            "times": times[name],
        }
    return result
