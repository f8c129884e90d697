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
from rlaif_jax.data.prompts.prepare import dedup, nothing_kept, write_record_sets
from rlaif_jax.data.records import COMPARISONS, DEMONSTRATIONS, PREFERENCES, PROMPTS, read_records
from rlaif_jax.errors import UserError, binding, existing_dir, existing_path, whole
from rlaif_jax.fileio import abspath, atomic_write, join, makedirs
from rlaif_jax.outputs import writer_lock


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
    overwrite: bool = False,
) -> dict:
    """Teacher completions -> DEMONSTRATIONS record sets under `output_dir`.

    With `prompts_dir` (the output of `prepare_prompts`), each demonstration goes to the
    split its prompt id is in (demonstrations/sft, demonstrations/feedback), so e.g. GPT-4
    SFT on the paper's 10% uses the same prompts as the GPT-3.5 arm; completions for
    prompts in neither split are dropped and counted (`not_in_prompts`). Without it
    everything goes to demonstrations/all. `keep_finish_reasons` (e.g. ("stop",), as the
    paper did for GPT-4) drops the others, counted as `finish_reason_<name>`. A file that
    yields no demonstrations is an error, and a complete set already in `output_dir` is
    replaced by a smaller one only with `overwrite`.
    """
    existing_path(binding("import_paper_completions.path"), path, "completion file")
    existing_dir(
        binding("import_paper_completions.prompts_dir"),
        prompts_dir,
        "prepare_prompts output directory",
        must_contain="prompts",
    )
    whole(binding("import_paper_completions.num_shards"), num_shards, 1)
    with writer_lock(output_dir, "import_paper_completions.output_dir"):
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
        stats.kept = sum(len(p) for p in parts.values())
        if not stats.kept:
            raise UserError(
                nothing_kept(
                    "import_paper_completions.path",
                    path,
                    stats,
                    "import_paper_completions.prompts_dir / keep_finish_reasons",
                )
            )
        write_record_sets(
            [
                (join(output_dir, "demonstrations", name), DEMONSTRATIONS, part, {**provenance, "split": name})
                for name, part in parts.items()
            ],
            num_shards,
            "import_paper_completions.overwrite",
            overwrite,
        )
        return _write_stats(output_dir, {**stats.as_dict(), **{name: len(p) for name, p in parts.items()}})


@gin.configurable
def import_paper_annotations(
    path: str, output_dir: str, *, judge: Optional[str] = None, num_shards: int = 1, overwrite: bool = False
) -> dict:
    """AI-preference annotations -> comparisons/ (every verdict, ties and invalid included)
    and preferences/ (decided, non-identical pairs only), with drop counts in stats.json.
    An empty file is an error; a complete set in `output_dir` is replaced by a smaller one
    only with `overwrite`."""
    existing_path(binding("import_paper_annotations.path"), path, "annotation file")
    whole(binding("import_paper_annotations.num_shards"), num_shards, 1)
    with writer_lock(output_dir, "import_paper_annotations.output_dir"):
        comparisons = read_paper_annotations(path, judge)
        if not comparisons:
            raise UserError(
                f"import_paper_annotations.path = {path!r}: holds no annotations; give a non-empty "
                "file (nothing was written)"
            )
        provenance = {"source": abspath(path), "judge": judge}
        prefs, stats = comparisons_to_preferences(comparisons, os.path.basename(path))
        write_record_sets(
            [
                (join(output_dir, "comparisons"), COMPARISONS, comparisons, provenance),
                (join(output_dir, "preferences"), PREFERENCES, prefs, provenance),
            ],
            num_shards,
            "import_paper_annotations.overwrite",
            overwrite,
        )
        verdicts = {}
        for c in comparisons:
            verdicts[c["verdict"]] = verdicts.get(c["verdict"], 0) + 1
        return _write_stats(output_dir, {**stats.as_dict(), "verdicts": verdicts})
