"""The training order and a loader that resumes it mid-epoch.

The order of epoch ``e`` is a function of ``(seed, e)``: one permutation of the
whole split, padded to a multiple of the world size, and rank ``r`` takes items
``r, r + W, ...`` (PyTorch's ``DistributedSampler``). The loader is *stateful*
in Lightning's sense (``state_dict`` / ``load_state_dict``): Lightning stores
its state in every checkpoint and hands it back on resume, and the loader then
skips the batches the killed run had already trained on, so a run resumed from
a mid-epoch checkpoint sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """A seeded ``DistributedSampler`` that can start epoch ``e`` after its first ``n`` items.

    A ``DistributedSampler`` so that Lightning calls ``set_epoch`` and leaves it in place under DDP.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, items: int) -> None:
        """Make epoch ``epoch`` start after this rank's first ``items`` items (other epochs are whole)."""
        self._resume = (epoch, items)
        self.set_epoch(epoch)

    @property
    def skipped(self) -> int:
        """Items of the current epoch that are skipped because an earlier run consumed them."""
        if self._resume is not None and self._resume[0] == self.epoch:
            return self._resume[1]
        return 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skipped :])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose state is (epoch, batches yielded in it).

    ``len()`` stays the full epoch's: Lightning counts the restored batches itself and
    expects the loader to yield only the rest.
    """

    sampler: ResumableSampler

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, batch_size: int, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._epoch = sampler.epoch
        self._batches = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # A generator: its body (and so the sampler's order) runs at the first next(), after
        # Lightning's set_epoch, not when Lightning creates the iterator ahead of the epoch.
        return self._counted()

    def _counted(self) -> Iterator[Any]:
        self._epoch = self.sampler.epoch
        # Counted from the epoch's start, not from this iterator's, so a second resume in the same epoch is exact.
        self._batches = self.sampler.skipped // self.batch_size  # type: ignore[operator]
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Where training stands in the order: epoch, batches of it yielded, and what the order depends on."""
        return {
            "epoch": int(self._epoch),
            "batches": int(self._batches),
            "seed": int(self.sampler.seed),
            "num_replicas": int(self.sampler.num_replicas),
            "batch_size": int(self.batch_size),  # type: ignore[arg-type]
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after the batches a killed run consumed; the order must be the one it used."""
        expected = {"seed": self.sampler.seed, "num_replicas": self.sampler.num_replicas, "batch_size": self.batch_size}
        differing = {key: (state.get(key), value) for key, value in expected.items() if state.get(key) != value}
        if differing:
            details = ", ".join(f"{key}: checkpoint {saved}, now {now}" for key, (saved, now) in differing.items())
            raise ValueError(
                f"cannot resume mid-epoch with another training order ({details}); "
                "resume from an epoch-end checkpoint or with the checkpoint's settings"
            )
        self.sampler.resume_at(int(state["epoch"]), int(state["batches"]) * self.batch_size)  # type: ignore[operator]
        self._epoch, self._batches = int(state["epoch"]), int(state["batches"])
