"""The feedback stages, each a gin-configurable function that reads files and writes a
record set (TFRecord shards + manifest, via rlaif_jax.data.records) plus JSON sidecars:

  teacher_stage         prompts -> demonstrations (API teacher), finish_reason filter
  policy_samples_stage  prompts -> demonstrations (a local checkpoint, compiled sampler)
  critic_stage          two demonstration sets -> comparisons (API critic), order
                        randomized per prompt and mapped back; pairwise or 1-5 ratings
  preferences_stage     comparisons (one or more critics) -> preference pairs + report

API stages go through FeedbackClient, so a rerun after a kill sends only what is not yet
in the cache and ends with the same records. Every prompt ends as a record or as a line
in errors.jsonl naming the request's error. Inputs and out_dir may be URLs (gs://...,
see rlaif_jax.fileio); the API cache (the client's cache_path) stays a local file.
How the critic is asked and the policy sampled are values (rlaif_jax.feedback.settings:
JudgeSettings, SamplingSettings), built from gin in the caller's scope when not given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Mapping, Optional, Sequence

import gin

from rlaif_jax import fileio as fio
from rlaif_jax.data.ids import id_conflicts
from rlaif_jax.data.ids import prompt_id as make_prompt_id
from rlaif_jax.data.records import (
    COMPARISONS,
    DEMONSTRATIONS,
    PREFERENCES,
    PROMPTS,
    read_manifest,
    read_records,
    write_records,
)
from rlaif_jax.data.records.schemas import normalize_finish_reason
from rlaif_jax.data.tokenize import get_template, load_tokenizer
from rlaif_jax.errors import (
    ConfigError,
    UserError,
    binding,
    existing_dir,
    existing_path,
    in_range,
    non_negative,
    positive,
    whole,
)
from rlaif_jax.feedback import judge as J
from rlaif_jax.feedback.client import FeedbackClient
from rlaif_jax.feedback.preferences import build_preference_pairs
from rlaif_jax.feedback.server.model_backend import LocalModel
from rlaif_jax.feedback.settings import JudgeSettings, SamplingSettings
from rlaif_jax.fileio import save_operative_config, write_json, write_jsonl
from rlaif_jax.outputs import check_replace, writer_lock

log = logging.getLogger(__name__)
STAGE_VERSION = 1


# -- io helpers ----------------------------------------------------------------------------


def _is_records_dir(path: str) -> bool:
    return fio.isdir(path) and fio.exists(fio.join(path, "manifest.json"))


def _neither(path: str, setting: Optional[str], what: str) -> UserError:
    where = f"{setting} = {path!r}" if setting else path
    if fio.isdir(path):
        return UserError(
            f"{where}: a directory without manifest.json (the stage writing it has not finished); "
            f"give a complete record set or a JSONL file of {what}"
        )
    return UserError(f"{where}: no such record directory or JSONL file of {what}")


def load_prompts(path: str, split: Optional[str] = None, setting: Optional[str] = None) -> list[dict]:
    """Prompt records from a PROMPTS record set or a JSONL file of {"prompt": ...} lines
    (prompt_id computed when absent), optionally only one split. With `setting` (the gin
    binding that gave `path`), no prompts, or none in `split`, is a UserError naming it."""
    if _is_records_dir(path):
        rows = list(read_records(path, PROMPTS))
        where = [f"record {i}" for i in range(len(rows))]
    elif fio.isfile(path):
        rows, where = [], []
        for line, r in fio.iter_jsonl(path):
            if not isinstance(r, dict):
                raise UserError(
                    f"{path}: line {line} is a JSON {fio.json_kind(r)}, expected an object with a 'prompt' string"
                )
            if not isinstance(r.get("prompt"), str):
                raise UserError(f"{path}: line {line} has no string 'prompt'")
            r.setdefault("prompt_id", make_prompt_id(r["prompt"]))
            rows.append(r)
            where.append(f"line {line}")
    else:
        raise _neither(path, setting, "prompts")
    rows = _unique_prompts(path, rows, where)
    if setting and not rows:
        raise UserError(
            f"{setting} = {path!r}: holds no prompts; give a non-empty prompt file (nothing was sent or written)"
        )
    if split is not None:
        n = len(rows)
        rows = [r for r in rows if r.get("split") == split]
        if setting and not rows:
            stage = setting.split(".")[0]
            raise UserError(
                f"{setting} = {path!r}: none of its {n} prompts is in split {split!r}; set "
                f"{stage}.split to the split they are in, or None for all (nothing was sent or written)"
            )
    return rows


def _unique_prompts(path: str, rows: list[dict], where: list[str]) -> list[dict]:
    """One row per prompt_id: two different prompts under one id are refused (every record
    and join downstream is keyed by it); a prompt repeated with its id is kept once."""
    conflicts = id_conflicts(rows)
    if conflicts:
        pid, idx = next(iter(conflicts.items()))
        raise UserError(
            f"{path}: prompt_id {pid!r} is given to {len(idx)} rows with different prompts "
            f"({', '.join(where[i] for i in idx[:3])}; {len(conflicts)} such id(s)); give each prompt "
            "its own id, or drop the ids to use the prompt's hash (nothing was sent or written)"
        )
    seen: set = set()
    out = [r for r in rows if not (r["prompt_id"] in seen or seen.add(r["prompt_id"]))]
    if len(out) < len(rows):
        log.warning("%s: %d repeated prompts (same id and text) are asked once", path, len(rows) - len(out))
    return out


def load_demonstrations(path: str, setting: Optional[str] = None) -> list[dict]:
    if _is_records_dir(path):
        return list(read_records(path, DEMONSTRATIONS))
    if not fio.isfile(path):
        raise _neither(path, setting, "demonstrations")
    return fio.read_jsonl_objects(path, "an object with 'prompt_id', 'prompt' and 'completion'")


def load_comparisons(path: str) -> list[dict]:
    """The rich comparisons.jsonl beside a comparison record set when present (views,
    p_1, errors), else the records themselves."""
    side = fio.join(path, "comparisons.jsonl") if fio.isdir(path) else path
    if fio.isfile(side):
        return fio.read_jsonl_objects(side, "a comparison object")
    return list(read_records(path, COMPARISONS))


def _run(client: FeedbackClient, requests, desc: str, batch_api: bool, poll_interval_s: float):
    if batch_api:
        return client.run_batch(requests, desc, poll_interval_s=poll_interval_s)
    return client.run(requests, desc)


def _counts(stage: str, **values) -> None:
    """Counts and sizes: whole numbers >= 1 (None: not set)."""
    for name, value in values.items():
        if value is not None:
            whole(binding(f"{stage}.{name}"), value, 1)


def _too_long(prompt: str, max_words: Optional[int], max_chars: Optional[int]) -> bool:
    return bool((max_words and len(prompt.split()) >= max_words) or (max_chars and len(prompt) >= max_chars))


# -- teacher -------------------------------------------------------------------------------


@gin.configurable
def teacher_stage(
    prompts: str = gin.REQUIRED,
    out_dir: str = gin.REQUIRED,
    client: FeedbackClient = gin.REQUIRED,
    system_prompt: Optional[str] = "You are a helpful assistant.",
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
    max_tokens: Optional[int] = None,
    n: int = 1,
    keep_finish_reasons: Optional[Sequence[str]] = ("stop",),
    split: Optional[str] = None,
    max_prompt_words: Optional[int] = 2000,
    max_prompt_chars: Optional[int] = 8000,
    limit: Optional[int] = None,
    batch_api: bool = False,
    poll_interval_s: float = 30.0,
    num_shards: int = 1,
    overwrite: bool = False,
) -> dict:
    """Teacher completions -> DEMONSTRATIONS records. temperature/top_p None leave the API's
    default (the paper's GPT-4 arm). The paper keeps finish_reason "stop" only; None keeps
    everything. Prompts of >= max_prompt_words words or >= max_prompt_chars characters are
    skipped before any request, as in the paper's API scripts. No prompts to send is an
    error, and a complete set already in out_dir is replaced by a smaller one only with
    `overwrite` (refused before anything is paid for where the count already tells).
    Returns the manifest."""
    existing_path(binding("teacher_stage.prompts"), prompts, "prompt file or record directory")
    non_negative(binding("teacher_stage.temperature"), temperature)
    in_range(binding("teacher_stage.top_p"), top_p, 0.0, 1.0, lo_open=True)
    _counts(
        "teacher_stage",
        n=n,
        max_tokens=max_tokens,
        limit=limit,
        num_shards=num_shards,
        max_prompt_words=max_prompt_words,
        max_prompt_chars=max_prompt_chars,
    )
    positive(binding("teacher_stage.poll_interval_s"), poll_interval_s)
    with writer_lock(out_dir, "teacher_stage.out_dir"):
        fio.makedirs(out_dir)
        rows = load_prompts(prompts, split, binding("teacher_stage.prompts"))[:limit]
        skipped_long = [r for r in rows if _too_long(r["prompt"], max_prompt_words, max_prompt_chars)]
        rows = [r for r in rows if not _too_long(r["prompt"], max_prompt_words, max_prompt_chars)]
        if not rows:
            raise UserError(
                f"teacher_stage.prompts = {prompts!r}: all {len(skipped_long)} prompts are at least "
                "teacher_stage.max_prompt_words words or max_prompt_chars characters long; raise those "
                "limits (nothing was sent or written)"
            )
        # At most n demonstrations per prompt: a set this run could only shrink is refused
        # before a single request is paid for.
        check_replace(out_dir, len(rows) * n, "teacher_stage.overwrite", overwrite)
        sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "n": n if n != 1 else None}
        template = f"teacher_system@{hashlib.sha256((system_prompt or '').encode()).hexdigest()[:16]}"
        answered = _answered_in(
            out_dir,
            stage="teacher",
            model=client.model,
            template=template,
            sampling=sampling,
            system_prompt=system_prompt,
            keep_finish_reasons=list(keep_finish_reasons) if keep_finish_reasons is not None else None,
        )
        to_ask = [r for r in rows if (r["prompt_id"], r["prompt"]) not in answered]
        reqs = []
        for r in to_ask:
            msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
                {"role": "user", "content": r["prompt"]}
            ]
            reqs.append(
                client.request(
                    msgs, template=template, meta={"prompt_id": r["prompt_id"], "stage": "teacher"}, **sampling
                )
            )
        results = _run(client, reqs, f"teacher {client.model}", batch_api, poll_interval_s) if reqs else []
        result_of = {r["prompt_id"]: res for r, res in zip(to_ask, results)}
        demos, errors = [], []
        dropped = {}
        for r in rows:
            if (r["prompt_id"], r["prompt"]) in answered:
                demos.extend(answered[r["prompt_id"], r["prompt"]])
                continue
            res = result_of[r["prompt_id"]]
            if res["status"] != "ok":
                errors.append({"prompt_id": r["prompt_id"], "key": res["key"], **res["error"]})
                continue
            for ch in res["response"]["choices"]:
                try:
                    fr = normalize_finish_reason(ch.get("finish_reason"))
                except ValueError:
                    fr = "unknown"
                if keep_finish_reasons is not None and fr not in keep_finish_reasons:
                    dropped[f"finish_reason={fr}"] = dropped.get(f"finish_reason={fr}", 0) + 1
                    continue
                demos.append(
                    {
                        "prompt_id": r["prompt_id"],
                        "prompt": r["prompt"],
                        "completion": ch["content"],
                        "source_model": client.model,
                        "finish_reason": fr,
                    }
                )
        # The answers are in the API cache: a refusal here costs a rerun with overwrite, not money.
        check_replace(out_dir, len(demos), "teacher_stage.overwrite", overwrite)
        write_jsonl(fio.join(out_dir, "errors.jsonl"), errors)
        report = {
            "prompts": len(rows) + len(skipped_long),
            "skipped_too_long": len(skipped_long),
            "requested": len(rows),  # answered now or kept from out_dir's records
            "kept_from_out_dir": len(rows) - len(to_ask),
            "request_errors": len(errors),
            "demonstrations": len(demos),
            "dropped": dropped,
            "api": client.summary.as_dict(),
        }
        write_json(fio.join(out_dir, "report.json"), report)
        manifest = write_records(
            out_dir,
            DEMONSTRATIONS,
            demos,
            num_shards=num_shards,
            provenance={
                "stage": "teacher",
                "stage_version": STAGE_VERSION,
                "client": client.describe(),
                "system_prompt": system_prompt,
                "template": template,
                "sampling": sampling,
                "keep_finish_reasons": list(keep_finish_reasons) if keep_finish_reasons is not None else None,
                "mode": "batch" if batch_api else "online",
                "prompts_source": fio.abspath(prompts),
                "split": split,
                "report": report,
            },
            overwrite=overwrite,
            overwrite_binding="teacher_stage.overwrite",
        )
        save_operative_config(out_dir)
        log.info("teacher: %d demonstrations, %d request errors -> %s", len(demos), len(errors), out_dir)
        return manifest


def kept_records(out_dir: str, schema, stage: str, **asked) -> list[dict]:
    """The records of the complete set already in out_dir when that set was asked for the
    same way (`asked`: `model` and the provenance fields that change an answer), else [].
    Every API stage reuses them: a rerun does not pay again for what is written there,
    whatever API cache it is given (a concurrent writer that was refused, then rerun, has
    another cache)."""
    if not _is_records_dir(out_dir):
        return []
    prov = read_manifest(out_dir, schema).get("provenance") or {}
    if prov.get("stage") != stage or (prov.get("client") or {}).get("model") != asked.pop("model"):
        return []
    if any(prov.get(k) != v for k, v in asked.items()):
        return []
    return list(read_records(out_dir, schema))


def _answered_in(out_dir: str, stage: str, **asked) -> dict[tuple[str, str], list[dict]]:
    """{(prompt_id, prompt): its records} of kept_records (a teacher's demonstrations)."""
    out: dict[tuple[str, str], list[dict]] = {}
    for rec in kept_records(out_dir, DEMONSTRATIONS, stage, **asked):
        out.setdefault((rec["prompt_id"], rec["prompt"]), []).append(rec)
    return out


def task_key(c: Any) -> tuple[str, str, str, str]:
    """What a judgment answers: (prompt_id, prompt, response_1, response_2), of a PairTask or
    a comparison dict."""
    if isinstance(c, Mapping):
        return c["prompt_id"], c["prompt"], c["response_1"], c["response_2"]
    return c.prompt_id, c.prompt, c.response_1, c.response_2


def answered(c: Mapping[str, Any]) -> bool:
    """A comparison whose every request was answered (no API error in it or its views):
    reusable. One with an error is asked again."""
    return not c.get("error") and not any(v.get("error") for v in c.get("views") or ())


def judge_asked(judge: JudgeSettings, tmpl: J.JudgeTemplate) -> dict[str, Any]:
    """How a judge was asked, every field that changes an answer: judgments written under
    the same values are reused rather than asked again (critic_stage, the evaluation)."""
    return {
        "template": tmpl.id,
        "template_sha256": tmpl.sha256,
        "mode": judge.mode,
        "both_orders": judge.both_orders,
        "seed": judge.seed,
        "logprobs": judge.logprobs,
        "top_logprobs": judge.top_logprobs if judge.logprobs else None,
        "temperature": judge.temperature,
        "max_tokens": judge.max_tokens,
        "on_disagreement": judge.on_disagreement,
    }


ASKED_FILE = "judge_asked.json"


def _sha256(path: str) -> str:
    with fio.open_file(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_judged(out_dir: str, rows_file: str, comps: Sequence[Mapping], asked: Mapping[str, Any]) -> None:
    """Writes the judgments to out_dir/rows_file, then ASKED_FILE: how they were asked and the
    file's hash (a run killed between the two leaves a hash that no longer matches: nothing
    is reused from it)."""
    path = fio.join(out_dir, rows_file)
    write_jsonl(path, comps)
    write_json(fio.join(out_dir, ASKED_FILE), {"asked": dict(asked), "file": rows_file, "sha256": _sha256(path)})


def judged_before(out_dir: str, rows_file: str, asked: Mapping[str, Any]) -> dict[tuple, dict]:
    """{task_key: judgment} that an earlier run wrote with write_judged into out_dir, when it
    was asked the same way (`asked`: the model and judge_asked()): the evaluation and the gap
    audit reuse them, so a rerun pays for nothing again whatever API cache it is given.
    Judgments are matched by prompt and both responses (changed responses are judged anew);
    one with an API error is asked again."""
    side, rows_path = fio.join(out_dir, ASKED_FILE), fio.join(out_dir, rows_file)
    if not (fio.isfile(side) and fio.isfile(rows_path)):
        return {}
    try:
        before = fio.read_json(side)
    except ValueError:
        return {}
    if not isinstance(before, dict) or before.get("asked") != dict(asked) or before.get("file") != rows_file:
        return {}
    if before.get("sha256") != _sha256(rows_path):
        return {}
    rows = fio.read_jsonl_objects(rows_path, "a judgment object")
    return {task_key(c): c for c in rows if "response_1" in c and answered(c)}


def _judged_in(out_dir: str, judge_name: str, **asked) -> dict[tuple, dict]:
    """{task_key: comparison} of a critic's complete set in out_dir asked the same way: the
    rich rows of comparisons.jsonl that agree with the records (a later run killed between
    the two files cannot slip its rows in) and hold no API error."""
    records = {task_key(r): r for r in kept_records(out_dir, COMPARISONS, "critic", **asked)}
    side = fio.join(out_dir, "comparisons.jsonl")
    if not records or not fio.isfile(side):
        return {}
    out = {}
    for c in fio.read_jsonl_objects(side, "a comparison object"):
        k = task_key(c)
        if (
            k in records
            and c.get("judge") == judge_name
            and answered(c)
            and comparison_record(c) == _as_record(records[k])
        ):
            out[k] = c
    return out


def _as_record(rec: Mapping[str, Any]) -> dict:
    return {k: rec.get(k) for k in _COMPARISON_FIELDS} | {
        "model_1": rec.get("model_1") or None,
        "model_2": rec.get("model_2") or None,
    }


# -- critic --------------------------------------------------------------------------------


def pair_tasks(first: Sequence[Mapping], second: Sequence[Mapping]) -> tuple[list[J.PairTask], dict]:
    """Joins two demonstration sets on prompt_id (first completion per prompt on each side),
    in the order of `first`."""

    def index(rows):
        out = {}
        for r in rows:
            out.setdefault(r["prompt_id"], r)
        return out

    a, b = index(first), index(second)
    tasks = [
        J.PairTask(
            pid,
            ra["prompt"],
            ra["completion"],
            b[pid]["completion"],
            ra.get("source_model", ""),
            b[pid].get("source_model", ""),
        )
        for pid, ra in a.items()
        if pid in b
    ]
    return tasks, {"only_in_first": len(set(a) - set(b)), "only_in_second": len(set(b) - set(a)), "paired": len(tasks)}


def truncate_to_budget(
    tasks: Sequence[J.PairTask], tokenizer: Any, max_length: int, template: str = "paper"
) -> tuple[list[J.PairTask], int]:
    """Cuts each response so that BOS + templated prompt + response fits max_length tokens:
    the paper judges the teacher's completion truncated to the policy sample's budget, so
    the critic cannot prefer it merely for going on longer. Returns (tasks, responses cut)."""

    tok = load_tokenizer(tokenizer)
    tmpl = get_template(template, tok)
    cut_count = 0
    out = []
    for t in tasks:
        n_prompt = len(tok(tmpl.prompt_text(t.prompt), add_special_tokens=False)["input_ids"])
        budget = max(0, max_length - n_prompt - (1 if tok.bos_token_id is not None else 0))

        def cut(text: str) -> str:
            nonlocal cut_count
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if len(ids) <= budget:
                return text
            cut_count += 1
            return tok.decode(ids[:budget], skip_special_tokens=False)

        out.append(dataclasses.replace(t, response_1=cut(t.response_1), response_2=cut(t.response_2)))
    return out, cut_count


def judge_pairs(
    client: FeedbackClient,
    tasks: Sequence[J.PairTask],
    judge: JudgeSettings,
    template: Optional[J.JudgeTemplate] = None,
    kept: Optional[Mapping[tuple, Mapping[str, Any]]] = None,
) -> list[dict]:
    """Asks the judge about every task not already judged in `kept`.

    Args:
      client: the judge's API client (cache, retries, accounting).
      tasks: the pairs, response_1 in canonical first place.
      judge: how to ask and read the answers.
      template: judge.template already loaded (None: loaded here).
      kept: {task_key: comparison} already written by a run asked the same way (see
        kept_records): those tasks are not asked again, whatever the client's cache.

    Returns:
      Comparison dicts (COMPARISONS fields + views, p_1, error...) in the order of tasks.
    """
    template = template or J.load_template(judge.template)
    judge_name = judge.name or client.model
    kept = {k: c for k, c in (kept or {}).items() if c.get("judge") == judge_name and answered(c)}
    plan, reqs = judge_requests(client, [t for t in tasks if task_key(t) not in kept], judge, template)
    results = _run(client, reqs, f"critic {client.model}", judge.batch_api, judge.poll_interval_s) if reqs else []
    fresh = {task_key(t): (kind, t, idx) for kind, t, idx in plan}
    out = []
    for t in tasks:
        if task_key(t) in kept:
            out.append(dict(kept[task_key(t)]))
            continue
        kind, t, idx = fresh[task_key(t)]
        if kind == "identical":
            out.append(J.identical_comparison(t, judge_name, judge.mode))
        elif kind == "pairwise":
            views = [J.read_presentation(results[i], sw) for i, sw in idx]
            out.append(
                J.comparison_from_views(
                    t, judge_name, views, judge.on_disagreement, "both_orders" if judge.both_orders else "pairwise"
                )
            )
        else:
            r1, r2 = (J.read_rating(results[i]) for i, _ in idx)
            out.append(J.comparison_from_ratings(t, judge_name, r1, r2))
    return out


def judge_requests(
    client: FeedbackClient,
    tasks: Sequence[J.PairTask],
    judge: JudgeSettings,
    template: J.JudgeTemplate,
) -> tuple[list, list]:
    """The requests judge_pairs sends, without sending them (so a caller can price them).

    Args:
      client: the judge's API client (builds the requests: model and cache keys).
      tasks: the pairs, response_1 in canonical first place.
      judge: how to ask.
      template: judge.template, loaded.

    Returns:
      (plan, requests): plan holds (kind, task, [(request index, swapped)]) per task, kind
      "identical" (a tie, nothing sent), "pairwise" or "rating".
    """
    mode, both_orders, seed = judge.mode, judge.both_orders, judge.seed
    params = judge.request_params()
    plan, reqs = [], []
    for t in tasks:
        meta = {"prompt_id": t.prompt_id, "stage": "critic"}
        if t.response_1 == t.response_2:
            plan.append(("identical", t, []))
        elif mode == "pairwise":
            s = J.is_swapped(t.prompt_id, seed)
            orders = [s, not s] if both_orders else [s]
            idx = []
            for sw in orders:
                idx.append((len(reqs), sw))
                reqs.append(
                    client.request(J.pairwise_messages(template, t, sw), template=template.id, meta=meta, **params)
                )
            plan.append(("pairwise", t, idx))
        else:
            idx = []
            for resp in (t.response_1, t.response_2):
                idx.append((len(reqs), False))
                reqs.append(
                    client.request(
                        J.rating_messages(template, t.prompt, resp), template=template.id, meta=meta, **params
                    )
                )
            plan.append(("rating", t, idx))
    return plan, reqs


def comparison_record(c: Mapping[str, Any]) -> dict:
    """The COMPARISONS-schema subset of a comparison dict."""
    return {k: c[k] for k in _COMPARISON_FIELDS} | {
        "model_1": c.get("model_1") or None,
        "model_2": c.get("model_2") or None,
    }


_COMPARISON_FIELDS = (
    "prompt_id",
    "prompt",
    "response_1",
    "response_2",
    "judge",
    "verdict",
    "raw_judge_text",
    "swapped",
)


@gin.configurable
def critic_stage(
    responses_1: str = gin.REQUIRED,
    responses_2: str = gin.REQUIRED,
    out_dir: str = gin.REQUIRED,
    client: FeedbackClient = gin.REQUIRED,
    judge: Optional[JudgeSettings] = None,
    limit: Optional[int] = None,
    num_shards: int = 1,
    truncate_tokenizer: Optional[str] = None,
    truncate_max_length: int = 512,
    truncate_template: str = "paper",
    overwrite: bool = False,
) -> dict:
    """Critic judgments of (responses_1[p], responses_2[p]) for every prompt p in both ->
    COMPARISONS records + comparisons.jsonl (every view, p_1, errors) + report.json.
    With truncate_tokenizer (the policy's tokenizer directory), both responses are cut to
    the policy sample's budget (truncate_max_length tokens including the prompt) first,
    as the paper does with the teacher's completion. Two sets with no prompt in common is
    an error; a complete set in out_dir is replaced by a smaller one only with `overwrite`.

    Args:
      judge: how the critic is asked; None builds JudgeSettings from gin in the caller's
        scope (run_arm's `critic/JudgeSettings.*`).

    Returns:
      The manifest of the comparison records.
    """
    judge = judge if judge is not None else JudgeSettings()
    existing_path(binding("critic_stage.responses_1"), responses_1, "demonstration set")
    existing_path(binding("critic_stage.responses_2"), responses_2, "demonstration set")
    existing_path(binding("critic_stage.truncate_tokenizer"), truncate_tokenizer, "tokenizer directory")
    _counts("critic_stage", limit=limit, num_shards=num_shards, truncate_max_length=truncate_max_length)
    with writer_lock(out_dir, "critic_stage.out_dir"):
        fio.makedirs(out_dir)
        tmpl = J.load_template(judge.template)
        first = load_demonstrations(responses_1, binding("critic_stage.responses_1"))
        second = load_demonstrations(responses_2, binding("critic_stage.responses_2"))
        tasks, join = pair_tasks(first, second)
        if not tasks:
            raise UserError(
                f"critic_stage.responses_1 = {responses_1!r} ({len(first)} responses) and "
                f"critic_stage.responses_2 = {responses_2!r} ({len(second)}) share no prompt_id; give "
                "two sets answering the same prompts (nothing was sent or written)"
            )
        tasks = tasks[:limit]
        # One comparison per pair: a set this run could only shrink is refused before paying.
        check_replace(out_dir, len(tasks), "critic_stage.overwrite", overwrite)
        if truncate_tokenizer:
            tasks, join["responses_truncated"] = truncate_to_budget(
                tasks, truncate_tokenizer, truncate_max_length, truncate_template
            )
        asked = judge_asked(judge, tmpl)
        kept = _judged_in(out_dir, judge.name or client.model, model=client.model, **asked)
        comps = judge_pairs(client, tasks, judge, tmpl, kept=kept)
        write_jsonl(fio.join(out_dir, "comparisons.jsonl"), comps)
        write_jsonl(
            fio.join(out_dir, "errors.jsonl"),
            [{"prompt_id": c["prompt_id"], "error": c["error"]} for c in comps if c.get("error")],
        )
        _, prefs_report = build_preference_pairs(comps)
        report = {
            "join": join,
            "kept_from_out_dir": sum(task_key(t) in kept for t in tasks),  # not asked again
            "api": client.summary.as_dict(),
            **prefs_report,
        }
        write_json(fio.join(out_dir, "report.json"), report)
        manifest = write_records(
            out_dir,
            COMPARISONS,
            [comparison_record(c) for c in comps],
            num_shards=num_shards,
            provenance={
                "stage": "critic",
                "stage_version": STAGE_VERSION,
                "client": client.describe(),
                **asked,
                "responses_1": fio.abspath(responses_1),
                "responses_2": fio.abspath(responses_2),
                "api_mode": "batch" if judge.batch_api else "online",
                "truncate": {
                    "tokenizer": fio.abspath(truncate_tokenizer),
                    "max_length": truncate_max_length,
                    "template": truncate_template,
                }
                if truncate_tokenizer
                else None,
                "report": report,
            },
            overwrite=overwrite,
            overwrite_binding="critic_stage.overwrite",
        )
        save_operative_config(out_dir)
        return manifest


# -- preferences ---------------------------------------------------------------------------


@gin.configurable
def preferences_stage(
    comparisons: Sequence[str] = gin.REQUIRED,
    out_dir: str = gin.REQUIRED,
    judge: Optional[str] = None,
    require_agreement: bool = False,
    min_confidence: float = 0.0,
    num_shards: int = 1,
    overwrite: bool = False,
) -> dict:
    """Comparison sets (one per critic) -> PREFERENCES records + report.json. No comparisons
    to read is an error; a complete set in out_dir is replaced by a smaller one only with
    `overwrite`."""
    if isinstance(comparisons, str):
        comparisons = [comparisons]
    if not comparisons:
        raise ConfigError("preferences_stage.comparisons is empty; give one or more critic output directories")
    for path in comparisons:
        existing_path(binding("preferences_stage.comparisons"), path, "comparison set")
    in_range(binding("preferences_stage.min_confidence"), min_confidence, 0.0, 1.0)
    _counts("preferences_stage", num_shards=num_shards)
    with writer_lock(out_dir, "preferences_stage.out_dir"):
        fio.makedirs(out_dir)
        comps = [c for path in comparisons for c in load_comparisons(path)]
        if not comps:
            raise UserError(
                f"preferences_stage.comparisons = {list(comparisons)!r}: hold no comparisons; give the "
                "output of a finished critic stage (nothing was written)"
            )
        pairs, report = build_preference_pairs(
            comps, judge=judge, require_agreement=require_agreement, min_confidence=min_confidence
        )
        check_replace(out_dir, len(pairs), "preferences_stage.overwrite", overwrite)
        write_json(fio.join(out_dir, "report.json"), report)
        manifest = write_records(
            out_dir,
            PREFERENCES,
            pairs,
            num_shards=num_shards,
            provenance={
                "stage": "preferences",
                "stage_version": STAGE_VERSION,
                "comparisons": [fio.abspath(p) for p in comparisons],
                "judge": judge,
                "require_agreement": require_agreement,
                "min_confidence": min_confidence,
                "report": report,
            },
            overwrite=overwrite,
            overwrite_binding="preferences_stage.overwrite",
        )
        save_operative_config(out_dir)
        return manifest


# -- policy samples ------------------------------------------------------------------------


@gin.configurable
def policy_samples_stage(
    hf_dir: str = gin.REQUIRED,
    prompts: str = gin.REQUIRED,
    out_dir: str = gin.REQUIRED,
    sampling: Optional[SamplingSettings] = None,
    split: Optional[str] = None,
    limit: Optional[int] = None,
    source_model: Optional[str] = None,
    dtype: str = "float32",
    mesh_shape: Optional[Sequence[int]] = None,
    length_bucket: int = 32,
    num_shards: int = 1,
    part: Optional[Sequence[int]] = None,
    overwrite: bool = False,
) -> dict:
    """Samples a local checkpoint on the prompts -> DEMONSTRATIONS records with
    finish_reason "stop" (EOS) or "length". Finished batches go to samples.jsonl as they
    complete, so a killed run resumes at the next batch with the same per-batch RNG and so
    the same samples. `part=(i, n)` samples only every n-th prompt from the i-th: host i of
    n's share. No prompts is an error; a complete set in out_dir is replaced by a smaller
    one only with `overwrite`.

    Args:
      sampling: template, lengths, distribution, seed and batch size; None builds
        SamplingSettings from gin in the caller's scope (the paper: T=1.0, top_p 0.9,
        512 tokens including the prompt).

    Returns:
      The manifest of the demonstration records.
    """

    sampling = sampling if sampling is not None else SamplingSettings()
    existing_dir(
        binding("policy_samples_stage.hf_dir"), hf_dir, "checkpoint directory (HF format)", must_contain="config.json"
    )
    existing_path(binding("policy_samples_stage.prompts"), prompts, "prompt file or record directory")
    _counts("policy_samples_stage", limit=limit, num_shards=num_shards, length_bucket=length_bucket)
    if part is not None and not (len(part) == 2 and 0 <= part[0] < part[1]):
        raise ConfigError(f"policy_samples_stage.part = {tuple(part)}: must be (i, n) with 0 <= i < n")
    with writer_lock(out_dir, "policy_samples_stage.out_dir"):
        fio.makedirs(out_dir)
        rows = load_prompts(prompts, split, binding("policy_samples_stage.prompts"))[:limit]
        if part is not None:
            i, n = part
            rows = rows[i::n]
        # One sample per prompt: refused before any compute when it could only shrink a set.
        check_replace(out_dir, len(rows), "policy_samples_stage.overwrite", overwrite)
        lm = LocalModel(
            hf_dir,
            template=sampling.template,
            max_prompt_length=sampling.max_prompt_length,
            max_length=sampling.max_length,
            dtype=dtype,
            mesh_shape=mesh_shape,
        )
        name = source_model or os.path.basename(os.path.normpath(hf_dir))
        done, save = _sample_progress(out_dir)
        from tqdm.auto import tqdm

        batches = [rows[i : i + sampling.batch_size] for i in range(0, len(rows), sampling.batch_size)]
        with contextlib.closing(save):
            for bi, batch in enumerate(tqdm(batches, desc=f"sampling {name}", unit="batch")):
                if bi in done:
                    continue
                outs = lm.sample(
                    [r["prompt"] for r in batch],
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    top_k=sampling.top_k,
                    seed=sampling.seed * 1_000_003 + bi,
                    length_bucket=length_bucket,
                    rng_per_prompt=sampling.rng_per_prompt,
                )
                samples = [
                    {
                        "prompt_id": r["prompt_id"],
                        "prompt": r["prompt"],
                        "completion": o.text,
                        "source_model": name,
                        "finish_reason": o.finish_reason,
                    }
                    for r, o in zip(batch, outs)
                ]
                save(bi, samples)
                done[bi] = samples
        demos = [s for bi in range(len(batches)) for s in done[bi]]
        counts = {fr: sum(d["finish_reason"] == fr for d in demos) for fr in ("stop", "length")}
        manifest = write_records(
            out_dir,
            DEMONSTRATIONS,
            demos,
            num_shards=num_shards,
            provenance={
                "stage": "policy_samples",
                "stage_version": STAGE_VERSION,
                "hf_dir": fio.abspath(hf_dir),
                "source_model": name,
                **sampling.provenance(),
                "finish_reasons": counts,
                "part": list(part) if part is not None else None,
            },
            overwrite=overwrite,
            overwrite_binding="policy_samples_stage.overwrite",
        )
        save_operative_config(out_dir)
        return manifest


class _LocalProgress:
    """Finished batches appended (and fsynced) to out_dir/samples.jsonl."""

    def __init__(self, path: str):
        self._f = open(path, "a")

    def __call__(self, bi: int, samples: list) -> None:
        self._f.write(json.dumps({"batch": bi, "samples": samples}, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


class _ObjectProgress:
    """Object stores cannot append: each finished batch is its own object
    (out_dir/samples/batch-NNNNNN.json; an upload is atomic)."""

    def __init__(self, directory: str):
        self.directory = directory

    def __call__(self, bi: int, samples: list) -> None:
        write_json(fio.join(self.directory, f"batch-{bi:06d}.json"), {"batch": bi, "samples": samples})

    def close(self) -> None:
        pass


def _sample_progress(out_dir: str):
    """({batch index: samples} already finished, a saver for the next ones)."""
    done = {}
    if fio.is_url(out_dir):
        directory = fio.join(out_dir, "samples")
        for path in fio.glob(fio.join(directory, "batch-*.json")):
            r = fio.read_json(path)
            done[r["batch"]] = r["samples"]
        return done, _ObjectProgress(directory)
    progress_path = os.path.join(out_dir, "samples.jsonl")
    if os.path.exists(progress_path):
        for r in _read_jsonl_tolerant(progress_path):
            done[r["batch"]] = r["samples"]
    return done, _LocalProgress(progress_path)


def _read_jsonl_tolerant(path: str) -> list[dict]:
    """Lines of a progress file; a torn last line (kill -9 mid-write) is cut off so the next
    append starts on a fresh line."""
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        log.warning("%s: cutting a torn last line", path)
        data = data[: data.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    return [json.loads(line) for line in data.splitlines() if line.strip()]
