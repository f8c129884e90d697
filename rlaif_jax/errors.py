"""Errors a user can cause, and the checks every stage and trainer runs before doing work.

One rule for the whole stack: input a user can get wrong (a setting, a file, a record)
is checked before anything is sent, trained or written, and the failure is a `UserError`
whose message is one line naming the gin binding / file / record and what to do. The
scripts print that line (`error: ...`, exit status 2) instead of a traceback
(rlaif_jax.cli.run); RLAIF_TRACEBACK=1 shows the traceback too.

The checks take the gin binding that sets the value (`"sft_pipeline.batch_size"`), so the
message says exactly what to change; `binding(name)` adds the active gin scope, because a
configurable called through `@dpo/make_optimizer` reads `dpo/make_optimizer.learning_rate`
and a message naming the unscoped binding would send the user to a setting without effect.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import gin


class UserError(ValueError):
    """Bad input a user can fix; the message names the binding / file / record and the fix."""


class ConfigError(UserError):
    """A setting out of its range, or a path that is missing or of the wrong kind."""


class WeightsError(UserError):
    """A model directory whose weights cannot be used as they are (truncated, missing a shard,
    shaped for another config); the message names the file and says to re-export it."""


class StorageError(OSError):
    """A write that failed (disk full, read-only, permission); the message names the path,
    what was kept, and what to do."""


def binding(name: str) -> str:
    """`name` ("make_optimizer.learning_rate") under the active gin scope, if any."""
    scope = gin.current_scope_str()
    return f"{scope}/{name}" if scope else name


def _fix(binding: str, hint: str) -> str:
    return f"; set {binding} ({hint})" if hint else f"; change {binding}"


def positive(binding: str, value: Any, hint: str = "") -> None:
    """value > 0 (and finite); None passes (the setting is optional)."""
    if value is None:
        return
    if not _number(value) or not value > 0 or not math.isfinite(value):
        raise ConfigError(f"{binding} = {value!r}: must be > 0{_fix(binding, hint)}")


def whole(name: str, value: Any, minimum: int, hint: str = "") -> None:
    """An integer setting (a count of steps, a size) >= minimum; a float or a bool is refused
    too, since a step count of 2.5 or True is a typo."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        fix = f"; set {name} ({hint})" if hint else f"; set it to a whole number >= {minimum}"
        raise ConfigError(f"{name} = {value!r}: must be a whole number >= {minimum}{fix}")


def non_negative(binding: str, value: Any, hint: str = "") -> None:
    if value is None:
        return
    if not _number(value) or not value >= 0 or not math.isfinite(value):
        raise ConfigError(f"{binding} = {value!r}: must be >= 0{_fix(binding, hint)}")


def in_range(
    binding: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False, hint: str = ""
) -> None:
    """lo <= value <= hi (strict where *_open); None passes."""
    if value is None:
        return
    ok = (
        _number(value)
        and math.isfinite(value)
        and (value > lo if lo_open else value >= lo)
        and (value < hi if hi_open else value <= hi)
    )
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ConfigError(f"{binding} = {value!r}: must be in {interval}{_fix(binding, hint)}")


def one_of(binding: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{binding} = {value!r}: must be one of {', '.join(map(repr, choices))}")


def existing_dir(
    binding: str, path: Optional[str], what: str = "directory", must_contain: Optional[str] = None
) -> None:
    """A local directory that exists (and holds `must_contain`); URLs and None pass (they
    are checked where they are fetched)."""
    if path is None or not isinstance(path, (str, os.PathLike)):
        return
    path = os.fspath(path)
    if "://" in path:
        return
    if not os.path.exists(path):
        raise ConfigError(f"{binding} = {path!r}: no such {what}; give an existing one")
    if not os.path.isdir(path):
        raise ConfigError(f"{binding} = {path!r}: is a file, expected a {what}")
    if must_contain and not os.path.exists(os.path.join(path, must_contain)):
        raise ConfigError(f"{binding} = {path!r}: has no {must_contain}, so it is not a {what}")


def existing_path(binding: str, path: Optional[str], what: str = "file or directory") -> None:
    """A local path that exists; URLs and None pass."""
    if path is None:
        return
    path = os.fspath(path)
    if "://" not in path and not os.path.exists(path):
        raise ConfigError(f"{binding} = {path!r}: no such {what}; give an existing one")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
