"""Bad input, round two (issue 39), as a hostile-but-fair user gives it: each case ends in one
`error:` line under 300 characters naming the file / binding / model pair and the fix, with
exit status 2, or (where the input is fine but was mishandled) in the right result; nothing
written or paid for is lost or paid twice. docs/reliability.md's table lists these cases."""

import json
import os
import shutil

import gin
import pytest

from rlaif_jax.cli import run
from rlaif_jax.data.records import COMPARISONS, DEMONSTRATIONS, PREFERENCES, read_records
from rlaif_jax.errors import UserError
from rlaif_jax.feedback.server.testing import EchoTeacher, FaultInjector, RuleJudge
from rlaif_jax.feedback.settings import JudgeSettings
from rlaif_jax.feedback.stages import critic_stage, load_prompts, teacher_stage
from tests.faults.disks import read_only
from tests.feedback.conftest import (  # noqa: F401
    KEY_ENV,
    SECRET,
    api_key,
    make_client,
    serve,
    write_prompts_jsonl,
)
from tests.train.fixtures import make_world, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def fresh_gin():
    """Each test parses its own config, as each script run does."""
    gin.clear_config()
    yield
    gin.clear_config()


def one_error_line(err: str) -> str:
    """The single `error:` line of a script's stderr, checked short and traceback-free."""
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    assert len(lines[0]) < 300, lines[0]
    return lines[0]


def run_script(main, argv, capsys) -> tuple[int, str]:
    rc = run(main, argv)
    return rc, capsys.readouterr().err


# -- API stages ---------------------------------------------------------------------------


def test_a_rerun_with_another_cache_does_not_pay_again_for_what_out_dir_holds(serve, tmp_path, api_key):
    """The rerun after a refused concurrent writer: its cache is not the one the other writer
    filled, but the other writer's records are in out_dir."""
    prompts = write_prompts_jsonl(tmp_path / "prompts.jsonl", [f"task {i}" for i in range(12)])
    faults = FaultInjector()
    srv = serve(EchoTeacher(["teacher"]), faults)
    out = str(tmp_path / "out")
    with make_client(srv, tmp_path, cache="writer_a.jsonl") as c:
        teacher_stage(prompts=prompts, out_dir=out, client=c)
    first = list(read_records(out, DEMONSTRATIONS))
    assert len(faults.paid()) == 12
    with make_client(srv, tmp_path, cache="writer_b.jsonl") as c:
        m = teacher_stage(prompts=prompts, out_dir=out, client=c)
    assert len(faults.paid()) == 12 and set(faults.paid().values()) == {1}  # before: 24, each twice
    assert list(read_records(out, DEMONSTRATIONS)) == first
    assert m["provenance"]["report"]["kept_from_out_dir"] == 12

    # Asked another way (another system prompt): the records are not reused.
    with make_client(srv, tmp_path, cache="writer_b.jsonl") as c:
        teacher_stage(prompts=prompts, out_dir=out, client=c, system_prompt="Be terse.")
    assert len(faults.paid()) == 24


@pytest.mark.parametrize("mode", ["pairwise", "rating"])
def test_a_critic_rerun_with_another_cache_does_not_pay_again_for_what_out_dir_holds(serve, tmp_path, api_key, mode):
    """Case 6 for the critic (both modes): its comparisons in out_dir are reused whatever
    cache the rerun is given; a judgment that failed is asked again."""
    demos = [
        {"prompt_id": f"p{i}", "prompt": f"task {i}", "completion": f"GOOD answer {i}", "source_model": "t"}
        for i in range(6)
    ] + [{"prompt_id": "p6", "prompt": "task 6 [[fault:400]]", "completion": "GOOD x", "source_model": "t"}]
    first_set = tmp_path / "a.jsonl"
    first_set.write_text("".join(json.dumps(d) + "\n" for d in demos))
    second_set = tmp_path / "b.jsonl"
    second_set.write_text("".join(json.dumps({**d, "completion": "weak", "source_model": "p"}) + "\n" for d in demos))
    faults = FaultInjector()
    srv = serve(RuleJudge(["judge"]), faults)
    out = str(tmp_path / "critic")
    judge = JudgeSettings(mode=mode, both_orders=mode == "pairwise", template=f"{mode}_v1")

    def critic(cache):
        with make_client(srv, tmp_path, model="judge", cache=cache) as c:
            return critic_stage(
                responses_1=str(first_set), responses_2=str(second_set), out_dir=out, client=c, judge=judge
            )

    critic("writer_a.jsonl")
    first = list(read_records(out, COMPARISONS))
    paid = sum(faults.paid().values())
    assert paid == 12 and len(first) == 7
    m = critic("writer_b.jsonl")
    assert sum(faults.paid().values()) == paid  # before: 24, each twice
    assert list(read_records(out, COMPARISONS)) == first
    assert m["provenance"]["report"]["kept_from_out_dir"] == 6  # p6's error is asked again (and fails again)
    assert sum(e["outcome"] != "ok" for e in faults.log) > 0

    # Asked another way (another seed decides the order): nothing is reused.
    judge = JudgeSettings(mode=mode, both_orders=mode == "pairwise", template=f"{mode}_v1", seed=1)
    critic("writer_b.jsonl")
    assert sum(faults.paid().values()) > paid


def test_two_prompts_under_one_prompt_id_are_refused_and_repeats_asked_once(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt_id": "p1", "prompt": "a"}, {"prompt_id": "p2", "prompt": "b"}, {"prompt_id": "p1", "prompt": "c"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError) as e:
        load_prompts(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: prompt_id 'p1' is given to 2 rows with different prompts (line 1, line 3")
    assert "own id" in msg and len(msg) < 300
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2] + rows[:1]))
    assert [r["prompt"] for r in load_prompts(str(path))] == ["a", "b"]


# -- gin -----------------------------------------------------------------------------------


def _train_main(argv=None):
    from rlaif_jax.cli import main_with_gin
    from rlaif_jax.train.loop import train

    return main_with_gin("train", train, argv)


def test_a_gin_macro_typo_is_one_short_line_naming_the_binding(capsys):
    rc, err = run_script(
        _train_main,
        [f"--gin_file={ROOT}/configs/experiments/tiny_sft.gin", "--gin_param=train.run_dir = %RUN_DIRR"],
        capsys,
    )
    line = one_error_line(err)  # before: 2,290 characters, the whole config
    assert rc == 2
    assert "train.run_dir uses macro %RUN_DIRR, which is never defined (did you mean %RUN_DIR?)" in line, line


def test_a_gin_scope_typo_is_refused_naming_the_binding(capsys):
    """`@evl/` for `@eval/`: the eval pipeline would run unscoped (the training data, repeated
    forever). The pass is finite now anyway (test_an_eval_pass_ends_whatever_the_binding)."""
    rc, err = run_script(
        _train_main,
        [f"--gin_file={ROOT}/configs/experiments/tiny_sft.gin", "--gin_param=train.eval_data = @evl/sft_pipeline"],
        capsys,
    )
    line = one_error_line(err)
    assert rc == 2
    assert "train.eval_data = @evl/sft_pipeline: no binding is under the scope 'evl'" in line, line
    assert "did you mean @eval/sft_pipeline?" in line


def test_a_read_only_run_dir_is_one_line_naming_it(world, tmp_path, capsys):
    with read_only(tmp_path / "ro"):
        rc, err = run_script(_train_main, [f"--gin_file={sft_gin(tmp_path, tmp_path / 'ro' / 'run', world)}"], capsys)
    line = one_error_line(err)  # before: a traceback (gin's re-raise dropped the filename)
    assert rc == 2
    assert (
        line == f"error: {tmp_path / 'ro' / 'run'}: Read-only file system; make it writable or choose another directory"
    )


# -- training inputs -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tok, tok_dir, demos, prefs = make_world(str(tmp_path_factory.mktemp("world")))
    return dict(vocab=len(tok), tok_dir=tok_dir, demos=demos, prefs=prefs)


def sft_gin(tmp_path, run_dir, world, extra: str = "") -> str:
    path = tmp_path / f"sft_{abs(hash((str(run_dir), extra)))}.gin"
    path.write_text(f"""
include '{ROOT}/configs/models/tiny_llama.gin'
make_mesh.data = -1
custom_model_config.vocab_size = {world["vocab"]}
custom_model_config.hidden_size = 32
custom_model_config.intermediate_size = 64
train.run_dir = '{run_dir}'
train.objective = @SFT()
train.model_config = %MODEL_CONFIG
train.tokenizer = '{world["tok_dir"]}'
train.train_data = @sft_pipeline
train.num_steps = 2
sft_pipeline.data_dirs = '{world["demos"]}'
sft_pipeline.batch_size = 8
sft_pipeline.seq_len = 32
sft_pipeline.max_length = 32
sft_pipeline.max_prompt_length = 16
sft_pipeline.prefetch = 0
{extra}
""")
    return str(path)


@pytest.fixture(scope="module")
def hf_dir(world, tmp_path_factory):
    """A tiny HF model directory (zero weights: nothing to compile; the world's tokenizer),
    written by save_hf."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from rlaif_jax.data.tokenize.tokenizer import load_tokenizer
    from rlaif_jax.models import build_model
    from rlaif_jax.models.hf_io import save_hf
    from rlaif_jax.models.params import abstract_params

    d = str(tmp_path_factory.mktemp("hf") / "model")
    cfg = tiny_config(world["vocab"])
    params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), nn.unbox(abstract_params(build_model(cfg))))
    save_hf(d, cfg, params, tokenizer=load_tokenizer(world["tok_dir"]))
    return d


def _truncate(d):
    path = os.path.join(d, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return path


def _reshape(d):
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    cfg["intermediate_size"] = 48  # the weights say 64
    json.dump(cfg, open(path, "w"))
    return d


def _drop_shard(d):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(os.path.join(d, "model.safetensors"))
    os.remove(os.path.join(d, "model.safetensors"))
    names = sorted(tensors)
    first = {k: tensors[k] for k in names[: len(names) // 2]}
    save_file(first, os.path.join(d, "model-00001-of-00002.safetensors"))
    shard = {k: "model-00001-of-00002.safetensors" if k in first else "model-00002-of-00002.safetensors" for k in names}
    json.dump({"weight_map": shard}, open(os.path.join(d, "model.safetensors.index.json"), "w"))
    return os.path.join(d, "model-00002-of-00002.safetensors")


@pytest.mark.parametrize(
    "break_it, says",
    [
        (_truncate, "not a readable safetensors file"),
        (_reshape, "has shape (64, 32), its config.json implies (48, 32)"),
        (_drop_shard, "missing, though the index lists it"),
    ],
    ids=["truncated", "wrong-shapes", "missing-shard"],
)
def test_broken_init_from_weights_are_one_line_naming_the_file(world, hf_dir, tmp_path, capsys, break_it, says):
    d = str(tmp_path / "model")
    shutil.copytree(hf_dir, d)
    named = break_it(d)
    gin_file = sft_gin(tmp_path, tmp_path / "run", world, f"train.init_from = '{d}'\ntrain.model_config = None")
    rc, err = run_script(_train_main, [f"--gin_file={gin_file}"], capsys)
    line = one_error_line(err)  # before: exit 1 and a traceback
    assert rc == 2
    assert line.startswith(f"error: {named}") and says in line and ("re-export" in line), line
    ckpts = tmp_path / "run" / "checkpoints"
    assert not (ckpts.exists() and os.listdir(ckpts)) and not (tmp_path / "run" / "hf").exists()


def test_an_eval_pass_ends_whatever_the_binding(world):
    """An eval pipeline left repeating forever (num_epochs=None: unscoped, or the scope
    misspelt) is still one pass. Run on a daemon thread, so a hang fails the test in 60 s
    instead of hanging it."""
    import functools
    import threading

    import jax

    from rlaif_jax import sharding as shd
    from rlaif_jax.data.pipeline.builders import sft_pipeline
    from rlaif_jax.data.tokenize.tokenizer import load_tokenizer
    from rlaif_jax.train.loop import evaluate

    forever = functools.partial(
        sft_pipeline, world["demos"], batch_size=8, seq_len=32, max_length=32, max_prompt_length=16, prefetch=0
    )
    rows = []

    def count(params, batch, ref):  # the eval step's (sum, count) per metric
        rows.append(len(batch["segment_ids"]))
        return {"rows": (float(len(batch["segment_ids"])), 1.0)}

    out = {}
    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tok = load_tokenizer(world["tok_dir"])
    t = threading.Thread(target=lambda: out.update(evaluate(count, None, forever, tok, mesh, None, None)), daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the evaluation pass never ended"
    assert out == {"rows": 8.0} and len(rows) == 32 // 8  # one pass over the 32 examples


def _permuted_tokenizer(tok_dir, dest) -> str:
    """The same tokenizer with two words' ids swapped: same size, other ids."""
    shutil.copytree(tok_dir, dest)
    path = os.path.join(dest, "tokenizer.json")
    d = json.load(open(path))
    vocab = d["model"]["vocab"]
    a, b = [w for w in vocab if vocab[w] > 4][:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    json.dump(d, open(path, "w"))
    return str(dest)


def _dpo_gin(tmp_path, world, init_from, extra="") -> str:
    path = tmp_path / "dpo.gin"
    path.write_text(f"""
make_mesh.data = -1
train.run_dir = '{tmp_path / "run"}'
train.objective = @DPO()
train.init_from = '{init_from}'
train.train_data = @preference_pipeline
train.num_steps = 2
DPO.beta = 0.1
preference_pipeline.data_dirs = '{world["prefs"]}'
preference_pipeline.batch_size = 8
preference_pipeline.seq_len = 32
preference_pipeline.max_length = 32
preference_pipeline.max_prompt_length = 16
preference_pipeline.prefetch = 0
{extra}
""")
    return str(path)


def _nothing_trained(run_dir) -> None:
    ckpts = run_dir / "checkpoints"
    assert not (ckpts.exists() and os.listdir(ckpts)) and not (run_dir / "hf").exists()


def test_a_tokenizer_of_the_same_size_but_other_ids_is_refused(world, hf_dir, tmp_path, capsys):
    """Before: DPO trained and exported without a word."""
    other = _permuted_tokenizer(world["tok_dir"], tmp_path / "other_tok")
    rc, err = run_script(
        _train_main, [f"--gin_file={_dpo_gin(tmp_path, world, hf_dir, f'train.tokenizer = {other!r}')}"], capsys
    )
    line = one_error_line(err)
    assert rc == 2
    assert line.startswith(f"error: train.tokenizer = '{other}' is not the tokenizer saved with train.init_from")
    assert f"'{hf_dir}' (same {world['vocab']} tokens, other ids)" in line
    _nothing_trained(tmp_path / "run")


def test_a_model_copied_without_its_tokenizer_is_checked_against_the_fingerprint_saved_with_it(
    world, hf_dir, tmp_path, capsys
):
    """save_hf writes the tokenizer's fingerprint beside config.json; a copy of the weights
    without the tokenizer's files (before: only size and special ids were checked) still
    refuses a tokenizer of the same size and special ids but other ids, and accepts its own."""
    from rlaif_jax.data.tokenize.tokenizer import FINGERPRINT_FILE, load_tokenizer, tokenizer_hash
    from rlaif_jax.preflight import run_preflight, tokenizer_check

    fp = json.load(open(os.path.join(hf_dir, FINGERPRINT_FILE)))
    assert fp["tokenizer_hash"] == tokenizer_hash(load_tokenizer(world["tok_dir"])) and fp["tokens"] == world["vocab"]
    weights = tmp_path / "w"  # short paths: the line stays under 300 characters
    shutil.copytree(hf_dir, weights)
    for name in os.listdir(weights):
        if name != FINGERPRINT_FILE and (name.startswith("tokenizer") or name == "special_tokens_map.json"):
            os.remove(weights / name)
    other = _permuted_tokenizer(world["tok_dir"], tmp_path / "t")
    rc, err = run_script(
        _train_main, [f"--gin_file={_dpo_gin(tmp_path, world, weights, f'train.tokenizer = {other!r}')}"], capsys
    )
    line = one_error_line(err)
    assert rc == 2
    assert line.startswith(f"error: train.tokenizer = '{other}' is not the tokenizer saved with train.init_from")
    assert f"'{weights}' (same {world['vocab']} tokens, other ids); give the tokenizer it was exported with" in line
    _nothing_trained(tmp_path / "run")
    run_preflight([tokenizer_check("train.init_from", str(weights), world["tok_dir"], "train.tokenizer")])  # its own


def test_a_tokenizer_larger_than_the_model_and_a_misfit_reference_are_all_reported(world, tmp_path, capsys):
    """Before: "loss non-finite at step 0" and a traceback, blaming numerics. Two problems:
    both reported, one line each."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from rlaif_jax.models import build_model
    from rlaif_jax.models.hf_io import save_hf
    from rlaif_jax.models.params import abstract_params

    small = tiny_config(world["vocab"] - 8)
    d = str(tmp_path / "small")
    save_hf(
        d, small, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), nn.unbox(abstract_params(build_model(small))))
    )
    ref = str(tmp_path / "ref")
    other = tiny_config(world["vocab"] + 8)
    save_hf(
        ref, other, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), nn.unbox(abstract_params(build_model(other))))
    )
    extra = f"train.tokenizer = {world['tok_dir']!r}\ntrain.reference_from = {ref!r}"
    rc, err = run_script(_train_main, [f"--gin_file={_dpo_gin(tmp_path, world, d, extra)}"], capsys)
    assert rc == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 2 and all(len(ln) < 300 for ln in lines), lines
    assert f"train.init_from '{d}' has {world['vocab'] - 8} embeddings but train.tokenizer" in lines[0]
    assert f"has {world['vocab']} tokens" in lines[0]
    assert "train.reference_from" in lines[1] and "different vocabularies" in lines[1]
    _nothing_trained(tmp_path / "run")


def test_ppo_with_a_reward_model_of_another_vocabulary_is_refused(world, hf_dir, tmp_path, capsys):
    """Before: policy vocab 422 and reward model vocab 64 died as a non-finite loss."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from rlaif_jax.cli import main_with_gin
    from rlaif_jax.models import build_model
    from rlaif_jax.models.hf_io import save_hf
    from rlaif_jax.models.params import abstract_params
    from rlaif_jax.train.ppo import train_ppo

    rm_cfg = tiny_config(world["vocab"] - 8)
    rm = str(tmp_path / "rm")
    model = build_model(rm_cfg, lm_head=False, scalar_heads=("score",))
    save_hf(
        rm,
        rm_cfg,
        jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), nn.unbox(abstract_params(model))),
        score_head=True,
    )
    gin_file = tmp_path / "ppo.gin"
    gin_file.write_text(f"""
make_mesh.data = -1
train_ppo.run_dir = '{tmp_path / "run"}'
train_ppo.policy = '{hf_dir}'
train_ppo.reward_model = '{rm}'
train_ppo.prompts = '{world["demos"]}'
train_ppo.num_iterations = 1
""")
    rc, err = run_script(lambda argv: main_with_gin("ppo", train_ppo, argv), [f"--gin_file={gin_file}"], capsys)
    line = one_error_line(err)
    assert rc == 2
    assert line.startswith(
        f"error: train_ppo.policy '{hf_dir}' and train_ppo.reward_model '{rm}' have different vocabularies"
    )
    assert f"({world['vocab']} vs {world['vocab'] - 8} tokens)" in line
    _nothing_trained(tmp_path / "run")


def _preferences(world, dest, tie) -> str:
    """The world's preference pairs with every `tie`-th one's rejected set to its chosen."""
    from rlaif_jax.data.records import write_records

    rows = list(read_records(world["prefs"], PREFERENCES))
    rows = [dict(r, rejected=r["chosen"]) if i % tie == 0 else r for i, r in enumerate(rows)]
    write_records(str(dest), PREFERENCES, rows)
    return str(dest)


def test_a_preference_set_of_tied_pairs_is_refused_and_a_few_warned_about(world, hf_dir, tmp_path, capsys, caplog):
    """Before: DPO trained at loss 0.693 with zero gradient and exported a model."""
    tied = _preferences(world, tmp_path / "tied", tie=1)
    extra = f"preference_pipeline.data_dirs = {tied!r}"
    rc, err = run_script(_train_main, [f"--gin_file={_dpo_gin(tmp_path, world, hf_dir, extra)}"], capsys)
    line = one_error_line(err)
    assert rc == 2
    n = len(list(read_records(tied, PREFERENCES)))
    assert line.startswith(f"error: {tied}: {n} of {n} preference pairs (100%) have chosen == rejected"), line
    assert "above 20%" in line and "rebuild the pairs" in line
    _nothing_trained(tmp_path / "run")

    # One tied pair in 16 (6%): a warning, not a refusal (checked on the pipeline alone).
    from rlaif_jax.data.pipeline.builders import preference_pipeline
    from rlaif_jax.data.tokenize.tokenizer import load_tokenizer

    gin.clear_config()
    few = _preferences(world, tmp_path / "few", tie=16)
    with caplog.at_level("WARNING", logger="rlaif_jax.preflight"):
        it = preference_pipeline(
            few,
            load_tokenizer(world["tok_dir"]),
            batch_size=8,
            seq_len=32,
            max_length=32,
            max_prompt_length=16,
            prefetch=0,
        )
        it.close()
    assert any("preference pairs" in r.message and "above 1%" in r.message for r in caplog.records), caplog.text
