"""Batches of unpaired labelled completions for KTO (LABELLED records).

Keys: the SFT layout (tokens, positions, segment_ids, loss_mask; one example per row), `label`
float32 [batch] (1 desirable, 0 undesirable; 0 on padding rows), and the same four sequence
keys prefixed `kl_`: row j's prompt with the completion of row j-1 of the same batch (row 0
takes the last real row's), the mismatched pairs KTO estimates its KL reference point from.
That is TRL's construction (completions cycled by one within each per-device batch). A
mismatched completion is cut so that the row fits max_length tokens.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from rlaif_jax.data.pipeline.batches import pad_batch
from rlaif_jax.data.tokenize.encode import Encoded


def mismatched(examples: Sequence[Encoded], max_length: int) -> list[Encoded]:
    """Example j's prompt with example j-1's response (cyclically), cut to max_length."""
    out = []
    for j, ex in enumerate(examples):
        response = examples[j - 1].response
        out.append(Encoded(ex.prompt, response[: max(1, max_length - len(ex.prompt))]))
    return out


def pad_labelled_batch(
    examples: Sequence[Encoded], labels: Sequence[int], batch_size: int, seq_len: int, max_length: int
) -> dict[str, np.ndarray]:
    batch = pad_batch(examples, batch_size, seq_len)
    batch.update(pad_batch(mismatched(examples, max_length), batch_size, seq_len, "kl_"))
    label = np.zeros(batch_size, np.float32)
    label[: len(labels)] = labels
    batch["label"] = label
    return batch


class LabelledBatcher:
    """batch_size labelled examples per batch, one per row, with their mismatched KL rows."""

    def __init__(
        self,
        examples: Sequence[Encoded],
        labels: np.ndarray,
        batch_size: int,
        seq_len: int,
        max_length: int,
        drop_remainder: bool,
    ):
        self.examples, self.labels = examples, labels
        self.batch_size, self.seq_len, self.max_length = batch_size, seq_len, max_length
        self.drop_remainder = drop_remainder

    def __call__(self, stream, carry: list[int]) -> Optional[dict]:
        idx = []
        while len(idx) < self.batch_size:
            i = stream.next()
            if i is None:
                break
            idx.append(i)
        if not idx or (self.drop_remainder and len(idx) < self.batch_size):
            return None
        return pad_labelled_batch(
            [self.examples[i] for i in idx], self.labels[idx], self.batch_size, self.seq_len, self.max_length
        )
