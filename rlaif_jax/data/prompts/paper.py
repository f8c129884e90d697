"""Readers for the paper's released files, in the shapes they were released in, so an arm
can be reproduced without API calls (docs/released_data.md).

- Completion files (`sharegpt1turn_df1.0_ff0_gpt4_completions.json`, `*claude_completions.json`):
  one JSON object mapping each ShareGPT instruction to a list of completions, the first the
  teacher's demonstration (the paper's loader reads `json.load(f).items()` and takes
  `completions[0]`), any others extra samples that no arm of the paper trains on (counted,
  not imported). AlpacaEval-style record lists (`instruction`, `output`, optional
  `generator` and `finish_reason`; a JSON array or JSON Lines) are read too.
- AI-preference annotation files (`comparisons_<critic>/<a>_vs_<b>/annotations.json`), as
  alpaca_eval writes them: a JSON array of records with `instruction`, `output_1`,
  `output_2`, `preference`, `annotator`, optional `generator_1/2` and `raw_completion` (a
  string, or an object for function-calling annotators). `preference` 1 / 2 means
  output_1 / output_2 wins, 1.5 or 0 (alpaca_eval's value for identical outputs) a tie,
  null / NaN an answer the annotator's parser could not read.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, Optional

from rlaif_jax.data.ids import prompt_id
from rlaif_jax.data.prompts.readers import SPECIAL_STRINGS, _field, load_json_records, parse_alpaca, record_at
from rlaif_jax.data.prompts.types import InputError, PromptExample, Stats
from rlaif_jax.errors import UserError
from rlaif_jax.fileio import decode_utf8, json_kind, open_file

# How annotations become preference pairs (import_paper_annotations.pairing).
PAIRINGS = ("strict", "paper")


# ----------------------------------------------------------------------------- completions


def _load_json_or_lines(path: str) -> Any:
    """The file's one JSON document (object or array), else its JSON Lines records. A
    broken document is named by line, column and the top-level record it breaks in."""
    with open_file(path, "rb") as f:
        data = f.read()
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # a byte-order mark is not content
    try:
        text = decode_utf8(data[bom:], path, offset=bom)
    except UserError as e:
        raise InputError(str(e)) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        first_line = text.lstrip().split("\n", 1)[0]
        if e.msg != "Extra data" and not _parses(first_line):
            record = record_at(text)
            where = f" (in record {record})" if record is not None else ""
            raise InputError(
                f"{path}: invalid JSON at line {e.lineno} col {e.colno}{where}: {e.msg}; the file is "
                "truncated or was edited by hand: fetch it again"
            ) from None
        return load_json_records(path)  # JSON Lines (names its own broken line)


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _is_completion_map(value: Any) -> bool:
    """The released object form: instruction -> list of completions. A lone JSON Lines
    record (an object with an 'instruction' string) is not one."""
    return isinstance(value, dict) and not isinstance(value.get("instruction"), str)


def parse_completion_map(
    mapping: Mapping[str, Any], source: str, source_model: Optional[str] = None
) -> tuple[list[PromptExample], Stats, int]:
    """The released object form -> (demonstrations, stats, extra completions not imported).

    The key is the instruction exactly as the paper's ShareGPT loader produced it (and as
    prepare_prompts reads it); the first completion is the demonstration. The paper wrote
    only GPT-4 answers with finish_reason "stop" (and no empty Claude answers) into these
    files but kept no reason, so finish_reason is "unknown".
    """
    stats, out, extra = Stats(), [], 0
    for i, (instruction, completions) in enumerate(mapping.items()):
        stats.read += 1
        where = f"{source}: record {i} (instruction {instruction[:60]!r})"
        if not isinstance(completions, list) or not completions:
            raise InputError(
                f"{where}: expected a non-empty list of completion strings, got a JSON {json_kind(completions)}; "
                "the released completion files map each instruction to a list whose first item is the completion"
            )
        bad = [j for j, c in enumerate(completions) if not isinstance(c, str)]
        if bad:
            raise InputError(
                f"{where}: completion {bad[0]} is a JSON {json_kind(completions[bad[0]])}, expected a string "
                "(each completion is the teacher's reply text)"
            )
        if not instruction.strip():
            stats.drop("empty_prompt")
            continue
        extra += len(completions) - 1
        out.append(PromptExample(instruction, source, i, completions[0], source_model))
    stats.kept = len(out)
    return out, stats, extra


def read_completion_file(
    path: str | os.PathLike, source_model: Optional[str] = None
) -> tuple[list[PromptExample], Stats, dict]:
    """Teacher demonstrations from a released completion file in either shape; returns
    (demonstrations, stats, {"shape": "object" | "records", "extra_completions": n})."""
    path = os.fspath(path)
    value = _load_json_or_lines(path)
    if _is_completion_map(value):
        demos, stats, extra = parse_completion_map(value, path, source_model)
        return demos, stats, {"shape": "object", "extra_completions": extra}
    rows = [value] if isinstance(value, dict) else value
    if not isinstance(rows, list):
        raise InputError(
            f"{path}: top-level JSON {json_kind(rows)}; expected an object mapping each instruction to a list "
            "of completions (the released shape), or a list of records with 'instruction' and 'output'"
        )
    demos, stats = parse_alpaca(rows, path, source_model, require_output=True)
    return demos, stats, {"shape": "records", "extra_completions": 0}


def read_paper_completions(
    path: str | os.PathLike, source_model: Optional[str] = None
) -> tuple[list[PromptExample], Stats]:
    """Teacher demonstrations from the paper's completion JSON (read_completion_file).

    `source_model` overrides the records' `generator` (e.g. "gpt-4-0314"). The paper keeps
    only finish_reason == "stop" for GPT-4; records with another finish_reason are kept
    here with that reason recorded, so the SFT stage can filter on it explicitly.
    """
    demos, stats, _ = read_completion_file(path, source_model)
    return demos, stats


# ----------------------------------------------------------------------------- annotations
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
    raise InputError(
        f"{where}: field 'preference'={value!r} is not 1, 2, 1.5, 0 or null (the released annotations' values; "
        "a weighted annotator's fractional preferences are not supported)"
    )


def _raw_text(row: Mapping, where: str) -> str:
    """The annotator's answer verbatim: alpaca_eval stores a string, or for function-calling
    annotators the parsed arguments as an object (kept as canonical JSON)."""
    value = row.get("raw_completion")
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    raise InputError(f"{where}: field 'raw_completion' must be a string or an object, got a JSON {json_kind(value)}")


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
                "raw_judge_text": _raw_text(row, where),
                "swapped": int(bool(swapped)),
            }
        )
    return out


def read_paper_annotations(path: str | os.PathLike, judge: Optional[str] = None) -> list[dict]:
    """An annotations.json as alpaca_eval writes it (a JSON array; JSON Lines too)."""
    path = os.fspath(path)
    rows = _load_json_or_lines(path)
    if not isinstance(rows, list):
        raise InputError(
            f"{path}: top-level JSON {json_kind(rows)}; an annotations file is a JSON array of records with "
            "'instruction', 'output_1', 'output_2' and 'preference' (as alpaca_eval writes annotations.json)"
        )
    return parse_paper_annotations(rows, path, judge)


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


def paper_loader_preferences(
    comparisons: Iterable[Mapping[str, Any]], source: str = ""
) -> tuple[list[dict], Stats, dict]:
    """Pairs exactly as the paper's loader builds them from an annotations file
    (`get_sharegpt_aiprefs` in github.com/architsharma97/dpo-rlaif, preference_datasets.py),
    for a reader who wants to match the paper's numbers, bug included:

    - a record whose instruction, output_1 or output_2 contains <s>, </s> or <|endoftext|>
      is skipped;
    - output_1 is chosen when preference == 1, and output_2 in EVERY other case: output 2
      wins, ties (1.5, or 0 for identical outputs) and unparsed answers (null / NaN)
      included, and pairs of identical outputs are kept;
    - the pairs are keyed by instruction: a later record for the same instruction replaces
      the earlier one's pair, at the earlier one's position.

    Returns (preferences, stats, relabelled) where relabelled counts the ties and invalid
    answers that became "output 2 wins" and the identical pairs kept.
    """
    stats, by_prompt = Stats(), {}
    relabelled = {"tie_as_second": 0, "invalid_as_second": 0, "identical_kept": 0}
    for i, c in enumerate(comparisons):
        stats.read += 1
        verdict = c["verdict"]
        if verdict not in ("first", "second", "tie", "invalid"):
            raise InputError(f"{source}: record {i}: unknown verdict {verdict!r}")
        if any(s in c[k] for k in ("prompt", "response_1", "response_2") for s in SPECIAL_STRINGS):
            stats.drop("special_token")
            continue
        first = verdict == "first"
        if verdict in ("tie", "invalid"):
            relabelled[f"{verdict}_as_second"] += 1
        if c["response_1"] == c["response_2"]:
            relabelled["identical_kept"] += 1
        if c["prompt"] in by_prompt:
            stats.drop("duplicate_instruction_replaced")
        by_prompt[c["prompt"]] = {
            "prompt_id": c["prompt_id"],
            "prompt": c["prompt"],
            "chosen": c["response_1"] if first else c["response_2"],
            "rejected": c["response_2"] if first else c["response_1"],
            "provenance": f"judge={c['judge']};source={source}#{i};pairing=paper",
        }
    out = list(by_prompt.values())
    stats.kept = len(out)
    return out, stats, relabelled
