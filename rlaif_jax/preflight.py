"""Run preflight: before any weights load or request is sent, every model/tokenizer pairing a
run will use and every input record set it reads is checked, and every problem found is
reported (one line each), not just the first.

  run_preflight(checks)      runs the checks: warnings are logged, problems raise one
                             PreflightError listing them all (the script prints each as an
                             `error:` line and exits 2)
  tokenizer_check(...)       a model (HF directory or DecoderConfig) and the tokenizer fed to it:
                             vocabulary size, special token ids, and the tokenizer against
                             the one the model was exported with (its fingerprint, written
                             by save_hf beside config.json, or its saved tokenizer files):
                             same size but other ids is silent garbage otherwise
  same_vocabulary_check(...) two models that read the same token ids (PPO's policy and reward
                             model, a DPO policy and its reference)
  record_set_check(...)      a record set: non-empty, no prompt_id given to two prompts, and
                             for preference pairs the share with chosen == rejected (or the same
                             token ids): refused above PreflightSettings.max_identical_share,
                             a warning above warn_identical_share
  preference_findings(...)   the last on pairs already in memory (the preference pipeline's);
                             it, Finding, Check and run_preflight live in rlaif_jax.data.checks
                             (the input pipelines use them) and are handed on from here

A trainer builds its checks from its settings (rlaif_jax.train.loop.train, ppo.train_ppo);
a pipeline runner builds them for every stage before its first one. Each check is a small
value (`Check`) so a runner can gather them from all its stages and run them at once.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Mapping, Optional, Union

from rlaif_jax import fileio as fio
from rlaif_jax.data.checks import (  # noqa: F401 (the preflight's own names)
    Check,
    Finding,
    PreflightError,
    PreflightSettings,
    preference_findings,
    record_findings,
    run_preflight,
)
from rlaif_jax.data.records import PREFERENCES, read_records
from rlaif_jax.data.tokenize.tokenizer import load_tokenizer, saved_fingerprint, tokenizer_hash
from rlaif_jax.models import DecoderConfig

log = logging.getLogger(__name__)

# Files whose presence means an HF directory carries its tokenizer (save_hf writes them).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


# -- models and tokenizers -----------------------------------------------------------------


ModelSpec = Union[str, os.PathLike, Any]  # an HF directory or a DecoderConfig


@functools.lru_cache(maxsize=16)
def _tokenizer(path: str):
    return load_tokenizer(path)


@functools.lru_cache(maxsize=16)
def _config(path: str):
    return DecoderConfig.from_pretrained(path)


def saved_tokenizer(model: ModelSpec) -> Optional[Any]:
    """The tokenizer saved with an HF directory (save_hf writes it beside the weights), if any."""
    if not isinstance(model, (str, os.PathLike)):
        return None
    d = os.fspath(model)
    if not any(os.path.exists(os.path.join(d, f)) for f in _TOKENIZER_FILES):
        return None
    return _tokenizer(d)


def saved_tokenizer_hash(model: ModelSpec) -> Optional[tuple[str, int]]:
    """(tokenizer_hash, size) of the tokenizer a model directory was exported with: the
    fingerprint save_hf writes beside config.json, else the tokenizer saved there, else None."""
    if not isinstance(model, (str, os.PathLike)):
        return None
    fp = saved_fingerprint(os.fspath(model))
    if fp is not None:
        return fp["tokenizer_hash"], fp.get("tokens")
    saved = saved_tokenizer(model)
    return (tokenizer_hash(saved), len(saved)) if saved is not None else None


def _cfg(model: ModelSpec):
    return _config(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else model


def _name(role: str, model: ModelSpec) -> str:
    return f"{role} {os.fspath(model)!r}" if isinstance(model, (str, os.PathLike)) else f"{role} (model_config)"


def tokenizer_check(role: str, model: ModelSpec, tokenizer: Any, tokenizer_binding: str = "") -> Check:
    """The tokenizer fed to `model`: no id beyond its embedding, the special ids its config
    names, and (for a directory with a saved tokenizer) the same vocabulary as that one.
    `role` names the model in messages ("train.init_from", "train_ppo.policy");
    `tokenizer_binding` the setting that chose the tokenizer, when not the model's own."""

    def run() -> list[Finding]:
        cfg, tok = (
            _cfg(model),
            (_tokenizer(os.fspath(tokenizer)) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer),
        )
        out = []
        is_path = isinstance(tokenizer, (str, os.PathLike))
        given = (
            (f"{tokenizer_binding} = {os.fspath(tokenizer)!r}" if is_path else tokenizer_binding)
            if tokenizer_binding
            else "its tokenizer"
        )
        if len(tok) > cfg.vocab_size:
            out.append(
                Finding(
                    f"{_name(role, model)} has {cfg.vocab_size} embeddings but {given} has {len(tok)} tokens; "
                    "give the tokenizer the model was trained with"
                )
            )
        for which, want, got in (
            ("bos", cfg.bos_token_id, tok.bos_token_id),
            ("eos", cfg.eos_token_ids, tok.eos_token_id),
            ("pad", cfg.pad_token_id, tok.pad_token_id),
        ):
            ids = want if isinstance(want, tuple) else (want,)
            if want is not None and want != () and got is not None and got not in ids:
                out.append(
                    Finding(
                        f"{_name(role, model)} has {which}_token_id {want} but {given} has {got}; give the "
                        "tokenizer the model was trained with",
                        fatal=which != "pad",  # padding is masked out; bos / eos change what is learnt
                    )
                )
        saved = saved_tokenizer_hash(model) if tokenizer_binding else None
        if saved is not None and saved[0] != tokenizer_hash(tok):
            size = f"same {len(tok)} tokens, other ids" if saved[1] == len(tok) else f"{saved[1]} vs {len(tok)} tokens"
            fix = (
                f"unset {tokenizer_binding} to use the saved one, or give that model's tokenizer"
                if saved_tokenizer(model) is not None
                else "give the tokenizer it was exported with"
            )
            out.append(Finding(f"{given} is not the tokenizer saved with {_name(role, model)} ({size}); {fix}"))
        return out

    return Check(f"{_name(role, model)} / tokenizer", run)


def same_vocabulary_check(role_a: str, model_a: ModelSpec, role_b: str, model_b: ModelSpec) -> Check:
    """Two models that read the same token ids: the same vocabulary size, and the same saved
    tokenizer where both directories carry one."""

    def run() -> list[Finding]:
        a, b = _cfg(model_a), _cfg(model_b)
        pair = f"{_name(role_a, model_a)} and {_name(role_b, model_b)}"
        if a.vocab_size != b.vocab_size:
            return [
                Finding(
                    f"{pair} have different vocabularies ({a.vocab_size} vs {b.vocab_size} tokens); "
                    f"give a {role_b} of the same base"
                )
            ]
        ta, tb = saved_tokenizer_hash(model_a), saved_tokenizer_hash(model_b)
        if ta is not None and tb is not None and ta[0] != tb[0]:
            return [
                Finding(
                    f"{pair} were saved with different tokenizers (same size, other ids); give a "
                    f"{role_b} of the same base"
                )
            ]
        return []

    return Check(f"{role_a} / {role_b}", run)


def record_set_check(
    path: str, schema: Any, binding: str = "", tokenizer: Any = None, settings: Optional[PreflightSettings] = None
) -> Check:
    """A record directory (rlaif_jax.data.records) or JSONL file read and checked: see record_findings.
    With a tokenizer, preference pairs whose responses tokenize the same count as tied."""

    def run() -> list[Finding]:
        where = f"{binding} = {path!r}" if binding else path
        records = list(read_records(path, schema)) if fio.isdir(path) else fio.read_jsonl_objects(path, "a record")
        pairs = None
        if schema is PREFERENCES and tokenizer is not None and records:
            tok = _tokenizer(os.fspath(tokenizer)) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
            ids = lambda texts: tok(list(texts), add_special_tokens=False)["input_ids"]  # noqa: E731
            pairs = list(zip(ids(r["chosen"] for r in records), ids(r["rejected"] for r in records)))
        return record_findings(where, records, schema is PREFERENCES, pairs, settings)

    return Check(f"records {path}", run)


# -- what each trainer checks --------------------------------------------------------------


def train_checks(
    model_config: Any, init_from: Optional[str], reference_from: Optional[str], tokenizer: Optional[str]
) -> list[Check]:
    """`train`'s pairings (local directories): the policy (init_from, else model_config) with
    the tokenizer it is fed (train.tokenizer, else init_from's own), and the reference with
    the policy."""
    policy, role = (init_from, "train.init_from") if init_from else (model_config, "train.model_config")
    checks = []
    if tokenizer is not None:
        checks.append(tokenizer_check(role, policy, tokenizer, "train.tokenizer"))
    elif init_from:
        checks.append(tokenizer_check(role, init_from, init_from))
    if reference_from:
        checks.append(same_vocabulary_check(role, policy, "train.reference_from", reference_from))
    return checks


def ppo_checks(policy: str, reward_model: Optional[str]) -> list[Check]:
    """`train_ppo`'s pairings (local directories): the policy with its own tokenizer (the
    reference and a shared critic are copies of it), and the reward model (also the separate
    critic's start) with the policy, whose tokens it scores."""
    checks = [tokenizer_check("train_ppo.policy", policy, policy)]
    if reward_model:
        checks.append(same_vocabulary_check("train_ppo.policy", policy, "train_ppo.reward_model", reward_model))
    return checks


def pipeline_checks(
    models: Mapping[str, ModelSpec],
    tokenizer: Any = None,
    tokenizer_binding: str = "",
    record_sets: Optional[Mapping[str, tuple[str, Any]]] = None,
    settings: Optional[PreflightSettings] = None,
) -> list[Check]:
    """A multi-stage run's checks in one call (the arm, the miniature): every model
    ({binding: HF directory or DecoderConfig}, e.g. {"run_arm.base_model": ...,
    "run_arm.reward_model": ...}) with the tokenizer (`tokenizer`, else the first model's own)
    and with the first model's vocabulary, and every input record set that exists now
    ({binding: (path, schema)}; sets a later stage writes are checked by the trainer that
    reads them)."""
    items = list(models.items())
    checks = []
    for i, (role, model) in enumerate(items):
        if tokenizer is not None:
            checks.append(tokenizer_check(role, model, tokenizer, tokenizer_binding or "tokenizer"))
        elif i == 0 and isinstance(model, (str, os.PathLike)):
            checks.append(tokenizer_check(role, model, model))
        if i > 0:
            checks.append(same_vocabulary_check(items[0][0], items[0][1], role, model))
    for binding, (path, schema) in (record_sets or {}).items():
        if path is not None and fio.exists(path):
            checks.append(record_set_check(path, schema, binding, tokenizer, settings))
    return checks
