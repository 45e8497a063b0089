"""sequence_model.py: the bidirectional GRU that reads a study's slice features as one sequence."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_cspine.errors import CSpineDataError
from keras_cspine.stage1.sequence_model import (
    SequenceConfig,
    apply_sequence_model,
    build_sequence_model,
    feature_model,
    fit_sequence_model,
    load_sequence_model,
    pad_studies,
)

SMALL = SequenceConfig(projection=16, units=16, noise=0.0, dropout=0.0)


def counting_studies(n_studies: int, seed: int, levels: int = 4, dim: int = 3):
    """Studies whose slices all look alike except the first slice of each level, which carries a
    marker: a slice's level cannot be told from its own features, only by counting the markers
    above it, which is what reading the study as a sequence is for."""
    rng = np.random.default_rng(seed)
    features, labels, ids, order = [], [], [], []
    for s in range(n_studies):
        lengths = rng.integers(3, 7, levels)
        n = int(lengths.sum())
        f = rng.normal(0.0, 0.1, (n, dim)).astype(np.float32)
        y = np.zeros((n, levels), np.float32)
        start = 0
        for k, length in enumerate(lengths):
            f[start, 0] += 1.0
            y[start : start + length, k] = 1.0
            start += length
        perm = rng.permutation(n)  # rows in any order, as prepare indexes may come
        features.append(f[perm])
        labels.append(y[perm])
        ids += [f"study{s}"] * n
        order.append(perm)
    return np.concatenate(features), np.concatenate(labels), np.array(ids), np.concatenate(order)


def test_pad_studies_groups_rows_in_series_order():
    features = np.arange(10, dtype=np.float32).reshape(5, 2)
    ids = ["b", "a", "b", "a", "b"]
    order = [2, 1, 0, 0, 1]
    labels = np.eye(5, 7, dtype=np.float32)
    batch = pad_studies(features, ids, order, labels)
    assert batch.studies == ["b", "a"]
    assert [r.tolist() for r in batch.rows] == [[2, 4, 0], [3, 1]]
    assert batch.features.shape == (2, 3, 2) and batch.mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    np.testing.assert_array_equal(batch.features[1, :2], features[[3, 1]])
    np.testing.assert_array_equal(batch.features[1, 2], 0.0)
    np.testing.assert_array_equal(batch.labels[0], labels[[2, 4, 0]])
    with pytest.raises(ValueError, match="one study id"):
        pad_studies(features, ids[:4], order)
    with pytest.raises(ValueError, match="labels"):
        pad_studies(features, ids, order, labels[:3])


def test_a_study_reads_the_same_alone_or_padded_beside_a_longer_one():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(30, 5)).astype(np.float32)
    ids = ["short"] * 10 + ["long"] * 20
    order = list(range(10)) + list(range(20))
    model = build_sequence_model(5, SMALL)
    both = apply_sequence_model(model, features, ids, order)
    alone = apply_sequence_model(model, features[:10], ids[:10], order[:10])
    np.testing.assert_allclose(both[:10], alone, atol=1e-5)
    assert both.shape == (30, 7) and ((both > 0) & (both < 1)).all()
    # the GRU is bidirectional: a change on the last slice reaches the first one
    changed = features[:10].copy()
    changed[-1] += 3.0
    assert not np.allclose(apply_sequence_model(model, changed, ids[:10], order[:10])[0], alone[0])


@pytest.mark.slow
def test_it_learns_what_no_single_slice_shows():
    features, labels, ids, order = counting_studies(48, seed=1)
    train = pad_studies(features, ids, order, labels)
    f_val, y_val, ids_val, order_val = counting_studies(16, seed=2)
    val = pad_studies(f_val, ids_val, order_val, y_val)
    config = SequenceConfig(projection=16, units=16, noise=0.0, dropout=0.0, epochs=80,
                            patience=15, learning_rate=1e-2)  # fmt: skip
    model, history = fit_sequence_model(train, val, config, seed=0)
    assert history["val_loss"][-1] < history["val_loss"][0]
    f_test, y_test, ids_test, order_test = counting_studies(16, seed=3)
    predicted = apply_sequence_model(model, f_test, ids_test, order_test) > 0.5
    exact = (predicted == (y_test > 0.5)).all(axis=1).mean()
    # a per-slice model can only guess the level of an unmarked slice (about 1 in 4)
    assert exact > 0.9


@pytest.mark.slow
def test_fit_normalises_with_the_training_slices_and_saves(tmp_path):
    features, labels, ids, order = counting_studies(6, seed=4)
    features = features * 50.0 + 7.0
    train = pad_studies(features, ids, order, labels)
    model, history = fit_sequence_model(train, None, SequenceConfig(projection=8, units=8,
                                                                    epochs=2), seed=0)  # fmt: skip
    assert len(history["loss"]) == 2 and "val_loss" not in history
    norm = model.get_layer("normalise")
    np.testing.assert_allclose(np.ravel(norm.mean), features.mean(axis=0), rtol=1e-4)
    np.testing.assert_allclose(np.ravel(norm.variance), features.var(axis=0), rtol=1e-3)
    path = tmp_path / "sequence_model.keras"
    model.save(path)
    again = load_sequence_model(path)
    np.testing.assert_allclose(apply_sequence_model(again, features, ids, order),
                               apply_sequence_model(model, features, ids, order), atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="labelled"):
        fit_sequence_model(pad_studies(features, ids, order), None)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(CSpineDataError, match="not found") as err:
        load_sequence_model(tmp_path / "missing.keras")
    assert "missing.keras" in str(err.value)
    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(CSpineDataError, match="not a loadable Keras model"):
        load_sequence_model(garbage)
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    other.save(tmp_path / "other.keras")
    with pytest.raises(CSpineDataError, match="not a study sequence model"):
        load_sequence_model(tmp_path / "other.keras")


def test_feature_model_gives_the_input_of_the_output_layer():
    image = keras.Input((8,), name="image")
    hidden = keras.layers.Dense(5, activation="relu", name="hidden")(image)
    out = keras.layers.Dense(7, activation="sigmoid", name="vertebrae")(hidden)
    classifier = keras.Model({"image": image}, out)
    x = {"image": np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)}
    features, probabilities = feature_model(classifier).predict(x, verbose=0)
    hidden_only = keras.Model(classifier.input, classifier.get_layer("hidden").output)
    np.testing.assert_allclose(features, hidden_only.predict(x, verbose=0), atol=1e-6)
    np.testing.assert_allclose(probabilities, classifier.predict(x, verbose=0), atol=1e-6)
    merged = keras.layers.Add(name="vertebrae")([hidden, hidden])
    with pytest.raises(ValueError, match="several inputs"):
        feature_model(keras.Model({"image": image}, merged))


@pytest.mark.parametrize("changes, fragment", [
    ({"units": 0}, "units"), ({"epochs": 1.5}, "epochs"), ({"dropout": 1.0}, "dropout"),
    ({"noise": -0.1}, "noise"), ({"learning_rate": 0.0}, "learning_rate"),
    ({"patience": -1}, "patience"),
])  # fmt: skip
def test_config_rejects_bad_values(changes, fragment):
    with pytest.raises(ValueError, match=fragment):
        SequenceConfig(**changes)


def test_studies_padded_to_a_bucket_read_as_unpadded():
    """``apply_sequence_model`` pads each study to a multiple of ``LENGTH_BUCKET`` slices (few
    traced graphs for many study lengths): the mask keeps the result that of the study alone."""
    import keras

    from keras_cspine.stage1.sequence_model import (
        LENGTH_BUCKET,
        apply_sequence_model,
        build_sequence_model,
    )

    keras.utils.set_random_seed(0)
    model = build_sequence_model(6)
    rng = np.random.default_rng(0)
    n = LENGTH_BUCKET + 5  # padded to 2 buckets
    features = rng.normal(size=(n, 6)).astype(np.float32)
    got = apply_sequence_model(model, features, np.zeros(n), np.arange(n))
    alone = np.asarray(model.predict({"features": features[None], "mask": np.ones((1, n), bool)},
                                     verbose=0))[0]  # fmt: skip
    np.testing.assert_allclose(got, alone, atol=1e-5)
