"""Map-style torch datasets over the images or the products of an :class:`ImageSource`.

Both are safe with DataLoader worker processes: the source opens its own file handle in
each process. A corrupt image never stops a job: :class:`ImageDataset` returns ``None`` for
it and :func:`collate_images` drops it and reports its index.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from hierclass.data.sources import ImageSource

Transform = Callable[[Image.Image], torch.Tensor]

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def image_rows(source: ImageSource, products: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One entry per image of the given product rows: ``(product_row, image_number)``, int64.

    Args:
        source: the products.
        products: product rows (default: all), e.g. one side of :func:`split_products`.

    Returns:
        Two arrays of equal length, in product order then image order.
    """
    rows = np.arange(len(source), dtype=np.int64) if products is None else np.asarray(products, dtype=np.int64)
    counts = np.asarray(source.n_images, dtype=np.int64)[rows]
    product_row = np.repeat(rows, counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    image_number = np.arange(len(product_row), dtype=np.int64) - first
    return product_row, image_number


def decode_image(data: bytes) -> Image.Image | None:
    """Decode image bytes to an RGB image; None if they are not a decodable image."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")  # convert() loads the pixels: a truncated JPEG fails here
    except _DECODE_ERRORS:
        return None


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """The default transform: an RGB image as a uint8 tensor ``[3, H, W]``."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class ImageDataset(torch.utils.data.Dataset):
    """One item per image: ``(transform(image) or None if undecodable, i)``.

    Args:
        source: the products.
        transform: PIL RGB image -> tensor ``[3, H, W]`` (default: :func:`to_uint8_tensor`);
            see :func:`resolve_transform`.
        product_row, image_number: which images, from :func:`image_rows` (default: all).
    """

    def __init__(
        self,
        source: ImageSource,
        transform: Transform | None = None,
        product_row: np.ndarray | None = None,
        image_number: np.ndarray | None = None,
    ) -> None:
        if (product_row is None) != (image_number is None):
            raise ValueError("give both product_row and image_number (from image_rows), or neither")
        if product_row is None:
            product_row, image_number = image_rows(source)
        self.source = source
        self.transform = transform or to_uint8_tensor
        self.product_row = np.asarray(product_row, dtype=np.int64)
        self.image_number = np.asarray(image_number, dtype=np.int64)
        if self.product_row.shape != self.image_number.shape:
            raise ValueError(
                f"product_row has shape {self.product_row.shape} but image_number {self.image_number.shape}; "
                "they must match"
            )

    def __len__(self) -> int:
        return len(self.product_row)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int]:
        data = self.source.read_images(int(self.product_row[i]))[int(self.image_number[i])]
        image = decode_image(data)
        return (None if image is None else self.transform(image)), int(i)


def collate_images(batch: list[tuple[torch.Tensor | None, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack the good images of a batch and report the bad ones.

    Returns:
        ``(images [B_good, 3, H, W], index of the good items, index of the bad items)``;
        when every image is bad, ``images`` is an empty ``[0, 3, 0, 0]`` tensor.
    """
    good = [(t, i) for t, i in batch if t is not None]
    bad = torch.tensor([i for t, i in batch if t is None], dtype=torch.long)
    if not good:
        return torch.empty(0, 3, 0, 0), torch.empty(0, dtype=torch.long), bad
    images = torch.stack([t for t, _ in good])
    return images, torch.tensor([i for _, i in good], dtype=torch.long), bad


class ProductDataset(torch.utils.data.Dataset):
    """One item per product row: ``([transform(image) for each decodable image], p)``.

    Undecodable images are left out of the list (which is empty if none decodes).
    """

    def __init__(self, source: ImageSource, transform: Transform | None = None) -> None:
        self.source = source
        self.transform = transform or to_uint8_tensor

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, p: int) -> tuple[list[torch.Tensor], int]:
        images = (decode_image(data) for data in self.source.read_images(int(p)))
        return [self.transform(im) for im in images if im is not None], int(p)


def collate_products(batch: list[tuple[list[torch.Tensor], int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate the images of a batch of products.

    Returns:
        ``(images [N, 3, H, W], owner [N]: the product row of each image, products [B]: the
        product rows of the batch)``; a product with no decodable image has no entry in owner.
    """
    products = torch.tensor([p for _, p in batch], dtype=torch.long)
    owner = torch.tensor([p for images, p in batch for _ in images], dtype=torch.long)
    tensors = [t for images, _ in batch for t in images]
    images = torch.stack(tensors) if tensors else torch.empty(0, 3, 0, 0)
    return images, owner, products


def resolve_transform(model: torch.nn.Module | str, image_size: int | None = None) -> Transform:
    """The evaluation preprocessing of a timm model (resize, centre crop, normalise).

    Args:
        model: a timm model, or a timm model name (created without weights to read its config).
        image_size: the square input size to use instead of the model's (e.g. 128 for speed).

    Returns:
        A callable PIL RGB image -> float tensor ``[3, image_size, image_size]``.
    """
    import timm
    import timm.data

    if isinstance(model, str):
        model = timm.create_model(model, pretrained=False)
    cfg = timm.data.resolve_model_data_config(model)
    if image_size is not None:
        if image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        cfg["input_size"] = (3, int(image_size), int(image_size))
    return timm.data.create_transform(**cfg, is_training=False)
