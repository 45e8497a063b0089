"""Stage 1, beyond the paper: decode a study's per-slice vertebra probabilities as one sequence.

The paper's classifier (Section 2.5) labels every axial slice on its own. Along a study the truth
is far from arbitrary: going from head to feet the label sets follow the spine, C1, C1+C2, C2,
C2+C3 (or an empty disc slice), C3, ... C7, each vertebra in one unbroken run, never back up,
and each at least some millimetres tall. :class:`LevelDecoder` is a hidden Markov model over those
label sets. Its states are the label sets seen in training (an empty set is split by what lies
above it: above C1, the disc after Ck, below C7), its transition and start probabilities are
counted on the training studies (smoothed, and only moves down the spine are possible besides an
``epsilon``), a duration prior makes each single vertebra last at least a low percentile of its
extent in training (in mm: a chain of sub-states, so it follows each study's slice spacing), and
the per-slice sigmoid outputs are the emissions (independent Bernoullis, tempered). The
forward-backward posterior of each slice gives smoothed probabilities of C1..C7 that drop into
every metric and into the two-stage pipeline unchanged; :meth:`LevelDecoder.viterbi` gives the
single best path.

Typical use::

    decoder = LevelDecoder.fit(train_label_sequences, spacings_mm)  # one (n_slices, 7) a study
    smoothed = decoder.decode(probabilities, spacing_mm)     # (n_slices, 7), series order
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


def _runs(keys: Sequence[tuple]) -> list[tuple[tuple, int, int]]:
    """``(key, first, last)`` of every run of equal consecutive keys."""
    out, first = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[first]:
            out.append((keys[first], first, i - 1))
            first = i
    return out


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


def _label_vectors(keys: Sequence[tuple]) -> np.ndarray:
    """``(S, 7)`` 0/1 label vector of every state key."""
    states = np.zeros((len(keys), N_LEVELS), np.int8)
    for i, key in enumerate(keys):
        if key[0] == "set":
            states[i, [int(level) - 1 for level in key[1:]]] = 1
    return states


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
        min_extent_mm: per state, the least extent (mm) of a run of it (0: no duration prior).
    """

    states: np.ndarray
    keys: tuple
    log_start: np.ndarray
    log_transition: np.ndarray
    temperature: float = 2.0
    min_extent_mm: tuple = ()

    @classmethod
    def fit(cls, label_sequences: Iterable, spacings_mm: Sequence[float] | None = None,
            alpha: float = 0.5, epsilon: float = 1e-6, temperature: float = 2.0,
            duration_quantile: float = 20.0) -> LevelDecoder:  # fmt: skip
        """Count starts, transitions and vertebra extents on training studies.

        Args:
            label_sequences: one ``(n_slices, 7)`` 0/1 array per study, in series order.
            spacings_mm: the slice spacing of each study (default 1, durations in slices).
            alpha: pseudo-count added to every start and to every transition that stays or
                moves down the spine without passing a whole vertebra, so that rare moves
                remain possible.
            epsilon: probability of any other move (back up the spine, or past a vertebra):
                not impossible, only very unlikely (real labels can flicker at an irregular
                border, and a short scan can start below C1).
            temperature: emission temperature (> 0); above 1 trusts the classifier less
                relative to the sequence prior (2 did best on the synthetic studies).
            duration_quantile: a single vertebra's run lasts at least this percentile of its
                complete runs in training (in mm, so studies of other spacings decode too);
                0 switches the duration prior off.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if not 0 <= duration_quantile <= 100:
            raise ValueError(f"duration_quantile must be in [0, 100], got {duration_quantile!r}")
        pairs = [(_check_labels(s, f"study {i}"), 1.0 if spacings_mm is None else
                  float(spacings_mm[i])) for i, s in enumerate(label_sequences)]  # fmt: skip
        pairs = [(s, spacing) for s, spacing in pairs if len(s)]
        if not pairs:
            raise ValueError("no labelled study to fit the level decoder on")
        if any(not spacing > 0 for _, spacing in pairs):
            raise ValueError("slice spacings must be > 0")
        sequences = [s for s, _ in pairs]
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
        states = _label_vectors(keys)
        extents: dict[tuple, list[float]] = {k: [] for k in keys}
        for ks, (_, spacing) in zip(study_keys, pairs):
            for key, first, last in _runs(ks):
                if first > 0 and last < len(ks) - 1:  # complete: bounded on both sides
                    extents[key].append((last - first + 1) * spacing)
        min_extent = tuple(
            float(np.percentile(extents[k], duration_quantile))
            if duration_quantile and k[0] == "set" and len(k) == 2 and extents[k] else 0.0
            for k in keys
        )  # fmt: skip
        return cls(states, tuple(keys), np.log(start / start.sum()), np.log(transition),
                   float(temperature), min_extent)  # fmt: skip

    # -- the duration prior: each single vertebra state becomes a chain of sub-states --------
    def _chains(self, spacing_mm: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                        np.ndarray]:  # fmt: skip
        """``(owner, states, log_start, log_transition)`` of the expanded model: state i becomes
        ``m_i = max(1, floor(min_extent_i / spacing))`` sub-states passed through in order (at
        least ``m_i`` slices), the last one keeping the state's own moves."""
        spacing = 1.0 if spacing_mm is None else float(spacing_mm)
        if not spacing > 0:
            raise ValueError(f"slice spacing must be > 0, got {spacing_mm!r}")
        extents = self.min_extent_mm or (0.0,) * len(self.keys)
        lengths = [max(1, int(np.floor(e / spacing + 1e-9))) for e in extents]
        owner = np.repeat(np.arange(len(self.keys)), lengths)
        first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        last = first + np.asarray(lengths) - 1
        n = len(owner)
        log_transition = np.full((n, n), -np.inf)
        for i in range(len(self.keys)):
            for step in range(first[i], last[i]):  # forced progress along the chain
                log_transition[step, step + 1] = 0.0
            log_transition[last[i], first] = self.log_transition[i]
            log_transition[last[i], first[i]] = -np.inf  # staying is staying at the end...
            log_transition[last[i], last[i]] = self.log_transition[i, i]  # ...of the chain
        log_start = np.full(n, -np.inf)
        log_start[first] = self.log_start  # a study starts at the top of a state...
        entered = np.asarray(lengths) > 1  # ...or inside a vertebra it cut through
        log_start[last[entered]] = self.log_start[entered]
        from scipy.special import logsumexp

        log_start -= logsumexp(log_start)
        return owner, self.states[owner], log_start, log_transition

    # -- inference ---------------------------------------------------------------------------
    def _log_emissions(self, probabilities, states: np.ndarray) -> np.ndarray:
        p = np.asarray(probabilities, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != N_LEVELS:
            raise ValueError(f"expected (n_slices, {N_LEVELS}) probabilities, got {p.shape}")
        if p.size and (not np.isfinite(p).all() or p.min() < 0 or p.max() > 1):
            raise ValueError("probabilities must be finite and within [0, 1]")
        p = np.clip(p, 1e-6, 1 - 1e-6)
        log_p, log_q = np.log(p), np.log1p(-p)
        s = states.astype(np.float64)
        return (log_p @ s.T + log_q @ (1 - s).T) / self.temperature

    def posterior(self, probabilities, spacing_mm: float | None = None) -> np.ndarray:
        """``(n_slices, S)`` posterior of every state (forward-backward, in log space).

        Args:
            probabilities: ``(n_slices, 7)`` sigmoid outputs of one study in series order.
            spacing_mm: the study's slice spacing (the duration prior is in mm).
        """
        from scipy.special import logsumexp

        owner, states, log_start, log_transition = self._chains(spacing_mm)
        emissions = self._log_emissions(probabilities, states)
        n = len(emissions)
        if n == 0:
            return np.zeros((0, len(self.keys)))
        forward = np.empty_like(emissions)
        backward = np.zeros_like(emissions)
        forward[0] = log_start + emissions[0]
        for i in range(1, n):
            forward[i] = emissions[i] + logsumexp(forward[i - 1][:, None] + log_transition,
                                                  axis=0)  # fmt: skip
        for i in range(n - 2, -1, -1):
            backward[i] = logsumexp(log_transition + (emissions[i + 1] + backward[i + 1]),
                                    axis=1)  # fmt: skip
        joint = forward + backward
        chained = np.exp(joint - logsumexp(joint, axis=1, keepdims=True))
        out = np.zeros((n, len(self.keys)))
        np.add.at(out.T, owner, chained.T)
        return out

    def decode(self, probabilities, spacing_mm: float | None = None) -> np.ndarray:
        """Smoothed ``(n_slices, 7)`` probabilities of C1..C7 for one study in series order."""
        posterior = self.posterior(probabilities, spacing_mm)
        return np.clip(posterior @ self.states.astype(np.float64), 0.0, 1.0)

    def viterbi(self, probabilities, spacing_mm: float | None = None) -> np.ndarray:
        """The most likely ``(n_slices, 7)`` 0/1 label sequence of one study."""
        owner, states, log_start, log_transition = self._chains(spacing_mm)
        emissions = self._log_emissions(probabilities, states)
        n = len(emissions)
        if n == 0:
            return np.zeros((0, N_LEVELS), np.int8)
        score = log_start + emissions[0]
        back = np.zeros((n, len(owner)), np.intp)
        for i in range(1, n):
            candidates = score[:, None] + log_transition
            back[i] = candidates.argmax(axis=0)
            score = candidates.max(axis=0) + emissions[i]
        path = np.empty(n, np.intp)
        path[-1] = int(score.argmax())
        for i in range(n - 1, 0, -1):
            path[i - 1] = back[i, path[i]]
        return states[path].copy()

    def decode_studies(self, probabilities, study_ids: Sequence, order: Sequence,
                       positions_mm: Sequence | None = None) -> np.ndarray:  # fmt: skip
        """:meth:`decode` applied study by study to rows in any order.

        Args:
            probabilities: ``(n_rows, 7)``.
            study_ids: the study of every row.
            order: the series index of every row (superior to inferior within a study).
            positions_mm: the slice position of every row (e.g. ``position_mm`` of the prepare
                index), giving each study's spacing; None: spacing 1.
        """
        p = np.asarray(probabilities, dtype=np.float64)
        ids, order = np.asarray(study_ids), np.asarray(order)
        if not (len(p) == len(ids) == len(order)):
            raise ValueError("probabilities, study_ids and order must have the same length")
        positions = None if positions_mm is None else np.asarray(positions_mm, np.float64)
        if positions is not None and len(positions) != len(p):
            raise ValueError("positions_mm must have one value per row")
        out = np.empty_like(p)
        for uid in dict.fromkeys(ids.tolist()):
            rows = np.flatnonzero(ids == uid)
            rows = rows[np.argsort(order[rows], kind="stable")]
            spacing = None if positions is None else slice_spacing(positions[rows])
            out[rows] = self.decode(p[rows], spacing)
        return out

    # -- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "temperature": self.temperature,
            "keys": [list(k) for k in self.keys], "min_extent_mm": list(self.min_extent_mm),
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
            extents = tuple(float(e) for e in data.get("min_extent_mm", ()))
            if log_start.shape != (len(keys),) or log_transition.shape != (len(keys),) * 2:
                raise ValueError("start/transition shapes do not match the states")
            if extents and len(extents) != len(keys):
                raise ValueError("min_extent_mm does not match the states")
        except FileNotFoundError:
            raise CSpineDataError(path, "level decoder file not found") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CSpineDataError(path, f"not a level decoder: {error}") from error
        return cls(_label_vectors(keys), keys, log_start, log_transition, float(data.get("temperature", 2.0)),
                   extents)  # fmt: skip


def fit_from_prepared(prepared: str | os.PathLike, study_uids: Sequence[str],
                      **kwargs) -> LevelDecoder:  # fmt: skip
    """:meth:`LevelDecoder.fit` on the labelled studies ``study_uids`` of a prepare folder (the
    training split of a run), each in series order."""
    from keras_cspine.data.prepare import load_index
    from keras_cspine.io.rsna import VERTEBRAE

    index = load_index(prepared)
    rows = index[index["StudyInstanceUID"].isin(set(study_uids)) & (index["labels_known"] == 1)]
    rows = rows.sort_values(["StudyInstanceUID", "series_index"], kind="stable")
    groups = [group for _, group in rows.groupby("StudyInstanceUID", sort=False)]
    if not groups:
        raise CSpineDataError(prepared, "none of the studies has labels to fit a level decoder")
    sequences = [group[list(VERTEBRAE)].to_numpy() for group in groups]
    spacings = [slice_spacing(group["position_mm"].to_numpy()) for group in groups]
    return LevelDecoder.fit(sequences, spacings, **kwargs)


def slice_spacing(positions_mm) -> float:
    """A series' slice spacing (mm): the median step between consecutive positions (1 for a
    single slice)."""
    steps = np.abs(np.diff(np.asarray(positions_mm, dtype=np.float64)))
    steps = steps[steps > 0]
    return float(np.median(steps)) if len(steps) else 1.0
