"""Packed, exactly resumable batches over a memory-mapped token stream.

The stream is cut into fixed windows of seq_len + 1 tokens; each epoch visits them in a permutation
drawn from (seed, epoch), so the loader's whole state is (epoch, cursor) and a resumed run reads the
same batches as one never stopped. Documents inside a window keep to themselves: `document_ids`
tells the model which tokens may attend to each other and `position_ids` restart at each document.

Legend: B batch, L seq_len.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .corpus import DataError


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    targets: torch.Tensor  # [B, L] the next token of each input position
    document_ids: torch.Tensor | None  # [B, L] or None without document masking
    position_ids: torch.Tensor  # [B, L]
    next_targets: torch.Tensor  # [B, L - 1] the token two ahead (MTP targets)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


class TokenStream:
    """tokens (memory-mapped) plus each document's start offset."""

    def __init__(self, bin_path: str | os.PathLike, dtype: str) -> None:
        path = Path(bin_path)
        idx = path.with_suffix(".idx.npy")
        if not path.is_file() or not idx.is_file():
            raise DataError(f"{path} or {idx.name} is missing; run `longcat data prepare` again")
        self.tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        self.starts = np.load(idx)

    def windows(self, seq_len: int) -> int:
        return max(0, (len(self.tokens) - 1) // seq_len)

    def window(self, index: int, seq_len: int, doc_masking: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """tokens [L + 1], document ids [L + 1], positions [L + 1] of window `index`."""
        begin = index * seq_len
        tokens = np.asarray(self.tokens[begin : begin + seq_len + 1], dtype=np.int64)
        offsets = np.arange(begin, begin + seq_len + 1)
        if not doc_masking:
            return tokens, np.zeros_like(tokens), offsets - begin
        doc = np.searchsorted(self.starts, offsets, side="right") - 1
        doc_start = np.maximum(self.starts[doc], begin)
        return tokens, doc, offsets - doc_start


def _to_batch(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], doc_masking: bool) -> Batch:
    tokens = torch.from_numpy(np.stack([r[0] for r in rows]))
    docs = torch.from_numpy(np.stack([r[1] for r in rows]))
    positions = torch.from_numpy(np.stack([r[2] for r in rows]))
    return Batch(
        input_ids=tokens[:, :-1],
        targets=tokens[:, 1:],
        document_ids=docs[:, :-1] if doc_masking else None,
        position_ids=positions[:, :-1],
        next_targets=tokens[:, 2:],
    )


class PackedLoader:
    def __init__(
        self,
        stream: TokenStream,
        seq_len: int,
        batch_size: int,
        seed: int,
        doc_masking: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.stream, self.seq_len, self.batch_size = stream, seq_len, batch_size
        self.seed, self.doc_masking = seed, doc_masking
        self.rank, self.world_size = rank, world_size
        self.num_windows = stream.windows(seq_len)
        if self.num_windows < batch_size * world_size:
            raise DataError(
                f"the training data holds {self.num_windows} windows of {seq_len + 1} tokens, fewer than one "
                f"batch ({batch_size} x {world_size} ranks); use more data or a shorter seq_len"
            )
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        if state["num_windows"] != self.num_windows or state["seed"] != self.seed:
            raise DataError(
                "the data directory or seq_len differs from the checkpoint's "
                f"({state['num_windows']} windows, seed {state['seed']}); resume with the same data and settings"
            )
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)

    def next_batch(self) -> Batch:
        """The next global batch's share of this rank: batch_size windows."""
        per_step = self.batch_size * self.world_size
        if self.cursor + per_step > self.num_windows:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        chosen = self._order[self.cursor + self.rank * self.batch_size :][: self.batch_size]
        self.cursor += per_step
        return _to_batch([self.stream.window(int(i), self.seq_len, self.doc_masking) for i in chosen], self.doc_masking)


def sequential_batches(
    stream: TokenStream, seq_len: int, batch_size: int, max_batches: int | None, doc_masking: bool = True
):  # noqa: ANN201 - an iterator of Batch
    """Validation: windows in order, at most max_batches batches."""
    count = stream.windows(seq_len)
    for n, begin in enumerate(range(0, count, batch_size)):
        if max_batches is not None and n >= max_batches:
            return
        rows = [stream.window(i, seq_len, doc_masking) for i in range(begin, min(begin + batch_size, count))]
        yield _to_batch(rows, doc_masking)


def rank_share(batch: Batch, world: int, rank: int) -> tuple[Batch, bool]:
    """This rank's rows of a validation batch, and whether they count. Every rank must run the same
    number of forwards (they share collectives), so a batch of fewer rows than ranks runs whole on
    every rank and counts on rank 0 only."""
    if world == 1:
        return batch, True
    rows = batch.input_ids.shape[0]
    if rows < world:
        return batch, rank == 0
    begin, end = rank * rows // world, (rank + 1) * rows // world
    part = lambda t: None if t is None else t[begin:end]  # noqa: E731
    fields = ("input_ids", "targets", "document_ids", "position_ids", "next_targets")
    return Batch(*(part(getattr(batch, f)) for f in fields)), True
