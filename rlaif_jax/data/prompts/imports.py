"""Run functions that turn the paper's released files into this project's record sets."""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import gin

from rlaif_jax.data import released
from rlaif_jax.data.prompts.paper import (
    PAIRINGS,
    comparisons_to_preferences,
    paper_loader_preferences,
    read_completion_file,
    read_paper_annotations,
)
from rlaif_jax.data.prompts.prepare import dedup, nothing_kept, write_record_sets
from rlaif_jax.data.records import COMPARISONS, DEMONSTRATIONS, PREFERENCES
from rlaif_jax.data.records.shards import MANIFEST
from rlaif_jax.errors import ConfigError, UserError, binding, existing_dir, existing_path, one_of, whole
from rlaif_jax.fileio import abspath, atomic_write, exists, join, makedirs
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
    explain_unmatched: bool = True,
    num_shards: int = 1,
    overwrite: bool = False,
) -> dict:
    """Teacher completions -> DEMONSTRATIONS record sets under `output_dir`.

    `path` is a released completion file in its released shape (one JSON object: instruction
    -> list of completions, the first imported, the others counted as `extra_completions`)
    or a list of AlpacaEval-style records (rlaif_jax.data.prompts.paper).

    With `prompts_dir` (the output of `prepare_prompts`), each demonstration goes to the
    split its prompt id is in (demonstrations/sft, demonstrations/feedback), so e.g. GPT-4
    SFT on the paper's 10% uses the same prompts as the GPT-3.5 arm; completions for
    prompts in neither split are dropped and counted (`not_in_prompts`), and with
    `explain_unmatched` counted again by why under `unmatched` (rlaif_jax.data.released:
    re-reads the prompts' ShareGPT source). Without it everything goes to
    demonstrations/all. `keep_finish_reasons` (e.g. ("stop",), as the paper did for GPT-4)
    drops the others, counted as `finish_reason_<name>`. A file that yields no
    demonstrations is an error, and a complete set already in `output_dir` is replaced by a
    smaller one only with `overwrite`. The counts go to stats.json and each record set's
    manifest.
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
        demos, stats, shape = read_completion_file(path, source_model)
        demos = dedup(demos, stats)
        records = []
        for d in demos:
            rec = d.demonstration_record()
            if keep_finish_reasons is not None and rec["finish_reason"] not in keep_finish_reasons:
                stats.drop(f"finish_reason_{rec['finish_reason']}")
                continue
            records.append(rec)
        report = {}
        if prompts_dir is None:
            parts = {"all": records}
        else:
            parts, report = released.match(records, prompts_dir, explain=explain_unmatched)
            missing = len(records) - report["matched"]
            if missing:
                stats.dropped["not_in_prompts"] = missing
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
        result = {**stats.as_dict(), **shape, **report, **{name: len(p) for name, p in parts.items()}}
        provenance = {"source": abspath(path), "source_model": source_model, "import": result}
        write_record_sets(
            [
                (join(output_dir, "demonstrations", name), DEMONSTRATIONS, part, {**provenance, "split": name})
                for name, part in parts.items()
            ],
            num_shards,
            "import_paper_completions.overwrite",
            overwrite,
        )
        return _write_stats(output_dir, result)


@gin.configurable
def import_paper_annotations(
    path: str,
    output_dir: str,
    *,
    judge: Optional[str] = None,
    pairing: str = "strict",
    prompts_dir: Optional[str] = None,
    splits: Sequence[str] = ("feedback",),
    explain_unmatched: bool = True,
    num_shards: int = 1,
    overwrite: bool = False,
) -> dict:
    """AI-preference annotations (an annotations.json as alpaca_eval writes it) ->
    comparisons/ (every verdict, ties and invalid included) and preferences/, with counts
    in stats.json and the manifests. A file that yields no pair (empty, or all ties) is an
    error; a complete set in `output_dir` is replaced by a smaller one only with `overwrite`.

    pairing:     'strict' (default): decided, non-identical pairs only; ties, unparsed
                 answers and identical pairs dropped and counted. 'paper': the pairs the
                 paper's loader built (paper_loader_preferences): ties and unparsed answers
                 become "output 2 wins", identical pairs stay, a repeated instruction keeps
                 its last record, special-token records are skipped; the relabelled counts
                 go to stats.json under `paper_relabelled`.
    prompts_dir: the output of `prepare_prompts`: keeps only pairs whose prompt is in
                 `splits` (default the feedback 90%, the paper's design), counting the
                 others (`other_split`, `unmatched` by reason as for completions).
    """
    existing_path(binding("import_paper_annotations.path"), path, "annotation file")
    one_of(binding("import_paper_annotations.pairing"), pairing, PAIRINGS)
    existing_dir(
        binding("import_paper_annotations.prompts_dir"),
        prompts_dir,
        "prepare_prompts output directory",
        must_contain="prompts",
    )
    bad = [s for s in splits if s not in released.SPLITS]
    if bad or not splits:
        raise ConfigError(
            f"{binding('import_paper_annotations.splits')} = {list(splits)!r}: choose from {list(released.SPLITS)}"
        )
    whole(binding("import_paper_annotations.num_shards"), num_shards, 1)
    with writer_lock(output_dir, "import_paper_annotations.output_dir"):
        comparisons = read_paper_annotations(path, judge)
        if not comparisons:
            raise UserError(
                f"import_paper_annotations.path = {path!r}: holds no annotations; give a non-empty "
                "file (nothing was written)"
            )
        source = os.path.basename(path)
        extra = {}
        if pairing == "paper":
            prefs, stats, extra["paper_relabelled"] = paper_loader_preferences(comparisons, source)
        else:
            prefs, stats = comparisons_to_preferences(comparisons, source)
        report = {}
        if prompts_dir is not None:
            parts, report = released.match(prefs, prompts_dir, splits, explain=explain_unmatched)
            prefs = [p for name in splits for p in parts[name]]
            dropped_other = sum(report["other_split"].values())
            dropped_missing = sum(report["unmatched"].values())
            if dropped_other:
                stats.dropped["other_split"] = dropped_other
            if dropped_missing:
                stats.dropped["not_in_prompts"] = dropped_missing
            stats.kept = len(prefs)
        verdicts = {}
        for c in comparisons:
            verdicts[c["verdict"]] = verdicts.get(c["verdict"], 0) + 1
        result = {**stats.as_dict(), "verdicts": verdicts, "pairing": pairing, **extra, **report}
        if not prefs:
            raise UserError(
                f"import_paper_annotations.path = {path!r}: none of its {len(comparisons)} annotations became a "
                f"preference pair ({result['dropped']}); check import_paper_annotations.pairing / prompts_dir / "
                "splits (nothing was written)"
            )
        provenance = {"source": abspath(path), "judge": judge, "pairing": pairing}
        write_record_sets(
            [
                (join(output_dir, "comparisons"), COMPARISONS, comparisons, provenance),
                (join(output_dir, "preferences"), PREFERENCES, prefs, {**provenance, "import": result}),
            ],
            num_shards,
            "import_paper_annotations.overwrite",
            overwrite,
        )
        return _write_stats(output_dir, result)


def imported_preferences(path: str, output_dir: str, **settings) -> str:
    """The preferences/ record set of `path`'s annotations under `output_dir`, imported on
    the first call (import_paper_annotations with `settings`) and reused once complete: the
    hook an arm's preferences stage calls to train on released annotations instead of
    asking a critic."""
    prefs = join(output_dir, "preferences")
    if not exists(join(prefs, MANIFEST)):  # written last, so a killed import is redone
        import_paper_annotations(path, output_dir, **settings)
    return prefs
