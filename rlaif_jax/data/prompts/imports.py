"""Run functions that turn the paper's released files into this project's record sets."""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import gin

from rlaif_jax.data.prompts.paper import (
    comparisons_to_preferences,
    read_paper_annotations,
    read_paper_completions,
)
from rlaif_jax.data.prompts.prepare import dedup
from rlaif_jax.data.records import COMPARISONS, DEMONSTRATIONS, PREFERENCES, PROMPTS, read_records, write_records
from rlaif_jax.fileio import abspath, atomic_write, join, makedirs


def _write_stats(output_dir: str, stats: dict) -> dict:
    makedirs(output_dir)
    with atomic_write(join(output_dir, "stats.json")) as f:
        json.dump(stats, f, indent=2, sort_keys=True)
    return stats


@gin.configurable
def import_paper_completions(
    path: str,
    output_dir: str,
    *,
    source_model: Optional[str] = None,
    prompts_dir: Optional[str] = None,
    keep_finish_reasons: Optional[Sequence[str]] = None,
    num_shards: int = 1,
) -> dict:
    """Teacher completions -> DEMONSTRATIONS record sets under `output_dir`.

    With `prompts_dir` (the output of `prepare_prompts`), each demonstration goes to the
    split its prompt id is in (demonstrations/sft, demonstrations/feedback), so e.g. GPT-4
    SFT on the paper's 10% uses the same prompts as the GPT-3.5 arm; completions for
    prompts in neither split are dropped and counted (`not_in_prompts`). Without it
    everything goes to demonstrations/all. `keep_finish_reasons` (e.g. ("stop",), as the
    paper did for GPT-4) drops the others, counted as `finish_reason_<name>`.
    """
    demos, stats = read_paper_completions(path, source_model)
    demos = dedup(demos, stats)
    records = []
    for d in demos:
        rec = d.demonstration_record()
        if keep_finish_reasons is not None and rec["finish_reason"] not in keep_finish_reasons:
            stats.drop(f"finish_reason_{rec['finish_reason']}")
            continue
        records.append(rec)
    provenance = {"source": abspath(path), "source_model": source_model}
    if prompts_dir is None:
        parts = {"all": records}
    else:
        split_of = {}
        for name in ("sft", "feedback"):
            for r in read_records(join(prompts_dir, "prompts", name), PROMPTS):
                split_of[r["prompt_id"]] = name
        parts = {"sft": [], "feedback": []}
        for rec in records:
            name = split_of.get(rec["prompt_id"])
            if name is None:
                stats.drop("not_in_prompts")
            else:
                parts[name].append(rec)
    for name, part in parts.items():
        write_records(join(output_dir, "demonstrations", name), DEMONSTRATIONS, part,
                      num_shards=num_shards, provenance={**provenance, "split": name})
    stats.kept = sum(len(p) for p in parts.values())
    return _write_stats(output_dir, {**stats.as_dict(), **{name: len(p) for name, p in parts.items()}})


@gin.configurable
def import_paper_annotations(
    path: str, output_dir: str, *, judge: Optional[str] = None, num_shards: int = 1
) -> dict:
    """AI-preference annotations -> comparisons/ (every verdict, ties and invalid included)
    and preferences/ (decided, non-identical pairs only), with drop counts in stats.json."""
    comparisons = read_paper_annotations(path, judge)
    provenance = {"source": abspath(path), "judge": judge}
    write_records(join(output_dir, "comparisons"), COMPARISONS, comparisons,
                  num_shards=num_shards, provenance=provenance)
    prefs, stats = comparisons_to_preferences(comparisons, os.path.basename(path))
    write_records(join(output_dir, "preferences"), PREFERENCES, prefs,
                  num_shards=num_shards, provenance=provenance)
    verdicts = {}
    for c in comparisons:
        verdicts[c["verdict"]] = verdicts.get(c["verdict"], 0) + 1
    return _write_stats(output_dir, {**stats.as_dict(), "verdicts": verdicts})
