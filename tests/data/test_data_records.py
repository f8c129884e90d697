import json
import os
import struct

import numpy as np
import pytest

from rlaif_jax.data import prompt_id
from rlaif_jax.data.records import (
    COMPARISONS,
    DEMONSTRATIONS,
    PREFERENCES,
    PROMPTS,
    ManifestError,
    RecordError,
    SchemaError,
    TFRecordWriter,
    decode_example,
    encode_example,
    iter_records,
    read_manifest,
    read_records,
    schema_of,
    shard_indices_for_process,
    write_records,
)
from rlaif_jax.data.records.tfrecord import masked_crc32c

P = "Explain the Pythagorean theorem ünïcödé ✓"

SAMPLES = {
    "prompts": (
        PROMPTS,
        [
            {"prompt_id": prompt_id(P), "prompt": P, "source": "sharegpt.json", "index": 3, "split": "sft"},
            {"prompt_id": prompt_id("b"), "prompt": "b", "source": "x", "index": 2**40, "split": None},
        ],
    ),
    "demonstrations": (
        DEMONSTRATIONS,
        [
            {
                "prompt_id": prompt_id(P),
                "prompt": P,
                "completion": "a² + b² = c²\n",
                "source_model": "gpt-4-0314",
                "finish_reason": "stop",
            }
        ],
    ),
    "comparisons": (
        COMPARISONS,
        [
            {
                "prompt_id": prompt_id(P),
                "prompt": P,
                "response_1": "one",
                "response_2": "two",
                "model_1": "sft",
                "model_2": None,
                "judge": "gpt-4-0314",
                "verdict": v,
                "raw_judge_text": "Output (b)",
                "swapped": s,
            }
            for v, s in (("first", 0), ("second", 1), ("tie", 0), ("invalid", 1))
        ],
    ),
    "preferences": (
        PREFERENCES,
        [
            {
                "prompt_id": prompt_id(P),
                "prompt": P,
                "chosen": "good",
                "rejected": "bad",
                "provenance": "judge=gpt-4",
                "ref_chosen_logp": -12.5,
                "ref_rejected_logp": -40.25,
                "ref_model": "sft-7b",
            },
            {
                "prompt_id": prompt_id("q"),
                "prompt": "q",
                "chosen": "",
                "rejected": "no",
                "provenance": "p",
                "ref_chosen_logp": None,
                "ref_rejected_logp": None,
                "ref_model": None,
            },
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_schema_round_trip_through_sharded_files(tmp_path, name):
    schema, records = SAMPLES[name]
    records = records * 3  # 6+ records over 4 shards: uneven split, possibly empty shards
    manifest = write_records(tmp_path, schema, records, num_shards=4, provenance={"why": "test"})
    assert manifest["num_records"] == len(records)
    assert sum(s["num_records"] for s in manifest["shards"]) == len(records)
    assert manifest["schema"] == {**schema.describe()}
    assert read_manifest(tmp_path, schema)["provenance"] == {"why": "test"}
    assert schema_of(tmp_path) is schema
    assert list(read_records(tmp_path, schema)) == records


def test_masked_crc_known_answer():
    # CRC-32C check value of "123456789" is 0xE3069283; TFRecord masks it as below.
    crc = 0xE3069283
    assert masked_crc32c(b"123456789") == ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def test_record_framing_layout(tmp_path):
    path = tmp_path / "x.tfrecord"
    with TFRecordWriter(path) as w:
        w.write(b"abc")
        w.write(b"")
    raw = path.read_bytes()
    assert struct.unpack("<Q", raw[:8])[0] == 3
    assert struct.unpack("<I", raw[8:12])[0] == masked_crc32c(raw[:8])
    assert raw[12:15] == b"abc"
    assert struct.unpack("<I", raw[15:19])[0] == masked_crc32c(b"abc")
    assert len(raw) == 19 + 16
    assert list(iter_records(path)) == [b"abc", b""]


def _write_demo(tmp_path, n=5, shards=1):
    schema, recs = SAMPLES["demonstrations"]
    records = [dict(recs[0], completion=f"answer {i}") for i in range(n)]
    write_records(tmp_path, schema, records, num_shards=shards)
    return schema, records, tmp_path / "demonstrations-00000-of-00001.tfrecord"


def test_flipped_data_byte_names_file_and_record(tmp_path):
    schema, records, shard = _write_demo(tmp_path)
    raw = bytearray(shard.read_bytes())
    rec_len = len(raw) // 5
    raw[2 * rec_len + 20] ^= 0x01  # inside record 2's payload
    shard.write_bytes(bytes(raw))
    with pytest.raises(RecordError, match=r"demonstrations-00000-of-00001\.tfrecord: record 2 .*data CRC"):
        list(read_records(tmp_path, schema, verify_checksum=False))
    with pytest.raises(ManifestError, match="sha256"):
        list(read_records(tmp_path, schema))


def test_corrupt_length_header_names_record(tmp_path):
    schema, records, shard = _write_demo(tmp_path)
    raw = bytearray(shard.read_bytes())
    rec_len = len(raw) // 5
    raw[rec_len + 1] ^= 0x10  # record 1's length field
    shard.write_bytes(bytes(raw))
    with pytest.raises(RecordError, match=r"record 1 .*length CRC"):
        list(iter_records(shard))


def test_truncated_shard_is_an_error(tmp_path):
    schema, records, shard = _write_demo(tmp_path)
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-7])
    with pytest.raises(ManifestError, match=r"bytes on disk, manifest says \d+ \(truncated\?\)"):
        list(read_records(tmp_path, schema))
    with pytest.raises(RecordError, match=r"record 4 .*truncated data"):
        list(iter_records(shard))
    shard.write_bytes(raw[: len(raw) // 5 * 3 + 5])  # cut inside record 3's header
    with pytest.raises(RecordError, match=r"record 3 .*truncated header"):
        list(iter_records(shard))


def test_manifest_checks(tmp_path):
    schema, records, shard = _write_demo(tmp_path)
    with pytest.raises(ManifestError, match="expected 'preferences'"):
        read_manifest(tmp_path, PREFERENCES)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["schema"]["version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="v99"):
        read_manifest(tmp_path, schema)
    m["schema"]["version"] = 1
    m["shards"][0]["num_records"] = 6
    m["num_records"] = 6
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="5 records, manifest says 6"):
        list(read_records(tmp_path, schema))
    os.remove(shard)
    with pytest.raises(ManifestError, match="missing"):
        read_manifest(tmp_path, schema)
    os.remove(tmp_path / "manifest.json")
    with pytest.raises(ManifestError, match="no manifest"):
        read_manifest(tmp_path)


def test_record_that_does_not_fit_schema_is_named(tmp_path):
    schema, recs = SAMPLES["comparisons"]
    bad = dict(recs[0], verdict="second wins")
    with pytest.raises(SchemaError, match=r"record 1: .*'verdict'"):
        write_records(tmp_path, schema, [recs[0], bad])
    with pytest.raises(SchemaError, match="missing required field 'judge'"):
        encode_example(schema, {k: v for k, v in recs[0].items() if k != "judge"})
    with pytest.raises(SchemaError, match="unknown field"):
        encode_example(schema, dict(recs[0], extra="x"))
    with pytest.raises(SchemaError, match="field 'swapped'"):
        encode_example(schema, dict(recs[0], swapped="yes"))
    # A well-framed record whose payload is an Example of another schema.
    other = encode_example(PROMPTS, SAMPLES["prompts"][1][0])
    with pytest.raises(SchemaError, match="unknown feature"):
        decode_example(schema, other)


def test_wrong_payload_in_valid_frame_names_file_and_record(tmp_path):
    schema, records, shard = _write_demo(tmp_path, n=2)
    with TFRecordWriter(shard) as w:
        w.write(encode_example(schema, records[0]))
        w.write(b"\xff\xff not a proto")
    m = json.loads((tmp_path / "manifest.json").read_text())
    from rlaif_jax.data.records.shards import _sha256

    m["shards"][0].update(bytes=os.path.getsize(shard), sha256=_sha256(str(shard)))
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RecordError, match=r"tfrecord: record 1: .*not a tf.train.Example"):
        list(read_records(tmp_path, schema))


def test_shard_assignment_per_process():
    assert shard_indices_for_process(5, 0, 2) == [0, 2, 4]
    assert shard_indices_for_process(5, 1, 2) == [1, 3]
    with pytest.raises(ValueError, match="cannot be split"):
        shard_indices_for_process(1, 0, 2)


def test_readable_by_tensorflow(tmp_path):
    tf = pytest.importorskip(
        "tensorflow",
        reason="TensorFlow is not installed (tensorflow-cpu is ~1.5 GB, so it is not in the "
        "test extra); pip install -e '.[test,tf-interop]' to run this interoperability check",
    )
    schema, records = SAMPLES["preferences"]
    write_records(tmp_path, schema, records, num_shards=2)
    files = sorted(str(p) for p in tmp_path.glob("*.tfrecord"))
    spec = {
        "prompt_id": tf.io.FixedLenFeature([], tf.string),
        "prompt": tf.io.FixedLenFeature([], tf.string),
        "chosen": tf.io.FixedLenFeature([], tf.string),
        "rejected": tf.io.FixedLenFeature([], tf.string),
        "provenance": tf.io.FixedLenFeature([], tf.string),
        "ref_chosen_logp": tf.io.FixedLenFeature([], tf.float32, default_value=np.nan),
        "ref_rejected_logp": tf.io.FixedLenFeature([], tf.float32, default_value=np.nan),
    }
    got = [tf.io.parse_single_example(x, spec) for x in tf.data.TFRecordDataset(files)]
    assert [g["prompt"].numpy().decode() for g in got] == [r["prompt"] for r in records]
    assert [g["chosen"].numpy().decode() for g in got] == [r["chosen"] for r in records]
    assert got[0]["ref_chosen_logp"].numpy() == pytest.approx(-12.5)
    assert np.isnan(got[1]["ref_chosen_logp"].numpy())
    # And the other direction: a file written by TensorFlow reads with ours.
    path = str(tmp_path / "tf_written.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        w.write(encode_example(schema, records[0]))
    assert [decode_example(schema, x) for x in iter_records(path)] == records[:1]


def test_float_beyond_float32_is_rejected_not_stored_as_inf(tmp_path):
    # tf.train.Example stores floats as float32: 1e39 passes a finiteness check as a Python
    # float but would be read back as inf
    schema, recs = SAMPLES["preferences"]
    big = dict(recs[0], ref_chosen_logp=-1e39)
    with pytest.raises(SchemaError, match=r"record 1: preferences: field 'ref_chosen_logp'=-1e\+39 overflows float32"):
        write_records(tmp_path, schema, [recs[0], big])
    edge = float(np.finfo(np.float32).max)  # the largest float32 itself is fine
    got = decode_example(schema, encode_example(schema, dict(recs[0], ref_chosen_logp=-edge)))
    assert got["ref_chosen_logp"] == -edge
