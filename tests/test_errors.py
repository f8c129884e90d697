"""The one mechanism for bad input: range checks naming the binding, the output guards
(writer lock, no silent shrinking), and the scripts' one-line errors."""

import errno
import os
import subprocess
import sys

import pytest

from rlaif_jax import errors, outputs
from rlaif_jax.cli import run, user_error_line
from rlaif_jax.data.records import PROMPTS, write_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "check,args,ok",
    [
        (errors.positive, (1,), True),
        (errors.positive, (0,), False),
        (errors.positive, (-2,), False),
        (errors.positive, (float("nan"),), False),
        (errors.positive, (float("inf"),), False),
        (errors.positive, (True,), False),
        (errors.positive, ("3",), False),
        (errors.positive, (None,), True),
        (errors.non_negative, (0,), True),
        (errors.non_negative, (-1e-9,), False),
        (errors.in_range, (0.5, 0, 1), True),
        (errors.in_range, (1.5, 0, 1), False),
        (errors.in_range, (0.0, 0, 1), True),
    ],
)
def test_checks_accept_and_refuse_naming_the_binding(check, args, ok):
    if ok:
        check("x.y", *args)
        return
    with pytest.raises(errors.ConfigError, match=r"^x\.y = "):
        check("x.y", *args)


def test_open_interval_bounds_are_excluded():
    errors.in_range("a.top_p", 1.0, 0, 1, lo_open=True)
    with pytest.raises(errors.ConfigError, match=r"must be in \(0, 1\]"):
        errors.in_range("a.top_p", 0.0, 0, 1, lo_open=True)


def test_path_checks(tmp_path):
    (tmp_path / "f").write_text("x")
    errors.existing_dir("train.init_from", str(tmp_path))
    errors.existing_dir("train.init_from", "gs://bucket/model")  # checked where it is fetched
    with pytest.raises(errors.ConfigError, match="no such directory"):
        errors.existing_dir("train.init_from", str(tmp_path / "missing"))
    with pytest.raises(errors.ConfigError, match="is a file"):
        errors.existing_dir("train.init_from", str(tmp_path / "f"))
    with pytest.raises(errors.ConfigError, match="has no config.json"):
        errors.existing_dir("train.init_from", str(tmp_path), "HF model directory", must_contain="config.json")


def test_writer_lock_refuses_a_second_writer_and_is_released(tmp_path):
    out = str(tmp_path / "out")
    with outputs.writer_lock(out, "teacher_stage.out_dir"):
        # A second holder in another process: flock is per open file, so a child process
        # sees the lock exactly as a second run would.
        code = (
            "import sys; from rlaif_jax.outputs import writer_lock\n"
            f"with writer_lock({out!r}, 'teacher_stage.out_dir'): pass\n"
        )
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        assert p.returncode != 0
        assert "OutputInUseError" in p.stderr and f"pid {os.getpid()}" in p.stderr
        assert "another teacher_stage.out_dir" in p.stderr
    with outputs.writer_lock(out, "teacher_stage.out_dir"):  # released at the end of the block
        pass


def test_a_complete_record_set_is_not_replaced_by_fewer_records(tmp_path):
    d = str(tmp_path / "prompts")
    rows = [{"prompt_id": f"p{i}", "prompt": f"q{i}", "source": "t", "index": i} for i in range(3)]
    write_records(d, PROMPTS, rows)
    write_records(d, PROMPTS, rows)  # a rerun with as many records passes
    with pytest.raises(outputs.OutputWouldShrinkError, match="holds a complete set of 3 records.*0.*x.overwrite=True"):
        write_records(d, PROMPTS, [], overwrite_binding="x.overwrite")
    assert outputs.complete_count(d) == 3  # untouched
    write_records(d, PROMPTS, rows[:1], overwrite=True)
    assert outputs.complete_count(d) == 1


def test_cli_turns_user_errors_into_one_line(capsys):
    def bad(argv):
        raise errors.ConfigError("sft_pipeline.batch_size = 0: must be > 0; change sft_pipeline.batch_size")

    assert run(bad) == 2
    err = capsys.readouterr().err
    assert err == "error: sft_pipeline.batch_size = 0: must be > 0; change sft_pipeline.batch_size\n"

    def bug(argv):
        raise KeyError("a bug is a traceback")

    with pytest.raises(KeyError):
        run(bug)
    full = OSError(errno.ENOSPC, "No space left on device", "/data/cache.jsonl")
    assert user_error_line(full) == "/data/cache.jsonl: No space left on device"


def test_gin_typo_is_one_line_from_the_script():
    p = subprocess.run(
        [sys.executable, "scripts/train.py", "--gin_param=trian.num_steps=3"], capture_output=True, text=True, cwd=ROOT
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "error: gin config: No configurable matching 'trian'. In bindings string line 1 trian.num_steps=3"
    ]


def test_a_missing_required_binding_is_one_line(capsys):
    import gin

    @gin.configurable("needs_out_dir_for_test")
    def needs(out_dir=gin.REQUIRED):
        return out_dir

    def main(argv):
        needs()

    assert run(main) == 2
    assert capsys.readouterr().err.startswith(
        "error: gin config: Required bindings for `needs_out_dir_for_test` not provided in config: ['out_dir']"
    )
