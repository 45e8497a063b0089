"""The study-level decoder of per-slice vertebra probabilities (keras_cspine.stage1.level_decoding)."""

import json

import numpy as np
import pytest

from keras_cspine.errors import CSpineDataError
from keras_cspine.stage1.level_decoding import LevelDecoder


def _study(runs):
    """A label sequence from ``[(levels, n_slices), ...]`` top to bottom."""
    rows = []
    for levels, n in runs:
        row = np.zeros(7, np.int8)
        row[[level - 1 for level in levels]] = 1
        rows += [row] * n
    return np.array(rows)


TRUTH = _study([((), 2), ((1,), 5), ((1, 2), 1), ((2,), 7), ((2, 3), 1), ((3,), 5), ((), 1),
                ((4,), 5), ((4, 5), 1), ((5,), 5), ((6,), 5), ((6, 7), 1), ((7,), 5), ((), 2)])
TRAIN = [TRUTH, TRUTH[3:], TRUTH[:-4], _study([((2,), 3), ((2, 3), 2), ((3,), 4), ((), 1),
                                               ((4,), 4), ((5,), 4)])]


def _noisy(truth, flips, seed=0, confidence=0.85):
    """Probabilities that agree with ``truth`` at ``confidence``, with some slices corrupted."""
    rng = np.random.default_rng(seed)
    p = np.where(truth == 1, confidence, 1 - confidence) + rng.uniform(-0.05, 0.05, truth.shape)
    for i, wrong in flips.items():  # a slice that the classifier got wrong, confidently
        p[i] = np.where(_study([(wrong, 1)])[0] == 1, 0.8, 0.1)
    return np.clip(p, 0, 1)


def test_isolated_errors_are_corrected_by_the_order_of_the_spine():
    flips = {4: (3,), 19: (1,), 29: (6,), 41: (2,)}  # C3 amid C1, C1 amid C3, C6 amid C5 ...
    p = _noisy(TRUTH, flips)
    assert ((p > 0.5) != TRUTH).any(axis=1).sum() == len(flips)
    decoder = LevelDecoder.fit(TRAIN, temperature=1.0)
    np.testing.assert_array_equal(decoder.viterbi(p), TRUTH)
    np.testing.assert_array_equal(decoder.decode(p) > 0.5, TRUTH == 1)


def test_a_vertebra_lasts_at_least_its_shortest_training_extent_in_mm():
    c4 = np.flatnonzero((TRUTH[:, 3] == 1) & (TRUTH.sum(axis=1) == 1))  # the 5 C4-only slices
    p = _noisy(TRUTH, {i: (5,) for i in c4[1:]})  # C4 seen on its first slice only, then "C5"
    with_prior = LevelDecoder.fit(TRAIN)
    without = LevelDecoder.fit(TRAIN, duration_quantile=0)
    assert with_prior.min_extent_mm[with_prior.keys.index(("set", 4))] == pytest.approx(4.6)
    assert not any(without.min_extent_mm)
    assert without.viterbi(p)[:, 3].sum() <= 2  # C4 stays a one-slice blip (+ the C4/C5 pair)
    assert with_prior.viterbi(p)[c4, 3].sum() >= 4  # at least 4.6 mm of C4 at 1 mm spacing
    # the prior is in millimetres: at a 2 mm spacing two slices already make 4.6 mm
    halved = _noisy(TRUTH[::2], {})
    assert with_prior.viterbi(halved, spacing_mm=2.0).shape == halved.shape
    owner = with_prior._chains(2.0)[0]
    assert (owner == with_prior.keys.index(("set", 4))).sum() == 2


def test_decoded_probabilities_are_posteriors_over_label_sets():
    decoder = LevelDecoder.fit(TRAIN)
    posterior = decoder.posterior(_noisy(TRUTH, {}))
    np.testing.assert_allclose(posterior.sum(axis=1), 1.0)
    smoothed = decoder.decode(_noisy(TRUTH, {}))
    assert smoothed.shape == TRUTH.shape and 0 <= smoothed.min() and smoothed.max() <= 1
    # at most two adjacent vertebrae carry weight on any slice of this spine
    assert (np.sort(smoothed, axis=1)[:, :-2] < 0.05).all()


def test_moves_up_the_spine_and_skipped_vertebrae_are_unlikely():
    decoder = LevelDecoder.fit(TRAIN, epsilon=1e-6)
    keys = list(decoder.keys)
    move = np.exp(decoder.log_transition)
    np.testing.assert_allclose(move.sum(axis=1), 1.0)
    c2, c3, c4, gap3 = (keys.index(k) for k in [("set", 2), ("set", 3), ("set", 4), ("empty", 3)])
    assert move[c3, c2] < 1e-5 and move[c2, c4] < 1e-5  # back up; past C3
    assert move[c3, gap3] > 0.05 and move[c3, c3] > 0.5  # seen in training; staying


def test_decode_studies_handles_interleaved_rows_in_any_order():
    decoder = LevelDecoder.fit(TRAIN)
    a, b = _noisy(TRUTH, {}, seed=1), _noisy(TRUTH[5:20], {}, seed=2)
    rows = [("a", i, p) for i, p in enumerate(a)] + [("b", i, p) for i, p in enumerate(b)]
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    ids, order, probs = zip(*rows)
    out = decoder.decode_studies(np.array(probs), ids, order)
    for uid, expected in (("a", decoder.decode(a)), ("b", decoder.decode(b))):
        mine = [(i, o) for (u, i, _), o in zip(rows, out) if u == uid]
        got = np.array([o for _, o in sorted(mine, key=lambda t: t[0])])
        np.testing.assert_allclose(got, expected)


def test_save_and_load_round_trip(tmp_path):
    decoder = LevelDecoder.fit(TRAIN, spacings_mm=[1.0, 1.0, 2.0, 1.5], temperature=1.5)
    path = decoder.save(tmp_path / "level_decoder.json")
    again = LevelDecoder.load(path)
    assert again.keys == decoder.keys and again.temperature == 1.5
    assert again.min_extent_mm == decoder.min_extent_mm
    p = _noisy(TRUTH, {7: (5,)})
    np.testing.assert_allclose(again.decode(p), decoder.decode(p))


@pytest.mark.parametrize(
    "content, match",
    [(None, "not found"), ("{", "not a level decoder"),
     ({"format": "other"}, "format"),
     ({"format": "keras_cspine.level_decoder/1", "keys": [["set", 1]], "log_start": [0, 0],
       "log_transition": [[0]]}, "shapes")],
)  # fmt: skip
def test_bad_decoder_files_name_the_file(tmp_path, content, match):
    path = tmp_path / "level_decoder.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(CSpineDataError, match=match) as info:
        LevelDecoder.load(path)
    assert str(path) in str(info.value)


def test_bad_inputs():
    with pytest.raises(ValueError, match="no labelled study"):
        LevelDecoder.fit([])
    with pytest.raises(ValueError, match="0 or 1"):
        LevelDecoder.fit([np.full((3, 7), -1)])
    decoder = LevelDecoder.fit(TRAIN)
    with pytest.raises(ValueError, match="within"):
        decoder.decode(np.full((2, 7), 1.5))
    with pytest.raises(ValueError, match="probabilities"):
        decoder.decode(np.zeros((2, 6)))
    assert decoder.decode(np.zeros((0, 7))).shape == (0, 7)
