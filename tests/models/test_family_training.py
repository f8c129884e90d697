"""A tiny Gemma-2-shaped and a tiny Qwen3-shaped model run SFT -> DPO through scripts/train.py
on the toy world; DPO starts from SFT's HF export (the family's config.json read back), and
its own export loads in transformers with the logits of our model on the same weights."""

import importlib.util
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from rlaif_jax.data.toy import write_toy_world  # noqa: E402
from rlaif_jax.models import apply, build_model  # noqa: E402
from rlaif_jax.models.hf_io import load_hf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train_script():
    spec = importlib.util.spec_from_file_location("train_script", os.path.join(ROOT, "scripts", "train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # ~35 s of CPU per family (4 compiles); the families' parity tests are in the default suite
@pytest.mark.parametrize("family, hf_class", [("gemma2", "Gemma2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM")])
def test_sft_then_dpo_exports_an_hf_model(family, hf_class, tmp_path, clean_gin, monkeypatch):
    monkeypatch.chdir(ROOT)
    w = write_toy_world(str(tmp_path / "toy"), 16)
    train = _train_script()
    # the 8 fake CPU devices of tests/conftest.py: the batch of 8 split over fsdp
    common = ["--gin_file=configs/mesh/fsdp_all.gin", "--gin_param=LoopSettings.log_every=1", "--log_level=WARNING"]
    assert (
        train.main(
            [
                "--gin_file=configs/experiments/tiny_sft.gin",
                f"--gin_file=configs/models/tiny_{family}.gin",
                "--gin_param=custom_model_config.vocab_size=64",
                f"--gin_param=train.run_dir='{tmp_path / 'sft'}'",
                f"--gin_param=train.tokenizer='{w['tokenizer']}'",
                f"--gin_param=sft_pipeline.data_dirs='{w['demonstrations']}'",
                "--gin_param=train.num_steps=3",
                "--gin_param=train.eval_every=0",
                "--gin_param=train.sample_prompts=[]",
                *common,
            ]
        )
        == 0
    )
    sft_cfg, sft_params = load_hf(str(tmp_path / "sft" / "hf"))
    assert sft_cfg.model_type == family
    clean_gin_again()
    assert (
        train.main(
            [
                "--gin_file=configs/experiments/tiny_dpo.gin",
                f"--gin_param=train.run_dir='{tmp_path / 'dpo'}'",
                f"--gin_param=train.init_from='{tmp_path / 'sft' / 'hf'}'",
                f"--gin_param=preference_pipeline.data_dirs='{w['preferences']}'",
                "--gin_param=train.num_steps=3",
                *common,
            ]
        )
        == 0
    )
    out = str(tmp_path / "dpo" / "hf")
    cfg, params = load_hf(out)
    assert cfg == sft_cfg
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), params, sft_params)
    assert max(jax.tree.leaves(moved)) > 0  # DPO trained
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == hf_class
    ids = np.random.RandomState(0).randint(3, 64, (2, 12)).astype(np.int32)
    ours = np.asarray(apply(build_model(cfg), params, ids)["logits"])
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def clean_gin_again():
    import gin

    gin.clear_config()
