"""Batches from DataLoader workers through reused shared segments (hierclass.data.handover): the same
pixels as in one process, a segment reused only once the main process has let go of its batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hierclass.data import (
    ImageDataset,
    ProductDataset,
    handover,
    open_source,
    resolve_transform,
    synthetic_products,
    write_dump,
)


@pytest.fixture
def dataset(tmp_path: Path, eval_config) -> ImageDataset:
    dump = tmp_path / "d.bson"
    write_dump(dump, synthetic_products(40, max_images=3, size=(24, 20)))  # 79 images
    return ImageDataset(open_source(dump, progress=False), resolve_transform(eval_config(16)))


def _one_process(ds: ImageDataset, batch_size: int) -> list[torch.Tensor]:
    return [
        ds.collate([ds[i] for i in range(s, min(s + batch_size, len(ds)))])[0] for s in range(0, len(ds), batch_size)
    ]


def _loader(ds, batch_size: int, **kw) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=2, collate_fn=ds.collate, **kw)


def test_batches_come_through_reused_segments(dataset: ImageDataset) -> None:
    expected = _one_process(dataset, 4)
    seen = set()
    for k, (images, index, bad) in enumerate(_loader(dataset, 4)):
        # a view of a worker's segment (torch's own path would give a shared-memory storage instead)
        assert not images.is_shared() and images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(images, expected[k]) and index.tolist() == list(range(4 * k, 4 * k + len(images)))
        assert len(bad) == 0
        seen |= {key for key in handover._received if key[0] != 0}  # noqa: SLF001
    # 20 batches went through a handful of segments: each was released and reused
    assert 2 <= len(seen) < 20


def test_a_batch_kept_by_the_consumer_is_never_overwritten(dataset: ImageDataset, monkeypatch) -> None:
    monkeypatch.setattr(handover, "MAX_SEGMENTS", 3)  # forked workers inherit it: past 3 in flight, torch's path
    expected = _one_process(dataset, 2)
    kept = list(_loader(dataset, 2))  # every batch held: segments are never released
    assert [torch.equal(images, e) for (images, _, _), e in zip(kept, expected, strict=True)] == [True] * 40
    assert sum(not images.is_shared() for images, _, _ in kept) == 6  # 3 per worker, then the fallback

    views = []  # a view keeps its batch's segment busy, though the batch tensor itself is gone
    for k, (images, _, _) in enumerate(_loader(dataset, 2)):
        if k % 5 == 0:
            views.append((k, images[1:]))
    assert all(torch.equal(view, expected[k][1:]) for k, view in views)


def test_product_batches_and_spawned_workers(dataset: ImageDataset) -> None:
    products = ProductDataset(dataset.source, dataset.transform)
    loader = torch.utils.data.DataLoader(
        products, batch_size=5, num_workers=2, collate_fn=products.collate, multiprocessing_context="spawn"
    )
    for k, (images, owner, rows) in enumerate(loader):
        one = products.collate([products[p] for p in range(5 * k, 5 * k + 5)])
        assert torch.equal(images, one[0]) and owner.tolist() == one[1].tolist() and rows.tolist() == one[2].tolist()
        assert not images.is_shared()


def test_outside_a_worker_batches_are_plain_tensors(dataset: ImageDataset) -> None:
    images = dataset.collate([dataset[i] for i in range(3)])[0]
    assert isinstance(images, torch.Tensor) and images.shape == (3, 3, 16, 16)
    with pytest.raises(RuntimeError, match="never received"):
        handover._receive(1, 12345, 48, (1, 3, 4, 4), None)  # noqa: SLF001
