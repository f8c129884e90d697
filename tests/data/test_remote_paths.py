"""URLs wherever records, prompts and reports are read or written, on fsspec's in-process
memory:// filesystem (no network), plus gs:// dispatch to gcsfs without connecting."""

import json
import os
import socket
import types

import fsspec
import numpy as np
import pytest

from rlaif_jax import fileio
from rlaif_jax.data import prompt_id
from rlaif_jax.data.pipeline import preference_pipeline, sft_pipeline
from rlaif_jax.data.prompts import (
    import_paper_annotations,
    import_paper_completions,
    prepare_prompts,
    read_prompt_source,
)
from rlaif_jax.data.records import (
    COMPARISONS,
    DEMONSTRATIONS,
    PREFERENCES,
    PROMPTS,
    ManifestError,
    RecordError,
    TFRecordWriter,
    iter_records,
    read_manifest,
    read_records,
    schema_of,
    write_records,
)

from .test_data_prompts import PAPER_ANNOTATIONS, SHAREGPT, conv
from .test_data_records import SAMPLES

MEM = "memory://bucket/run"


@pytest.fixture(autouse=True)
def mem(memfs):
    return memfs


def put(url, data):
    fsspec.filesystem("memory").pipe(fileio.url_fs(url)[1], data if isinstance(data, bytes) else data.encode())


def get(url):
    return fsspec.filesystem("memory").cat(fileio.url_fs(url)[1])


# ---------------------------------------------------------------------------- fileio


def test_path_helpers(tmp_path):
    assert fileio.is_url("gs://b/x") and fileio.is_url("memory://x") and not fileio.is_url("/data/x")
    assert not fileio.is_url("rel/x") and not fileio.is_url(tmp_path)
    assert fileio.join("gs://b/data", "prompts", "sft") == "gs://b/data/prompts/sft"
    assert fileio.join("gs://b/data/", "/x") == "gs://b/data/x"
    assert fileio.join("/d", "x") == os.path.join("/d", "x")
    assert fileio.abspath("gs://b/x") == "gs://b/x" and fileio.abspath("x") == os.path.abspath("x")

    fileio.makedirs(f"{MEM}/a/b")  # no-op on an object store
    assert not fileio.exists(f"{MEM}/a/b")
    fileio.write_json(f"{MEM}/a/r.json", {"ü": 1})
    fileio.write_jsonl(f"{MEM}/a/r.jsonl", [{"x": 1}, {"x": 2}])
    assert json.loads(get(f"{MEM}/a/r.json")) == {"ü": 1}
    assert get(f"{MEM}/a/r.jsonl") == b'{"x": 1}\n{"x": 2}\n'
    assert fileio.isdir(f"{MEM}/a") and fileio.isfile(f"{MEM}/a/r.json") and not fileio.isdir(f"{MEM}/a/r.json")
    assert fileio.glob(f"{MEM}/a/*.json") == [
        fileio.url_fs(f"{MEM}/a/r.json")[0].unstrip_protocol("/bucket/run/a/r.json")
    ]
    assert fileio.listdir_sizes(f"{MEM}/a") == {"r.json": len(get(f"{MEM}/a/r.json")), "r.jsonl": 18}
    assert fileio.getsize(f"{MEM}/a/r.jsonl") == 18
    assert not any(k.endswith(".tmp") for k in fsspec.filesystem("memory").store)  # no rename dance

    # a write that fails leaves no object behind (nor half of one)
    with pytest.raises(RuntimeError):
        with fileio.atomic_write(f"{MEM}/a/broken.json") as f:
            f.write('{"half": ')
            raise RuntimeError("killed")
    assert not fileio.exists(f"{MEM}/a/broken.json")
    # ... and locally the rename keeps the old file
    local = tmp_path / "r.json"
    fileio.write_json(str(local), {"v": 1})
    with pytest.raises(RuntimeError):
        with fileio.atomic_write(str(local)) as f:
            f.write("{")
            raise RuntimeError
    assert json.loads(local.read_text()) == {"v": 1}


def test_gs_dispatches_to_gcsfs_without_network(monkeypatch):
    import gcsfs

    def no_network(*a, **k):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert issubclass(fsspec.get_filesystem_class("gs"), gcsfs.GCSFileSystem)
    # anonymous credentials, so that building the filesystem needs no credential lookup
    monkeypatch.setitem(fsspec.config.conf, "gs", {"token": "anon"})
    fs, path = fileio.url_fs("gs://my-bucket/data/prompts/sft/manifest.json")
    assert isinstance(fs, gcsfs.GCSFileSystem) and path == "my-bucket/data/prompts/sft/manifest.json"
    fileio.makedirs("gs://my-bucket/data/prompts")  # a no-op: no request


# ---------------------------------------------------------------------------- records


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_records_round_trip_remote_and_match_local_bytes(tmp_path, name):
    schema, records = SAMPLES[name]
    records = records * 3
    url = f"{MEM}/{name}"
    manifest = write_records(url, schema, records, num_shards=4, provenance={"why": "test"})
    assert manifest["num_records"] == len(records)
    assert read_manifest(url, schema)["provenance"] == {"why": "test"}
    assert schema_of(url) is schema
    assert list(read_records(url, schema)) == records
    assert list(read_records(url, schema, verify_checksum=False)) == records
    assert list(read_records(url, schema, shards=[3, 0])) == list(read_records(url, schema, shards=[3])) + list(
        read_records(url, schema, shards=[0])
    )
    # byte for byte what a local write gives
    local = write_records(tmp_path, schema, records, num_shards=4, provenance={"why": "test"})
    assert [(s["file"], s["bytes"], s["sha256"]) for s in local["shards"]] == [
        (s["file"], s["bytes"], s["sha256"]) for s in manifest["shards"]
    ]
    for s in manifest["shards"]:
        assert get(f"{url}/{s['file']}") == (tmp_path / s["file"]).read_bytes()
    assert sorted(fileio.listdir_sizes(url)) == sorted([s["file"] for s in manifest["shards"]] + ["manifest.json"])


def _demo(where, n=5):
    schema, recs = SAMPLES["demonstrations"]
    write_records(where, schema, [dict(recs[0], completion=f"answer {i}") for i in range(n)])
    return schema, "demonstrations-00000-of-00001.tfrecord"


def _errors(fn):
    try:
        fn()
    except (RecordError, ManifestError) as e:
        return type(e), str(e)
    raise AssertionError("no error")


def test_corrupt_remote_shard_gives_the_local_errors(tmp_path):
    """Same corruption, same exception type and message (file, record index, byte offset)."""
    schema, fname = _demo(MEM)
    _demo(tmp_path)
    shard_url, shard_local = f"{MEM}/{fname}", tmp_path / fname
    raw = get(shard_url)
    assert raw == shard_local.read_bytes()
    rec_len = len(raw) // 5

    def both(fn_of_dir):
        r, loc = _errors(lambda: fn_of_dir(MEM)), _errors(lambda: fn_of_dir(str(tmp_path)))
        assert r[0] is loc[0] and r[1] == loc[1].replace(str(tmp_path), MEM), (r, loc)
        return r

    def corrupt(data):
        put(shard_url, data)
        shard_local.write_bytes(data)

    flipped = bytearray(raw)
    flipped[2 * rec_len + 20] ^= 0x01  # record 2's payload
    corrupt(bytes(flipped))
    kind, msg = both(lambda d: list(read_records(d, schema, verify_checksum=False)))
    assert kind is RecordError and msg == f"{shard_url}: record 2 (byte {2 * rec_len}): data CRC mismatch"
    kind, msg = both(lambda d: list(read_records(d, schema)))
    assert kind is ManifestError and "sha256" in msg

    header = bytearray(raw)
    header[rec_len + 1] ^= 0x10  # record 1's length field
    corrupt(bytes(header))
    assert both(lambda d: list(iter_records(fileio.join(d, fname))))[1].endswith(
        f"record 1 (byte {rec_len}): length CRC mismatch"
    )

    corrupt(raw[:-7])
    assert "(truncated?)" in both(lambda d: list(read_records(d, schema)))[1]
    assert "record 4" in both(lambda d: list(iter_records(fileio.join(d, fname))))[1]
    corrupt(raw[: rec_len * 3 + 5])
    assert "record 3 (byte" in both(lambda d: list(iter_records(fileio.join(d, fname))))[1]

    fsspec.filesystem("memory").rm(fileio.url_fs(shard_url)[1])
    os.remove(shard_local)
    assert "is missing" in both(lambda d: read_manifest(d, schema))[1]


def test_remote_shard_is_downloaded_once_and_streamed(monkeypatch):
    """A checksummed remote shard is fetched once (hashed into a local spool); reading
    never asks for a whole object in one read."""
    schema, fname = _demo(MEM, n=50)
    opened, reads = [], []
    real_open = fileio.open_file

    def counting_open(path, mode="r", encoding=None):
        f = real_open(path, mode, encoding)
        if str(path).endswith(".tfrecord"):
            opened.append(path)
            real_read = f.read

            def read(n=-1):
                reads.append(n)
                return real_read(n)

            return _Wrap(f, read)
        return f

    import rlaif_jax.data.records.shards as shards_mod
    import rlaif_jax.data.records.tfrecord as tfrecord_mod

    monkeypatch.setattr(shards_mod, "open_file", counting_open)
    monkeypatch.setattr(tfrecord_mod, "open_file", counting_open)
    assert len(list(read_records(MEM, schema))) == 50
    assert opened == [f"{MEM}/{fname}"]
    opened.clear()
    reads.clear()
    assert len(list(read_records(MEM, schema, verify_checksum=False))) == 50
    assert opened == [f"{MEM}/{fname}"] and reads and all(0 <= n < 1 << 16 for n in reads)


class _Wrap:
    def __init__(self, f, read):
        self._f, self.read = f, read

    def tell(self):
        return self._f.tell()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_tfrecord_writer_and_reader_take_urls():
    with TFRecordWriter(f"{MEM}/x.tfrecord") as w:
        w.write(b"abc")
        w.write(b"")
    assert list(iter_records(f"{MEM}/x.tfrecord")) == [b"abc", b""]


# ---------------------------------------------------------------------------- prompts


def test_prompt_readers_take_urls():
    put(f"{MEM}/sg.json", json.dumps(SHAREGPT))
    prompts, _, stats = read_prompt_source(f"{MEM}/sg.json")
    assert prompts[0].prompt == "What is 2+2?" and prompts[0].source == f"{MEM}/sg.json" and stats.read == len(SHAREGPT)
    put(f"{MEM}/p.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n')
    assert [p.prompt for p in read_prompt_source(f"{MEM}/p.jsonl")[0]] == ["a", "b"]
    put(f"{MEM}/alpaca.json", json.dumps([{"instruction": "Do", "input": "this", "output": "ok"}]))
    assert read_prompt_source(f"{MEM}/alpaca.json")[0][0].prompt == "Do\n\nthis"


def test_prepare_prompts_and_imports_url_to_url():
    rows = [conv(("human", f"question {i}"), ("gpt", f"answer {i}")) for i in range(30)]
    put(f"{MEM}/in/sg.json", json.dumps(rows))
    stats = prepare_prompts(f"{MEM}/in/sg.json", f"{MEM}/prep", num_shards=2)
    assert stats["sft"] == 3 and stats["feedback"] == 27
    sft = list(read_records(f"{MEM}/prep/prompts/sft", PROMPTS))
    fb = list(read_records(f"{MEM}/prep/prompts/feedback", PROMPTS))
    assert [r["prompt"] for r in sft + fb] == [f"question {i}" for i in range(30)]
    assert len(list(read_records(f"{MEM}/prep/demonstrations/feedback", DEMONSTRATIONS))) == 27
    assert json.loads(get(f"{MEM}/prep/stats.json"))["read"] == 30
    assert read_manifest(f"{MEM}/prep/prompts/sft")["provenance"]["source"] == f"{MEM}/in/sg.json"

    gpt4 = [{"instruction": f"question {i}", "output": f"gpt4 {i}", "finish_reason": "stop"} for i in range(30)]
    put(f"{MEM}/in/gpt4.json", json.dumps(gpt4))
    stats = import_paper_completions(f"{MEM}/in/gpt4.json", f"{MEM}/gpt4", prompts_dir=f"{MEM}/prep")
    assert stats["sft"] == 3 and stats["feedback"] == 27 and json.loads(get(f"{MEM}/gpt4/stats.json"))["sft"] == 3
    put(f"{MEM}/in/ann.json", json.dumps(PAPER_ANNOTATIONS, allow_nan=True))
    import_paper_annotations(f"{MEM}/in/ann.json", f"{MEM}/ann")
    assert len(list(read_records(f"{MEM}/ann/comparisons", COMPARISONS))) == 5
    assert [p["chosen"] for p in read_records(f"{MEM}/ann/preferences", PREFERENCES)] == ["gpt says", "Paris"]


# ---------------------------------------------------------------------------- pipeline


def test_pipelines_read_url_data_dirs(tmp_path, tokenizer_dir):
    rng = np.random.default_rng(0)
    words = ["hello", "world", "the", "sea", "is", "blue"]
    demos = [
        {
            "prompt_id": prompt_id(f"{i} q"),
            "prompt": f"{i} q",
            "source_model": "m",
            "finish_reason": "stop",
            "completion": " ".join(rng.choice(words, size=5)),
        }
        for i in range(20)
    ]
    prefs = [
        {
            "prompt_id": prompt_id(f"{i} q"),
            "prompt": f"{i} q",
            "chosen": "yes",
            "rejected": "no " * (i % 3 + 1),
            "provenance": "t",
        }
        for i in range(12)
    ]
    for root in (MEM, str(tmp_path)):
        write_records(fileio.join(root, "demos"), DEMONSTRATIONS, demos, num_shards=3)
        write_records(fileio.join(root, "prefs"), PREFERENCES, prefs, num_shards=2)
    kw = dict(batch_size=4, seq_len=32, max_length=32, max_prompt_length=16, seed=3, process_index=0, process_count=1)

    def batches(make, n=4):
        it = make()
        out = [next(it) for _ in range(n)]
        it.close()
        return out

    for make in (
        lambda root: sft_pipeline(fileio.join(root, "demos"), tokenizer_dir, **kw),
        lambda root: sft_pipeline(fileio.join(root, "demos"), tokenizer_dir, packing=True, **kw),
        lambda root: preference_pipeline(fileio.join(root, "prefs"), tokenizer_dir, **kw),
    ):
        remote, local = batches(lambda: make(MEM)), batches(lambda: make(str(tmp_path)))
        for r, loc in zip(remote, local):
            assert r.keys() == loc.keys() and all(np.array_equal(r[k], loc[k]) for k in r)
    # two hosts: each reads its own shards of the remote directories
    h0 = sft_pipeline([f"{MEM}/demos"], tokenizer_dir, **{**kw, "process_count": 3})
    assert next(h0)["tokens"].shape == (4, 32)
    h0.close()


# ---------------------------------------------------------------------------- feedback stages


def test_feedback_stages_write_urls(monkeypatch):
    from rlaif_jax.feedback import stages
    from rlaif_jax.feedback.settings import SamplingSettings

    comps = [dict(c, prompt_id=prompt_id(f"p{i}"), prompt=f"p{i}") for i, c in enumerate(SAMPLES["comparisons"][1])]
    write_records(f"{MEM}/critic", COMPARISONS, comps)
    m = stages.preferences_stage(comparisons=[f"{MEM}/critic"], out_dir=f"{MEM}/prefs")
    assert m["num_records"] == 2 and m["provenance"]["comparisons"] == [f"{MEM}/critic"]
    assert len(list(read_records(f"{MEM}/prefs", PREFERENCES))) == 2
    assert json.loads(get(f"{MEM}/prefs/report.json")) == m["provenance"]["report"]

    # policy samples (a stand-in model): progress is one object per finished batch, so a
    # rerun after a kill resumes on an object store too
    calls = []

    class FakeModel:
        def __init__(self, hf_dir, **kw):
            pass

        def sample(self, prompts, seed, **kw):
            calls.append(seed)
            return [types.SimpleNamespace(text=f"{p} -> {seed}", finish_reason="stop") for p in prompts]

    monkeypatch.setattr(stages, "LocalModel", FakeModel)  # the name the samples stage calls
    put(f"{MEM}/prompts.jsonl", "".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(5)))
    kw = dict(
        hf_dir=f"{MEM}/ckpt/tiny",
        prompts=f"{MEM}/prompts.jsonl",
        sampling=SamplingSettings(batch_size=2),
        source_model="tiny",
    )
    m = stages.policy_samples_stage(out_dir=f"{MEM}/a", **kw)
    a = list(read_records(f"{MEM}/a", DEMONSTRATIONS))
    assert m["num_records"] == 5 and len(calls) == 3 and [d["prompt"] for d in a] == [f"q{i}" for i in range(5)]
    assert sorted(fileio.listdir_sizes(f"{MEM}/a/samples")) == [f"batch-00000{i}.json" for i in range(3)]
    put(f"{MEM}/b/samples/batch-000000.json", get(f"{MEM}/a/samples/batch-000000.json"))
    calls.clear()
    stages.policy_samples_stage(out_dir=f"{MEM}/b", **kw)
    assert len(calls) == 2 and list(read_records(f"{MEM}/b", DEMONSTRATIONS)) == a


def test_api_cache_refuses_urls(tmp_path):
    from rlaif_jax.feedback.cache import ResultCache

    with pytest.raises(ValueError, match="local working file"):
        ResultCache("gs://bucket/api/teacher.jsonl")
