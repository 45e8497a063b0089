"""Stage 1, beyond the paper: decode a study's per-slice vertebra probabilities as one sequence.

The paper's classifier (Section 3.2) labels every axial slice on its own. Along a study the truth
is far from arbitrary: going from head to feet the label sets follow the spine, C1, C1+C2, C2,
C2+C3 (or an empty disc slice), C3, ... C7, each vertebra in one unbroken run, never back up.
:class:`LevelDecoder` is a hidden Markov model over those label sets. Its states are the label
sets seen in training (an empty set is split by what lies above it: above C1, the disc after Ck,
below C7), its transition and start probabilities are counted on the training studies (smoothed,
and only moves down the spine are possible besides an ``epsilon``), and the per-slice sigmoid
outputs are the emissions (independent Bernoullis, optionally tempered). The forward-backward
posterior of each slice gives smoothed probabilities of C1..C7 that drop into every metric and
into the two-stage pipeline unchanged; :meth:`LevelDecoder.viterbi` gives the single best path.

Typical use::

    decoder = LevelDecoder.fit(train_label_sequences)        # one (n_slices, 7) array a study
    smoothed = decoder.decode(probabilities)                 # (n_slices, 7), series order
    decoder.save(run_dir / "level_decoder.json")

Series order (superior to inferior, ``series_index`` of the prepare index) is required: the
decoder reads slices in that direction.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keras_cspine.errors import CSpineDataError
from keras_cspine.utils import write_json

N_LEVELS = 7
FORMAT = "keras_cspine.level_decoder/1"
LEVEL_DECODER_FILE = "level_decoder.json"
"""Its file name in a stage 1 run directory."""


def _state_keys(labels: np.ndarray) -> list[tuple]:
    """The state of every slice of one study: ``("set", levels...)`` for a non-empty label set,
    ``("empty", k)`` for an empty one, k the lowest level seen above it (0: none yet)."""
    keys, deepest = [], 0
    for row in labels:
        levels = tuple(int(j) + 1 for j in np.flatnonzero(row))
        if levels:
            keys.append(("set", *levels))
            deepest = max(deepest, levels[-1])
        else:
            keys.append(("empty", deepest))
    return keys


def _rank(key: tuple) -> float:
    """Position of a state down the spine (C1 = 1 ... C7 = 7; an empty state sits half a level
    below the last vertebra above it)."""
    if key[0] == "empty":
        return key[1] + 0.5
    return (key[1] + key[-1]) / 2


def _all_keys() -> list[tuple]:
    """Every single level, adjacent pair and empty state, so an unseen one still decodes."""
    keys = [("empty", k) for k in range(N_LEVELS + 1)]
    keys += [("set", k) for k in range(1, N_LEVELS + 1)]
    keys += [("set", k, k + 1) for k in range(1, N_LEVELS)]
    return keys


def _check_labels(labels, where: str) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 2 or array.shape[1] != N_LEVELS:
        raise ValueError(f"{where}: expected (n_slices, {N_LEVELS}) labels, got {array.shape}")
    if array.size and not np.isin(array, (0, 1)).all():
        raise ValueError(f"{where}: labels must be 0 or 1 (unknown labels cannot train a decoder)")
    return array.astype(np.int8)


@dataclass(frozen=True)
class LevelDecoder:
    """A fitted label-set HMM (see the module docstring).

    Attributes:
        states: ``(S, 7)`` 0/1 label vector of every state.
        keys: the state keys (``("set", 3, 4)``, ``("empty", 7)`` ...), for reading and saving.
        log_start: ``(S,)`` log probability of the first slice's state.
        log_transition: ``(S, S)`` log probability of moving from state i to state j.
        temperature: the emission log likelihoods are divided by it (> 1 trusts the
            classifier less, relative to the sequence prior).
    """

    states: np.ndarray
    keys: tuple
    log_start: np.ndarray
    log_transition: np.ndarray
    temperature: float = 1.0

    @classmethod
    def fit(cls, label_sequences: Iterable, alpha: float = 0.5, epsilon: float = 1e-6,
            temperature: float = 1.0) -> LevelDecoder:  # fmt: skip
        """Count starts and transitions on training studies.

        Args:
            label_sequences: one ``(n_slices, 7)`` 0/1 array per study, in series order.
            alpha: pseudo-count added to every start and to every transition that stays or
                moves down the spine without passing a whole vertebra, so that rare moves
                remain possible.
            epsilon: probability of any other move (back up the spine, or past a vertebra):
                not impossible, only very unlikely (real labels can flicker at an irregular
                border, and a short scan can start below C1).
            temperature: emission temperature (> 0); above 1 trusts the classifier less.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        sequences = [_check_labels(s, f"study {i}") for i, s in enumerate(label_sequences)]
        sequences = [s for s in sequences if len(s)]
        if not sequences:
            raise ValueError("no labelled study to fit the level decoder on")
        study_keys = [_state_keys(s) for s in sequences]
        keys = sorted({k for ks in study_keys for k in ks} | set(_all_keys()), key=_rank)
        index = {k: i for i, k in enumerate(keys)}
        n = len(keys)
        start = np.full(n, alpha)
        counts = np.zeros((n, n))
        for ks in study_keys:
            start[index[ks[0]]] += 1
            for a, b in zip(ks[:-1], ks[1:]):
                counts[index[a], index[b]] += 1
        ranks = np.array([_rank(k) for k in keys])
        # a move may stay or go down the spine, but never past a whole vertebra
        forward = ranks[None, :] >= ranks[:, None]
        for level in range(1, N_LEVELS + 1):
            forward &= ~((ranks[:, None] < level) & (ranks[None, :] > level))
        counts += alpha * forward
        transition = counts / counts.sum(axis=1, keepdims=True)
        transition = np.where(forward, transition, 0.0) + np.where(forward, 0.0, epsilon)
        transition /= transition.sum(axis=1, keepdims=True)
        states = np.zeros((n, N_LEVELS), np.int8)
        for i, key in enumerate(keys):
            if key[0] == "set":
                states[i, [level - 1 for level in key[1:]]] = 1
        return cls(states, tuple(keys), np.log(start / start.sum()), np.log(transition),
                   float(temperature))  # fmt: skip

    # -- inference ---------------------------------------------------------------------------
    def _log_emissions(self, probabilities) -> np.ndarray:
        p = np.asarray(probabilities, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != N_LEVELS:
            raise ValueError(f"expected (n_slices, {N_LEVELS}) probabilities, got {p.shape}")
        if p.size and (not np.isfinite(p).all() or p.min() < 0 or p.max() > 1):
            raise ValueError("probabilities must be finite and within [0, 1]")
        p = np.clip(p, 1e-6, 1 - 1e-6)
        log_p, log_q = np.log(p), np.log1p(-p)
        s = self.states.astype(np.float64)
        return (log_p @ s.T + log_q @ (1 - s).T) / self.temperature

    def posterior(self, probabilities) -> np.ndarray:
        """``(n_slices, S)`` posterior of every state (forward-backward, in log space)."""
        from scipy.special import logsumexp

        emissions = self._log_emissions(probabilities)
        n = len(emissions)
        if n == 0:
            return np.zeros((0, len(self.keys)))
        forward = np.empty_like(emissions)
        backward = np.zeros_like(emissions)
        forward[0] = self.log_start + emissions[0]
        for i in range(1, n):
            forward[i] = emissions[i] + logsumexp(forward[i - 1][:, None] + self.log_transition,
                                                  axis=0)  # fmt: skip
        for i in range(n - 2, -1, -1):
            backward[i] = logsumexp(self.log_transition + (emissions[i + 1] + backward[i + 1]),
                                    axis=1)  # fmt: skip
        joint = forward + backward
        return np.exp(joint - logsumexp(joint, axis=1, keepdims=True))

    def decode(self, probabilities) -> np.ndarray:
        """Smoothed ``(n_slices, 7)`` probabilities of C1..C7 for one study in series order."""
        return np.clip(self.posterior(probabilities) @ self.states.astype(np.float64), 0.0, 1.0)

    def viterbi(self, probabilities) -> np.ndarray:
        """The most likely ``(n_slices, 7)`` 0/1 label sequence of one study."""
        emissions = self._log_emissions(probabilities)
        n = len(emissions)
        if n == 0:
            return np.zeros((0, N_LEVELS), np.int8)
        score = self.log_start + emissions[0]
        back = np.zeros((n, len(self.keys)), np.intp)
        for i in range(1, n):
            candidates = score[:, None] + self.log_transition
            back[i] = candidates.argmax(axis=0)
            score = candidates.max(axis=0) + emissions[i]
        path = np.empty(n, np.intp)
        path[-1] = int(score.argmax())
        for i in range(n - 1, 0, -1):
            path[i - 1] = back[i, path[i]]
        return self.states[path].copy()

    def decode_studies(self, probabilities, study_ids: Sequence, order: Sequence) -> np.ndarray:
        """:meth:`decode` applied study by study to rows in any order.

        Args:
            probabilities: ``(n_rows, 7)``.
            study_ids: the study of every row.
            order: the series index of every row (superior to inferior within a study).
        """
        p = np.asarray(probabilities, dtype=np.float64)
        ids, order = np.asarray(study_ids), np.asarray(order)
        if not (len(p) == len(ids) == len(order)):
            raise ValueError("probabilities, study_ids and order must have the same length")
        out = np.empty_like(p)
        for uid in dict.fromkeys(ids.tolist()):
            rows = np.flatnonzero(ids == uid)
            rows = rows[np.argsort(order[rows], kind="stable")]
            out[rows] = self.decode(p[rows])
        return out

    # -- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "temperature": self.temperature,
            "keys": [list(k) for k in self.keys],
            "log_start": self.log_start.tolist(), "log_transition": self.log_transition.tolist(),
        }  # fmt: skip

    def save(self, path: str | os.PathLike) -> Path:
        """Write the decoder as JSON (atomically); returns the path."""
        write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LevelDecoder:
        """Read a decoder written by :meth:`save`; a bad file raises ``CSpineDataError``."""
        path = Path(path)
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
            keys = tuple(tuple(k) for k in data["keys"])
            log_start = np.asarray(data["log_start"], dtype=np.float64)
            log_transition = np.asarray(data["log_transition"], dtype=np.float64)
            if log_start.shape != (len(keys),) or log_transition.shape != (len(keys),) * 2:
                raise ValueError("start/transition shapes do not match the states")
        except FileNotFoundError:
            raise CSpineDataError(path, "level decoder file not found") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CSpineDataError(path, f"not a level decoder: {error}") from error
        states = np.zeros((len(keys), N_LEVELS), np.int8)
        for i, key in enumerate(keys):
            if key[0] == "set":
                states[i, [int(level) - 1 for level in key[1:]]] = 1
        return cls(states, keys, log_start, log_transition, float(data.get("temperature", 1.0)))


def fit_from_prepared(prepared: str | os.PathLike, study_uids: Sequence[str],
                      **kwargs) -> LevelDecoder:  # fmt: skip
    """:meth:`LevelDecoder.fit` on the labelled studies ``study_uids`` of a prepare folder (the
    training split of a run), each in series order."""
    from keras_cspine.io.rsna import VERTEBRAE
    from keras_cspine.prepare import load_index

    index = load_index(prepared)
    rows = index[index["StudyInstanceUID"].isin(set(study_uids)) & (index["labels_known"] == 1)]
    rows = rows.sort_values(["StudyInstanceUID", "series_index"], kind="stable")
    sequences = [group[list(VERTEBRAE)].to_numpy() for _, group in
                 rows.groupby("StudyInstanceUID", sort=False)]  # fmt: skip
    if not sequences:
        raise CSpineDataError(prepared, "none of the studies has labels to fit a level decoder")
    return LevelDecoder.fit(sequences, **kwargs)
