"""Shuffling that a resumed run can repeat exactly."""

import torch


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A shuffle whose order is a function of (seed, epoch) alone.

    A run resumed at epoch k then sees exactly the order an unbroken run would have seen.
    """

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n
