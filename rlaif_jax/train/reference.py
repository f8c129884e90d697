"""Precompute DPO reference log-probs once, so training holds one model.

Reads preference records, scores chosen and rejected under the reference checkpoint with
exactly the encoding the preference pipeline uses (template, truncation, masks), and writes
a copy of the records with `ref_chosen_logp` / `ref_rejected_logp` (summed over response
tokens) and `ref_model` = the reference's identity: checkpoint path, a hash of its weights
index/config and of the tokenizer vocabulary.
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional

import gin
import jax
import numpy as np
from tqdm.auto import tqdm

from rlaif_jax import fileio
from rlaif_jax import sharding as shd
from rlaif_jax.data.pipeline.batches import pad_preference_batch
from rlaif_jax.data.pipeline.builders import check_settings
from rlaif_jax.data.records import PREFERENCES, read_manifest, read_records, write_records
from rlaif_jax.data.tokenize.encode import TRUNCATION_MODES, Encoder
from rlaif_jax.data.tokenize.tokenizer import load_tokenizer, tokenizer_hash
from rlaif_jax.errors import UserError, binding, existing_dir, existing_path, one_of, whole
from rlaif_jax.models import apply, build_model
from rlaif_jax.models.hf_io import load_hf
from rlaif_jax.models.remote import local_hf_dir
from rlaif_jax.outputs import check_replace, writer_lock
from rlaif_jax.train.logprobs import sequence_logps
from rlaif_jax.train.objectives import concat_pairs


def reference_identity(ref_dir: str, tok) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json", "model.safetensors"):
        path = os.path.join(ref_dir, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            if name == "model.safetensors.index.json":
                break  # the index names every shard; hashing 100 GB of weights is not worth it
    return f"{fileio.abspath(ref_dir)}#weights={h.hexdigest()[:16]}#tokenizer={tokenizer_hash(tok)}"


@gin.configurable
def precompute_reference_logps(
    preferences_dir: str = gin.REQUIRED,
    out_dir: str = gin.REQUIRED,
    reference: str = gin.REQUIRED,
    tokenizer: Optional[str] = None,
    batch_size: int = 16,
    seq_len: int = 512,
    template: str = "paper",
    max_length: int = 512,
    max_prompt_length: int = 256,
    truncation_mode: str = "keep_end",
    num_shards: Optional[int] = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> dict:
    """Writes out_dir (a PREFERENCES record set) and returns its manifest. preferences_dir
    and out_dir may be URLs (gs://...); so may reference and tokenizer (fetched to local disk).
    Settings and paths are checked before the reference loads; out_dir is held by its
    writer lock, and a complete set there is replaced by fewer records only with overwrite."""
    b = lambda p: binding(f"precompute_reference_logps.{p}")  # noqa: E731
    check_settings(
        "precompute_reference_logps",
        batch_size=batch_size,
        seq_len=seq_len,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        num_epochs=None,
        prefetch=0,
    )
    if num_shards is not None:
        whole(b("num_shards"), num_shards, 1, hint="> 0, or None for as many as the input")
    one_of(b("truncation_mode"), truncation_mode, TRUNCATION_MODES)
    existing_path(b("preferences_dir"), preferences_dir, "preference record directory")
    existing_dir(b("reference"), reference, "HF model directory", must_contain="config.json")
    existing_dir(b("tokenizer"), tokenizer, "tokenizer directory")
    # Held from before the reference loads until the records are written.
    with writer_lock(out_dir, b("out_dir")):
        src = read_manifest(preferences_dir, PREFERENCES)
        if src["num_records"] == 0:
            raise UserError(f"{preferences_dir}: no preference records; nothing was computed or written")
        check_replace(out_dir, src["num_records"], b("overwrite"), overwrite)  # before the reference loads
        reference = local_hf_dir(reference, "reference")
        tokenizer = local_hf_dir(tokenizer, "tokenizer", weights=False)
        tok = load_tokenizer(tokenizer or reference)
        mesh = shd.make_mesh(-1, 1, 1)
        layout = shd.Layout(mesh, shd.logical_rules())
        cfg, params = load_hf(reference, layout=layout, dtype=dtype, param_dtype=dtype)
        model = build_model(cfg, layout=layout)
        records = list(read_records(preferences_dir, PREFERENCES))
        enc = Encoder(tok, template, max_length, max_prompt_length, truncation_mode)
        pairs = enc.encode_pairs(
            [r["prompt"] for r in records], [r["chosen"] for r in records], [r["rejected"] for r in records]
        )

        @jax.jit
        def score(params, batch):
            both = concat_pairs(batch)
            out = apply(model, params, both["tokens"], both["positions"], both["segment_ids"])
            return sequence_logps(out["logits"], both["tokens"], both["loss_mask"])

        logps = np.zeros((len(records), 2), np.float64)
        for start in tqdm(range(0, len(pairs), batch_size), desc="reference log-probs"):
            chunk = pairs[start : start + batch_size]
            batch = pad_preference_batch(chunk, batch_size, seq_len)
            lp = shd.to_host(score(params, shd.shard_batch(batch, mesh)))
            n = len(chunk)
            logps[start : start + n, 0], logps[start : start + n, 1] = lp[:n], lp[batch_size : batch_size + n]
        if not np.isfinite(logps).all():
            bad = int(np.where(~np.isfinite(logps).all(1))[0][0])
            raise FloatingPointError(
                f"non-finite reference log-prob for record {bad} (prompt_id {records[bad]['prompt_id']})"
            )
        ident = reference_identity(reference, tok)
        out = [
            dict(r, ref_chosen_logp=float(c), ref_rejected_logp=float(j), ref_model=ident)
            for r, (c, j) in zip(records, logps)
        ]
        return write_records(
            out_dir,
            PREFERENCES,
            out,
            num_shards=num_shards or len(src["shards"]),
            overwrite=overwrite,
            overwrite_binding=b("overwrite"),
            provenance={
                "source": fileio.abspath(preferences_dir),
                "ref_model": ident,
                "template": template,
                "max_length": max_length,
                "max_prompt_length": max_prompt_length,
                "truncation_mode": truncation_mode,
            },
        )
