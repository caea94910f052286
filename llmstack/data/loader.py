"""A packing, resumable, rank-sharded loader over token shards.

Rows of ``seq_len + 1`` tokens are built once from the document boundaries (bos positions):

* a document longer than a row is cut into row-sized windows, each a row of its own;
* shorter documents (and the last part of a long one) are packed one after another, so a row holds
  several whole documents; the piece that does not fit the rest of a row is cropped to fill it.

So a row always starts at a document's bos, or at a row-aligned window inside a long document, and
no row mixes two shards. Rows are shuffled per epoch with a seeded permutation.

Distribution and resumption rest on one counter, ``cursor``: the number of rows all ranks together
have consumed. A call takes rows ``cursor + rank*B ... + B - 1`` and advances the cursor by
``world_size * B``; so 2 ranks x 1 micro-step see exactly the rows 1 rank x 2 micro-steps sees, and
the state saved in a checkpoint is that one integer (plus what validates it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


class PackedLoader:
    def __init__(
        self,
        arrays: list[np.ndarray],
        bos_id: int,
        seq_len: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive (got {seq_len}, {batch_size})")
        self.arrays = arrays
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.rows = self._build_rows(arrays, bos_id, seq_len + 1)
        if len(self.rows) < world_size * batch_size:
            raise ValueError(
                f"the data holds {len(self.rows)} rows of {seq_len + 1} tokens, fewer than one global batch "
                f"({world_size} ranks x {batch_size}); use a smaller batch or seq_len, or more data"
            )
        self.cursor = 0
        self._perm_epoch = -1
        self._perm = np.arange(len(self.rows))

    @staticmethod
    def _build_rows(arrays: list[np.ndarray], bos_id: int, R: int) -> list[list[tuple[int, int, int]]]:
        """Each row is a list of (shard, start, length) segments whose lengths sum to R."""
        rows: list[list[tuple[int, int, int]]] = []
        for shard, arr in enumerate(arrays):
            starts = np.flatnonzero(np.asarray(arr) == bos_id)
            if starts.size == 0 or starts[0] != 0:
                starts = np.insert(starts, 0, 0)
            ends = np.append(starts[1:], len(arr))
            row: list[tuple[int, int, int]] = []
            room = R
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
                while e - s >= R:  # full windows of a long document: rows of their own
                    rows.append([(shard, s, R)])
                    s += R
                if e - s < 2:  # a lone token teaches nothing
                    continue
                take = min(e - s, room)
                row.append((shard, s, take))
                room -= take
                if room == 0:
                    rows.append(row)
                    row, room = [], R
        return rows

    def __len__(self) -> int:
        """Number of global batches in one epoch."""
        return len(self.rows) // (self.world_size * self.batch_size)

    def _row(self, g: int) -> np.ndarray:
        epoch, i = divmod(g, len(self.rows))
        if self.shuffle and epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            self._perm_epoch = epoch
        segs = self.rows[int(self._perm[i])]
        return np.concatenate([self.arrays[sh][s : s + n] for sh, s, n in segs])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (B, T) int64, for this rank; advances the shared cursor."""
        first = self.cursor + self.rank * self.batch_size
        rows = np.stack([self._row(first + i) for i in range(self.batch_size)]).astype(np.int64)
        self.cursor += self.world_size * self.batch_size
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over the data from the start (for evaluation), independent of the cursor."""
        saved = self.cursor
        self.cursor = 0
        try:
            for _ in range(len(self)):
                yield self.next_batch()
        finally:
            self.cursor = saved

    @property
    def epoch(self) -> float:
        return self.cursor / len(self.rows)

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "n_rows": len(self.rows), "seq_len": self.seq_len, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seq_len", "seed", "n_rows"):
            mine = len(self.rows) if key == "n_rows" else getattr(self, key)
            if state.get(key) != mine:
                raise ValueError(
                    f"data loader state does not match this data: {key} was {state.get(key)}, is {mine} "
                    "(the shards or seq_len changed since the checkpoint)"
                )
        self.cursor = int(state["cursor"])
