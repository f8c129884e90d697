"""Prompt preparation: length filter, dedup, order-based split, and writing record sets."""

from __future__ import annotations

import json
from typing import Optional, Sequence

import gin

from rlaif_jax.data.prompts.readers import FORMATS, read_prompt_source
from rlaif_jax.data.prompts.types import PromptExample, Stats
from rlaif_jax.data.records import DEMONSTRATIONS, PREFERENCES, PROMPTS, write_records
from rlaif_jax.errors import UserError, binding, existing_path, in_range, one_of, whole
from rlaif_jax.fileio import abspath, atomic_write, join
from rlaif_jax.outputs import check_replace, writer_lock

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
    overwrite: bool = False,
) -> dict:
    """Reads a prompt source and writes record sets under `output_dir`:

      prompts/{sft,feedback}          PROMPTS schema, split recorded per record
      demonstrations/{sft,feedback}   DEMONSTRATIONS, for prompts whose source has a completion
      preferences/all                 PREFERENCES, when the source holds TRL pairs
      stats.json                      read / kept / dropped-by-reason counts and split sizes

    Filters run in this order: the reader's own, then length, then dedup; the split is by
    the order that remains. `source` and `output_dir` may be URLs (gs://...). A source that
    yields no records (empty, or all filtered out) is an error, and a complete record set
    already in `output_dir` is replaced by a smaller one only with `overwrite`. Returns the
    stats dict.
    """
    existing_path(binding("prepare_prompts.source"), source, "prompt file or dataset")
    one_of(binding("prepare_prompts.format"), format, ("auto",) + FORMATS)
    in_range(binding("prepare_prompts.sft_fraction"), sft_fraction, 0.0, 1.0)
    for name, value in (("max_words", max_words), ("max_chars", max_chars), ("num_shards", num_shards)):
        if value is not None:
            whole(binding(f"prepare_prompts.{name}"), value, 1)
    with writer_lock(output_dir, "prepare_prompts.output_dir"):
        prompts, prefs, stats = read_prompt_source(source, format, split=split, completion_model=completion_model)
        prompts = length_filter(prompts, stats, max_words, max_chars)
        if deduplicate:
            prompts = dedup(prompts, stats)
        stats.kept = len(prompts) + len(prefs)
        if not stats.kept:
            raise UserError(
                nothing_kept("prepare_prompts.source", source, stats, "prepare_prompts.format / max_words / max_chars")
            )
        sft, feedback = split_by_order(prompts, sft_fraction)
        result = {**stats.as_dict(), "sft": len(sft), "feedback": len(feedback), "preferences": len(prefs)}
        # The counts travel with the records too (a manifest outlives its stats.json).
        provenance = {"source": abspath(source), "format": format, "sft_fraction": sft_fraction, "counts": result}
        writes = []
        for name, part in (("sft", sft), ("feedback", feedback)):
            writes.append(
                (
                    join(output_dir, "prompts", name),
                    PROMPTS,
                    [ex.prompt_record(name) for ex in part],
                    {**provenance, "split": name},
                )
            )
            demos = [ex.demonstration_record() for ex in part if ex.completion is not None]
            if demos:
                writes.append(
                    (join(output_dir, "demonstrations", name), DEMONSTRATIONS, demos, {**provenance, "split": name})
                )
        if prefs:
            writes.append((join(output_dir, "preferences", "all"), PREFERENCES, prefs, provenance))
        write_record_sets(writes, num_shards, "prepare_prompts.overwrite", overwrite)
        with atomic_write(join(output_dir, "stats.json")) as f:
            json.dump(result, f, indent=2, sort_keys=True)
        return result


def write_record_sets(writes, num_shards: int, overwrite_binding: str, overwrite: bool) -> None:
    """Writes (directory, schema, records, provenance) record sets, each checked against
    the complete set it would replace before any is written: a refused replacement must
    not leave the output half old, half new."""
    for directory, _, records, _ in writes:
        check_replace(directory, len(records), overwrite_binding, overwrite)
    for directory, schema, records, provenance in writes:
        write_records(
            directory,
            schema,
            records,
            num_shards=num_shards,
            provenance=provenance,
            overwrite=overwrite,
            overwrite_binding=overwrite_binding,
        )


def nothing_kept(binding: str, source: str, stats: Stats, filters: str) -> str:
    """The message for a source that yields no records: empty, or all of it filtered out."""
    if not stats.read:
        return f"{binding} = {source!r}: holds no records; give a non-empty file (nothing was written)"
    dropped = ", ".join(f"{k}={v}" for k, v in sorted(stats.dropped.items())) or "none"
    return (
        f"{binding} = {source!r}: none of its {stats.read} records was kept (dropped: {dropped}); check the "
        f"file and {filters} (nothing was written)"
    )
