"""orbax checkpoints of the train state plus the data iterator position.

A checkpoint holds everything an exact resume needs: params, optimizer state, step, RNG and
the iterator state (JSON). Saves are asynchronous where orbax supports it; keep-last-N.
Paths may be local or gs://.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        # orbax wants absolute local paths; gs:// and other URLs pass through.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self._mngr.latest_step()

    def all_steps(self) -> list:
        return list(self._mngr.all_steps())

    def save(self, step: int, state: Any, data_state: Optional[dict], meta: Optional[dict] = None) -> None:
        args = {
            "state": ocp.args.StandardSave(state),
            "data": ocp.args.JsonSave(data_state or {}),
            "meta": ocp.args.JsonSave(meta or {}),
        }
        self._mngr.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """abstract_state: a tree of jax.ShapeDtypeStruct with shardings (where to put it)."""
        out = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], dict(out["data"] or {}), dict(out["meta"] or {})

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def abstract_like(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
