"""A deterministic, checkpointable batch iterator with background prefetch.

Order: epoch e visits this host's examples in a permutation keyed by (seed, process_index,
e) (or in file order with shuffle=False), truncated to `epoch_size` so every host has the
same number of examples per epoch. The permutation sorts a splitmix64 hash of the indices,
so it is fixed by this code alone, not by a numpy version's random streams: a run resumed
after an upgrade still sees the same order. Batches are cut from that endless stream of
example indices and may span an epoch boundary (as shuffle -> repeat -> batch does).

State (a small JSON-able dict) = position in the stream + examples carried by the packer +
a fingerprint of the data and settings. It describes the batches the *caller* has
received, not those the prefetch thread has produced, so checkpointing it and passing it
back as `state=` resumes with exactly the batch that would have come next.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import weakref
from typing import Any, Callable, Optional, Sequence

import numpy as np

from rlaif_jax.data.pipeline.batches import RowPacker, pad_batch, pad_preference_batch
from rlaif_jax.data.tokenize.encode import Encoded


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # uint64 array arithmetic wraps modulo 2**64, which is what splitmix64 needs.
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permutation(n: int, *key: int) -> np.ndarray:
    """A deterministic pseudo-random permutation of range(n) for the integer key."""
    k = np.zeros(1, np.uint64)  # arrays, not numpy scalars: scalars warn on wrap-around
    for part in key:
        k = _splitmix64(k ^ np.array([part & 0xFFFFFFFFFFFFFFFF], np.uint64))
    return np.argsort(_splitmix64(_splitmix64(np.arange(n, dtype=np.uint64)) ^ k), kind="stable")


class IndexStream:
    """Endless (or num_epochs-long) stream of example indices; state = (epoch, index)."""

    def __init__(
        self,
        num_examples: int,
        epoch_size: int,
        seed: int,
        shuffle: bool,
        num_epochs: Optional[int],
        process_index: int = 0,
    ):
        if not 0 < epoch_size <= num_examples:
            raise ValueError(f"epoch_size {epoch_size} must be in (0, {num_examples}]")
        self.num_examples, self.epoch_size = num_examples, epoch_size
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        self.process_index = process_index
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = -1, None

    def _order_for(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                key = (self.seed, self.process_index, epoch)
                self._order = permutation(self.num_examples, *key)[: self.epoch_size]
            else:
                self._order = np.arange(self.epoch_size)
            self._order_epoch = epoch
        return self._order

    def next(self) -> Optional[int]:
        if self.index >= self.epoch_size:
            self.epoch, self.index = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            return None
        i = int(self._order_for(self.epoch)[self.index])
        self.index += 1
        return i


class PaddedBatcher:
    """batch_size examples per batch, one per row."""

    def __init__(self, examples: Sequence[Encoded], batch_size: int, seq_len: int, drop_remainder: bool):
        self.examples, self.batch_size, self.seq_len = examples, batch_size, seq_len
        self.drop_remainder = drop_remainder

    def __call__(self, stream: IndexStream, carry: list[int]) -> Optional[dict]:
        idx = _take(stream, self.batch_size)
        if not idx or (self.drop_remainder and len(idx) < self.batch_size):
            return None
        return pad_batch([self.examples[i] for i in idx], self.batch_size, self.seq_len)


class PreferenceBatcher:
    """batch_size pairs per batch; row i of chosen_* and rejected_* is pair i."""

    def __init__(
        self,
        pairs: Sequence[tuple[Encoded, Encoded]],
        batch_size: int,
        seq_len: int,
        drop_remainder: bool,
        ref_logps: Optional[np.ndarray] = None,
    ):
        self.pairs, self.batch_size, self.seq_len = pairs, batch_size, seq_len
        self.drop_remainder, self.ref_logps = drop_remainder, ref_logps

    def __call__(self, stream: IndexStream, carry: list[int]) -> Optional[dict]:
        idx = _take(stream, self.batch_size)
        if not idx or (self.drop_remainder and len(idx) < self.batch_size):
            return None
        ref = None if self.ref_logps is None else self.ref_logps[idx]
        return pad_preference_batch([self.pairs[i] for i in idx], self.batch_size, self.seq_len, ref)


class PackedBatcher:
    """First-fit packing from the stream with a bounded look-ahead.

    Examples carried over from the previous batch go first; then examples are pulled until
    `max_carry` of them failed to fit (or every row is full). Those become the next carry,
    which is part of the iterator state, so packing is exactly reproducible on resume.
    """

    def __init__(self, examples: Sequence[Encoded], batch_size: int, seq_len: int, max_carry: int = 8):
        self.examples, self.batch_size, self.seq_len = examples, batch_size, seq_len
        self.max_carry = max_carry

    def __call__(self, stream: IndexStream, carry: list[int]) -> Optional[dict]:
        packer = RowPacker(self.batch_size, self.seq_len)
        pending = list(carry)
        carry.clear()
        for i in pending:
            if not packer.try_add(self.examples[i]):
                carry.append(i)
        while len(carry) < self.max_carry and not packer.full:
            i = stream.next()
            if i is None:
                break
            if not packer.try_add(self.examples[i]):
                carry.append(i)
        if packer.num_examples == 0:
            return None
        return packer.batch


def _take(stream: IndexStream, n: int) -> list[int]:
    out = []
    while len(out) < n:
        i = stream.next()
        if i is None:
            break
        out.append(i)
    return out


def fingerprint(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


_END = object()


def _prefetch_worker(ref: "weakref.ref[DataIterator]", q: queue.Queue, stop: threading.Event) -> None:
    """Fills the queue; holds the iterator only weakly between batches so an abandoned
    iterator is collected (its __del__ stops this thread)."""
    try:
        while not stop.is_set():
            it = ref()
            if it is None:
                return
            batch, pos = it._produce()
            if batch is not _END and it._transform is not None:
                batch = it._transform(batch)
            del it
            while not stop.is_set():
                try:
                    q.put((batch, pos), timeout=0.1)
                    break
                except queue.Full:
                    if ref() is None:
                        return
            if batch is _END:
                return
    except BaseException as e:  # surfaced to the consumer on its next call
        q.put((e, None))


class DataIterator:
    """Iterates batches (dicts of numpy arrays); `get_state()` / `state=` for exact resume.

    With prefetch > 0 a daemon thread builds up to `prefetch` batches ahead (and applies
    `transform`, e.g. a device_put, off the training thread). Errors in the thread are
    re-raised on the next `next()`.
    """

    def __init__(
        self,
        batcher: Callable[[IndexStream, list[int]], Optional[dict]],
        stream: IndexStream,
        fingerprint: str,
        state: Optional[dict] = None,
        prefetch: int = 2,
        transform: Optional[Callable[[dict], Any]] = None,
    ):
        self._batcher, self._stream, self._fingerprint = batcher, stream, fingerprint
        self._carry: list[int] = []
        self._transform = transform
        self._prefetch = prefetch
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self.num_batches = 0
        self.num_tokens = 0
        self.num_slots = 0
        self._set_position(state)
        self._state = self._position()

    # -- state

    def _position(self) -> dict:
        return {
            "epoch": self._stream.epoch,
            "index": self._stream.index,
            "carry": list(self._carry),
            "fingerprint": self._fingerprint,
        }

    def _set_position(self, state: Optional[dict]) -> None:
        if state is None:
            return
        if state.get("fingerprint") != self._fingerprint:
            raise ValueError(
                "iterator state was saved for different data or settings "
                f"(fingerprint {state.get('fingerprint')} != {self._fingerprint})"
            )
        self._stream.epoch, self._stream.index = int(state["epoch"]), int(state["index"])
        self._carry = [int(i) for i in state["carry"]]

    def get_state(self) -> dict:
        """Position after the last batch returned to the caller (JSON-able)."""
        return dict(self._state, carry=list(self._state["carry"]))

    @property
    def epoch(self) -> int:
        return self._state["epoch"]

    # -- production

    def _produce(self) -> tuple[Any, dict]:
        batch = self._batcher(self._stream, self._carry)
        if batch is None:
            return _END, self._position()
        return batch, self._position()

    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=self._prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_prefetch_worker, args=(weakref.ref(self), self._queue, self._stop), daemon=True
        )
        self._thread.start()

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> Any:
        if self._error is not None:
            raise self._error
        if self._prefetch > 0:
            if self._thread is None:
                self._start()
            batch, pos = self._queue.get()
            if isinstance(batch, BaseException):
                self._error = batch  # the producer is gone: keep failing, never hang
                raise batch
        else:
            batch, pos = self._produce()
            if batch is not _END and self._transform is not None:
                batch = self._transform(batch)
        if batch is _END:
            self._put_back_end()
            raise StopIteration
        self._state = pos
        self._count(batch)
        return batch

    def _put_back_end(self) -> None:
        # Keep raising StopIteration on later calls instead of blocking on an empty queue.
        if self._prefetch > 0:
            self._queue.put((_END, self._state))

    def _count(self, batch: Any) -> None:
        self.num_batches += 1
        if isinstance(batch, dict):
            for k, v in batch.items():
                if k.endswith("segment_ids") and isinstance(v, np.ndarray):
                    self.num_tokens += int((v > 0).sum())
                    self.num_slots += v.size

    @property
    def packing_efficiency(self) -> float:
        """Real tokens / token slots over the batches returned so far."""
        return self.num_tokens / self.num_slots if self.num_slots else 0.0

    def close(self) -> None:
        """Stops the prefetch thread; batches it made ahead are dropped and the producer is
        rewound to the caller's position, so iterating again continues exactly."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
            self._set_position(self._state)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
