"""Unpaired labelled completions for KTO: from a critic's 1-5 ratings, or by unpairing
preference pairs.

rating_labels_stage reads a critic set judged in rating mode (`critic_stage` with
configs/feedback/critic_rating.gin: every response rated on its own, comparisons.jsonl holds
both ratings) and labels each rated response by a threshold:
  rating > threshold  desirable (label 1)
  rating < threshold  undesirable (label 0)
  rating == threshold a tie: dropped (the critic called it neither good nor bad)
  no rating           invalid (unparseable answer or API error): dropped
With the default threshold 3 on the 1-5 scale, 4-5 are desirable, 1-2 undesirable, 3 dropped;
a threshold between integers (3.5) drops nothing but invalid ratings. Identical response pairs
are never sent to the critic, so they carry no rating and are dropped as unrated. Every drop
is counted in the manifest's provenance and in report.json.

unpair_preferences_stage turns each preference pair into two records, the chosen response
desirable and the rejected undesirable, as TRL's `unpair_preference_dataset`.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import gin

from rlaif_jax import fileio as fio
from rlaif_jax.data.records import COMPARISONS, LABELLED, PREFERENCES, read_manifest, read_records, write_records
from rlaif_jax.errors import UserError, binding, existing_path, whole
from rlaif_jax.fileio import save_operative_config, write_json
from rlaif_jax.outputs import check_replace, writer_lock

log = logging.getLogger(__name__)
STAGE_VERSION = 1
DROPS = ("ties", "invalid", "unrated")


def valid_rating(rating: Any) -> bool:
    return isinstance(rating, (int, float)) and not isinstance(rating, bool) and not math.isnan(rating)


def rating_label(rating: Any, threshold: float) -> Optional[int]:
    """1 above the threshold, 0 below it, None at it (a tie) or when there is no rating."""
    if not valid_rating(rating):
        return None
    if rating > threshold:
        return 1
    if rating < threshold:
        return 0
    return None


def labelled_from_ratings(comparisons: Iterable[Mapping[str, Any]], threshold: float) -> tuple[list[dict], dict]:
    """LABELLED records of every rated response, in comparison order (response_1 then
    response_2), and the counts {desirable, undesirable, ties, invalid, unrated, responses}.
    A comparison without `ratings` (identical responses, not asked) counts both its responses
    as unrated."""
    records, counts = [], dict.fromkeys(("responses", "desirable", "undesirable", *DROPS), 0)
    for c in comparisons:
        ratings = c.get("ratings")
        for k in (1, 2):
            counts["responses"] += 1
            if ratings is None:
                counts["unrated"] += 1
                continue
            rating = ratings[k - 1]
            label = rating_label(rating, threshold)
            if label is None:
                counts["ties" if valid_rating(rating) else "invalid"] += 1
                continue
            counts["desirable" if label else "undesirable"] += 1
            records.append(
                {
                    "prompt_id": c["prompt_id"],
                    "prompt": c["prompt"],
                    "completion": c[f"response_{k}"],
                    "label": label,
                    "source": f"critic {c.get('judge', '?')}: rating {rating:g} vs threshold {threshold:g}",
                    "rating": float(rating),
                    "source_model": c.get(f"model_{k}") or None,
                }
            )
    return records, counts


def labelled_from_preferences(pairs: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Two LABELLED records per preference pair: chosen desirable, rejected undesirable."""
    out = []
    for p in pairs:
        for key, label in (("chosen", 1), ("rejected", 0)):
            out.append(
                {
                    "prompt_id": p["prompt_id"],
                    "prompt": p["prompt"],
                    "completion": p[key],
                    "label": label,
                    "source": f"{key} of a preference pair ({p['provenance']})",
                    "rating": None,
                    "source_model": None,
                }
            )
    return out


def _rating_comparisons(comparisons: str) -> list[dict]:
    """A critic set's comparisons.jsonl, checked to come from rating mode."""
    setting = binding("rating_labels_stage.comparisons")
    existing_path(setting, comparisons, "critic comparison set")
    mode = read_manifest(comparisons, COMPARISONS).get("provenance", {}).get("mode")
    if mode != "rating":
        raise UserError(
            f"{setting} = {comparisons!r} was judged in mode {mode!r}, not 'rating': pairwise verdicts carry no "
            "per-response rating; rerun the critic with configs/feedback/critic_rating.gin, or unpair preference "
            "pairs with unpair_preferences_stage"
        )
    side = fio.join(comparisons, "comparisons.jsonl")
    if not fio.isfile(side):
        raise UserError(
            f"{setting} = {comparisons!r} has no comparisons.jsonl (the ratings live there); point it at the "
            "critic_stage's out_dir"
        )
    return fio.read_jsonl_objects(side, "a comparison object")


def _write(out_dir, records, counts, provenance, num_shards, overwrite, stage) -> dict:
    if not records:
        raise UserError(
            f"{binding(stage + '.out_dir')}: no labelled completion is left ({counts}); nothing was written. "
            "Check the critic's ratings (report.json, errors.jsonl) or the threshold"
        )
    check_replace(out_dir, len(records), f"{stage}.overwrite", overwrite)
    write_json(fio.join(out_dir, "report.json"), counts)
    manifest = write_records(
        out_dir,
        LABELLED,
        records,
        num_shards=num_shards,
        provenance={**provenance, "stage_version": STAGE_VERSION, "counts": counts},
        overwrite=overwrite,
        overwrite_binding=f"{stage}.overwrite",
    )
    save_operative_config(out_dir)
    return manifest


@gin.configurable
def rating_labels_stage(
    comparisons: str | Sequence[str] = gin.REQUIRED,
    out_dir: str = gin.REQUIRED,
    threshold: float = 3.0,
    num_shards: int = 1,
    overwrite: bool = False,
) -> dict:
    """A critic's rating-mode comparison sets (one directory or several, e.g. one per policy
    sample) -> LABELLED records (see the module docstring for the threshold rule) +
    report.json of the counts. Returns the manifest; its provenance holds the counts of kept
    and dropped responses."""
    whole(binding("rating_labels_stage.num_shards"), num_shards, 1)
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not math.isfinite(threshold):
        raise UserError(f"{binding('rating_labels_stage.threshold')} = {threshold!r}: give a number such as 3")
    with writer_lock(out_dir, "rating_labels_stage.out_dir"):
        dirs = [comparisons] if isinstance(comparisons, (str, os.PathLike)) else list(comparisons)
        comps = [c for d in dirs for c in _rating_comparisons(os.fspath(d))]
        records, counts = labelled_from_ratings(comps, threshold)
        log.info("rating labels: %s", counts)
        fio.makedirs(out_dir)
        provenance = {"stage": "rating_labels", "comparisons": [fio.abspath(d) for d in dirs], "threshold": threshold}
        return _write(out_dir, records, counts, provenance, num_shards, overwrite, "rating_labels_stage")


@gin.configurable
def unpair_preferences_stage(
    preferences: str = gin.REQUIRED,
    out_dir: str = gin.REQUIRED,
    num_shards: int = 1,
    overwrite: bool = False,
) -> dict:
    """PREFERENCES records -> LABELLED records, two per pair (chosen desirable, rejected
    undesirable), as TRL's unpair_preference_dataset. Returns the manifest."""
    whole(binding("unpair_preferences_stage.num_shards"), num_shards, 1)
    existing_path(binding("unpair_preferences_stage.preferences"), preferences, "preference record set")
    with writer_lock(out_dir, "unpair_preferences_stage.out_dir"):
        pairs = list(read_records(preferences, PREFERENCES))
        records = labelled_from_preferences(pairs)
        counts = {"pairs": len(pairs), "desirable": len(pairs), "undesirable": len(pairs)}
        fio.makedirs(out_dir)
        provenance = {"stage": "unpair_preferences", "preferences": fio.abspath(preferences)}
        return _write(out_dir, records, counts, provenance, num_shards, overwrite, "unpair_preferences_stage")
