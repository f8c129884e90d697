"""The OpenAI-compatible server: HTTP layer, and a checkpoint of this project behind it
(the compiled sampler), plus the policy-samples stage that uses the same model code."""

import dataclasses
import json
import os
import urllib.error
import urllib.request

import pytest

from rlaif_jax.data.records import DEMONSTRATIONS, read_records
from rlaif_jax.feedback.server.testing import EchoTeacher

from .conftest import SECRET, make_client


def _post(url, body: bytes, key=SECRET):
    req = urllib.request.Request(
        url, data=body, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_layer_validates_and_answers_in_openai_shape(serve):
    srv = serve(EchoTeacher(["teacher"]))
    url = srv.url + "/chat/completions"
    ok = json.dumps({"model": "teacher", "messages": [{"role": "user", "content": "hi"}], "n": 2}).encode()
    status, body = _post(url, ok)
    assert status == 200 and body["object"] == "chat.completion" and len(body["choices"]) == 2
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert _post(url, ok, key="wrong")[0] == 401
    status, body = _post(url, b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _post(url, json.dumps({"model": "teacher", "messages": [{"role": "x", "content": 1}]}).encode())
    assert status == 400 and "messages[0]" in body["error"]["message"]
    status, body = _post(url, json.dumps({"model": "other", "messages": [{"role": "user", "content": "x"}]}).encode())
    assert status == 404 and "teacher" in body["error"]["message"]
    status, body = _post(
        url, json.dumps({"model": "teacher", "messages": [{"role": "user", "content": "x"}], "temperature": 5}).encode()
    )
    assert status == 400 and "temperature" in body["error"]["message"]
    req = urllib.request.Request(srv.url + "/models", headers={"Authorization": f"Bearer {SECRET}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert [m["id"] for m in json.loads(r.read())["data"]] == ["teacher"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    import jax

    from rlaif_jax.data.tokenize import build_test_tokenizer
    from rlaif_jax.models import DecoderConfig, build_model, init_params
    from rlaif_jax.models.hf_io import save_hf

    d = str(tmp_path_factory.mktemp("ckpt"))
    tok = build_test_tokenizer(d, kind="bpe", vocab_size=300)
    cfg = DecoderConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    save_hf(d, cfg, init_params(build_model(cfg), jax.random.key(0)), tokenizer=tok)
    return d


@pytest.fixture(scope="module")
def local_model(tiny_ckpt):
    from rlaif_jax.feedback.server.model_backend import LocalModel

    return LocalModel(tiny_ckpt, template="paper", max_prompt_length=48, max_length=64)


def test_checkpoint_served_as_teacher_matches_direct_sampling(serve, tmp_path, api_key, local_model):
    from rlaif_jax.feedback.server.model_backend import ModelBackend, render_messages

    srv = serve(ModelBackend(local_model, "tiny", max_batch=8, batch_window_s=0.05))
    client = make_client(srv, tmp_path, model="tiny", timeout_s=60)
    questions = ["What is the capital of France?", "Tell me a joke.", "How do I sort a list in Python?"]
    reqs = [
        client.request([{"role": "user", "content": q}], temperature=0.0, max_tokens=6, n=2, logprobs=True)
        for q in questions
    ]
    res = client.run(reqs)  # concurrent: gathered into one batch by the backend
    direct = local_model.sample_ids(
        [
            local_model.encode(render_messages([{"role": "user", "content": q}], "paper", local_model.tokenizer))
            for q in questions
        ],
        temperature=0.0,
        max_new_tokens=6,
    )
    for r, d in zip(res, direct):
        assert r["status"] == "ok", r
        c = r["response"]["choices"]
        assert len(c) == 2 and c[0]["content"] == c[1]["content"] == d.text  # greedy
        assert c[0]["finish_reason"] == d.finish_reason in ("stop", "length")
        assert [t["logprob"] for t in c[0]["logprobs"]["content"]] == pytest.approx(d.logprobs, abs=1e-5)
        assert r["response"]["usage"]["prompt_tokens"] == d.prompt_tokens
    # top_logprobs from a teacher-forced pass: sorted, and (greedy) headed by the sampled token
    (r,) = client.run(
        [
            client.request(
                [{"role": "user", "content": questions[0]}],
                temperature=0.0,
                max_tokens=4,
                logprobs=True,
                top_logprobs=3,
            )
        ]
    )
    for pos in r["response"]["choices"][0]["logprobs"]["content"]:
        alts = pos["top_logprobs"]
        assert len(alts) == 3 and [a["logprob"] for a in alts] == sorted([a["logprob"] for a in alts], reverse=True)
        assert alts[0]["token"] == pos["token"] and alts[0]["logprob"] == pytest.approx(pos["logprob"], abs=1e-4)
    bad = client.run(
        [make_client(srv, tmp_path, model="nope", cache="c2.jsonl").request([{"role": "user", "content": "x"}])]
    )
    assert bad[0]["status"] == "error" and bad[0]["error"]["kind"] == "http_404" and bad[0]["attempts"] == 1


def test_policy_samples_stage_writes_records_and_resumes(tmp_path, tiny_ckpt):
    from rlaif_jax.feedback.stages import policy_samples_stage

    prompts = tmp_path / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(6):
            f.write(json.dumps({"prompt": f"Write a short poem about the sea, number {i}."}) + "\n")
    from rlaif_jax.feedback.settings import SamplingSettings

    sampling = SamplingSettings(max_length=40, max_prompt_length=32, temperature=1.0, top_p=0.9, batch_size=4, seed=3)
    kw = dict(hf_dir=tiny_ckpt, prompts=str(prompts), sampling=sampling, length_bucket=8)
    m = policy_samples_stage(out_dir=str(tmp_path / "a"), **kw)
    a = list(read_records(tmp_path / "a", DEMONSTRATIONS))
    assert m["num_records"] == 6 and all(d["finish_reason"] in ("stop", "length") for d in a)
    assert all(d["source_model"] == os.path.basename(tiny_ckpt) for d in a)
    # a run killed after its first batch (second batch line torn) resumes to the same records
    lines = open(tmp_path / "a" / "samples.jsonl").read().splitlines()
    os.makedirs(tmp_path / "b")
    with open(tmp_path / "b" / "samples.jsonl", "w") as f:
        f.write(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    policy_samples_stage(out_dir=str(tmp_path / "b"), **kw)
    assert list(read_records(tmp_path / "b", DEMONSTRATIONS)) == a
    other = policy_samples_stage(
        out_dir=str(tmp_path / "c"), **{**kw, "sampling": dataclasses.replace(sampling, seed=4)}
    )
    assert [d["completion"] for d in read_records(tmp_path / "c", DEMONSTRATIONS)] != [d["completion"] for d in a]
    assert other["provenance"]["top_p"] == 0.9


def test_shared_seeds_draw_what_separate_passes_draw(local_model):
    """SamplingSettings.rng_per_prompt in the samples stage: under shared_seeds the first
    pass draws every pass's samples of a batch (one prefill per prompt, continuous batching)
    and the later passes get exactly what they would have drawn alone."""
    from rlaif_jax.feedback.server import model_backend

    texts = ["hi there", "a longer prompt about cats and dogs", "x"]
    kw = dict(temperature=1.0, top_p=0.9, rng_per_prompt=True, length_bucket=16)
    seeds = [s * 1_000_003 + 2 for s in (7, 1007)]  # batch 2 of the passes with seeds 7 and 1007
    alone = [[x.token_ids for x in local_model.sample(texts, seed=s, **kw)] for s in seeds]
    with model_backend.shared_seeds([7, 1007]):
        together = [[x.token_ids for x in local_model.sample(texts, seed=s, **kw)] for s in seeds]
        assert not model_backend._SHARED.ctx["made"]  # the second pass took its batch
    assert together == alone and alone[0] != alone[1]
