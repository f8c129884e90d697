"""`train`: any objective (SFT, DPO family, reward model), any mesh, on the shared run loop
(rlaif_jax.train.run_loop: exact resume, checkpoints, metrics, export).

Each batch is one jitted, donated step (rlaif_jax.train.step) with explicit shardings.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator, Optional, Sequence

import gin
import jax
import jax.numpy as jnp

from rlaif_jax import sharding as shd
from rlaif_jax.data.tokenize.encode import Encoder
from rlaif_jax.data.tokenize.tokenizer import load_tokenizer
from rlaif_jax.errors import ConfigError, UserError, binding, existing_dir, positive, whole
from rlaif_jax.lora import LoraSettings
from rlaif_jax.lora import training as lora_training
from rlaif_jax.models import DecoderConfig, build_model, init_params
from rlaif_jax.models.decoder import init_scalar_head
from rlaif_jax.models.heads import head_param
from rlaif_jax.models.hf_io import load_hf, save_hf
from rlaif_jax.models.remote import local_hf_dir
from rlaif_jax.preflight import run_preflight, train_checks
from rlaif_jax.sampling import SamplingParams, generate
from rlaif_jax.train.metrics import mfu, peak_tflops
from rlaif_jax.train.optim import make_optimizer
from rlaif_jax.train.run_loop import (
    Closing,
    LoopSettings,
    NonFiniteLossError,
    Plan,
    RunKind,
    check_length,
    run,
    run_lock,
)
from rlaif_jax.train.step import compile_step, init_state, make_eval_step, make_train_step

# The run loop's names that callers of `train` import from here too.
__all__ = [
    "Closing",
    "LoopSettings",
    "NonFiniteLossError",
    "evaluate",
    "load_policy",
    "run_lock",
    "sample_texts",
    "train",
]


def _batch_tokens(batch: dict) -> int:
    return int(sum((v > 0).sum() for k, v in batch.items() if k.endswith("segment_ids")))


def load_policy(
    objective, cfg: Optional[DecoderConfig], init_from: Optional[str], layout: Optional[shd.Layout], seed: int
):
    """(cfg, model, params): from an HF directory when given (a reward model gets a fresh
    score head on the pretrained trunk), else random."""
    if cfg is None:
        cfg = DecoderConfig.from_pretrained(init_from)
    model = build_model(cfg, lm_head=objective.lm_head, scalar_heads=objective.scalar_heads, layout=layout)
    if not init_from:
        return cfg, model, init_params(model, jax.random.key(seed))
    _, params = load_hf(init_from, layout=layout, config=cfg, lm_head=objective.lm_head)
    for head in objective.scalar_heads:
        params[head_param(head)] = init_scalar_head(cfg, jax.random.key(seed + 1), layout)
    return cfg, model, params


@gin.configurable(denylist=["stop_after"])
def train(
    run_dir: str = gin.REQUIRED,
    objective: Any = gin.REQUIRED,
    train_data: Callable = gin.REQUIRED,
    num_steps: Optional[int] = gin.REQUIRED,
    model_config: Optional[DecoderConfig] = None,
    init_from: Optional[str] = None,
    reference_from: Optional[str] = None,
    tokenizer: Optional[str] = None,
    eval_data: Optional[Callable] = None,
    grad_accum: int = 1,
    optimizer: Callable = make_optimizer,
    mesh: Callable = shd.make_mesh,
    seed: int = 0,
    eval_every: int = 0,
    eval_batches: Optional[int] = None,
    sample_prompts: Sequence[str] = (),
    sample_max_new_tokens: int = 64,
    peak_device_tflops: Optional[float] = None,
    loop: Optional[LoopSettings] = None,
    lora: Optional[LoraSettings] = None,
    stop_after: Optional[int] = None,
) -> dict:
    """Train `objective` for num_steps, or until the data runs out when num_steps is None
    (epoch-based recipes bind the pipeline's num_epochs); resumes from run_dir/checkpoints.

        run_dir may be a URL (gs://...): checkpoints go there through orbax, everything else is
        staged locally and mirrored there at each checkpoint and at the end (see
        rlaif_jax.train.rundir); the HF export is marked complete by hf/EXPORT_COMPLETE.json.
        The run holds run_dir's writer lock (rlaif_jax.outputs) from start to end.

        reference_from: an HF directory holding the frozen reference of an objective that needs
        one (DPO), when it is not the policy's start: iterative RLAIF starts round r from round
        r-1's policy and keeps the SFT model as the reference. None: the initial params.

        train_data / eval_data are pipeline constructors (e.g. gin `@sft_pipeline`), called with
        tokenizer=..., state=... (the iterator position to resume from); eval_data also with
        num_epochs=1, so that an evaluation is one pass whatever is bound. `loop` (logging,
        checkpoints, export) defaults to a LoopSettings built here, so gin's `LoopSettings.*`
        bindings hold. `stop_after` ends the process-side loop early without a final checkpoint:
        preemption in tests. `lora` (LoRA / QLoRA, rlaif_jax.lora) defaults to a LoraSettings
        built here, so gin's (scoped) `LoraSettings.*` bindings hold; rank 0 is off.
        Returns the summary: {"step": last step, **the last logged metrics}.
    """
    loop = loop if loop is not None else LoopSettings()
    lora = lora if lora is not None else LoraSettings()
    _check_settings(
        num_steps,
        model_config,
        init_from,
        tokenizer,
        grad_accum,
        eval_every,
        eval_batches,
        sample_max_new_tokens,
        peak_device_tflops,
        stop_after,
    )
    _check_reference(objective, reference_from)
    kind = RunKind("train", "step", "data iterator", default_log_every=10, desc=f"train[{type(objective).__name__}]")

    def build(data_state: Optional[dict], closing: Closing) -> Plan:
        # HF directories on GCS: a local copy per host (the weights are memory-mapped).
        init_dir = local_hf_dir(init_from, "init_from")
        given_tok = local_hf_dir(tokenizer, "tokenizer", weights=False)
        tok_dir = given_tok or init_dir
        ref_dir = local_hf_dir(reference_from, "reference_from")
        # Every model/tokenizer pairing, before the data or any weights load.
        run_preflight(train_checks(model_config, init_dir, ref_dir, given_tok))
        return _plan(
            data_state,
            closing,
            objective=objective,
            train_data=train_data,
            num_steps=num_steps,
            model_config=model_config,
            init_from=init_dir,
            reference_from=ref_dir,
            tok_dir=tok_dir,
            eval_data=eval_data,
            grad_accum=grad_accum,
            optimizer=optimizer,
            mesh=mesh,
            seed=seed,
            log_every=loop.every(kind.default_log_every),
            eval_every=eval_every,
            eval_batches=eval_batches,
            sample_prompts=sample_prompts,
            sample_max_new_tokens=sample_max_new_tokens,
            peak_device_tflops=peak_device_tflops,
            lora=lora,
            run_dir=run_dir,
        )

    return run(run_dir, kind, loop, build, stop_after)


def _check_settings(
    num_steps,
    model_config,
    init_from,
    tokenizer,
    grad_accum,
    eval_every,
    eval_batches,
    sample_max_new_tokens,
    peak_device_tflops,
    stop_after,
) -> None:
    """Every setting of `train` a user can get wrong, before anything is loaded or written
    (LoopSettings, the pipeline, optimizer and objective check their own)."""
    b = lambda p: binding(f"train.{p}")  # noqa: E731
    check_length(b("num_steps"), num_steps, stop_after, optional=True)
    whole(b("grad_accum"), grad_accum, 1)
    whole(b("eval_every"), eval_every, 0, hint=">= 0; 0 is never")
    if eval_batches is not None:
        whole(b("eval_batches"), eval_batches, 1, hint="> 0, or None for the whole eval set")
    whole(b("sample_max_new_tokens"), sample_max_new_tokens, 1)
    positive(b("peak_device_tflops"), peak_device_tflops, hint="> 0, or None to look it up")
    if model_config is None and not init_from:
        raise ConfigError(
            f"{b('model_config')} and {b('init_from')} are both unset; give a model config or an "
            "HF directory to start from"
        )
    existing_dir(b("init_from"), init_from, "HF model directory", must_contain="config.json")
    existing_dir(b("tokenizer"), tokenizer, "tokenizer directory")


def _check_reference(objective, reference_from: Optional[str]) -> None:
    if reference_from is None:
        return
    if not objective.needs_reference:
        raise ConfigError(
            f"{binding('train.reference_from')} = {reference_from!r}, but {type(objective).__name__} "
            "keeps no reference model (reference 'precomputed' / 'none', simpo, SFT, reward model); "
            "unset it"
        )
    existing_dir(binding("train.reference_from"), reference_from, "HF model directory", must_contain="config.json")


def _batches(it) -> Iterator[tuple[Any, dict]]:
    """(iterator position before the batch, batch) until the data ends."""
    while True:
        position = it.get_state()
        try:
            batch = next(it)
        except StopIteration:
            return
        yield position, batch


def _plan(
    data_state,
    closing: Closing,
    *,
    objective,
    train_data,
    num_steps,
    model_config,
    init_from,
    reference_from,
    tok_dir,
    eval_data,
    grad_accum,
    optimizer,
    mesh,
    seed,
    log_every,
    eval_every,
    eval_batches,
    sample_prompts,
    sample_max_new_tokens,
    peak_device_tflops,
    lora: LoraSettings,
    run_dir: str,
) -> Plan:
    """train's data, model, state and compiled step."""

    tok = load_tokenizer(tok_dir) if tok_dir else None
    # The optimizer and the data before any weights: their settings are checked, and an
    # empty dataset found, in seconds rather than after loading a 7B model.
    tx, schedule = optimizer(params=None, default_total_steps=num_steps)
    it = train_data(tokenizer=tok, state=data_state)
    closing.add(getattr(it, "close", None))
    batches = _batches(it)
    first = next(batches, None)
    if first is None and data_state is None:
        raise UserError(
            f"{binding('train.train_data')}: the training data yields no batch at all (fewer "
            "examples than one batch, with drop_remainder?); give more data or a smaller "
            "batch_size. Nothing was trained or exported"
        )
    batches = itertools.chain([first] if first else [], batches)

    the_mesh = mesh() if callable(mesh) else mesh
    layout = shd.Layout(the_mesh, shd.logical_rules())
    cfg, model, params = load_policy(objective, model_config, init_from, layout, seed)
    ref_params = None
    if objective.needs_reference and reference_from:
        # The policy's shape: a reference of another architecture fails here, not mid-step.
        _, ref_params = load_hf(reference_from, layout=layout, config=cfg, lm_head=objective.lm_head)
    elif objective.needs_reference and not lora.enabled:
        ref_params = jax.tree.map(jnp.copy, params)
    lora_run = None
    if lora.enabled:
        # Only the adapters (and a fresh score head) train; the frozen base (the reference
        # unless reference_from) is the step's constant `ref_params`.
        lora_training.check_base_pointer(run_dir, lora_training.base_pointer(init_from, cfg, seed, lora))
        lora_run = lora_training.prepare(objective, model, params, lora, seed, reference=ref_params)
        objective, model, params, ref_params = lora_run.objective, lora_run.model, lora_run.trainable, lora_run.frozen
    policy = lora_run.full_params if lora_run else lambda p: p
    state = init_state(params, tx, seed)
    del params
    step_fn = compile_step(make_train_step(objective, model, tx, schedule, grad_accum), state, the_mesh, ref_params)
    eval_fn = jax.jit(make_eval_step(objective, model)) if eval_data else None
    peak = peak_tflops(jax.devices()[0], peak_device_tflops)

    def step(state, batch):
        return step_fn(state, shd.shard_batch(batch, the_mesh), ref_params)

    def summarize(metrics, batches: list, seconds: float) -> dict:
        metrics = jax.device_get(metrics)
        tokens = sum(_batch_tokens(b) for b in batches)
        seq_len = batches[-1][next(k for k in batches[-1] if k.endswith("tokens"))].shape[1]
        # 6N per token for the policy's forward and backward; a reference forward adds 2N.
        flops = cfg.flops_per_token(seq_len) * tokens * (4 / 3 if objective.needs_reference else 1)
        m = {k: float(v) for k, v in metrics.items()}
        m.update(tokens_per_second=tokens / seconds, step_time=seconds / len(batches), epoch=it.epoch)
        u = mfu(flops, seconds, jax.device_count(), peak)
        if u is not None:
            m["mfu"] = u
        return m

    def after_step(state, step: int, writer) -> Optional[dict]:
        if eval_fn is None or not eval_every or step % eval_every:
            return None
        ev = evaluate(eval_fn, state.params, eval_data, tok, the_mesh, ref_params, eval_batches)
        writer.write(step, ev, prefix="eval/")
        if sample_prompts and objective.lm_head and tok is not None:
            for p, text in zip(
                sample_prompts,
                sample_texts(model, policy(state.params), tok, sample_prompts, sample_max_new_tokens, the_mesh),
            ):
                writer.text(step, "samples", f"**{p}**\n\n{text}")
                writer.write(step, {"prompt": p, "completion": text}, prefix="sample/")
        return {f"eval/{k}": v for k, v in ev.items()}

    return Plan(
        state=state,
        data=it,
        batches=batches,
        step=step,
        summarize=summarize,
        export=lambda d, state: (
            lora_run.export(d, cfg, state.params, tokenizer=tok, base_model=init_from or "")
            if lora_run
            else save_hf(d, cfg, state.params, tokenizer=tok, score_head=not objective.lm_head)
        ),
        postfix=lambda m: dict(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_second']:.0f}"),
        after_step=after_step,
        num_steps=num_steps,
    )


def evaluate(eval_fn, params, eval_data: Callable, tok, mesh, ref_params, max_batches: Optional[int]) -> dict:
    """Metric averages over one pass of the held-out iterator (sums / counts, exactly).
    One pass whatever the binding: a pipeline left repeating forever (num_epochs=None, the
    default, as when a scope typo drops eval/...num_epochs) would never end the evaluation."""
    it = eval_data(tokenizer=tok, state=None, num_epochs=1)
    sums: dict = {}
    try:
        for i, batch in enumerate(it):
            if max_batches is not None and i >= max_batches:
                break
            out = jax.device_get(eval_fn(params, shd.shard_batch(batch, mesh), ref_params))
            for k, (s, c) in out.items():
                a, b = sums.get(k, (0.0, 0.0))
                sums[k] = (a + float(s), b + float(c))
    finally:
        it.close() if hasattr(it, "close") else None
    return {k: s / c for k, (s, c) in sums.items() if c}


def sample_texts(model, params, tok, prompts: Sequence[str], max_new_tokens: int, mesh, template: str = "paper"):

    enc = Encoder(
        tok,
        template,
        max_length=model.cfg.max_position_embeddings,
        max_prompt_length=model.cfg.max_position_embeddings // 2,
    )
    ids = [list(map(int, x)) for x in enc.encode_prompts(list(prompts))]
    eos = tuple(model.cfg.eos_token_ids) or ((tok.eos_token_id,) if tok.eos_token_id is not None else ())
    sp = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9, eos_ids=eos, pad_id=tok.pad_token_id or 0
    )
    out = generate(model, params, ids, jax.random.key(0), sp)
    return [tok.decode(t[:n], skip_special_tokens=True) for t, n in zip(out.tokens, out.lengths)]
