"""Pipeline constructors: record directories -> tokenized examples -> DataIterator.

Each process reads only its own shards (shard i goes to process i % process_count) and
tokenizes them once, in memory. The epoch size is the smallest per-process example count
(known from the manifests without reading other hosts' files), so all hosts take the same
number of padded batches per epoch and stay in lock-step.

Batches are per process: `batch_size` rows on each, or `global_batch_size` over all
processes (each then batches global_batch_size // process_count rows); `shard_batch`
assembles the global array from every process's rows.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import gin
import numpy as np

from rlaif_jax.data.checks import Check, PreflightSettings, record_findings, run_preflight
from rlaif_jax.data.pipeline.iterator import (
    DataIterator,
    IndexStream,
    PackedBatcher,
    PaddedBatcher,
    PreferenceBatcher,
    fingerprint,
)
from rlaif_jax.data.pipeline.labelled import LabelledBatcher
from rlaif_jax.data.records import (
    DEMONSTRATIONS,
    LABELLED,
    PREFERENCES,
    Schema,
    read_manifest,
    shard_indices_for_process,
)
from rlaif_jax.data.records.shards import iter_shard
from rlaif_jax.data.tokenize.encode import Encoder
from rlaif_jax.data.tokenize.tokenizer import load_tokenizer, tokenizer_hash
from rlaif_jax.errors import ConfigError, UserError, binding, whole

_ENCODE_CHUNK = 2048


def _process(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


def load_host_records(
    data_dirs: str | Sequence[str], schema: Schema, process_index: int, process_count: int
) -> tuple[list[dict], int, list[str]]:
    """This process's records, the smallest per-process count, and all shard checksums.

    Shards of all directories are numbered globally (in the order given), then dealt out
    round-robin to processes. Each manifest is read (and checked) once; directories may be
    URLs (gs://...).
    """
    dirs = [data_dirs] if isinstance(data_dirs, (str, os.PathLike)) else list(data_dirs)
    shards = []  # (directory, shard index within it, manifest entry)
    for d in dirs:
        for s, entry in enumerate(read_manifest(d, schema)["shards"]):
            shards.append((os.fspath(d), s, entry))
    mine = shard_indices_for_process(len(shards), process_index, process_count)
    per_process = [
        sum(shards[g][2]["num_records"] for g in shard_indices_for_process(len(shards), p, process_count))
        for p in range(process_count)
    ]
    records = []
    for g in mine:
        d, _, entry = shards[g]
        records.extend(iter_shard(d, schema, entry))
    return records, min(per_process), [e["sha256"] for _, _, e in shards]


def _chunks(n: int):
    for start in range(0, n, _ENCODE_CHUNK):
        yield slice(start, min(n, start + _ENCODE_CHUNK))


def per_process_batch(
    name: str,
    batch_size: Optional[int],
    global_batch_size: Optional[int],
    process_count: int,
    processes: str = "",
) -> int:
    """The rows each process batches: `batch_size` as given (per process), or
    `global_batch_size` // process_count. Exactly one of the two is set; a global batch that
    the processes do not split evenly is refused. `name` is the configurable
    ("sft_pipeline"); `processes` describes the processes in messages (default "N
    processes")."""
    b = lambda p: binding(f"{name}.{p}")  # noqa: E731
    processes = processes or f"{process_count} process{'es' if process_count != 1 else ''}"
    if batch_size is not None and global_batch_size is not None:
        raise ConfigError(
            f"{b('batch_size')} = {batch_size!r} (per process) and {b('global_batch_size')} = "
            f"{global_batch_size!r} (over all processes) are both set; bind only one of them (set the other to None)"
        )
    if global_batch_size is None:
        if batch_size is None:
            raise ConfigError(
                f"{b('batch_size')} and {b('global_batch_size')} are both unset; bind "
                f"{b('global_batch_size')} (rows per step over all processes) or {b('batch_size')} "
                "(rows per process)"
            )
        return batch_size
    whole(
        b("global_batch_size"),
        global_batch_size,
        1,
        hint=f"rows per step over all processes; a multiple of {process_count} splits evenly over {processes}",
    )
    if global_batch_size % process_count:
        lower = global_batch_size // process_count * process_count
        fits = " or ".join(str(v) for v in (lower, lower + process_count) if v > 0)
        raise ConfigError(
            f"{b('global_batch_size')} = {global_batch_size} does not split evenly over {processes}; "
            f"make it a multiple of {process_count} (e.g. {fits})"
        )
    return global_batch_size // process_count


def check_settings(
    name: str, *, batch_size, seq_len, max_length, max_prompt_length, num_epochs, prefetch, max_carry=1
) -> None:
    """A batch_size of 0 yields no batches, so a run would "finish" untrained; every size is
    checked before any record is read. `name` is the configurable ("sft_pipeline")."""
    b = lambda p: binding(f"{name}.{p}")  # noqa: E731
    for param, value in (
        ("batch_size", batch_size),
        ("seq_len", seq_len),
        ("max_length", max_length),
        ("max_prompt_length", max_prompt_length),
        ("max_carry", max_carry),
    ):
        whole(b(param), value, 1)
    if num_epochs is not None:
        whole(b("num_epochs"), num_epochs, 1, hint="> 0, or None to repeat forever")
    whole(b("prefetch"), prefetch, 0)
    if max_length > seq_len:
        raise ConfigError(
            f"{b('max_length')} = {max_length} is longer than {b('seq_len')} = {seq_len}; "
            f"lower {b('max_length')} or raise {b('seq_len')}"
        )
    if max_prompt_length >= max_length:
        raise ConfigError(
            f"{b('max_prompt_length')} = {max_prompt_length} leaves no room for the response in "
            f"{b('max_length')} = {max_length}; make it smaller"
        )


def _host_inputs(data_dirs, schema, what: str, tokenizer, process_index, process_count):
    """What both pipelines start from: this process's records, loaded."""
    process_index, process_count = _process(process_index, process_count)
    tok = load_tokenizer(tokenizer)
    records, epoch_size, checksums = load_host_records(data_dirs, schema, process_index, process_count)
    if not records:
        raise UserError(
            f"{data_dirs}: no {what} for process {process_index} of {process_count}; "
            "give a record set with at least one shard per process"
        )
    return process_index, process_count, tok, records, epoch_size, checksums


def _check_records(data_dirs, records: list, preferences: bool, token_pairs=None) -> None:
    """The record-set checks on the records as loaded (rlaif_jax.data.checks)."""
    where = ", ".join(map(str, data_dirs)) if isinstance(data_dirs, (list, tuple)) else str(data_dirs)
    settings = PreflightSettings()
    run_preflight(
        [Check(f"records {where}", lambda: record_findings(where, records, preferences, token_pairs, settings))]
    )


def _encode_in_chunks(records: list, encode: Callable[[list], list]) -> list:
    out = []
    for sl in _chunks(len(records)):
        out.extend(encode(records[sl]))
    return out


@gin.configurable
def sft_pipeline(
    data_dirs: str | Sequence[str],
    tokenizer: Any,
    *,
    batch_size: Optional[int] = None,
    global_batch_size: Optional[int] = None,
    seq_len: int = 512,
    packing: bool = False,
    template: str = "paper",
    max_length: int = 512,
    max_prompt_length: int = 256,
    truncation_mode: str = "keep_end",
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: Optional[int] = None,
    drop_remainder: bool = True,
    max_carry: int = 8,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    prefetch: int = 2,
    transform: Optional[Callable[[dict], Any]] = None,
    state: Optional[dict] = None,
) -> DataIterator:
    """SFT batches (tokens/positions/segment_ids/loss_mask) from DEMONSTRATIONS record sets.

    Bind one of batch_size (rows per process) or global_batch_size (rows per step over all
    processes; each process batches global_batch_size // process_count, which must divide
    it). Steps per epoch follow from the per-process batch. packing=True first-fit packs
    several examples per row (the number of examples per batch then varies; use a step count
    rather than num_epochs to end multi-host runs). num_epochs=None repeats forever.
    """
    process_index, process_count = _process(process_index, process_count)
    batch_size = per_process_batch("sft_pipeline", batch_size, global_batch_size, process_count)
    check_settings(
        "sft_pipeline",
        batch_size=batch_size,
        seq_len=seq_len,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        num_epochs=num_epochs,
        prefetch=prefetch,
        max_carry=max_carry,
    )
    process_index, process_count, tok, records, epoch_size, checksums = _host_inputs(
        data_dirs, DEMONSTRATIONS, "demonstrations", tokenizer, process_index, process_count
    )
    _check_records(data_dirs, records, preferences=False)
    enc = Encoder(tok, template, max_length, max_prompt_length, truncation_mode)
    examples = _encode_in_chunks(
        records, lambda c: enc.encode_sft([r["prompt"] for r in c], [r["completion"] for r in c])
    )
    batcher = (
        PackedBatcher(examples, batch_size, seq_len, max_carry)
        if packing
        else PaddedBatcher(examples, batch_size, seq_len, drop_remainder)
    )
    stream = IndexStream(len(examples), epoch_size, seed, shuffle, num_epochs, process_index)
    fp = fingerprint(
        kind="sft",
        data=checksums,
        batch=batch_size,
        seq_len=seq_len,
        packing=packing,
        template=enc.template.name,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation=truncation_mode,
        seed=seed,
        shuffle=shuffle,
        process=(process_index, process_count),
        max_carry=max_carry if packing else None,
        tokenizer=tokenizer_hash(tok),
    )
    return DataIterator(batcher, stream, fp, state, prefetch, transform)


@gin.configurable
def preference_pipeline(
    data_dirs: str | Sequence[str],
    tokenizer: Any,
    *,
    batch_size: Optional[int] = None,
    global_batch_size: Optional[int] = None,
    seq_len: int = 512,
    template: str = "paper",
    max_length: int = 512,
    max_prompt_length: int = 256,
    truncation_mode: str = "keep_end",
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: Optional[int] = None,
    drop_remainder: bool = True,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    prefetch: int = 2,
    transform: Optional[Callable[[dict], Any]] = None,
    state: Optional[dict] = None,
) -> DataIterator:
    """Preference batches (chosen_* / rejected_* keys) from PREFERENCES record sets.

    Bind one of batch_size (pairs per process) or global_batch_size (pairs per step over all
    processes; each process batches global_batch_size // process_count, which must divide
    it). If every record carries ref_chosen_logp / ref_rejected_logp, the batches include
    ref_chosen_logps / ref_rejected_logps; if only some do, that is an error.
    """
    process_index, process_count = _process(process_index, process_count)
    batch_size = per_process_batch("preference_pipeline", batch_size, global_batch_size, process_count)
    check_settings(
        "preference_pipeline",
        batch_size=batch_size,
        seq_len=seq_len,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        num_epochs=num_epochs,
        prefetch=prefetch,
    )
    process_index, process_count, tok, records, epoch_size, checksums = _host_inputs(
        data_dirs, PREFERENCES, "preference pairs", tokenizer, process_index, process_count
    )
    has_ref = [r["ref_chosen_logp"] is not None and r["ref_rejected_logp"] is not None for r in records]
    if any(has_ref) and not all(has_ref):
        missing = has_ref.index(False)
        raise ValueError(
            f"{data_dirs}: {sum(has_ref)} of {len(records)} pairs have reference log-probs; "
            f"all or none must (first without: prompt_id {records[missing]['prompt_id']})"
        )
    ref = (
        np.asarray([[r["ref_chosen_logp"], r["ref_rejected_logp"]] for r in records], np.float32)
        if all(has_ref)
        else None
    )
    enc = Encoder(tok, template, max_length, max_prompt_length, truncation_mode)
    pairs = _encode_in_chunks(
        records,
        lambda c: enc.encode_pairs([r["prompt"] for r in c], [r["chosen"] for r in c], [r["rejected"] for r in c]),
    )
    # After encoding: a pair whose responses differ only past max_length is tied too.
    _check_records(data_dirs, records, preferences=True, token_pairs=[(c.response, r.response) for c, r in pairs])
    batcher = PreferenceBatcher(pairs, batch_size, seq_len, drop_remainder, ref)
    stream = IndexStream(len(pairs), epoch_size, seed, shuffle, num_epochs, process_index)
    fp = fingerprint(
        kind="preference",
        data=checksums,
        batch=batch_size,
        seq_len=seq_len,
        template=enc.template.name,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation=truncation_mode,
        seed=seed,
        shuffle=shuffle,
        process=(process_index, process_count),
        tokenizer=tokenizer_hash(tok),
    )
    return DataIterator(batcher, stream, fp, state, prefetch, transform)


@gin.configurable
def labelled_pipeline(
    data_dirs: str | Sequence[str],
    tokenizer: Any,
    *,
    batch_size: Optional[int] = None,
    global_batch_size: Optional[int] = None,
    seq_len: int = 512,
    template: str = "paper",
    max_length: int = 512,
    max_prompt_length: int = 256,
    truncation_mode: str = "keep_end",
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: Optional[int] = None,
    drop_remainder: bool = True,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    prefetch: int = 2,
    transform: Optional[Callable[[dict], Any]] = None,
    state: Optional[dict] = None,
) -> DataIterator:
    """KTO batches (rlaif_jax.data.pipeline.labelled: the SFT keys, `label`, and the
    mismatched `kl_*` rows) from LABELLED record sets.

    Bind one of batch_size (examples per process) or global_batch_size, as sft_pipeline. The
    mismatched pairs cycle completions within each process's batch, so it needs at least 2
    rows: with one, a row's "mismatched" completion would be its own.
    """
    process_index, process_count = _process(process_index, process_count)
    batch_size = per_process_batch("labelled_pipeline", batch_size, global_batch_size, process_count)
    check_settings(
        "labelled_pipeline",
        batch_size=batch_size,
        seq_len=seq_len,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        num_epochs=num_epochs,
        prefetch=prefetch,
    )
    if batch_size < 2:
        raise ConfigError(
            f"{binding('labelled_pipeline.batch_size')}: {batch_size} row per process leaves KTO no mismatched "
            "completion for its KL estimate (each row pairs its prompt with another row's completion); use 2 or more"
        )
    process_index, process_count, tok, records, epoch_size, checksums = _host_inputs(
        data_dirs, LABELLED, "labelled completions", tokenizer, process_index, process_count
    )
    enc = Encoder(tok, template, max_length, max_prompt_length, truncation_mode)
    examples = _encode_in_chunks(
        records, lambda c: enc.encode_sft([r["prompt"] for r in c], [r["completion"] for r in c])
    )
    labels = np.asarray([r["label"] for r in records], np.float32)
    batcher = LabelledBatcher(examples, labels, batch_size, seq_len, max_length, drop_remainder)
    stream = IndexStream(len(examples), epoch_size, seed, shuffle, num_epochs, process_index)
    fp = fingerprint(
        kind="labelled",
        data=checksums,
        batch=batch_size,
        seq_len=seq_len,
        template=enc.template.name,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation=truncation_mode,
        seed=seed,
        shuffle=shuffle,
        process=(process_index, process_count),
        tokenizer=tokenizer_hash(tok),
    )
    return DataIterator(batcher, stream, fp, state, prefetch, transform)
