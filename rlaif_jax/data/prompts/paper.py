"""Importers for the paper's released files, so an arm can be reproduced without API calls.

- Completion files (GPT-4 / Claude demonstrations): AlpacaEval-style JSON records with
  `instruction`, `output`, optional `generator` and `finish_reason`.
- AI-preference annotation files: AlpacaEval annotation records with `instruction`,
  `output_1`, `output_2`, `preference`, optional `generator_1/2`, `annotator`,
  `raw_completion`. `preference` 1 / 2 means output_1 / output_2 wins, 1.5 (or 0) a tie,
  null / NaN an unparsed answer.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping, Optional

from rlaif_jax.data.ids import prompt_id
from rlaif_jax.data.prompts.readers import _field, load_json_records, parse_alpaca
from rlaif_jax.data.prompts.types import InputError, PromptExample, Stats


def read_paper_completions(
    path: str | os.PathLike, source_model: Optional[str] = None
) -> tuple[list[PromptExample], Stats]:
    """Teacher demonstrations from the paper's completion JSON (every record needs `output`).

    `source_model` overrides the records' `generator` (e.g. "gpt-4-0314"). The paper keeps
    only finish_reason == "stop" for GPT-4; records with another finish_reason are kept
    here with that reason recorded, so the SFT stage can filter on it explicitly.
    """
    path = os.fspath(path)
    return parse_alpaca(load_json_records(path), path, source_model, require_output=True)


def _verdict(value: Any, where: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "invalid"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}: field 'preference' must be a number or null, got {value!r}")
    if value == 1:
        return "first"
    if value == 2:
        return "second"
    if value in (0, 1.5):
        return "tie"
    raise InputError(f"{where}: field 'preference'={value!r} is not 1, 2, 1.5, 0 or null")


def parse_paper_annotations(rows: Iterable[Any], source: str, judge: Optional[str] = None) -> list[dict]:
    """Annotation records -> COMPARISONS-schema dicts (verdict in canonical order)."""
    out = []
    for i, row in enumerate(rows):
        where = f"{source}: record {i}"
        prompt = _field(row, "instruction", where)
        if "preference" not in row:
            raise InputError(f"{where}: missing field 'preference'")
        annotator = judge or _field(row, "annotator", where, required=False)
        if annotator is None:
            raise InputError(f"{where}: missing field 'annotator' (or pass judge=)")
        swapped = row.get("swapped", row.get("is_switched_outputs", False))
        out.append(
            {
                "prompt_id": prompt_id(prompt),
                "prompt": prompt,
                "response_1": _field(row, "output_1", where),
                "response_2": _field(row, "output_2", where),
                "model_1": _field(row, "generator_1", where, required=False),
                "model_2": _field(row, "generator_2", where, required=False),
                "judge": str(annotator),
                "verdict": _verdict(row["preference"], where),
                "raw_judge_text": _field(row, "raw_completion", where, (str,), required=False) or "",
                "swapped": int(bool(swapped)),
            }
        )
    return out


def read_paper_annotations(path: str | os.PathLike, judge: Optional[str] = None) -> list[dict]:
    path = os.fspath(path)
    return parse_paper_annotations(load_json_records(path), path, judge)


def comparisons_to_preferences(comparisons: Iterable[Mapping[str, Any]], source: str = "") -> tuple[list[dict], Stats]:
    """Decided comparisons -> PREFERENCES-schema dicts.

    Ties and invalid verdicts are dropped and counted (never turned into "second wins", the
    bug in the paper's code), as are pairs whose two responses are identical.
    """
    stats, out = Stats(), []
    for i, c in enumerate(comparisons):
        stats.read += 1
        verdict = c["verdict"]
        if verdict in ("tie", "invalid"):
            stats.drop(verdict)
            continue
        if verdict not in ("first", "second"):
            raise InputError(f"{source}: record {i}: unknown verdict {verdict!r}")
        if c["response_1"] == c["response_2"]:
            stats.drop("identical_responses")
            continue
        first = verdict == "first"
        out.append(
            {
                "prompt_id": c["prompt_id"],
                "prompt": c["prompt"],
                "chosen": c["response_1"] if first else c["response_2"],
                "rejected": c["response_2"] if first else c["response_1"],
                "provenance": f"judge={c['judge']};source={source}#{i}",
            }
        )
    stats.kept = len(out)
    return out, stats
