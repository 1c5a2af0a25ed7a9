"""Exact resume inside an epoch: the training sampler skips the batches the epoch already ran.

Lightning restores its loops mid-epoch (the epoch's batch index continues from the checkpoint's)
but a plain ``DataLoader`` restarts the epoch's data from its first batch, so a resumed run trains
on other batches than the uninterrupted one. Lightning only fast-forwards loaders that are
``_Stateful`` (torchdata's ``StatefulDataLoader``); user data modules return plain ones.

The fix needs no state of its own: when the epoch's iterator is first read, Lightning's batch index
starts at ``fit_loop.epoch_loop.batch_progress.current.ready`` (0 in a fresh epoch, the number of
batches already run in a resumed one), so the sampler drops that many batches' worth of its own
indices. The permutation is Lightning's ``DistributedSampler`` one for ``trainer.current_epoch``,
so the remaining batches are those the uninterrupted run reads; with another data-parallel size
the global batch of each step is still the same samples (the global batch size is kept).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """A ``DistributedSampler`` whose next iteration uses epoch ``epoch()`` and skips
    ``skip_batches() * batch_size`` indices."""

    def __init__(self, *args: Any, skip_batches: Callable[[], int], epoch: Callable[[], int], batch_size: int,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._skip_batches = skip_batches
        self._epoch = epoch
        self._batch_size = batch_size

    def __iter__(self) -> Iterator[int]:
        # Lightning calls set_epoch(epoch_progress.current.processed): a checkpoint saved in
        # on_train_epoch_end of an epoch that max_steps cut short has processed = epoch + 1, yet the
        # resumed run continues that epoch: its permutation must be the epoch's own.
        self.set_epoch(self._epoch())
        skip = self._skip_batches() * self._batch_size
        if skip >= len(self):
            # Saved after the epoch's last batch: Lightning starts the next epoch, from its start.
            skip = 0
        it = super().__iter__()
        for _ in range(skip):
            next(it, None)
        return it


def make_resumable(dataloader: object, skip_batches: Callable[[], int], epoch: Callable[[], int]) -> object:
    """``dataloader`` rebuilt with a :class:`ResumableDistributedSampler` when it has Lightning's
    plain ``DistributedSampler`` and batches of a fixed size; anything else is returned unchanged
    (a user's own sampler must then resume itself)."""
    if not isinstance(dataloader, DataLoader) or type(dataloader.sampler) is not DistributedSampler:
        return dataloader
    if dataloader.batch_size is None:  # a custom batch_sampler: its batch sizes are unknown here
        return dataloader
    from lightning.pytorch.utilities.data import _update_dataloader

    s = dataloader.sampler
    sampler = ResumableDistributedSampler(s.dataset, num_replicas=s.num_replicas, rank=s.rank, shuffle=s.shuffle,
                                          seed=s.seed, drop_last=s.drop_last, skip_batches=skip_batches,
                                          epoch=epoch, batch_size=dataloader.batch_size)
    sampler.set_epoch(s.epoch)
    return _update_dataloader(dataloader, sampler)


def batches_already_run(trainer: Any) -> int:
    """The batch index Lightning's training epoch loop starts from (see the module docstring).

    The sampler is read at the iterator's first batch (or, with workers, when ``FitLoop.setup_data``
    creates it): after the checkpoint's loops are restored, and the count is the same before and
    after the epoch loop's reset. Only a restarting loop continues an epoch."""
    loop = trainer.fit_loop.epoch_loop
    return int(loop.batch_progress.current.ready) if loop.restarting else 0


def restart_epoch_iterator_if_done(trainer: Any) -> bool:
    """Re-create the training iterator when the restored epoch has no batch left (the checkpoint was
    saved after its last batch); returns whether it did.

    Lightning creates the resumed run's iterator in ``FitLoop.setup_data``, before the strategy
    restores the random generators (on_train_start), and uses it for the next epoch; the
    uninterrupted run created that epoch's iterator after the save, and a ``DataLoader`` iterator
    draws its base seed from the default generator when it is created. Without this the resumed
    run's generators were one draw behind: every dropout mask differed (docs/pipeline.md)."""
    loop = trainer.fit_loop
    fetcher = getattr(loop, "_data_fetcher", None)
    if fetcher is None or not loop.epoch_loop.restarting:
        return False
    if batches_already_run(trainer) < loop.max_batches:
        return False  # mid-epoch: the uninterrupted run drew this epoch's seed before the save too
    iter(fetcher)
    return True
