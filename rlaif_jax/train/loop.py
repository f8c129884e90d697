"""The one training loop: any objective, any mesh, exact resume, metrics, export.

The hot loop calls one jitted, donated step per batch and touches the host only to feed
batches and, every `log_every` steps, to fetch metrics (which is also when a non-finite
loss is noticed: the run stops naming the step and the batch, before any checkpoint of the
bad state is written).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from rlaif_jax import fileio
from rlaif_jax import sharding as shd
from rlaif_jax.errors import ConfigError, StorageError, UserError, binding, existing_dir, positive, whole
from rlaif_jax.models import DecoderConfig, build_model, init_params
from rlaif_jax.models.decoder import init_scalar_head
from rlaif_jax.models.heads import head_param
from rlaif_jax.models.hf_io import load_hf, save_hf
from rlaif_jax.outputs import writer_lock
from rlaif_jax.train.checkpoint import Checkpointer, abstract_like
from rlaif_jax.train.metrics import MetricsWriter, mfu, peak_tflops
from rlaif_jax.train.optim import make_optimizer
from rlaif_jax.train.rundir import RunDir, local_hf_dir
from rlaif_jax.train.step import TrainState, compile_step, create_state, make_eval_step, make_train_step

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def _batch_tokens(batch: dict) -> int:
    return int(sum((v > 0).sum() for k, v in batch.items() if k.endswith("segment_ids")))


def load_policy(objective, cfg: Optional[DecoderConfig], init_from: Optional[str], layout, seed: int):
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


# -- what `train` and `train_ppo` share: settings checks, the writer lock, closing -----------


def check_run_settings(fn: str, steps_param: str, num_steps, *, log_every, checkpoint_every, keep_checkpoints,
                       stop_after=None, steps_optional: bool = False) -> None:
    """The settings every trainer has: a length, logging and checkpoint intervals."""
    b = lambda p: binding(f"{fn}.{p}")  # noqa: E731
    if num_steps is not None or not steps_optional:
        whole(b(steps_param), num_steps, 1, hint="> 0, or None to run until the data ends" if steps_optional else "")
    whole(b("log_every"), log_every, 1)
    whole(b("checkpoint_every"), checkpoint_every, 0, hint=">= 0; 0 saves at the end only")
    whole(b("keep_checkpoints"), keep_checkpoints, 1)
    if stop_after is not None:
        whole("stop_after", stop_after, 1)


@contextlib.contextmanager
def run_lock(run_dir: str, binding_name: str) -> Iterator[None]:
    """The run directory's writer lock, held by process 0 for the whole run: a second trainer
    on the same run_dir would interleave checkpoints and metrics with this one."""
    if jax.process_index() != 0:
        yield
        return
    with writer_lock(run_dir, binding_name):
        yield


class Closing:
    """Closes what a run opened, last opened first, when the block ends. While an error is on
    its way out, a closer's own failure (the same full disk, say) is logged in one line rather
    than raised: it would hide that error. Otherwise the first failure is raised after every
    closer ran."""

    def __init__(self, *closers: Optional[Callable[[], Any]]):
        self._closers: list = []
        for c in closers:
            self.add(c)

    def add(self, closer: Optional[Callable[[], Any]]) -> None:
        if closer is not None:
            self._closers.append(closer)

    def __enter__(self) -> "Closing":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        first = None
        for close in reversed(self._closers):
            try:
                close()
            except Exception as e:
                if exc is not None:
                    log.warning("while stopping after the error below: %s", " ".join(str(e).split()))
                elif first is None:
                    first = e
        if first is not None:
            raise first
        return False


def _batches(it) -> Iterator[tuple[dict, Any]]:
    """(iterator position before the batch, batch) until the data ends."""
    while True:
        position = it.get_state()
        try:
            batch = next(it)
        except StopIteration:
            return
        yield position, batch


def _check_finite(state: TrainState, recent: collections.deque, run_dir: RunDir) -> None:
    bad = int(jax.device_get(state.nonfinite_step))
    if bad < 0:
        return
    where = next((pos for s, pos, _ in recent if s == bad), None)
    batch = next((b for s, _, b in recent if s == bad), None)
    dump = None
    if batch is not None and jax.process_index() == 0:
        name = f"nonfinite_batch_step{bad}.npz"
        np.savez(run_dir.local_path(name), **batch)
        dump = run_dir.url(name)  # a URL run_dir gets it when the run closes
    raise NonFiniteLossError(
        f"loss or gradient became non-finite at step {bad} (data iterator position before that "
        f"batch: {where}; batch saved to {dump}). That update was not applied and no checkpoint "
        "of it was written; the last good checkpoint is intact."
    )


@gin.configurable(denylist=["stop_after"])
def train(
    run_dir: str = gin.REQUIRED,
    objective: Any = gin.REQUIRED,
    train_data: Callable = gin.REQUIRED,
    num_steps: Optional[int] = gin.REQUIRED,
    model_config: Optional[DecoderConfig] = None,
    init_from: Optional[str] = None,
    tokenizer: Optional[str] = None,
    eval_data: Optional[Callable] = None,
    grad_accum: int = 1,
    optimizer: Callable = make_optimizer,
    mesh: Callable = shd.make_mesh,
    seed: int = 0,
    log_every: int = 10,
    eval_every: int = 0,
    eval_batches: Optional[int] = None,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 3,
    async_checkpoint: bool = True,
    export_hf: bool = True,
    sample_prompts: Sequence[str] = (),
    sample_max_new_tokens: int = 64,
    peak_device_tflops: Optional[float] = None,
    stop_after: Optional[int] = None,
) -> dict:
    """Train `objective` for num_steps, or until the data runs out when num_steps is None
(epoch-based recipes bind the pipeline's num_epochs); resumes from run_dir/checkpoints.

    run_dir may be a URL (gs://...): checkpoints go there through orbax, everything else is
    staged locally and mirrored there at each checkpoint and at the end (see
    rlaif_jax.train.rundir); the HF export is marked complete by hf/EXPORT_COMPLETE.json.
    The run holds run_dir's writer lock (rlaif_jax.outputs) from start to end.

    train_data / eval_data are pipeline constructors (e.g. gin `@sft_pipeline`), called with
    tokenizer=..., state=... (the iterator position to resume from). `stop_after` ends the
    process-side loop early without a final checkpoint: preemption in tests.
    Returns the last logged metrics.
    """
    args = dict(locals())  # every argument, passed on to _train by name
    _check_settings(args)
    with run_lock(run_dir, binding("train.run_dir")):
        # HF directories on GCS: a local copy per host (the weights are memory-mapped).
        args["init_from"] = local_hf_dir(init_from, "init_from")
        args["tokenizer"] = local_hf_dir(tokenizer, "tokenizer", weights=False)
        rd = RunDir(args.pop("run_dir"))
        with Closing(rd.close):  # a URL run_dir: the last upload, also after an error
            return _train(rd, **args)


def _check_settings(a: dict) -> None:
    """Every setting of `train` a user can get wrong, before anything is loaded or written
    (the pipeline, optimizer and objective check their own)."""
    b = lambda p: binding(f"train.{p}")  # noqa: E731
    check_run_settings("train", "num_steps", a["num_steps"], log_every=a["log_every"],
                       checkpoint_every=a["checkpoint_every"], keep_checkpoints=a["keep_checkpoints"],
                       stop_after=a["stop_after"], steps_optional=True)
    whole(b("grad_accum"), a["grad_accum"], 1)
    whole(b("eval_every"), a["eval_every"], 0, hint=">= 0; 0 is never")
    if a["eval_batches"] is not None:
        whole(b("eval_batches"), a["eval_batches"], 1, hint="> 0, or None for the whole eval set")
    whole(b("sample_max_new_tokens"), a["sample_max_new_tokens"], 1)
    positive(b("peak_device_tflops"), a["peak_device_tflops"], hint="> 0, or None to look it up")
    if a["model_config"] is None and not a["init_from"]:
        raise ConfigError(f"{b('model_config')} and {b('init_from')} are both unset; give a model config or an "
                          "HF directory to start from")
    existing_dir(b("init_from"), a["init_from"], "HF model directory", must_contain="config.json")
    existing_dir(b("tokenizer"), a["tokenizer"], "tokenizer directory")


def _train(rd: RunDir, objective, train_data, num_steps, model_config, init_from, tokenizer, eval_data, grad_accum,
           optimizer, mesh, seed, log_every, eval_every, eval_batches, checkpoint_every, keep_checkpoints,
           async_checkpoint, export_hf, sample_prompts, sample_max_new_tokens, peak_device_tflops, stop_after) -> dict:
    from rlaif_jax.data.tokenize.tokenizer import load_tokenizer

    run_dir = rd.path
    tok_dir = tokenizer or init_from
    tok = load_tokenizer(tok_dir) if tok_dir else None
    # The optimizer and the data before any weights: their settings are checked, and an
    # empty dataset found, in seconds rather than after loading a 7B model.
    tx, schedule = optimizer(params=None, default_total_steps=num_steps)
    ckpt = Checkpointer(fileio.join(run_dir, "checkpoints"), keep_checkpoints, async_checkpoint)
    with Closing(ckpt.close) as closing:
        try:
            latest = ckpt.latest_step()
            it = train_data(tokenizer=tok, state=(ckpt.restore_data(latest) if latest is not None else None) or None)
            closing.add(getattr(it, "close", None))
            batches = _batches(it)
            first = next(batches, None)
            if first is None and latest is None:
                raise UserError(f"{binding('train.train_data')}: the training data yields no batch at all (fewer "
                                "examples than one batch, with drop_remainder?); give more data or a smaller "
                                "batch_size. Nothing was trained or exported")
            batches = itertools.chain([first] if first else [], batches)

            the_mesh = mesh() if callable(mesh) else mesh
            layout = shd.Layout(the_mesh, shd.logical_rules())
            cfg, model, params = load_policy(objective, model_config, init_from, layout, seed)
            ref_params = jax.tree.map(jnp.copy, params) if objective.needs_reference else None
            state = jax.jit(lambda p: create_state(p, tx, seed))(params)
            del params
            start = 0
            if latest is not None:
                state, _, _ = ckpt.restore(latest, abstract_like(state))
                start = int(jax.device_get(state.step))
                log.info("resumed from %s at step %d", ckpt.directory, start)
            step_fn = compile_step(make_train_step(objective, model, tx, schedule, grad_accum, the_mesh), state,
                                   the_mesh, ref_params)
            eval_fn = jax.jit(make_eval_step(objective, model, the_mesh)) if eval_data else None
            writer = MetricsWriter(rd.local, resume_step=start)
            closing.add(writer.close)
            rd.write_text("config.gin", gin.config_str())
            rd.sync(writer)

            peak = peak_tflops(jax.devices()[0], peak_device_tflops)
            recent: collections.deque = collections.deque(maxlen=max(log_every, 1))
            last: dict = {}
            t_last, tokens_since, steps_since = time.perf_counter(), 0, 0
            bar = tqdm(total=num_steps, initial=start, desc=f"train[{type(objective).__name__}]",
                       disable=jax.process_index() != 0)
            closing.add(bar.close)
            step = start
            metrics = batch = None

            def log_metrics(metrics, batch) -> dict:
                nonlocal t_last, tokens_since, steps_since
                metrics = jax.device_get(metrics)
                _check_finite(state, recent, rd)
                dt = time.perf_counter() - t_last
                seq_len = batch[next(k for k in batch if k.endswith("tokens"))].shape[1]
                # 6N per token for the policy's forward and backward; a reference forward adds 2N.
                flops = cfg.flops_per_token(seq_len) * tokens_since * (4 / 3 if objective.needs_reference else 1)
                m = {k: float(v) for k, v in metrics.items()}
                m.update(tokens_per_second=tokens_since / dt, step_time=dt / steps_since, epoch=it.epoch)
                u = mfu(flops, dt, jax.device_count(), peak)
                if u is not None:
                    m["mfu"] = u
                writer.write(step, m)
                bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_second']:.0f}")
                t_last, tokens_since, steps_since = time.perf_counter(), 0, 0
                return m

            while num_steps is None or step < num_steps:
                nxt = next(batches, None)
                if nxt is None:
                    if num_steps is not None:
                        log.warning("training data exhausted after %d steps (num_steps=%d)", step, num_steps)
                    break
                position, batch = nxt
                recent.append((step, position, batch))
                tokens_since += _batch_tokens(batch)
                steps_since += 1
                state, metrics = step_fn(state, shd.shard_batch(batch, the_mesh), ref_params)
                step += 1
                bar.update(1)

                if step % log_every == 0 or step == num_steps:
                    last = log_metrics(metrics, batch)
                if eval_fn is not None and eval_every and step % eval_every == 0:
                    ev = evaluate(eval_fn, state.params, eval_data, tok, the_mesh, ref_params, eval_batches)
                    writer.write(step, ev, prefix="eval/")
                    last.update({f"eval/{k}": v for k, v in ev.items()})
                    if sample_prompts and objective.lm_head and tok is not None:
                        for p, text in zip(sample_prompts, sample_texts(model, state.params, tok, sample_prompts,
                                                                        sample_max_new_tokens, the_mesh)):
                            writer.text(step, "samples", f"**{p}**\n\n{text}")
                            writer.write(step, {"prompt": p, "completion": text}, prefix="sample/")

                if checkpoint_every and step % checkpoint_every == 0 and step != num_steps:
                    _check_finite(state, recent, rd)
                    ckpt.save(step, state, it.get_state())
                    rd.sync(writer)
                if stop_after is not None and step >= stop_after:
                    ckpt.wait()
                    return last
            if steps_since:  # the data ran out between two logging steps
                last = {**last, **log_metrics(metrics, batch)}
            _check_finite(state, recent, rd)
            if ckpt.latest_step() != step:
                ckpt.save(step, state, it.get_state())
            ckpt.wait()
            rd.write_text("operative_config.gin", gin.operative_config_str())
            rd.sync(writer)
            if export_hf:
                rd.export_hf(lambda d: save_hf(d, cfg, state.params, tokenizer=tok, score_head=not objective.lm_head),
                             info={"step": step})
            summary = {"step": step, **last}
            rd.write_text("summary.json", json.dumps(summary, indent=2))  # last: on a URL, after hf/ is complete
            return summary
        except StorageError:
            # A save failing in the background fills the disk, and the next write to fail may
            # be a metrics row: report the checkpoint (the cause) if it failed.
            ckpt.wait()
            raise


def evaluate(eval_fn, params, eval_data: Callable, tok, mesh, ref_params, max_batches: Optional[int]) -> dict:
    """Metric averages over one pass of the held-out iterator (sums / counts, exactly)."""
    it = eval_data(tokenizer=tok, state=None)
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
    from rlaif_jax.data.tokenize.encode import Encoder
    from rlaif_jax.sampling import SamplingParams, generate

    enc = Encoder(tok, template, max_length=model.cfg.max_position_embeddings, max_prompt_length=model.cfg.max_position_embeddings // 2)
    ids = [list(map(int, x)) for x in enc.encode_prompts(list(prompts))]
    eos = tuple(model.cfg.eos_token_ids) or ((tok.eos_token_id,) if tok.eos_token_id is not None else ())
    sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9, eos_ids=eos,
                        pad_id=tok.pad_token_id or 0)
    out = generate(model, params, ids, jax.random.key(0), sp)
    return [tok.decode(t[:n], skip_special_tokens=True) for t, n in zip(out.tokens, out.lengths)]
