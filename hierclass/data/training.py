"""Images as training data: what a feature store is to heads, :class:`ImageRows` is to a fine-tuned CNN.

:class:`ImageRows` lists every image of a source (dump, CSV catalogue or folder) with its product
and leaf, like a feature store's index, so the engine carves the same holdout from it and
picks the same samples per task. :class:`ImageSplit` is the engine's view of some of those rows:
the order of an epoch (a ``DistributedSampler``: each rank its share, reshuffled per epoch
with ``set_epoch``) and its batches, decoded and augmented in DataLoader workers with timm's
training transforms resolved from the model, or preprocessed as at evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hierclass.data.datasets import EvalTransform, ImageDataset, image_rows
from hierclass.data.sources import ImageSource, open_source
from hierclass.errors import DumpError

if TYPE_CHECKING:
    from hierclass.distributed import Dist
    from hierclass.taxonomy import Taxonomy


@dataclass
class ImageRows:
    """Every image of a source, one row each, labelled with a taxonomy.

    Attributes:
        root: the source's path (named in messages and the run record).
        source: the opened source.
        product_row, image_number: which image each row is (:func:`~hierclass.data.datasets.image_rows`).
        product_id: the product of each row.
        leaf: the leaf index of each row (-1: unlabelled, or a category the taxonomy lacks).
        problems: what of the source could not be used, one line each.
    """

    root: Path
    source: ImageSource
    product_row: np.ndarray
    image_number: np.ndarray
    product_id: np.ndarray
    leaf: np.ndarray
    problems: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | Path, taxonomy: Taxonomy, *, progress: bool = False) -> ImageRows:
        """Open a dump, CSV catalogue or folder catalogue and label its images with ``taxonomy``.

        Raises:
            DumpError: not a source, or no image in it.
            TaxonomyError: most labelled images have a category_id that is not a leaf of ``taxonomy``.
        """
        from hierclass.features import check_labels

        source = open_source(path, progress=progress, taxonomy=taxonomy)
        if len(source) == 0:
            raise DumpError(f"{path}: no product with an image found; is this a Cdiscount-format dump?")
        problems = list(getattr(source, "problems", list)())
        label_problem = check_labels(taxonomy, source.category_ids, source.n_images, Path(source.path))
        if label_problem:
            problems.append(label_problem)
        product_row, image_number = image_rows(source)
        product_id = np.asarray(source.product_ids, dtype=np.int64)[product_row]
        leaf = taxonomy.encode(np.asarray(source.category_ids, dtype=np.int64)[product_row], unknown=-1)
        return cls(Path(path), source, product_row, image_number, product_id, np.asarray(leaf), problems)

    def __len__(self) -> int:
        return len(self.product_row)

    @property
    def valid(self) -> np.ndarray:
        """Every row may be used (an image that does not decode is dropped from its batch when read)."""
        return np.ones(len(self), dtype=bool)


@dataclass
class Pipeline:
    """How one split's images become model input.

    Attributes:
        transform: per image (a timm training transform: PIL -> normalised float tensor), or an
            :class:`EvalTransform` (uint8 batches, normalised on the model's device).
        workers: DataLoader worker processes.
        seed: the base of each worker's random seed (augmentations repeat with the seed).
    """

    transform: EvalTransform | Callable[[Any], torch.Tensor]
    workers: int = 0
    seed: int = 0


@dataclass
class ImageSplit:
    """Some rows of an :class:`ImageRows`, with their targets: the engine's training or holdout data.

    Attributes:
        images: all the images of the source.
        rows: the rows this split uses, sorted.
        target: the global class of each (aligned with ``rows``).
        pipeline: how images are decoded and preprocessed.
    """

    images: ImageRows
    rows: np.ndarray
    target: np.ndarray
    pipeline: Pipeline | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def flip(self) -> None:
        """Feature stores' stored-flip generator; images flip in their transform instead."""
        return None

    def positions(
        self, epoch: int, rng: np.random.Generator, sample_p: np.ndarray | None, dist: Dist, seed: int
    ) -> np.ndarray:
        """This rank's positions (into ``rows``) for ``epoch``, in training order.

        A ``DistributedSampler`` (``set_epoch(epoch)``: a new order each epoch, the same on every
        rank, each rank taking every ``world``-th position) unless ``sample_p`` asks for
        class-weighted sampling, which draws from ``rng`` and splits the draw the same way.
        """
        if sample_p is not None:
            return shard(rng.choice(len(self), size=len(self), p=sample_p), dist)
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(self, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return np.fromiter(iter(sampler), dtype=np.int64)

    def batches(
        self,
        positions: np.ndarray,
        batch_size: int,
        device: torch.device,
        channels_last: bool = False,
        epoch: int | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, targets)`` on ``device`` for consecutive ``batch_size`` slices of ``positions``.

        With ``epoch`` (training), each image's random augmentation is drawn from generators seeded by
        the run's seed, the epoch and the image's row: the same whichever worker or process decodes it,
        and after a restart in the middle of the epoch. Images that do not decode are left out of their
        batch (with their targets). One DataLoader serves every call: its workers live as long as the split.
        """
        if self.pipeline is None:
            raise ValueError("ImageSplit.batches needs a pipeline (the transform and workers)")
        loader, plan = self._loader(device)
        plan.batches = [
            [(int(p), epoch) for p in positions[s : s + batch_size]] for s in range(0, len(positions), batch_size)
        ]
        transform = self.pipeline.transform
        target = torch.from_numpy(self.target)
        for images, good, _bad in loader:
            x = images.to(device, non_blocking=True)
            if isinstance(transform, EvalTransform):
                x = transform.normalize(x) if device.type == "cpu" else _normalize_on(transform, x)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, target[torch.from_numpy(good)].to(device, non_blocking=True)

    def _loader(self, device: torch.device) -> tuple[torch.utils.data.DataLoader, _Plan]:
        """The split's DataLoader (made on first use; workers kept between epochs) and the plan it reads."""
        assert self.pipeline is not None
        cached = getattr(self, "_cached", None)
        if cached is not None and cached[0] == device.type:
            return cached[1], cached[2]
        images, workers = self.images, self.pipeline.workers
        rows = self.rows
        base = ImageDataset(images.source, self.pipeline.transform, images.product_row[rows], images.image_number[rows])
        plan = _Plan()
        loader = torch.utils.data.DataLoader(
            _SeededImages(base, self.pipeline.seed),
            batch_sampler=plan,
            num_workers=workers,
            collate_fn=base.collate,
            pin_memory=device.type == "cuda",
            worker_init_fn=_WorkerSeed(self.pipeline.seed),
            prefetch_factor=4 if workers else None,
            persistent_workers=workers > 0,
            # Its own generator: making an iterator would otherwise draw from torch's global one, and a run
            # resumed mid-epoch (which makes one more) would then drop out differently.
            generator=torch.Generator().manual_seed(self.pipeline.seed),
        )
        self._cached = (device.type, loader, plan)
        return loader, plan


class _Plan:
    """The batches of the epoch under way, as ``(row, epoch)`` items: the DataLoader's batch sampler,
    refilled before each pass (it is read in the main process, so the workers can stay)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int | None]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int | None]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _SeededImages(torch.utils.data.Dataset):
    """An :class:`ImageDataset` whose item ``(i, epoch)`` is image ``i``, augmented (when ``epoch`` is not None)
    with torch's, Python's and numpy's generators seeded by ``(seed, epoch, i)``, torch's and Python's left
    as they were."""

    def __init__(self, dataset: ImageDataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int | None]) -> tuple[torch.Tensor | None, int]:
        import random

        i, epoch = item
        if epoch is None:
            return self.dataset[i]
        s = ((self.seed * 1_000_003 + epoch) * 10_000_019 + i) % 2**63
        state = random.getstate()
        # RandAugment picks its operations with numpy's global generator: seeded too, not restored (saving
        # and restoring it costs ~0.2 ms an image; nothing else in a training process draws from it
        # but mixup, which then draws a value fixed by the batch's last image, as reproducible).
        np.random.seed(s % 2**32)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(s)  # torch.manual_seed also visits every accelerator: ~0.4 ms
                random.seed(s)
                return self.dataset[i]
        finally:
            random.setstate(state)


def _normalize_on(transform: EvalTransform, x: torch.Tensor) -> torch.Tensor:
    from hierclass.data.datasets import normalisation

    scale, shift = (t.to(x.device) for t in normalisation(transform.mean, transform.std))
    return torch.addcmul(shift, x.float(), scale)


@dataclass(frozen=True)
class _WorkerSeed:
    """Seeds each DataLoader worker's generators from the run's seed (each image then seeds its own)."""

    seed: int

    def __call__(self, worker: int) -> None:
        import random

        s = (self.seed * 1_000_003 + worker) % 2**31
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s)


def shard(order: np.ndarray, dist: Dist) -> np.ndarray:
    """This rank's share of an epoch's ``order``: every ``world``-th entry, the order padded with its
    first entries to a multiple of ``world`` (as ``DistributedSampler`` does) so every rank takes as
    many steps."""
    if dist.world == 1:
        return order
    total = -(-len(order) // dist.world) * dist.world
    padded = np.concatenate([order, order[: total - len(order)]]) if total > len(order) else order
    return padded[dist.rank :: dist.world]


def train_transform(data_config: dict[str, Any], *, augment: bool, flip: bool, rand_augment: str | None) -> Any:
    """timm's training transform for the model's data config (random resized crop, flip, optional
    RandAugment), or, with ``augment`` off, the evaluation preprocessing."""
    from hierclass.data.datasets import resolve_transform

    if not augment:
        return resolve_transform(data_config)
    import timm.data

    return timm.data.create_transform(
        input_size=tuple(data_config["input_size"]),
        is_training=True,
        hflip=0.5 if flip else 0.0,
        auto_augment=rand_augment,
        interpolation=data_config.get("interpolation") or "bilinear",
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
    )
