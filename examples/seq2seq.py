"""A seq2seq encoder-decoder (Keras 3): expose the encoder's and the decoder's cell states.

The decoder starts from the encoder's final (h, c) through ``initial_state``; the traced model
shows how the decoder's cell state moves away from what the encoder handed over.

    python examples/seq2seq.py [--flavour keras3|tfkeras]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np


def build(keras, vocab=20, units=16):
    layers = keras.layers
    source = keras.Input((None,), dtype="int32", name="source")
    target = keras.Input((None,), dtype="int32", name="target")
    embedded_source = layers.Embedding(vocab, 8, mask_zero=True, name="source_embedding")(source)
    embedded_target = layers.Embedding(vocab, 8, mask_zero=True, name="target_embedding")(target)
    _, h, c = layers.LSTM(units, return_state=True, name="encoder")(embedded_source)
    decoded = layers.LSTM(units, return_sequences=True, name="decoder")(embedded_target, initial_state=[h, c])
    logits = layers.Dense(vocab, activation="softmax", name="next_token")(decoded)
    return keras.Model([source, target], logits, name="seq2seq")


def copy_task(rng, n=256, length=8, vocab=20):
    """Reverse a sequence of tokens: the decoder must read what the encoder stored in c."""
    source = rng.integers(2, vocab, size=(n, length)).astype("int32")
    answer = source[:, ::-1]
    target_in = np.concatenate([np.ones((n, 1), "int32"), answer[:, :-1]], axis=1)  # 1 = start token
    return source, target_in, answer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavour", choices=["keras3", "tfkeras"], default="keras3")
    args = parser.parse_args(argv)
    import lstm_rewrite.backends as backends
    from lstm_rewrite import expose_cell_states

    keras = backends.keras_module(args.flavour)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    model = build(keras)
    model.compile("adam", "sparse_categorical_crossentropy")
    source, target_in, answer = copy_task(rng)
    model.fit([source, target_in], answer, epochs=3, batch_size=32, verbose=0)

    traced = expose_cell_states(model, states=("c", "h"))
    print("traced outputs:", traced.output_names)
    print(traced.rewrite_record.verification)
    outputs = dict(zip(traced.output_names, traced.predict([source[:4], target_in[:4]], verbose=0)))
    encoder_c, decoder_c = outputs["encoder.c"], outputs["decoder.c"]
    print(f"encoder.c {encoder_c.shape}, decoder.c {decoder_c.shape}")
    handed_over = encoder_c[:, -1]
    drift = np.linalg.norm(decoder_c - handed_over[:, None, :], axis=-1).mean(axis=0)
    print("mean distance of the decoder's c from the encoder's final c, per decoder step:")
    print("  " + " ".join(f"{d:.2f}" for d in drift))


if __name__ == "__main__":
    main()
