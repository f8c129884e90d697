"""The paper's released files matched to the prompts prepare_prompts kept.

The released completion and annotation files key every record by its ShareGPT instruction,
exactly as the paper's loader cut it out of the conversation; prepare_prompts keys its
prompts by `prompt_id` (a hash of that same exact text). A record matches when its id is
in a split of the prepared prompts. For those that do not, `explain_unmatched` goes back
to the source prepare_prompts read (named in the prompts' manifest) and says why, with
prepare_prompts' own reader and filters, so the reasons are the ones that really dropped
each prompt. The counts go into the import's stats.json and its records' manifests.

Names of the released files (the authors' data repository), for recipes and docs.
"""

from __future__ import annotations

import collections
import logging
from typing import Iterable, Mapping, Optional, Sequence

from rlaif_jax.data.ids import prompt_id
from rlaif_jax.data.prompts.prepare import MAX_CHARS, MAX_WORDS, length_filter
from rlaif_jax.data.prompts.readers import _ASSISTANT_ROLES, _HUMAN_ROLES, load_json_records, parse_sharegpt
from rlaif_jax.data.prompts.types import InputError, Stats
from rlaif_jax.data.records import PROMPTS, read_manifest, read_records
from rlaif_jax.errors import UserError
from rlaif_jax.fileio import exists, join

log = logging.getLogger(__name__)

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split_no_imsorry.json"
GPT4_COMPLETIONS_FILE = "sharegpt1turn_df1.0_ff0_gpt4_completions.json"
CLAUDE_COMPLETIONS_SUFFIX = "claude_completions.json"  # the paper's loader reads every *claude_completions.json
ANNOTATIONS_FILE = "comparisons_gpt4/mistral7bsft_vs_chatgpt/annotations.json"

SPLITS = ("sft", "feedback")
# How the paper's loader glues a conversation that opens with two human turns into one
# instruction ("Human: A\n\nAssistant: B\n\nAssistant: " with its template cut off).
_MERGED_TURNS = "\n\nAssistant: "


def split_of(prompts_dir: str) -> dict[str, str]:
    """prompt_id -> the split ('sft' / 'feedback') prepare_prompts put it in."""
    return {r["prompt_id"]: name for name in SPLITS for r in read_records(join(prompts_dir, "prompts", name), PROMPTS)}


def match(
    records: Iterable[dict], prompts_dir: str, splits: Sequence[str] = SPLITS, explain: bool = True
) -> tuple[dict[str, list[dict]], dict]:
    """Records (with 'prompt_id' and 'prompt') -> ({split: records}, report).

    Records whose prompt is in a split outside `splits` are left out and counted
    (`other_split`); those in no split are counted by reason under `unmatched` (see
    explain_unmatched; with explain=False all are `not_in_prompts`).
    """
    where = split_of(prompts_dir)
    parts: dict[str, list[dict]] = {name: [] for name in splits}
    other, missing = collections.Counter(), {}
    for rec in records:
        name = where.get(rec["prompt_id"])
        if name is None:
            missing.setdefault(rec["prompt_id"], rec["prompt"])
        elif name in parts:
            parts[name].append(rec)
        else:
            other[name] += 1
    unmatched = explain_unmatched(missing, prompts_dir) if explain else {"not_in_prompts": len(missing)}
    report = {
        "matched": sum(len(p) for p in parts.values()),
        "matched_by_split": {name: len(p) for name, p in parts.items()},
        "other_split": dict(other),
        "unmatched": {k: v for k, v in sorted(unmatched.items()) if v},
    }
    return parts, report


def _first_human_text(row) -> Optional[str]:
    """The first human turn's text, as the paper's loader takes it (None if there is none)."""
    turns = row.get("conversations") if isinstance(row, Mapping) else None
    for turn in turns if isinstance(turns, list) else ():
        if not isinstance(turn, Mapping):
            return None
        role = str(turn.get("from", "")).lower()
        if role in _HUMAN_ROLES:
            value = turn.get("value")
            return value if isinstance(value, str) else None
        if role in _ASSISTANT_ROLES:
            return None  # the paper's loader skips chats that start with the assistant
    return None


def explain_unmatched(missing: Mapping[str, str], prompts_dir: str) -> dict[str, int]:
    """Why each prompt (prompt_id -> text) is in no split of `prompts_dir`, counted by reason:

    - a ShareGPT filter of prepare_prompts' reader dropped its conversation (`special_token`,
      `first_turn_not_human`, `no_assistant_reply`, `starts_with_assistant`, ...),
    - `too_many_words` / `too_many_chars`: the paper's length limit (2000 words / 8000
      characters),
    - `filtered_by_prepare`: its conversation passed those, so a stricter limit bound on
      prepare_prompts dropped it,
    - `merged_human_turns`: the paper's loader glued two consecutive human turns into one
      instruction ("A\\n\\nAssistant: B"), which is no single turn of the source,
    - `whitespace_differs`: the source holds it with other leading / trailing whitespace,
    - `not_in_source`: the prompts' source does not hold it at all,
    - `not_in_prompts`: the prompts were not prepared from a ShareGPT file this can read.
    """
    if not missing:
        return {}
    rows = _sharegpt_rows(prompts_dir)
    if rows is None:
        return {"not_in_prompts": len(missing)}
    reasons: dict[str, str] = {}
    stripped: dict[str, str] = {}  # stripped text -> id
    first_texts: dict[str, str] = {}  # id -> drop reason, for every first human text of the source
    for row in rows:
        text = _first_human_text(row)
        if text is None:
            continue
        pid = prompt_id(text)
        stripped.setdefault(text.strip(), pid)
        if pid in first_texts:
            continue
        first_texts[pid] = _drop_reason(row, text)
    for pid, text in missing.items():
        if pid in first_texts:
            reasons[pid] = first_texts[pid]
        elif _MERGED_TURNS in text and prompt_id(text.split(_MERGED_TURNS, 1)[0]) in first_texts:
            reasons[pid] = "merged_human_turns"
        elif text.strip() in stripped:
            reasons[pid] = "whitespace_differs"
        else:
            reasons[pid] = "not_in_source"
    return dict(collections.Counter(reasons.values()))


def _drop_reason(row, text: str) -> str:
    """Which of prepare_prompts' filters drops this conversation (its reader's, then the
    paper's length limit); `filtered_by_prepare` if none of them does."""
    try:
        kept, stats = parse_sharegpt([row], "source")
    except InputError:  # a record the reader refuses: prepare_prompts would have stopped on it
        return "malformed_in_source"
    if not kept:
        return next(iter(stats.dropped))
    stats = Stats()
    if not length_filter(kept, stats, MAX_WORDS, MAX_CHARS):
        return next(iter(stats.dropped))
    return "filtered_by_prepare"


def _sharegpt_rows(prompts_dir: str) -> Optional[list]:
    """The rows of the ShareGPT file the prompts were prepared from, or None (another
    format, or the file is gone)."""
    provenance = read_manifest(join(prompts_dir, "prompts", "sft"), PROMPTS).get("provenance", {})
    source = provenance.get("source")
    if not source or provenance.get("format") not in ("sharegpt", "auto") or not exists(source):
        log.info("unmatched records not explained: prompts source %r is not a readable ShareGPT file", source)
        return None
    try:
        rows = load_json_records(source)
    except (UserError, OSError) as e:  # explaining is a report; the import must not fail on it
        log.warning("unmatched records not explained: %s", e)
        return None
    if not rows or not isinstance(rows[0], Mapping) or "conversations" not in rows[0]:
        return None
    return rows
