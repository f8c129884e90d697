"""Readers for prompt sources: ShareGPT, Alpaca/AlpacaEval, plain JSONL, TRL schemas and
local Hugging Face datasets. Each returns (examples, Stats); malformed records raise
InputError naming file, record index and field. Only the documented filters drop records,
and every drop is counted in Stats. Paths may be URLs (gs://..., see rlaif_jax.fileio).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

from rlaif_jax.data.ids import prompt_id
from rlaif_jax.data.prompts.types import InputError, PromptExample, Stats
from rlaif_jax.errors import UserError
from rlaif_jax.fileio import decode_utf8, isdir, isfile, json_kind, open_file

# Conversations containing these are dropped (as the paper's code does): they would collide
# with special tokens of the tokenizers the paper trains.
SPECIAL_STRINGS = ("<s>", "</s>", "<|endoftext|>")
_HUMAN_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "assistant", "chatgpt", "bard", "bing", "model"}


# ----------------------------------------------------------------------------- file access


def load_json_records(path: str | os.PathLike) -> list[Any]:
    """A JSON array file, or JSON Lines (one object per line; chosen by content, not name)."""
    path = os.fspath(path)
    with open_file(path, "rb") as f:
        data = f.read()
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # a byte-order mark (Windows editors) is not content
    try:
        text = decode_utf8(data[bom:], path, offset=bom)
    except UserError as e:
        raise InputError(str(e)) from None
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as e:
        # "Extra data" after a first line that parsed: JSON Lines whose lines are arrays,
        # named line by line below.
        if text.lstrip().startswith("[") and e.msg != "Extra data":
            record = record_at(text)
            where = f" (in record {record})" if record is not None else ""
            raise InputError(f"{path}: invalid JSON at line {e.lineno} col {e.colno}{where}: {e.msg}") from None
        whole = None  # not one JSON document: read it as JSON Lines
    if isinstance(whole, list):
        return whole
    if isinstance(whole, dict) and "\n" in text.strip():
        raise InputError(f"{path}: top-level JSON object; expected a list of records or JSON Lines")
    records = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: line {line_no} (record {len(records)}): invalid JSON: {e.msg}") from None
        if not isinstance(value, dict):
            raise InputError(
                f"{path}: line {line_no} is a JSON {json_kind(value)}, expected an object "
                "(one record per line, e.g. with a 'prompt' string)"
            )
        records.append(value)
    return records


_WS = re.compile(r"[ \t\n\r]*")


def record_at(text: str) -> Optional[int]:
    """The index of the first top-level record (array item or object member) of a JSON
    document that does not parse, or None when the records parse and the frame breaks."""
    dec = json.JSONDecoder()
    i = _WS.match(text, 0).end()
    if text[i : i + 1] not in ("[", "{"):
        return None
    is_object, n = text[i] == "{", 0
    i += 1
    while True:
        i = _WS.match(text, i).end()
        try:
            if is_object:
                key, i = dec.raw_decode(text, i)
                i = _WS.match(text, i).end()
                if not isinstance(key, str) or text[i : i + 1] != ":":
                    return n
                i = _WS.match(text, i + 1).end()
            _, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return n
        i = _WS.match(text, i).end()
        if text[i : i + 1] != ",":
            return None if text[i : i + 1] in ("]", "}") else n + 1
        n += 1
        i += 1


def _field(row: Any, name: str, where: str, types=(str,), required: bool = True) -> Any:
    if not isinstance(row, Mapping):
        raise InputError(f"{where}: expected an object, got {type(row).__name__}")
    if name not in row or row[name] is None:
        if required:
            raise InputError(f"{where}: missing field {name!r}")
        return None
    value = row[name]
    if not isinstance(value, types):
        names = "/".join(t.__name__ for t in types)
        raise InputError(f"{where}: field {name!r} must be {names}, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------- ShareGPT


def parse_sharegpt(
    rows: Iterable[Any], source: str, completion_model: str = "sharegpt-chatgpt"
) -> tuple[list[PromptExample], Stats]:
    """First human -> assistant turn of each conversation.

    Filters (counted in stats.dropped): `special_token` (any turn contains <s>, </s> or
    <|endoftext|>), `starts_with_assistant`, `first_turn_not_human` (e.g. a system turn),
    `no_assistant_reply`, `empty_conversation`, `empty_prompt`. The assistant reply is kept
    as the completion: in the paper it is the GPT-3.5 teacher's demonstration.
    """
    stats, out = Stats(), []
    for i, row in enumerate(rows):
        stats.read += 1
        where = f"{source}: record {i}"
        turns = _field(row, "conversations", where, (list,))
        if not turns:
            stats.drop("empty_conversation")
            continue
        roles, values = [], []
        for t, turn in enumerate(turns):
            roles.append(str(_field(turn, "from", f"{where}.conversations[{t}]")).lower())
            values.append(_field(turn, "value", f"{where}.conversations[{t}]"))
        if any(s in v for v in values for s in SPECIAL_STRINGS):
            stats.drop("special_token")
            continue
        if roles[0] in _ASSISTANT_ROLES:
            stats.drop("starts_with_assistant")
            continue
        if roles[0] not in _HUMAN_ROLES:
            stats.drop("first_turn_not_human")
            continue
        if len(turns) < 2 or roles[1] not in _ASSISTANT_ROLES:
            stats.drop("no_assistant_reply")
            continue
        if not values[0].strip():
            stats.drop("empty_prompt")
            continue
        out.append(PromptExample(values[0], source, i, values[1], completion_model, "unknown"))
    stats.kept = len(out)
    return out, stats


# ----------------------------------------------------------------------------- Alpaca


def parse_alpaca(
    rows: Iterable[Any],
    source: str,
    completion_model: Optional[str] = None,
    require_output: bool = False,
) -> tuple[list[PromptExample], Stats]:
    """Alpaca / AlpacaEval records: `instruction`, optional `input`, `output`, `generator`.

    A non-empty `input` is appended to the instruction after a blank line (Alpaca's own
    convention). `generator` (AlpacaEval) names the completion's model unless
    `completion_model` overrides it; `finish_reason` is read when present.
    """
    stats, out = Stats(), []
    for i, row in enumerate(rows):
        stats.read += 1
        where = f"{source}: record {i}"
        instruction = _field(row, "instruction", where)
        extra = _field(row, "input", where, required=False)
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        output = _field(row, "output", where, required=require_output)
        model = completion_model or _field(row, "generator", where, required=False)
        finish = _field(row, "finish_reason", where, required=False)
        if not prompt.strip():
            stats.drop("empty_prompt")
            continue
        out.append(PromptExample(prompt, source, i, output, model, finish))
    stats.kept = len(out)
    return out, stats


# ----------------------------------------------------------------------------- JSONL


def parse_plain(
    rows: Iterable[Any],
    source: str,
    prompt_field: str = "prompt",
    completion_field: Optional[str] = None,
    completion_model: Optional[str] = None,
) -> tuple[list[PromptExample], Stats]:
    """Records with a prompt string field (and optionally a completion string field)."""
    stats, out = Stats(), []
    for i, row in enumerate(rows):
        stats.read += 1
        where = f"{source}: record {i}"
        prompt = _field(row, prompt_field, where)
        completion = _field(row, completion_field, where) if completion_field else None
        if not prompt.strip():
            stats.drop("empty_prompt")
            continue
        out.append(PromptExample(prompt, source, i, completion, completion_model))
    stats.kept = len(out)
    return out, stats


# ----------------------------------------------------------------------------- TRL


def _messages_text(messages: Any, role: str, where: str) -> str:
    """The content of a single-turn message list, e.g. [{"role": "user", "content": ...}]."""
    if isinstance(messages, str):
        return messages
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: expected a string or a non-empty message list")
    for m, msg in enumerate(messages):
        _field(msg, "role", f"{where}[{m}]")
        _field(msg, "content", f"{where}[{m}]")
    if len(messages) != 1 or messages[0]["role"] != role:
        got = [m["role"] for m in messages]
        raise InputError(f"{where}: only single-turn data is supported: expected one {role!r} message, got roles {got}")
    return messages[0]["content"]


def _split_implicit(messages: Any, where: str) -> tuple[str, str]:
    """TRL's implicit-prompt form: a full [user, assistant] conversation."""
    if not isinstance(messages, list) or len(messages) != 2:
        raise InputError(f"{where}: implicit-prompt conversations must be [user, assistant]")
    return (
        _messages_text(messages[:1], "user", where),
        _messages_text(messages[1:], "assistant", where),
    )


def parse_trl(rows: Iterable[Any], source: str) -> tuple[list[PromptExample], list[dict], Stats]:
    """TRL dataset schemas, string or conversational, single-turn.

    - prompt / completion -> PromptExample with completion
    - prompt / chosen / rejected -> preference dict (PREFERENCES schema fields)
    - chosen / rejected conversations with an implicit prompt -> preference dict
    - messages ([user, assistant]) -> PromptExample with completion
    - prompt only -> PromptExample
    Returns (prompts, preferences, stats).
    """

    stats, prompts, prefs = Stats(), [], []
    for i, row in enumerate(rows):
        stats.read += 1
        where = f"{source}: record {i}"
        if not isinstance(row, Mapping):
            raise InputError(f"{where}: expected an object, got {type(row).__name__}")
        if "chosen" in row or "rejected" in row:
            if "prompt" in row:
                prompt = _messages_text(row["prompt"], "user", f"{where}.prompt")
                chosen = _messages_text(_need(row, "chosen", where), "assistant", f"{where}.chosen")
                rejected = _messages_text(_need(row, "rejected", where), "assistant", f"{where}.rejected")
            else:
                prompt, chosen = _split_implicit(_need(row, "chosen", where), f"{where}.chosen")
                prompt_r, rejected = _split_implicit(_need(row, "rejected", where), f"{where}.rejected")
                if prompt_r != prompt:
                    raise InputError(f"{where}: chosen and rejected conversations have different prompts")
            if chosen == rejected:
                stats.drop("chosen_equals_rejected")
                continue
            prefs.append(
                {
                    "prompt_id": prompt_id(prompt),
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "provenance": f"{source}#{i}",
                }
            )
        elif "messages" in row:
            prompt, completion = _split_implicit(row["messages"], f"{where}.messages")
            prompts.append(PromptExample(prompt, source, i, completion))
        else:
            prompt = _messages_text(_need(row, "prompt", where), "user", f"{where}.prompt")
            completion = None
            if row.get("completion") is not None:
                completion = _messages_text(row["completion"], "assistant", f"{where}.completion")
            if not prompt.strip():
                stats.drop("empty_prompt")
                continue
            prompts.append(PromptExample(prompt, source, i, completion))
    stats.kept = len(prompts) + len(prefs)
    return prompts, prefs, stats


def _need(row: Mapping, name: str, where: str) -> Any:
    if row.get(name) is None:
        raise InputError(f"{where}: missing field {name!r}")
    return row[name]


# ----------------------------------------------------------------------------- HF datasets


def load_hf_rows(path: str | os.PathLike, split: Optional[str] = None) -> list[dict]:
    """Rows of a local Hugging Face dataset: a `save_to_disk` directory, or data files
    (.json/.jsonl/.parquet/.csv) loaded with the matching `datasets` builder. Never
    touches the hub. URLs go to `datasets`, which reads them through fsspec."""
    import datasets

    path = os.fspath(path)
    if isdir(path):
        ds = datasets.load_from_disk(path)
    else:
        ext = os.path.splitext(path)[1].lstrip(".").lower()
        builder = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(ext)
        if builder is None:
            raise InputError(f"{path}: unsupported data file type {ext!r}")
        ds = datasets.load_dataset(builder, data_files=path, split=split or "train")
        split = None
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise InputError(f"{path}: dataset has splits {list(ds)}; pass split=")
            split = next(iter(ds))
        ds = ds[split]
    return list(ds)


# ----------------------------------------------------------------------------- dispatch

FORMATS = ("sharegpt", "alpaca", "plain", "trl")


def detect_format(row: Any, source: str = "") -> str:
    where = f"{source}: record 0: " if source else ""
    if not isinstance(row, Mapping):
        raise InputError(
            f"{where}cannot detect the format of a {json_kind(row)} record; expected an object "
            "(e.g. with a 'prompt' string)"
        )
    keys = set(row)
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys:
        return "alpaca"
    if keys & {"chosen", "rejected", "messages", "completion"} or (
        "prompt" in keys and isinstance(row["prompt"], list)
    ):
        return "trl"
    if "prompt" in keys:
        return "plain"
    raise InputError(
        f"{where}cannot detect the format of a record with keys {sorted(keys)}; expected "
        "'conversations', 'instruction', 'prompt', 'chosen'/'rejected' or 'messages' (or set the format)"
    )


def read_prompt_source(
    path: str | os.PathLike,
    format: str = "auto",
    *,
    split: Optional[str] = None,
    completion_model: Optional[str] = None,
) -> tuple[list[PromptExample], list[dict], Stats]:
    """Reads any supported source; returns (prompts, preference dicts, stats).

    JSON/JSONL files are read directly; directories (`save_to_disk`) and parquet/csv go
    through `datasets`. `format="auto"` looks at the first record's keys.
    """
    path = os.fspath(path)
    is_json = os.path.splitext(path)[1].lower() in (".json", ".jsonl") and isfile(path)
    rows: Sequence[Any] = load_json_records(path) if is_json else load_hf_rows(path, split)
    if not isinstance(rows, list):
        raise InputError(f"{path}: expected a list of records, got {type(rows).__name__}")
    if format == "auto":
        if not rows:
            return [], [], Stats()
        format = detect_format(rows[0], path)
    if format == "sharegpt":
        prompts, stats = parse_sharegpt(rows, path, completion_model or "sharegpt-chatgpt")
        return prompts, [], stats
    if format == "alpaca":
        prompts, stats = parse_alpaca(rows, path, completion_model)
        return prompts, [], stats
    if format == "plain":
        prompts, stats = parse_plain(rows, path, completion_model=completion_model)
        return prompts, [], stats
    if format == "trl":
        return parse_trl(rows, path)
    raise ValueError(f"unknown format {format!r}; choose from {('auto',) + FORMATS}")
