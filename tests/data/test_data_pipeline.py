import json

import numpy as np
import pytest

from rlaif_jax.data import prompt_id
from rlaif_jax.data.pipeline import (
    DataIterator,
    IndexStream,
    PackedBatcher,
    pack_batch,
    packing_efficiency,
    pad_batch,
    preference_pipeline,
    sft_pipeline,
)
from rlaif_jax.data.records import DEMONSTRATIONS, PREFERENCES, write_records
from rlaif_jax.data.tokenize.encode import Encoded

WORDS = ["hello", "world", "the", "sea", "is", "blue", "yes", "no"]


def text(rng, lo, hi):
    return " ".join(rng.choice(WORDS, size=rng.integers(lo, hi)))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("demos")
    recs = []
    for i in range(37):
        p = f"{i} " + text(rng, 1, 12)  # the leading number makes every prompt unique
        recs.append(
            {
                "prompt_id": prompt_id(p),
                "prompt": p,
                "completion": text(rng, 1, 20),
                "source_model": "m",
                "finish_reason": "stop",
            }
        )
    write_records(d, DEMONSTRATIONS, recs, num_shards=4)
    return str(d)


@pytest.fixture(scope="module")
def pref_dir(tmp_path_factory):
    rng = np.random.default_rng(1)
    d = tmp_path_factory.mktemp("prefs")
    recs = []
    for i in range(21):
        p = f"{i} " + text(rng, 1, 8)
        recs.append(
            {
                "prompt_id": prompt_id(p),
                "prompt": p,
                "chosen": "yes " + text(rng, 1, 10),
                "rejected": "no " + text(rng, 1, 10),
                "provenance": "t",
                "ref_chosen_logp": -float(i),
                "ref_rejected_logp": -100.0 - i,
                "ref_model": "ref",
            }
        )
    write_records(d, PREFERENCES, recs, num_shards=2)
    return str(d)


def synthetic(n, rng, max_len=30):
    # Token values encode (example, position) so every token is traceable.
    out = []
    for i in range(n):
        n_p, n_r = rng.integers(1, max_len // 2), rng.integers(1, max_len // 2)
        toks = 1000 * (i + 1) + np.arange(n_p + n_r, dtype=np.int32)
        out.append(Encoded(toks[:n_p], toks[n_p:]))
    return out


def segments(batch, prefix=""):
    """(tokens, positions, loss_mask) of every packed sequence, row by row."""
    out = []
    seg = batch[f"{prefix}segment_ids"]
    for row in range(seg.shape[0]):
        ids = seg[row]
        nz = ids[ids > 0]
        # segments are contiguous, numbered 1..k in order, and padding only trails them
        assert list(np.unique(nz)) == list(range(1, (nz.max() if nz.size else 0) + 1))
        assert not ids[len(nz) :].any()
        for s in range(1, (nz.max() if nz.size else 0) + 1):
            sel = ids == s
            out.append(tuple(batch[f"{prefix}{k}"][row][sel] for k in ("tokens", "positions", "loss_mask")))
    return out


def check_segment(tokens, positions, mask, ex):
    np.testing.assert_array_equal(tokens, np.concatenate([ex.prompt, ex.response]))
    np.testing.assert_array_equal(positions, np.arange(ex.length))
    np.testing.assert_array_equal(mask, [0.0] * len(ex.prompt) + [1.0] * len(ex.response))


def test_pad_batch_layout():
    ex = [
        Encoded(np.array([1, 5, 6], np.int32), np.array([7, 2], np.int32)),
        Encoded(np.array([1], np.int32), np.array([9], np.int32)),
    ]
    b = pad_batch(ex, batch_size=3, seq_len=6)
    assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
        "tokens": ((3, 6), "int32"),
        "positions": ((3, 6), "int32"),
        "segment_ids": ((3, 6), "int32"),
        "loss_mask": ((3, 6), "float32"),
    }
    np.testing.assert_array_equal(b["tokens"], [[1, 5, 6, 7, 2, 0], [1, 9, 0, 0, 0, 0], [0] * 6])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3, 4, 0], [0, 1, 0, 0, 0, 0], [0] * 6])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [0] * 6])
    np.testing.assert_array_equal(b["loss_mask"], [[0, 0, 0, 1, 1, 0], [0, 1, 0, 0, 0, 0], [0] * 6])
    with pytest.raises(ValueError, match="does not fit"):
        pad_batch(ex, 2, 4)


def test_packing_preserves_every_token_and_mask():
    rng = np.random.default_rng(0)
    exs = synthetic(40, rng)
    batch, left = pack_batch(exs, batch_size=4, seq_len=32)
    segs = segments(batch)
    placed = [i for i in range(40) if i not in left]
    assert len(segs) == len(placed) > 4  # more than one sequence per row on average
    by_first = {int(t[0]) // 1000 - 1: (t, p, m) for t, p, m in segs}
    assert sorted(by_first) == placed
    for i in placed:
        check_segment(*by_first[i], exs[i])
    assert packing_efficiency(batch) == pytest.approx(sum(exs[i].length for i in placed) / 128)


def test_packed_stream_covers_each_example_once_per_epoch():
    rng = np.random.default_rng(1)
    exs = synthetic(50, rng)
    stream = IndexStream(50, 50, seed=3, shuffle=True, num_epochs=2)
    it = DataIterator(PackedBatcher(exs, 3, 32, max_carry=4), stream, "fp", prefetch=0)
    seen = []
    for batch in it:
        for t, p, m in segments(batch):
            i = int(t[0]) // 1000 - 1
            check_segment(t, p, m, exs[i])
            seen.append(i)
    assert sorted(seen) == sorted(list(range(50)) * 2)
    assert seen[:50] != list(range(50))  # shuffled
    assert 0.5 < it.packing_efficiency <= 1.0


def _make(kind, demo_dir, pref_dir, tokenizer_dir, **kw):
    args = dict(batch_size=4, seq_len=48, max_length=48, max_prompt_length=16, process_index=0, process_count=1)
    args.update(kw)
    if kind == "preference":
        return preference_pipeline(pref_dir, tokenizer_dir, **args)
    return sft_pipeline(demo_dir, tokenizer_dir, packing=kind == "packed", **args)


@pytest.mark.parametrize("kind", ["padded", "packed", "preference"])
@pytest.mark.parametrize("prefetch", [0, 3])
def test_exact_resume(kind, prefetch, demo_dir, pref_dir, tokenizer_dir):
    full = _make(kind, demo_dir, pref_dir, tokenizer_dir, seed=7, prefetch=prefetch)
    batches, states = [], []
    for _ in range(14):  # > 2 epochs of 37 (or 21) examples at batch 4
        batches.append(next(full))
        states.append(json.loads(json.dumps(full.get_state())))  # must survive JSON
    full.close()
    assert states[-1]["epoch"] >= 1
    for k in (0, 5, 9):
        resumed = _make(kind, demo_dir, pref_dir, tokenizer_dir, seed=7, prefetch=prefetch, state=states[k])
        for want in batches[k + 1 :]:
            got = next(resumed)
            assert got.keys() == want.keys()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{kind} {key} after resume at {k}")
        resumed.close()


def test_resume_refuses_other_settings(demo_dir, pref_dir, tokenizer_dir):
    it = _make("padded", demo_dir, pref_dir, tokenizer_dir, seed=1, prefetch=0)
    next(it)
    with pytest.raises(ValueError, match="different data or settings"):
        _make("padded", demo_dir, pref_dir, tokenizer_dir, seed=2, state=it.get_state())


def test_shuffle_is_seeded_and_epochs_are_complete(demo_dir, pref_dir, tokenizer_dir):
    def first_tokens(seed, n, **kw):
        it = _make("padded", demo_dir, pref_dir, tokenizer_dir, seed=seed, prefetch=0, batch_size=1, **kw)
        return [tuple(next(it)["tokens"][0]) for _ in range(n)]

    a, b, c = first_tokens(0, 74), first_tokens(0, 74), first_tokens(1, 74)
    assert a == b and a != c
    assert len(set(a[:37])) == 37 and set(a[:37]) == set(a[37:]) and a[:37] != a[37:]
    assert first_tokens(0, 37, shuffle=False) != a[:37]


@pytest.mark.timeout(60)  # a prefetch bug shows up as a hang
def test_finite_epochs_and_drop_remainder(demo_dir, pref_dir, tokenizer_dir):
    it = _make("padded", demo_dir, pref_dir, tokenizer_dir, num_epochs=2, prefetch=2)
    assert len(list(it)) == 74 // 4
    with pytest.raises(StopIteration):
        next(it)
    it = _make("padded", demo_dir, pref_dir, tokenizer_dir, num_epochs=1, drop_remainder=False, prefetch=0)
    batches = list(it)
    assert len(batches) == 10 and (batches[-1]["segment_ids"][1:] == 0).all()


def test_sft_loss_mask_marks_response_targets(demo_dir, pref_dir, tokenizer_dir, tokenizer):
    # Long enough that nothing is truncated: "Human: " and the final EOS are there to see.
    b = next(
        _make("padded", demo_dir, pref_dir, tokenizer_dir, prefetch=0, seq_len=96, max_length=96, max_prompt_length=40)
    )
    for row in range(4):
        toks, mask = b["tokens"][row], b["loss_mask"][row]
        n = int((b["segment_ids"][row] > 0).sum())
        assert toks[0] == tokenizer.bos_token_id and mask[0] == 0
        starts = np.flatnonzero(mask)
        text = tokenizer.decode(toks[: starts[0]].tolist())
        assert text.startswith("<s>Human: ") and text.endswith("\n\nAssistant: ")
        assert mask[starts[0] : n].all() and not mask[n:].any()
        assert toks[n - 1] == tokenizer.eos_token_id


def test_preference_batches_pair_rows_and_ref_logps(pref_dir, demo_dir, tokenizer_dir, tokenizer, tmp_path):
    b = next(_make("preference", demo_dir, pref_dir, tokenizer_dir, prefetch=0, shuffle=False))
    assert set(b) == {
        f"{s}_{k}" for s in ("chosen", "rejected") for k in ("tokens", "positions", "segment_ids", "loss_mask")
    } | {"ref_chosen_logps", "ref_rejected_logps"}
    np.testing.assert_array_equal(b["ref_chosen_logps"], [0.0, -1.0, -2.0, -3.0])
    np.testing.assert_array_equal(b["ref_rejected_logps"], [-100.0, -101.0, -102.0, -103.0])
    for row in range(4):
        n_c = int(np.argmax(b["chosen_loss_mask"][row]))
        n_r = int(np.argmax(b["rejected_loss_mask"][row]))
        assert n_c == n_r  # same prompt, same length
        np.testing.assert_array_equal(b["chosen_tokens"][row, :n_c], b["rejected_tokens"][row, :n_r])
        assert tokenizer.decode(b["chosen_tokens"][row, n_c : n_c + 1].tolist()) == "yes"
        assert tokenizer.decode(b["rejected_tokens"][row, n_r : n_r + 1].tolist()) == "no"
    recs = [
        {
            "prompt_id": "a",
            "prompt": "a",
            "chosen": "yes",
            "rejected": "no",
            "provenance": "t",
            "ref_chosen_logp": -1.0 if i else None,
            "ref_rejected_logp": -2.0,
        }
        for i in range(3)
    ]
    write_records(tmp_path, PREFERENCES, recs)
    with pytest.raises(ValueError, match="2 of 3 pairs have reference log-probs"):
        preference_pipeline(str(tmp_path), tokenizer_dir, batch_size=1, process_index=0, process_count=1)
    write_records(tmp_path, PREFERENCES, [dict(r, ref_chosen_logp=None, ref_rejected_logp=None) for r in recs])
    b = next(
        preference_pipeline(str(tmp_path), tokenizer_dir, batch_size=1, process_index=0, process_count=1, prefetch=0)
    )
    assert "ref_chosen_logps" not in b


def test_each_process_reads_its_own_shards(demo_dir, pref_dir, tokenizer_dir):
    from rlaif_jax.data.pipeline import load_host_records

    per = [load_host_records(demo_dir, DEMONSTRATIONS, p, 2) for p in range(2)]
    ids = [[r["prompt_id"] for r in recs] for recs, _, _ in per]
    assert not set(ids[0]) & set(ids[1]) and len(ids[0]) + len(ids[1]) == 37
    assert per[0][1] == per[1][1] == min(len(ids[0]), len(ids[1]))  # common epoch size
    counts = []
    for p in range(2):
        it = _make(
            "padded", demo_dir, pref_dir, tokenizer_dir, process_index=p, process_count=2, num_epochs=1, batch_size=2
        )
        counts.append(sum(1 for _ in it))
    assert counts[0] == counts[1] == per[0][1] // 2


@pytest.mark.timeout(60)  # a prefetch bug shows up as a hang
def test_prefetch_surfaces_errors_and_applies_transform():
    def bad(stream, carry):
        raise RuntimeError("boom in batcher")

    it = DataIterator(bad, IndexStream(3, 3, 0, False, None), "fp", prefetch=2)
    with pytest.raises(RuntimeError, match="boom in batcher"):
        next(it)
    exs = synthetic(6, np.random.default_rng(0))
    it = DataIterator(
        PackedBatcher(exs, 1, 32),
        IndexStream(6, 6, 0, False, 1),
        "fp",
        prefetch=2,
        transform=lambda b: {"n": int((b["segment_ids"] > 0).sum())},
    )
    assert sum(b["n"] for b in it) == sum(e.length for e in exs)


@pytest.mark.timeout(60)  # a prefetch bug shows up as a hang
def test_abandoned_iterator_stops_its_thread():
    import gc

    exs = synthetic(6, np.random.default_rng(0))
    it = DataIterator(PackedBatcher(exs, 1, 32), IndexStream(6, 6, 0, False, None), "fp", prefetch=2)
    next(it)
    thread = it._thread
    del it
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_gin_binds_the_pipeline_constructors(demo_dir, tokenizer_dir):
    import gin

    with gin.unlock_config():
        gin.parse_config(["sft_pipeline.batch_size = 2", "sft_pipeline.packing = True", "sft_pipeline.seed = 5"])
    try:
        b = next(sft_pipeline(demo_dir, tokenizer_dir, process_index=0, process_count=1, prefetch=0))
        assert b["tokens"].shape == (2, 512) and b["segment_ids"].max() > 1
    finally:
        gin.clear_config()


def test_permutation_is_fixed_by_the_code():
    from rlaif_jax.data.pipeline.iterator import permutation

    # Pinned values: a change here would silently change every run's data order.
    assert permutation(8, 0, 0, 0).tolist() == [2, 0, 4, 3, 1, 7, 5, 6]
    assert sorted(permutation(1000, 3, 1, 2).tolist()) == list(range(1000))
    assert permutation(1000, 3, 1, 2).tolist() != permutation(1000, 3, 1, 3).tolist()


@pytest.mark.timeout(60)  # a prefetch bug shows up as a hang
def test_close_then_continue_is_exact_and_errors_are_sticky():
    exs = synthetic(20, np.random.default_rng(2))
    make = lambda: DataIterator(PackedBatcher(exs, 2, 32), IndexStream(20, 20, 4, True, None), "fp", prefetch=3)  # noqa: E731
    ref = make()
    want = [next(ref) for _ in range(6)]
    it = make()
    got = [next(it), next(it)]
    it.close()  # the thread had produced batches ahead; they must not be skipped
    got += [next(it) for _ in range(4)]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g["tokens"], w["tokens"])

    calls = []

    def flaky(stream, carry):
        calls.append(1)
        raise RuntimeError("broken shard")

    it = DataIterator(flaky, IndexStream(3, 3, 0, False, None), "fp", prefetch=2)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="broken shard"):
            next(it)
    assert len(calls) == 1


def test_document_stream_joins_a_packed_row_and_trains_eos_as_an_input():
    from rlaif_jax.data.pipeline import as_document_stream

    # Two examples packed in one row: BOS p p | r EOS, then BOS p | r r EOS; BOS=1, EOS=2.
    a, b = (
        Encoded(np.array([1, 5, 6], np.int32), np.array([7, 2], np.int32)),
        Encoded(np.array([1, 8], np.int32), np.array([9, 9, 2], np.int32)),
    )
    batch, left = pack_batch([a, b], batch_size=1, seq_len=12)
    assert not left
    s = as_document_stream(batch)
    np.testing.assert_array_equal(s["tokens"], batch["tokens"])
    np.testing.assert_array_equal(s["segment_ids"], [[1] * 10 + [0, 0]])
    np.testing.assert_array_equal(s["positions"][0, :10], np.arange(10))
    # The responses' targets as before, plus the second document's BOS, which EOS predicts.
    np.testing.assert_array_equal(s["loss_mask"], [[0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0]])  # untouched


@pytest.mark.parametrize("kind", ["padded", "preference"])
def test_global_batch_size_is_split_over_the_processes(kind, demo_dir, pref_dir, tokenizer_dir):
    """global_batch_size = 8 over 2 processes: each batches 4 rows, and an epoch is the
    smallest per-process example count // 4 steps, exactly as batch_size = 4 per process."""
    from rlaif_jax.data.pipeline import load_host_records

    schema, d = (PREFERENCES, pref_dir) if kind == "preference" else (DEMONSTRATIONS, demo_dir)
    epoch_size = load_host_records(d, schema, 0, 2)[1]
    for p in range(2):
        common = dict(process_index=p, process_count=2, num_epochs=1, prefetch=0, batch_size=None)
        got = list(_make(kind, demo_dir, pref_dir, tokenizer_dir, global_batch_size=8, **common))
        want = list(_make(kind, demo_dir, pref_dir, tokenizer_dir, **{**common, "batch_size": 4}))
        assert len(got) == len(want) == epoch_size // 4 > 0
        for g, w in zip(got, want):
            assert all(v.shape[0] == 4 for v in g.values())
            for key in w:
                np.testing.assert_array_equal(g[key], w[key])


@pytest.mark.parametrize("name", ["sft_pipeline", "preference_pipeline"])
@pytest.mark.parametrize(
    "kw,message",
    [
        (
            dict(global_batch_size=0),
            "{n}.global_batch_size = 0: must be a whole number >= 1; set {n}.global_batch_size (rows per "
            "step over all processes; a multiple of 4 splits evenly over 4 processes)",
        ),
        (
            dict(global_batch_size=-8),
            "{n}.global_batch_size = -8: must be a whole number >= 1",
        ),
        (
            dict(global_batch_size=6),
            "{n}.global_batch_size = 6 does not split evenly over 4 processes; make it a multiple of 4 (e.g. 4 or 8)",
        ),
        (
            dict(global_batch_size=2),
            "{n}.global_batch_size = 2 does not split evenly over 4 processes; make it a multiple of 4 (e.g. 4)",
        ),
        (
            dict(global_batch_size=8, batch_size=2),
            "{n}.batch_size = 2 (per process) and {n}.global_batch_size = 8 (over all processes) are both "
            "set; bind only one of them (set the other to None)",
        ),
        (
            dict(batch_size=None),
            "{n}.batch_size and {n}.global_batch_size are both unset; bind {n}.global_batch_size (rows per "
            "step over all processes) or {n}.batch_size (rows per process)",
        ),
    ],
    ids=["zero", "negative", "indivisible", "fewer_than_processes", "both", "neither"],
)
def test_batch_size_settings_are_refused_in_one_line(name, kw, message, tokenizer_dir, tmp_path):
    from rlaif_jax.errors import ConfigError

    fn = sft_pipeline if name == "sft_pipeline" else preference_pipeline
    # Refused before any record is read: the directory does not exist.
    with pytest.raises(ConfigError) as e:
        fn(str(tmp_path / "none"), tokenizer_dir, process_index=0, process_count=4, **kw)
    # The first line is the message the scripts print (gin appends "In call to configurable").
    line = str(e.value).splitlines()[0]
    assert line.startswith(message.format(n=name)), line


def test_gin_binds_the_global_batch_size(demo_dir, tokenizer_dir):
    import gin

    from rlaif_jax.errors import ConfigError

    with gin.unlock_config():
        gin.parse_config(["sft_pipeline.global_batch_size = 4"])
    try:
        b = next(sft_pipeline(demo_dir, tokenizer_dir, process_index=1, process_count=2, prefetch=0))
        assert b["tokens"].shape == (2, 512)
        with gin.unlock_config():
            gin.parse_config(["sft_pipeline.batch_size = 2"])
        with pytest.raises(ConfigError, match="are both set"):
            sft_pipeline(demo_dir, tokenizer_dir, process_index=1, process_count=2, prefetch=0)
    finally:
        gin.clear_config()
