"""Prompt preparation: length filter, dedup, order-based split, and writing record sets."""

from __future__ import annotations

import json
from typing import Optional, Sequence

import gin

from rlaif_jax.data.prompts.readers import read_prompt_source
from rlaif_jax.data.prompts.types import PromptExample, Stats
from rlaif_jax.data.records import DEMONSTRATIONS, PREFERENCES, PROMPTS, write_records
from rlaif_jax.fileio import abspath, atomic_write, join

# The paper's API-call limits: instructions of >= 2000 words or >= 8000 characters are skipped.
MAX_WORDS = 2000
MAX_CHARS = 8000


def length_filter(
    examples: Sequence[PromptExample], stats: Stats, max_words: Optional[int], max_chars: Optional[int]
) -> list[PromptExample]:
    """Drops prompts with >= max_words words or >= max_chars characters (None: no limit)."""
    out = []
    for ex in examples:
        if max_chars is not None and len(ex.prompt) >= max_chars:
            stats.drop("too_many_chars")
        elif max_words is not None and len(ex.prompt.split()) >= max_words:
            stats.drop("too_many_words")
        else:
            out.append(ex)
    return out


def dedup(examples: Sequence[PromptExample], stats: Stats) -> list[PromptExample]:
    """Keeps the first occurrence of each exact prompt text (by prompt id)."""
    seen, out = set(), []
    for ex in examples:
        if ex.prompt_id in seen:
            stats.drop("duplicate")
            continue
        seen.add(ex.prompt_id)
        out.append(ex)
    return out


def split_by_order(
    examples: Sequence[PromptExample], sft_fraction: float
) -> tuple[list[PromptExample], list[PromptExample]]:
    """The first floor(n * sft_fraction) prompts for SFT, the rest for feedback (paper: 10%)."""
    if not 0.0 <= sft_fraction <= 1.0:
        raise ValueError(f"sft_fraction must be in [0, 1], got {sft_fraction}")
    n_sft = int(len(examples) * sft_fraction)
    return list(examples[:n_sft]), list(examples[n_sft:])


@gin.configurable
def prepare_prompts(
    source: str,
    output_dir: str,
    *,
    format: str = "auto",
    split: Optional[str] = None,
    sft_fraction: float = 0.1,
    max_words: Optional[int] = MAX_WORDS,
    max_chars: Optional[int] = MAX_CHARS,
    deduplicate: bool = True,
    completion_model: Optional[str] = None,
    num_shards: int = 1,
) -> dict:
    """Reads a prompt source and writes record sets under `output_dir`:

      prompts/{sft,feedback}          PROMPTS schema, split recorded per record
      demonstrations/{sft,feedback}   DEMONSTRATIONS, for prompts whose source has a completion
      preferences/all                 PREFERENCES, when the source holds TRL pairs
      stats.json                      read / kept / dropped-by-reason counts and split sizes

    Filters run in this order: the reader's own, then length, then dedup; the split is by
    the order that remains. `source` and `output_dir` may be URLs (gs://...). Returns the
    stats dict.
    """
    prompts, prefs, stats = read_prompt_source(source, format, split=split, completion_model=completion_model)
    prompts = length_filter(prompts, stats, max_words, max_chars)
    if deduplicate:
        prompts = dedup(prompts, stats)
    stats.kept = len(prompts) + len(prefs)
    sft, feedback = split_by_order(prompts, sft_fraction)
    provenance = {"source": abspath(source), "format": format, "sft_fraction": sft_fraction}
    for name, part in (("sft", sft), ("feedback", feedback)):
        write_records(
            join(output_dir, "prompts", name),
            PROMPTS,
            (ex.prompt_record(name) for ex in part),
            num_shards=num_shards,
            provenance={**provenance, "split": name},
        )
        demos = [ex.demonstration_record() for ex in part if ex.completion is not None]
        if demos:
            write_records(
                join(output_dir, "demonstrations", name),
                DEMONSTRATIONS,
                demos,
                num_shards=num_shards,
                provenance={**provenance, "split": name},
            )
    if prefs:
        write_records(join(output_dir, "preferences", "all"), PREFERENCES, prefs,
                      num_shards=num_shards, provenance=provenance)
    result = {**stats.as_dict(), "sft": len(sft), "feedback": len(feedback), "preferences": len(prefs)}
    with atomic_write(join(output_dir, "stats.json")) as f:
        json.dump(result, f, indent=2, sort_keys=True)
    return result
