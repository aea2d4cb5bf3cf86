"""Calibration: a model's image scores from raw part scores, fitted to held-out normals only.

A fit scores each validation image once, keeping its raw parts [s*, global(, pixel)]
(common/engine/fit.py ``score_records``). Everything after that is arithmetic on those parts,
and it all lives here: the part tails a fused score is normalised by are fitted to a chosen set
of held-out normals (``with_tails``), a held-out normal is scored by the model calibrated on the
*other* normals (``held_out_scores``, ``left_out``), and ``calibrated`` attaches those scores as
the model's calibration. `fit` calls it for its one configuration, `fit --auto` for every
candidate x scorer on every subset of normals it chooses or reports on; neither scores an image
again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from common.engine.patchcore import PatchCore


def combine_parts(model: PatchCore, parts: np.ndarray) -> np.ndarray:
    """The model's image scores from raw (n, parts) [s*, global(, pixel)] part scores."""
    global_scores = parts[:, 1] if model.global_scorer is not None else None
    pixel_scores = parts[:, 2] if model.pixel_scorer is not None else None
    return model.combine(parts[:, 0], global_scores, pixel_scores)


def with_tails(model: PatchCore, scorer: str, normal_parts: np.ndarray) -> PatchCore:
    """``model`` scoring with ``scorer``, its part tails fitted to ``normal_parts`` (the raw
    parts of held-out normals) and no calibration scores yet: a model that only scores."""
    return PatchCore(
        dataclasses.replace(model.config, scorer=scorer),
        model.extractor,
        model.bank,
        np.empty(0, np.float32),
        model.global_scorer,
        normal_parts if model.global_scorer is not None else None,
        model.pixel_scorer,
    )


def calibrated(model: PatchCore, scorer: str, normal_parts: np.ndarray) -> PatchCore:
    """``model`` scoring with ``scorer``, calibrated on the held-out normals whose raw parts are
    ``normal_parts`` only (so that no other image shapes its scale), each left out in turn."""
    tails = with_tails(model, scorer, normal_parts)
    return tails.with_calibration(held_out_scores(tails, normal_parts))


def held_out_scores(model: PatchCore, parts: np.ndarray) -> np.ndarray:
    """Image scores of the held-out normals whose raw ``parts`` calibrate ``model``, each
    scored by the model calibrated on the *other* normals (leave-one-out).

    A fused score turns each part into a tail probability fitted to these very normals; scored
    by its own tails, a normal never falls beyond them, so it scores lower than any new normal
    would (demo poly: AUROC 0.94 against its calibration normals, 0.67 against new ones).
    Thresholds, validation figures and the normals aggregate stands in for a run need what a
    new normal scores. The raw parts themselves (s*, global, pixel) are not fitted to these
    normals, so plain scorers score them as they are; so does a lone normal (no others).
    """
    if model.config.scorer in ("patch", "global") or len(parts) < 2:
        return combine_parts(model, parts)
    scores = [combine_parts(m, parts[i : i + 1]) for i, m in enumerate(left_out(model, parts))]
    return np.concatenate(scores)


def left_out(model: PatchCore, parts: np.ndarray) -> Iterator[PatchCore]:
    """For each held-out normal i of the raw ``parts`` calibrating ``model``, the model whose
    part tails are fitted to the other normals only."""
    for i in range(len(parts)):
        yield model.with_calibration(model.calibration, np.delete(parts, i, axis=0))
