"""The reward-model protocol: API-free evaluation for sweeps. Every policy output and the
reference output of the same instruction are scored by a trained Bradley-Terry reward model;
report the mean reward and the win rate against the reference, where an instruction is a
win when r(policy) > r(reference), a tie (0.5) when equal, with AlpacaEval's standard
error (rlaif_jax.winrate). `bt_win_rate` is the continuous version: the mean of
sigmoid(r_policy - r_reference), the reward model's own P(policy preferred)."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from rlaif_jax.data.tokenize import Encoder, load_tokenizer
from rlaif_jax.models import build_model
from rlaif_jax.models.heads import SCORE_HEAD
from rlaif_jax.models.hf_io import load_hf
from rlaif_jax.train.reward import sequence_rewards
from rlaif_jax.winrate import win_rate


def reward_protocol_metrics(policy_rewards: Sequence[float], reference_rewards: Sequence[float]) -> dict:
    r_p = np.asarray(policy_rewards, np.float64)
    r_r = np.asarray(reference_rewards, np.float64)
    if r_p.shape != r_r.shape or r_p.ndim != 1:
        raise ValueError(f"need two 1-D arrays of one length, got {r_p.shape} and {r_r.shape}")
    if not np.all(np.isfinite(r_p)) or not np.all(np.isfinite(r_r)):
        raise ValueError("non-finite reward")
    n = r_p.size
    diff = r_p - r_r
    wr = win_rate(np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5)))
    cont = win_rate(1.0 / (1.0 + np.exp(-diff)))
    sem = lambda x: float(np.std(x, ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {
        "mean_reward": float(np.mean(r_p)),
        "mean_reward_se": sem(r_p),
        "mean_reference_reward": float(np.mean(r_r)),
        "mean_reward_margin": float(np.mean(diff)),
        "mean_reward_margin_se": sem(diff),
        "win_rate": wr.win_rate,
        "standard_error": wr.standard_error,
        "n_wins": wr.n_wins,
        "n_losses": wr.n_losses,
        "n_ties": wr.n_ties,
        "n_total": n,
        "bt_win_rate": cont.win_rate,
        "bt_standard_error": cont.standard_error,
    }


class RewardScorer:
    """Scores (prompt, response) texts with an HF-format reward model directory (a
    ...ForSequenceClassification export of this project), in fixed-shape batches so the
    forward pass compiles once."""

    def __init__(
        self,
        hf_dir: str,
        template: str = "paper",
        max_length: int = 512,
        max_prompt_length: int = 256,
        batch_size: int = 16,
        dtype: str = "float32",
    ):

        self.tokenizer = load_tokenizer(hf_dir)
        self.encoder = Encoder(self.tokenizer, template, max_length, max_prompt_length)
        self.cfg, self.params = load_hf(hf_dir, dtype=dtype, param_dtype=dtype, lm_head=False, score_head=True)
        self.model = build_model(self.cfg, lm_head=False, scalar_heads=(SCORE_HEAD,))
        self.max_length, self.batch_size = max_length, batch_size
        self._fn: Optional[Any] = None

    def _score_fn(self):
        if self._fn is None:
            import jax

            self._fn = jax.jit(lambda p, t, pos, seg: sequence_rewards(self.model, p, t, pos, seg))
        return self._fn

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        enc = self.encoder.encode_sft(list(prompts), list(responses))
        fn, out = self._score_fn(), []
        for i in range(0, len(enc), self.batch_size):
            chunk = enc[i : i + self.batch_size]
            tokens = np.zeros((self.batch_size, self.max_length), np.int32)
            seg = np.zeros_like(tokens)
            for j, e in enumerate(chunk):
                ids = np.concatenate([e.prompt, e.response])[: self.max_length]
                tokens[j, : len(ids)], seg[j, : len(ids)] = ids, 1
            pos = np.broadcast_to(np.arange(self.max_length, dtype=np.int32), tokens.shape)
            out.append(np.asarray(fn(self.params, tokens, pos, seg), np.float64)[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0,))
