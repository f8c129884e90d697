"""Small atomic writers shared by the stages that leave reports beside their records."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Optional

import gin


def write_json(path: str, obj: Any, default: Optional[Callable] = str) -> None:
    """Write-then-rename, so a killed run never leaves half a report."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False, default=default)
    os.replace(tmp, path)


def write_jsonl(path: str, rows: Iterable[Any], default: Optional[Callable] = None) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True, ensure_ascii=False, default=default) + "\n")
    os.replace(tmp, path)


def save_operative_config(out_dir: str) -> None:
    """The gin bindings the run used. API clients take the *name* of their key's
    environment variable, never the key, so this cannot leak it."""
    try:
        text = gin.operative_config_str()
    except Exception:  # pragma: no cover - gin not in use
        return
    if text.strip():
        with open(os.path.join(out_dir, "operative_config.gin"), "w") as f:
            f.write(text)
