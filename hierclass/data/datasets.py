"""Map-style torch datasets over the images or the products of an :class:`ImageSource`.

Both are safe with DataLoader worker processes: the source opens its own file handle in
each process. A corrupt image never stops a job: :class:`ImageDataset` returns ``None`` for
it and :func:`collate_images` drops it and reports its index.

Preprocessing is split where it is cheapest (as timm's "prefetcher" mode does): each image is
decoded, resized and cropped in uint8 (:class:`EvalTransform`, one Pillow resize straight to
the crop); the float conversion and mean/std normalisation run once per batch
(:meth:`EvalTransform.normalize`, done by :class:`~hierclass.features.FeatureExtractor`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

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


def decode_image(data: bytes, draft: Callable[[int, int], tuple[int, int] | None] | None = None) -> Image.Image | None:
    """Decode image bytes to an RGB image; None if they are not a decodable image.

    Args:
        data: the encoded image.
        draft: ``(width, height) -> (width, height) or None``, the smallest size the image is
            needed at; a JPEG is then decoded at 1/2, 1/4 or 1/8 scale in the DCT domain when
            that still covers it (much cheaper than decoding it whole and resizing).
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            need = draft(*im.size) if draft is not None and im.format == "JPEG" else None
            if need is not None:
                im.draft("RGB", need)
            return im.convert("RGB")  # convert() loads the pixels: a truncated JPEG fails here
    except _DECODE_ERRORS:
        return None


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """The default transform: an RGB image as a uint8 tensor ``[3, H, W]``."""
    h, w = image.height, image.width
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)  # one copy, writable
    return pixels.view(h, w, 3).permute(2, 0, 1)


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
        image = decode_image(data, getattr(self.transform, "draft_size", None))
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
        draft = getattr(self.transform, "draft_size", None)
        images = (decode_image(data, draft) for data in self.source.read_images(int(p)))
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


@dataclass(frozen=True)
class EvalTransform:
    """A timm model's evaluation preprocessing, split into a cheap per-image uint8 part and a
    per-batch float part.

    Calling it maps a PIL RGB image to a uint8 tensor ``[3, H, W]``: resize (keeping the aspect
    ratio, shorter side to ``floor(size / crop_pct)``; ``squash``: both sides) and centre crop,
    exactly timm's ``Resize`` + ``CenterCrop``, done as one Pillow resize of the crop's source
    box (only the kept pixels are computed). :meth:`normalize` then turns a batch into the float
    tensor the model takes. Other crop modes (``border``) fall back to timm's own uint8 steps.

    Build it with :func:`resolve_transform`.

    Attributes:
        size: ``(height, width)`` of the output.
        interpolation: timm's name of the resampling filter (``bicubic``, ``bilinear``, ...).
        crop_pct: the fraction of the resized image kept by the centre crop.
        crop_mode: ``center``, ``squash`` or ``border``.
        mean, std: per-channel normalisation, on the 0-1 scale.
        draft: allow JPEG DCT-domain downscaling (1/2, 1/4, 1/8) before the resize when the image is
            at least twice the resize target (nearly the same pixels, several times cheaper).
    """

    size: tuple[int, int]
    interpolation: str
    crop_pct: float
    crop_mode: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    draft: bool = True

    @property
    def scale_size(self) -> tuple[int, int]:
        """``(height, width)`` the resize aims at before the crop (timm: ``floor(size / crop_pct)``)."""
        return math.floor(self.size[0] / self.crop_pct), math.floor(self.size[1] / self.crop_pct)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` of an image after the resize step (torchvision's shorter-side rule)."""
        sh, sw = self.scale_size
        if self.crop_mode == "squash" or sh != sw:
            if self.crop_mode != "squash":  # timm's ResizeKeepRatio for non-square targets
                ratio = max(height / sh, width / sw)
                return round(width / ratio), round(height / ratio)
            return sw, sh
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(sh * long / short)
        return (sh, new_long) if width <= height else (new_long, sh)

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The size a JPEG may be decoded at (see :func:`decode_image`), or None to decode it whole."""
        if not (self.draft and self._fast):
            return None
        w, h = self.resized_size(width, height)
        return (w, h) if width >= 2 * w and height >= 2 * h else None

    @property
    def _fast(self) -> bool:
        return self.crop_mode in ("center", "squash") and self.crop_pct <= 1.0

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not self._fast:
            return _timm_uint8_steps(self)(image)
        ch, cw = self.size
        # A drafted JPEG is a 1/2^k-scale copy (sides rounded up), so its geometry is within a
        # pixel of the full image's.
        nw, nh = self.resized_size(image.width, image.height)
        top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
        fx, fy = image.width / nw, image.height / nh
        box = (left * fx, top * fy, (left + cw) * fx, (top + ch) * fy)
        resample = _PIL_FILTERS[self.interpolation]
        return to_uint8_tensor(image.resize((cw, ch), resample, box=box))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """A batch ``[B, 3, H, W]`` of uint8 images as the model's normalised float32 input."""
        scale = torch.tensor([1.0 / (255.0 * s) for s in self.std], dtype=torch.float32).view(1, 3, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std, strict=True)]).view(1, 3, 1, 1)
        return torch.addcmul(shift.float(), images.float(), scale)


_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


def _timm_uint8_steps(t: EvalTransform) -> Transform:
    import timm.data

    return timm.data.create_transform(
        input_size=(3, *t.size),
        interpolation=t.interpolation,
        mean=t.mean,
        std=t.std,
        crop_pct=t.crop_pct,
        crop_mode=t.crop_mode,
        is_training=False,
        use_prefetcher=True,  # resize + crop, then a uint8 tensor: normalisation is left to the batch
    )


def resolve_transform(
    model: torch.nn.Module | str | dict, image_size: int | None = None, crop_pct: float | None = None
) -> EvalTransform:
    """The evaluation preprocessing of a timm model (resize, centre crop; normalise per batch).

    Args:
        model: a timm model, a timm model name (created without weights to read its config), or
            a resolved data config (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``,
            ``crop_mode``).
        image_size: the square input size to use instead of the model's (e.g. 128 for speed).
        crop_pct: the fraction kept by the centre crop instead of the model's (1.0: no crop).

    Returns:
        An :class:`EvalTransform`: PIL RGB image -> uint8 tensor ``[3, image_size, image_size]``,
        and its ``normalize`` for batches.
    """
    import timm
    import timm.data

    if isinstance(model, dict):
        cfg = dict(model)
    else:
        if isinstance(model, str):
            model = timm.create_model(model, pretrained=False)
        cfg = timm.data.resolve_model_data_config(model)
    if image_size is not None:
        if image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        cfg["input_size"] = (3, int(image_size), int(image_size))
    if crop_pct is not None:
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1] (the fraction kept by the centre crop), got {crop_pct}")
        cfg["crop_pct"] = float(crop_pct)
    interpolation = cfg.get("interpolation") or "bilinear"
    return EvalTransform(
        size=(int(cfg["input_size"][1]), int(cfg["input_size"][2])),
        interpolation=interpolation if interpolation in _PIL_FILTERS else "bilinear",
        crop_pct=float(cfg.get("crop_pct") or timm.data.DEFAULT_CROP_PCT),
        crop_mode=cfg.get("crop_mode") or "center",
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
    )
