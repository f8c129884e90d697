"""A checkpoint of this project (HF-format directory) as teacher, critic or policy: the
compiled sampler behind the OpenAI-compatible server, and behind the policy-samples stage.

Concurrent HTTP requests that share sampling settings are gathered for a few milliseconds
and run as one batch, because the decode loop costs about the same for 1 row as for 32.
A request that carries a `seed` runs alone, so its sample depends only on its seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import threading
from typing import Any, Optional, Sequence

from rlaif_jax.feedback.server.app import BackendError, Choice, Completion

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Sample:
    text: str
    finish_reason: str  # "stop" (EOS) or "length"
    token_ids: list
    logprobs: list
    prompt_tokens: int


def render_messages(messages: Sequence[dict], template: str, tokenizer: Any) -> str:
    """Prompt text for a conversation. "paper": Human/Assistant turns (a system message is
    prepended as plain text); "model": the tokenizer's own chat template."""
    if template == "model":
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    if template != "paper":
        raise ValueError(f"template must be 'paper' or 'model', got {template!r}")
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"] + "\n\n")
        elif m["role"] == "user":
            parts.append(f"Human: {m['content']}\n\n")
        else:
            parts.append(f"Assistant: {m['content']}\n\n")
    return "".join(parts) + "Assistant: "


# The K policy samples of a stage under rng_per_prompt: `shared_seeds` names the K base seeds
# that K passes over the same prompts will ask for (batch b of the pass with base seed s draws
# with seed s * 1_000_003 + b). The first pass's batch samples all K at once (one prefill per
# prompt feeding K decode slots: sampling.generate_samples with slots), and the later passes
# take their batch from here: the same samples as K separate passes in this mode.
_SHARED = threading.local()


@contextlib.contextmanager
def shared_seeds(seeds: Sequence[int], stride: int = 1_000_003):
    """Within the block, a per-prompt-RNG sample of a batch with seed s * stride + b (s in
    `seeds`) draws the other seeds' samples of the same batch with it and keeps them for their
    own passes."""
    prev = getattr(_SHARED, "ctx", None)
    _SHARED.ctx = {"seeds": [int(s) for s in seeds], "stride": stride, "made": {}}
    try:
        yield
    finally:
        _SHARED.ctx = prev


class LocalModel:
    """Loads an HF directory once; samples text prompts with per-row token budgets."""

    def __init__(
        self,
        hf_dir: str,
        template: str = "paper",
        max_prompt_length: int = 256,
        max_length: int = 512,
        dtype: str = "float32",
        mesh_shape: Optional[Sequence[int]] = None,
    ):

        import jax

        from rlaif_jax import sharding as shd
        from rlaif_jax.data.tokenize import load_tokenizer
        from rlaif_jax.errors import ConfigError, existing_dir
        from rlaif_jax.models import build_model
        from rlaif_jax.models.hf_io import load_hf
        from rlaif_jax.models.remote import local_hf_dir

        if not 0 < max_prompt_length < max_length:
            raise ConfigError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})")
        existing_dir("hf_dir", hf_dir, "HF model directory", must_contain="config.json")  # not a hub name
        # What a checkpoint's samples depend on besides the call (shared_seeds' key).
        self.source = (str(hf_dir), dtype, tuple(mesh_shape or ()), template, max_prompt_length, max_length)
        hf_dir = local_hf_dir(hf_dir, "hf_dir")  # gs://: a local copy, fetched once per host
        self.tokenizer = load_tokenizer(hf_dir)
        # This host's devices: a sampler serves (or samples for) one host, also on a
        # multi-host slice where process 0 samples while the others wait.
        # Mesh and rules are read together here, where the sampler's mesh is made.
        layout = (
            shd.Layout(shd.make_mesh(*mesh_shape, devices=jax.local_devices()), shd.logical_rules())
            if mesh_shape
            else None
        )
        self.cfg, self.params = load_hf(hf_dir, layout=layout, dtype=dtype, param_dtype=dtype)
        self.model = build_model(self.cfg, layout=layout)
        self.template = template
        self.max_prompt_length, self.max_length = max_prompt_length, max_length
        tok = self.tokenizer
        self.eos_ids = tuple(self.cfg.eos_token_ids) or ((tok.eos_token_id,) if tok.eos_token_id is not None else ())
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.bos_id = tok.bos_token_id
        self._lock = threading.Lock()
        self._topk_fns: dict = {}

    def encode(self, text: str) -> list[int]:
        split = self.template != "model"
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=split)["input_ids"]
        if self.bos_id is not None:
            while ids and ids[0] == self.bos_id:
                ids = ids[1:]
            ids = [self.bos_id] + ids
        if len(ids) > self.max_prompt_length:  # keep the end, which holds "Assistant: "
            ids = (
                ids[:1] + ids[len(ids) - self.max_prompt_length + 1 :]
                if self.bos_id is not None
                else ids[-self.max_prompt_length :]
            )
        return ids

    def sample_ids(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        temperature: float,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        max_new_tokens: Optional[int] = None,
        length_bucket: int = 32,
        rng_per_prompt: bool = False,
    ) -> list[Sample]:
        import jax

        from rlaif_jax import sampling

        budgets = [self.max_length - len(p) for p in prompts]
        if max_new_tokens is not None:
            budgets = [min(b, max_new_tokens) for b in budgets]
        if min(budgets) < 1:
            raise ValueError(f"a prompt of {max(len(p) for p in prompts)} tokens leaves no room under max_length")
        # Rounded up so that only a few distinct decode lengths are ever compiled.
        steps = -(-max(budgets) // length_bucket) * length_bucket
        sp = sampling.SamplingParams(
            max_new_tokens=steps,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            eos_ids=self.eos_ids,
            pad_id=self.pad_id,
            rng_per_prompt=rng_per_prompt,
        )
        ids = [list(p) for p in prompts]
        ctx = getattr(_SHARED, "ctx", None) if rng_per_prompt else None
        key = (self.source, tuple(map(tuple, ids)), sp)
        if ctx is not None and (key, seed) in ctx["made"]:
            return self._samples(prompts, ctx["made"].pop((key, seed)), budgets)
        seeds = self._sibling_seeds(ctx, seed)
        with self._lock:
            if len(seeds) > 1 and self.model.layout is None:
                # Every pass's samples of this batch: one prefill per prompt, K x B rows decoding
                # through B slots (a finished row's slot takes the next).
                sp_k = dataclasses.replace(sp, slots=len(ids))
                outs = sampling.generate_samples(self.model, self.params, ids, [jax.random.key(s) for s in seeds], sp_k)
                for s, o in zip(seeds[1:], outs[1:]):
                    ctx["made"][(key, s)] = o
                out = outs[0]
            else:
                out = sampling.generate(self.model, self.params, ids, jax.random.key(seed), sp)
        return self._samples(prompts, out, budgets)

    @staticmethod
    def _sibling_seeds(ctx, seed: int) -> list:
        """[seed] + the other shared passes' seeds of the same batch (none outside shared_seeds)."""
        if ctx is None:
            return [seed]
        stride = ctx["stride"]
        for base in ctx["seeds"]:
            b = seed - base * stride
            if 0 <= b < stride:
                later = ctx["seeds"][ctx["seeds"].index(base) + 1 :]
                return [seed] + [s * stride + b for s in later]
        return [seed]

    def _samples(self, prompts, out, budgets) -> list[Sample]:
        samples = []
        for p, toks, n, lps, budget in zip(prompts, out.tokens, out.lengths, out.logprobs, budgets):
            n = int(min(n, budget))
            toks, lps = [int(t) for t in toks[:n]], [float(x) for x in lps[:n]]
            stopped = bool(toks) and toks[-1] in self.eos_ids
            body = toks[:-1] if stopped else toks
            text = self.tokenizer.decode(body, skip_special_tokens=False)
            samples.append(Sample(text, "stop" if stopped else "length", toks, lps, len(p)))
        return samples

    def _topk_fn(self, k: int, temperature: float):
        key = (k, temperature)
        if key not in self._topk_fns:
            import jax
            import jax.numpy as jnp

            from rlaif_jax.models import apply

            scale = temperature if temperature > 0 else 1.0  # the sampler's convention for greedy

            def fn(params, tokens, segs):
                logits = apply(self.model, params, tokens, None, segs)["logits"]
                logp = jax.nn.log_softmax(logits.astype(jnp.float32) / scale, axis=-1)
                return jax.lax.top_k(logp, k)

            self._topk_fns[key] = jax.jit(fn)
        return self._topk_fns[key]

    def top_alternatives(
        self, prompt_ids: Sequence[int], completion_ids: Sequence[int], k: int, temperature: float, bucket: int = 32
    ) -> list[list[tuple[int, float]]]:
        """For each completion token, the k most likely tokens (id, log-prob) at its position,
        from one teacher-forced forward pass (the sampler keeps only the sampled token's
        log-prob). What OpenAI's top_logprobs reports, and what a logprob-weighted judge needs."""
        import numpy as np

        seq = list(prompt_ids) + list(completion_ids)
        if not completion_ids:
            return []
        length = -(-len(seq) // bucket) * bucket
        tokens = np.full((1, length), self.pad_id, np.int32)
        segs = np.zeros((1, length), np.int32)
        tokens[0, : len(seq)] = seq
        segs[0, : len(seq)] = 1
        with self._lock:
            vals, idx = self._topk_fn(k, temperature)(self.params, tokens, segs)
        vals, idx = np.asarray(vals)[0], np.asarray(idx)[0]
        start = len(prompt_ids) - 1  # the logits at position i predict token i + 1
        return [
            [(int(idx[start + j, m]), float(vals[start + j, m])) for m in range(k)] for j in range(len(completion_ids))
        ]

    def sample(
        self,
        texts: Sequence[str],
        *,
        temperature: float,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        max_new_tokens: Optional[int] = None,
        length_bucket: int = 32,
        raw: bool = False,
        rng_per_prompt: bool = False,
    ) -> list[Sample]:
        """Samples for prompts; `raw` sends the text as is, else the template wraps it."""
        rendered = (
            texts
            if raw
            else [render_messages([{"role": "user", "content": t}], self.template, self.tokenizer) for t in texts]
        )
        return self.sample_ids(
            [self.encode(t) for t in rendered],
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            max_new_tokens=max_new_tokens,
            length_bucket=length_bucket,
            rng_per_prompt=rng_per_prompt,
        )


@dataclasses.dataclass
class _Pending:
    ids: list
    n: int
    future: asyncio.Future


class ModelBackend:
    """Server backend over a LocalModel, with micro-batching of concurrent requests."""

    def __init__(
        self,
        model: LocalModel,
        name: str,
        max_batch: int = 32,
        batch_window_s: float = 0.005,
        default_max_tokens: int = 256,
    ):
        self.lm, self.name = model, name
        self.max_batch, self.window = max_batch, batch_window_s
        self.default_max_tokens = default_max_tokens
        self._queues: dict[tuple, list] = {}
        self._seed = itertools.count(1)

    def model_ids(self):
        return [self.name]

    async def complete(self, request: dict) -> Completion:
        text = render_messages(request["messages"], self.lm.template, self.lm.tokenizer)
        ids = self.lm.encode(text)
        max_tokens = request.get("max_tokens") or request.get("max_completion_tokens") or self.default_max_tokens
        if len(ids) >= self.lm.max_length:
            raise BackendError(400, f"prompt is {len(ids)} tokens; this server's max_length is {self.lm.max_length}")
        temperature = float(request.get("temperature", 1.0))
        top_p = float(request.get("top_p", 1.0) or 1.0)
        n = int(request.get("n", 1))
        loop = asyncio.get_running_loop()
        if request.get("seed") is not None:
            samples = await loop.run_in_executor(
                None,
                lambda: self.lm.sample_ids(
                    [ids] * n,
                    temperature=temperature,
                    top_p=top_p,
                    seed=int(request["seed"]),
                    max_new_tokens=max_tokens,
                ),
            )
        else:
            key = (temperature, top_p, int(max_tokens))
            fut = loop.create_future()
            q = self._queues.setdefault(key, [])
            q.append(_Pending(ids, n, fut))
            if len(q) == 1:
                loop.call_later(self.window, lambda: asyncio.ensure_future(self._flush(key)))
            elif sum(p.n for p in q) >= self.max_batch:
                await self._flush(key)
            samples = await fut
        want_lp = bool(request.get("logprobs"))
        k = int(request.get("top_logprobs") or 0)
        if k < 0 or k > 20:
            raise BackendError(400, "'top_logprobs' must be in [0, 20]")
        decode = lambda t: self.lm.tokenizer.decode([t])  # noqa: E731
        choices = []
        for s in samples:
            lp = None
            if want_lp:
                alts = [[] for _ in s.token_ids]
                if k:
                    alts = await loop.run_in_executor(
                        None, lambda s=s: self.lm.top_alternatives(ids, s.token_ids, k, temperature)
                    )
                lp = {
                    "content": [
                        {
                            "token": decode(t),
                            "logprob": lp,
                            "top_logprobs": [{"token": decode(a), "logprob": al} for a, al in alt],
                        }
                        for t, lp, alt in zip(s.token_ids, s.logprobs, alts)
                    ]
                }
            choices.append(Choice(s.text, s.finish_reason, lp))
        return Completion(choices, len(ids), sum(len(s.token_ids) for s in samples), self.name)

    async def _flush(self, key: tuple) -> None:
        batch = self._queues.pop(key, [])
        if not batch:
            return
        temperature, top_p, max_tokens = key
        flat = [p.ids for p in batch for _ in range(p.n)]
        loop = asyncio.get_running_loop()
        try:
            samples = await loop.run_in_executor(
                None,
                lambda: self.lm.sample_ids(
                    flat, temperature=temperature, top_p=top_p, seed=next(self._seed), max_new_tokens=max_tokens
                ),
            )
        except Exception as e:  # every waiter learns why
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(
                        BackendError(500, f"sampling failed: {type(e).__name__}: {e}", "server_error")
                    )
            return
        i = 0
        for p in batch:
            if not p.future.done():
                p.future.set_result(samples[i : i + p.n])
            i += p.n
