"""CSpineSequence: batches, unknown labels, study splits, seeded shuffling, augmentation, balance."""

import pickle

import numpy as np
import pandas as pd
import pytest
from helpers_stage1 import make_prepared, study_uid

from keras_cspine.errors import CSpineDataError
from keras_cspine.stage1.dataset import (
    Augmenter,
    CSpineSequence,
    EpochSync,
    resample,
    split_prepared,
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prep"), n_studies=4, n_slices=16, size=32)


def test_two_input_batches(prepared):
    seq = CSpineSequence(prepared, batch_size=5)
    x, y = seq[0]
    assert set(x) == {"image", "metadata"}
    assert x["image"].shape == (5, 32, 32, 3) and x["image"].dtype == np.float32
    assert x["metadata"].shape == (5, 2) and x["metadata"].dtype == np.float32
    assert y.shape == (5, 7) and y.dtype == np.float32  # F1Score wants float labels
    index = pd.read_csv(prepared / "index.csv").sort_values(["StudyInstanceUID", "series_index"])
    first = index.iloc[:5]
    np.testing.assert_allclose(x["metadata"][:, 0], first["position_mm"] / 100.0, rtol=1e-6)
    np.testing.assert_allclose(x["metadata"][:, 1], first["slice_ratio"], rtol=1e-6)
    np.testing.assert_array_equal(y, first[["C1", "C2", "C3", "C4", "C5", "C6", "C7"]])
    cache = np.load(prepared / "cache" / f"{first.iloc[0].StudyInstanceUID}.npy")
    np.testing.assert_array_equal(x["image"][0], cache[0].astype(np.float32))
    # the last batch is partial: 3 labelled studies x 16 slices = 48 = 9 * 5 + 3
    assert len(seq) == 10 and seq[9][1].shape == (3, 7)


def test_image_only_and_metadata_only(prepared):
    x, _ = CSpineSequence(prepared, batch_size=2, inputs="image", image_size=48)[0]
    assert set(x) == {"image"} and x["image"].shape == (2, 48, 48, 3)
    x, _ = CSpineSequence(prepared, batch_size=2, inputs="metadata")[0]
    assert set(x) == {"metadata"} and x["metadata"].shape == (2, 2)


def test_unknown_labels_skipped_and_kept_for_prediction(prepared):
    seq = CSpineSequence(prepared, batch_size=4)
    assert study_uid(3) not in seq.study_uids  # the unlabelled study
    assert seq.num_samples == 48 and (seq.labels >= 0).all()
    pred = CSpineSequence(prepared, batch_size=4, labels=False, drop_unknown=False)
    assert pred.num_samples == 64 and len(pred[0]) == 1
    with pytest.raises(ValueError, match="drop_unknown"):
        CSpineSequence(prepared, labels=True, drop_unknown=False)


def test_split_prepared_by_study(prepared):
    splits = split_prepared(prepared, val_fraction=0.34, seed=0)
    assert study_uid(3) not in sum(splits.values(), [])
    assert not set(splits["train"]) & set(splits["val"])
    train = CSpineSequence(prepared, splits["train"])
    val = CSpineSequence(prepared, splits["val"])
    assert not set(train.frame.StudyInstanceUID) & set(val.frame.StudyInstanceUID)
    assert train.num_samples + val.num_samples == 48


def test_seeded_shuffle_per_epoch(prepared):
    a = CSpineSequence(prepared, batch_size=8, shuffle=True, seed=3)
    b = CSpineSequence(prepared, batch_size=8, shuffle=True, seed=3)
    c = CSpineSequence(prepared, batch_size=8, shuffle=True, seed=4)
    first = a.order.copy()
    np.testing.assert_array_equal(first, b.order)
    assert not np.array_equal(first, c.order)
    assert sorted(first) == list(range(48))
    a.on_epoch_end()
    assert a.epoch == 1 and not np.array_equal(first, a.order)
    b.set_epoch(1)
    np.testing.assert_array_equal(a.order, b.order)
    np.testing.assert_array_equal(a[0][1], a.labels[a.order[:8]])
    plain = CSpineSequence(prepared, batch_size=8)
    np.testing.assert_array_equal(plain.order, np.arange(48))


def test_augmentation_is_seeded_and_keeps_anatomy():
    image = np.zeros((32, 32, 3), np.uint8)
    image[4:10, 4:10] = 200  # a marker in the top-left (anterior right of the patient)
    aug = Augmenter(max_rotation_deg=10, max_shift=0.05, max_zoom=0.05, contrast=0, brightness=0)
    out1 = aug(image, np.random.default_rng(0))
    out2 = aug(image, np.random.default_rng(0))
    np.testing.assert_array_equal(out1, out2)
    assert out1.dtype == np.float32 and out1.min() >= 0 and out1.max() <= 255
    for seed in range(30):  # never flipped: the marker stays in the top-left quadrant
        out = aug(image, np.random.default_rng(seed))[..., 0]
        ys, xs = np.nonzero(out > 100)
        assert ys.mean() < 12 and xs.mean() < 12
    assert not np.array_equal(out1, image.astype(np.float32))
    with pytest.raises(ValueError, match="max_rotation_deg"):
        Augmenter(max_rotation_deg=90)


def test_augmented_sequence_is_reproducible(prepared):
    kw = dict(batch_size=4, shuffle=True, augment=True, seed=1)
    a, b = CSpineSequence(prepared, **kw), CSpineSequence(prepared, **kw)
    np.testing.assert_array_equal(a[2][0]["image"], b[2][0]["image"])
    raw = CSpineSequence(prepared, batch_size=4, shuffle=True, seed=1)
    assert not np.array_equal(a[2][0]["image"], raw[2][0]["image"])


def test_resample_backends_agree():
    pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    kw = dict(angle=0.1, zoom=1.05, shift_y=0.03, shift_x=-0.02)
    fast, slow = resample(image, 32, **kw), resample(image, 32, backend="scipy", **kw)
    assert fast.shape == slow.shape == (32, 32, 3)
    assert np.abs(fast - slow)[2:-2, 2:-2].max() < 1.0  # same bilinear map (borders aside)


def test_resample_identity_and_resize():
    image = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    np.testing.assert_array_equal(resample(image, 16), image.astype(np.float32))
    big = resample(np.full((16, 16, 3), 100, np.uint8), 32)
    assert big.shape == (32, 32, 3) and np.allclose(big[4:28, 4:28], 100)


def test_balance_evens_out_label_combinations(prepared):
    plain = CSpineSequence(prepared, batch_size=8)
    balanced = CSpineSequence(prepared, batch_size=8, balance=True, seed=0)

    def spread(seq, order):
        keys = [tuple(row) for row in seq.labels[order].astype(int)]
        counts = pd.Series(keys).value_counts()
        return counts.max() / counts.min(), len(counts)

    ratio_plain, n_plain = spread(plain, plain.order)
    orders = np.concatenate([balanced._epoch_order(e) for e in range(20)])
    ratio_bal, n_bal = spread(balanced, orders)
    assert n_bal == n_plain
    assert ratio_bal < 1.5 < ratio_plain


def test_pickles_without_memory_maps(prepared):
    seq = CSpineSequence(prepared, batch_size=4, workers=2, use_multiprocessing=True)
    seq[0]
    assert seq.workers == 2 and seq.use_multiprocessing
    clone = pickle.loads(pickle.dumps(seq))
    assert "_caches" not in clone.__dict__
    np.testing.assert_array_equal(clone[1][0]["image"], seq[1][0]["image"])


def test_fit_with_threaded_workers_follows_keras_epochs(prepared):
    import keras

    seq = CSpineSequence(prepared, batch_size=8, inputs="metadata", shuffle=True, workers=2)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append((epoch, seq.order.copy()))

    inputs = keras.Input((2,), name="metadata")
    model = keras.Model({"metadata": inputs}, keras.layers.Dense(7, activation="sigmoid")(inputs))
    model.compile("adam", "binary_crossentropy")
    model.fit(seq, epochs=2, shuffle=False, verbose=0, callbacks=[EpochSync(seq), Record()])
    assert [e for e, _ in seen] == [0, 1]
    for epoch, order in seen:
        np.testing.assert_array_equal(order, seq._epoch_order(epoch))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"uids": ["1.2.3.999"]}, CSpineDataError, "unknown study"),
        ({"inputs": "pixels"}, ValueError, "inputs"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"image_size": 4}, ValueError, "image_size"),
        ({"metadata_columns": ("age",)}, CSpineDataError, "metadata column"),
        ({"augment": "yes"}, TypeError, "augment"),
    ],
)
def test_bad_arguments(prepared, kwargs, error, match):
    with pytest.raises(error, match=match):
        CSpineSequence(prepared, **kwargs)


def test_bad_cache_and_missing_index(tmp_path):
    root = make_prepared(tmp_path / "p", n_studies=2, unlabelled=0)
    np.save(root / "cache" / f"{study_uid(0)}.npy", np.zeros((3, 32, 32, 3), np.uint8))  # short
    seq = CSpineSequence(root, [study_uid(0)], batch_size=1)
    with pytest.raises(CSpineDataError, match=r"outside the 3 cached slices") as info:
        seq[5]
    assert study_uid(0) in str(info.value)
    np.save(root / "cache" / f"{study_uid(1)}.npy", np.zeros((16, 32, 32), np.uint8))
    with pytest.raises(CSpineDataError, match=r"\(Z, S, S, 3\)"):
        CSpineSequence(root, [study_uid(1)])
    with pytest.raises(CSpineDataError, match="index.csv"):
        CSpineSequence(tmp_path / "nowhere")
    with pytest.raises(CSpineDataError, match="no labelled study"):
        split_prepared(make_prepared(tmp_path / "q", n_studies=1, unlabelled=1))
