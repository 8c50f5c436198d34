"""What a checkpoint needs beyond weights and optimizer for a resumed run to be the same run.

- RNG states (python, numpy, torch, CUDA) of every rank, taken at the step boundary the
  checkpoint is saved at: augmentations (numpy), ROI sampling and dropout (torch) then
  draw what the uninterrupted run drew.
- The data position: how many indices of detectron2's TrainingSampler stream this rank
  consumed. The sampler's stream is a pure function of its seed, so a resumed loader skips
  that many and sees the batches the uninterrupted run saw next.

Everything is stored as tensors and plain Python values so that `torch.load(weights_only=True)`
reads it back.
- The augmentations of a sample: drawn from an RNG seeded by (train seed, rank, the sample's
  position in the stream), not from whichever data-loader worker happens to map it. With
  workers each worker reseeds its RNG and maps a share of the stream, so per-worker RNGs
  made a resumed run draw other flips than the uninterrupted one; positions make the
  augmentations a function of the stream alone, so resumes are bit-identical on the CPU
  with or without workers (detectron2 gives each worker whole batches, shard_chunk_size =
  batch, so the batches themselves are the same). On CUDA, nondeterministic kernels
  (atomics in backward) differ run to run anyway.
"""

from __future__ import annotations

import contextlib
import itertools
import random

import numpy as np
import torch
from detectron2.data.samplers import TrainingSampler
from detectron2.utils import comm


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_rank_rng_states() -> list[dict]:
    """Every rank's state, in rank order (a collective: all ranks must call it)."""
    own = rng_state()
    return comm.all_gather(own) if comm.get_world_size() > 1 else [own]


@contextlib.contextmanager
def rng_untouched():
    """Run the block (an evaluation) without moving any RNG the training draws from: an
    evaluation at a checkpoint's iteration must not make the resumed run draw differently."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def resume_state(iteration: int, per_rank_batch: int) -> dict:
    return {"rng": all_rank_rng_states(), "samples_seen": (iteration + 1) * per_rank_batch}


class ResumedTrainingSampler(TrainingSampler):
    """detectron2's TrainingSampler stream of this rank from its `skip`-th index on; each
    index is yielded as `position * size + index` (position: its place in the stream), which
    PositionedMapping decodes (detectron2's loaders pass indices on as single ints)."""

    def __init__(self, size: int, seed: int, skip: int = 0):
        super().__init__(size, shuffle=True, seed=seed)
        self._skip = skip

    def __iter__(self):
        stream = itertools.islice(super().__iter__(), self._skip, None)
        return (position * self._size + int(index) for position, index in enumerate(stream, self._skip))


class PositionedMapping(torch.utils.data.Dataset):
    """The dataset dicts mapped by `mapper` (detectron2's DatasetMapper) with the numpy and
    python RNGs seeded from (seed, rank, stream position) for the call and restored after,
    so the augmentations of a sample do not depend on the worker that maps it (see above).
    Our own rather than detectron2's MapDataset: that one takes plain indices and keeps every
    index it ever mapped in a set, which would grow with the stream positions."""

    def __init__(self, dicts: list[dict], mapper, seed: int):
        from detectron2.data.common import DatasetFromList

        self._dicts = DatasetFromList(dicts, copy=False)  # serialized: workers share it without copy-on-read
        self._mapper, self._seed, self._rank = mapper, int(seed), comm.get_rank()

    def __len__(self):
        return len(self._dicts)

    def __getitem__(self, key: int):
        position, index = divmod(int(key), len(self._dicts))
        words = [self._seed & 0xFFFFFFFF, self._rank, position & 0xFFFFFFFF, position >> 32]
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            np.random.seed(words)
            random.seed((self._seed << 96) | (self._rank << 64) | position)
            return self._mapper(self._dicts[index])
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
