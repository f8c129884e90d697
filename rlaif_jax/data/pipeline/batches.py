"""Batch layouts the models consume: dicts of numpy arrays of shape [batch, length].

Keys (int32 unless noted):
  tokens       token ids, right-padded with 0
  positions    0-based position within each sequence / packed segment (0 on padding)
  segment_ids  1..k for the k sequences packed in a row, 0 for padding (never attended)
  loss_mask    float32; loss_mask[t] == 1 iff tokens[t] is a response token (including
               EOS). The mask is aligned to the *targets*: the loss at t predicts
               tokens[t] from logits[t-1], so a trainer uses loss_mask[:, 1:] with
               logits[:, :-1] and tokens[:, 1:]. loss_mask[:, 0] and the first token of
               every segment are always 0 (BOS / prompt), so no prediction ever crosses a
               segment boundary.
Preference batches use the same keys prefixed `chosen_` / `rejected_` (row i of both is
pair i), plus `ref_chosen_logps` / `ref_rejected_logps` float32 [batch] when precomputed.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from rlaif_jax.data.tokenize.encode import Encoded

SEQUENCE_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")


def empty_batch(batch_size: int, seq_len: int, prefix: str = "") -> dict[str, np.ndarray]:
    out = {f"{prefix}{k}": np.zeros((batch_size, seq_len), np.int32) for k in SEQUENCE_KEYS}
    out[f"{prefix}loss_mask"] = np.zeros((batch_size, seq_len), np.float32)
    return out


def _place(batch: dict, prefix: str, row: int, start: int, segment: int, ex: Encoded) -> None:
    n_p, n = len(ex.prompt), ex.length
    end = start + n
    batch[f"{prefix}tokens"][row, start : start + n_p] = ex.prompt
    batch[f"{prefix}tokens"][row, start + n_p : end] = ex.response
    batch[f"{prefix}positions"][row, start:end] = np.arange(n, dtype=np.int32)
    batch[f"{prefix}segment_ids"][row, start:end] = segment
    batch[f"{prefix}loss_mask"][row, start + n_p : end] = 1.0


def _check_fits(ex: Encoded, seq_len: int) -> None:
    if ex.length > seq_len:
        raise ValueError(f"example of {ex.length} tokens does not fit seq_len={seq_len}")


def pad_batch(examples: Sequence[Encoded], batch_size: int, seq_len: int, prefix: str = "") -> dict[str, np.ndarray]:
    """One example per row, right-padded; rows past len(examples) are all padding."""
    if len(examples) > batch_size:
        raise ValueError(f"{len(examples)} examples for batch_size={batch_size}")
    batch = empty_batch(batch_size, seq_len, prefix)
    for row, ex in enumerate(examples):
        _check_fits(ex, seq_len)
        _place(batch, prefix, row, 0, 1, ex)
    return batch


def pad_preference_batch(
    pairs: Sequence[tuple[Encoded, Encoded]],
    batch_size: int,
    seq_len: int,
    ref_logps: Optional[Sequence[tuple[float, float]]] = None,
) -> dict[str, np.ndarray]:
    batch = pad_batch([c for c, _ in pairs], batch_size, seq_len, "chosen_")
    batch.update(pad_batch([r for _, r in pairs], batch_size, seq_len, "rejected_"))
    if ref_logps is not None:
        ref = np.zeros((batch_size, 2), np.float32)
        ref[: len(ref_logps)] = ref_logps
        batch["ref_chosen_logps"] = ref[:, 0].copy()
        batch["ref_rejected_logps"] = ref[:, 1].copy()
    return batch


class RowPacker:
    """Incremental first-fit packing of examples into batch_size rows of seq_len.

    Each packed sequence gets its own segment id (1..k per row) and positions from 0.
    Incremental so the iterator can pull examples one at a time and carry the ones that do
    not fit to the next batch (exactly, as part of its checkpointed state).
    """

    def __init__(self, batch_size: int, seq_len: int):
        self.batch_size, self.seq_len = batch_size, seq_len
        self.batch = empty_batch(batch_size, seq_len)
        self.free = [seq_len] * batch_size
        self.segments = [0] * batch_size
        self.num_examples = 0

    def try_add(self, ex: Encoded) -> bool:
        _check_fits(ex, self.seq_len)
        for row in range(self.batch_size):
            if ex.length <= self.free[row]:
                self.segments[row] += 1
                _place(self.batch, "", row, self.seq_len - self.free[row], self.segments[row], ex)
                self.free[row] -= ex.length
                self.num_examples += 1
                return True
        return False

    @property
    def full(self) -> bool:
        return max(self.free) == 0


def pack_batch(examples: Sequence[Encoded], batch_size: int, seq_len: int) -> tuple[dict[str, np.ndarray], list[int]]:
    """First-fit packs examples (in order); returns (batch, indices of those that did not fit)."""
    packer = RowPacker(batch_size, seq_len)
    left = [i for i, ex in enumerate(examples) if not packer.try_add(ex)]
    return packer.batch, left


def packing_efficiency(batch: dict[str, np.ndarray]) -> float:
    """Fraction of token slots holding real tokens (over all *segment_ids arrays)."""
    seg = [v for k, v in batch.items() if k.endswith("segment_ids")]
    return float(sum((s > 0).sum() for s in seg) / sum(s.size for s in seg))


def as_document_stream(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packed SFT rows -> document-stream rows: the examples packed into a row become one
    segment (positions counting on), as in pretraining on documents separated by EOS. The
    loss stays on each response and is added on every following document's first token,
    so each EOS becomes an input that is trained to predict what comes after it. (SFT
    alone never trains EOS as an input, its target being masked, so a reward head reading
    a sequence's score at EOS would start from an untrained, content-blind position.)
    Real tokens must lead each row, as packing leaves them."""
    seg = batch["segment_ids"]
    real = seg > 0
    out = dict(batch)
    out["segment_ids"] = real.astype(seg.dtype)
    out["positions"] = np.where(real, np.cumsum(real, axis=1) - 1, 0).astype(batch["positions"].dtype)
    starts = np.zeros_like(real)
    starts[:, 1:] = real[:, 1:] & (seg[:, 1:] != seg[:, :-1])  # a later document's first token
    out["loss_mask"] = np.maximum(batch["loss_mask"], starts.astype(np.float32))
    return out
