"""Map-style torch datasets over the images or the products of an :class:`ImageSource`.

Both are safe with DataLoader worker processes: the source opens its own file handle in
each process. A corrupt image never stops a job: the datasets return ``None`` for it and
:func:`collate_images` drops it and reports its index.

Preprocessing is split where it is cheapest. Each item is only decoded, to a uint8 tensor at
its stored size (:func:`decode_image`: libjpeg-turbo through simplejpeg, straight into a numpy
array). The geometry (resize, centre crop) runs once per batch in the collate function, i.e.
in the DataLoader workers (:meth:`EvalTransform.batch`: torch's SIMD uint8 antialiased resize
over all the images of a size at once, several times cheaper per image than one Pillow resize
each); the float conversion and mean/std normalisation run once per batch where the model is
(:meth:`EvalTransform.normalize`, done by :class:`~hierclass.features.FeatureExtractor`).
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
from PIL import Image

from hierclass.data.sources import ImageSource

Transform = Callable[[Image.Image], torch.Tensor]
"""A per-image transform (PIL RGB image -> tensor), e.g. one of timm's; see :class:`ImageDataset`."""

PREPROCESS = "simplejpeg decode; torch uint8 antialiased resize + centre crop per batch"
"""Names the code path from bytes to model input; stored with extracted features, so that a feature
folder begun by another path is not resumed with this one (the pixels may differ by a level or two)."""

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_JPEG_START = b"\xff\xd8"


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


def decode_image(data: bytes, draft: Callable[[int, int], tuple[int, int] | None] | None = None) -> np.ndarray | None:
    """Decode image bytes to RGB pixels, uint8 ``[H, W, 3]``; None if they are not a decodable image.

    JPEGs are decoded by libjpeg-turbo through simplejpeg, straight into the array (Pillow's
    ``Image.open`` parses the JPEG markers in Python, which is most of its time on small
    product images). Other formats, JPEGs libjpeg-turbo cannot turn into RGB (CMYK) and
    anything it rejects go to Pillow, so a JPEG counts as bad only if both fail.

    Args:
        data: the encoded image.
        draft: ``(width, height) -> (width, height) or None``, the smallest size the image is
            needed at; a JPEG is then decoded at 1/2, 1/4 or 1/8 scale in the DCT domain when
            that still covers it (several times cheaper than decoding it whole and resizing).
    """
    if data[:2] == _JPEG_START:
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            if colorspace in ("Gray", "YCbCr", "RGB"):  # CMYK and YCCK: Pillow knows Adobe's inverted inks
                k = _draft_factor(width, height, None if draft is None else draft(width, height))
                min_height, min_width = -(-height // k), -(-width // k)  # 1/k scale: sides rounded up
                return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_height, min_width=min_width)
        except ValueError:
            pass  # libjpeg-turbo rejects it (e.g. a truncated file): Pillow's verdict decides
    try:
        with Image.open(io.BytesIO(data)) as im:
            need = draft(*im.size) if draft is not None and im.format == "JPEG" else None
            if need is not None:
                im.draft("RGB", need)
            return np.asarray(im.convert("RGB"))  # convert() loads the pixels: a truncated image fails here
    except _DECODE_ERRORS:
        return None


def _draft_factor(width: int, height: int, need: tuple[int, int] | None) -> int:
    """The largest of 8, 4, 2 (else 1) by which a ``width x height`` image can shrink and still cover
    ``need`` (Pillow's ``draft`` rule; libjpeg-turbo's other scales, such as 7/8, are slower than 1)."""
    if need is None:
        return 1
    scale = min(width // max(need[0], 1), height // max(need[1], 1))
    return next((k for k in (8, 4, 2) if scale >= k), 1)


def to_uint8_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """An RGB image (PIL, or ``[H, W, 3]`` uint8 pixels) as a uint8 tensor ``[3, H, W]``: a view of the
    pixels stored channels-last (no copy for an array)."""
    pixels = np.asarray(image) if isinstance(image, Image.Image) else image
    if not pixels.flags.writeable:
        pixels = pixels.copy()
    return torch.from_numpy(pixels).permute(2, 0, 1)


class ImageDataset(torch.utils.data.Dataset):
    """One item per image: ``(image or None if undecodable, i)``.

    With an :class:`EvalTransform` (or none) an item is the decoded image as a uint8 tensor
    ``[3, H, W]`` at its stored size, and :meth:`collate` (this dataset's DataLoader
    ``collate_fn``) resizes and crops the whole batch at once. Any other transform, e.g. one of
    timm's training transforms, is applied per image to the decoded PIL image in
    ``__getitem__``, and :meth:`collate` only stacks.

    Args:
        source: the products.
        transform: an :class:`EvalTransform` (see :func:`resolve_transform`), a per-image
            PIL -> tensor transform, or None (images at their stored size).
        product_row, image_number: which images, from :func:`image_rows` (default: all).
    """

    def __init__(
        self,
        source: ImageSource,
        transform: EvalTransform | Transform | None = None,
        product_row: np.ndarray | None = None,
        image_number: np.ndarray | None = None,
    ) -> None:
        if (product_row is None) != (image_number is None):
            raise ValueError("give both product_row and image_number (from image_rows), or neither")
        if product_row is None:
            product_row, image_number = image_rows(source)
        self.source = source
        self.transform = transform
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
        return _load(data, self.transform), int(i)

    @property
    def collate(self) -> Callable[[list[tuple[torch.Tensor | None, int]]], tuple[torch.Tensor, np.ndarray, np.ndarray]]:
        """The ``collate_fn`` for a DataLoader over this dataset (picklable: runs in the workers)."""
        return functools.partial(collate_images, transform=_batched(self.transform))


def _batched(transform: EvalTransform | Transform | None) -> EvalTransform | None:
    return transform if isinstance(transform, EvalTransform) else None


def _load(data: bytes, transform: EvalTransform | Transform | None) -> torch.Tensor | None:
    """Decode one image for a dataset item (see :class:`ImageDataset`)."""
    batched = transform is None or isinstance(transform, EvalTransform)
    pixels = decode_image(data, transform.draft_size if isinstance(transform, EvalTransform) else None)
    if pixels is None:
        return None
    return to_uint8_tensor(pixels) if batched else transform(Image.fromarray(pixels))


def collate_images(
    batch: list[tuple[torch.Tensor | None, int]], transform: EvalTransform | None = None
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Stack the good images of a batch (resized and cropped by ``transform.batch`` if given) and
    report the bad ones.

    The item indices are numpy arrays, not tensors: from a DataLoader worker they then travel
    inside the pickled batch, where each tensor would cost a shared-memory segment of its own and
    a file-descriptor handshake with the main process (see ``benchmarks/README.md``, part c).

    Returns:
        ``(images [B_good, 3, H, W], index of the good items, index of the bad items)``, the
        indices int64; when every image is bad, ``images`` is an empty ``[0, 3, 0, 0]`` tensor.
    """
    good = [(t, i) for t, i in batch if t is not None]
    bad = _indices(i for t, i in batch if t is None)
    if not good:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8), _indices(()), bad
    return _stack([t for t, _ in good], transform), _indices(i for _, i in good), bad


def _indices(values: Iterable[int]) -> np.ndarray:
    return np.fromiter(values, dtype=np.int64)


def _stack(images: Sequence[torch.Tensor], transform: EvalTransform | None) -> torch.Tensor:
    """The collate functions' batch: the images stacked, or resized and cropped by ``transform``."""
    return torch.stack(list(images)) if transform is None else transform.batch(images)


class ProductDataset(torch.utils.data.Dataset):
    """One item per product row: ``([image for each decodable image], p)`` (see :class:`ImageDataset`
    for what an image is); undecodable images are left out of the list (empty if none decodes).
    Use :meth:`collate` as the DataLoader's ``collate_fn``."""

    def __init__(self, source: ImageSource, transform: EvalTransform | Transform | None = None) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, p: int) -> tuple[list[torch.Tensor], int]:
        images = (_load(data, self.transform) for data in self.source.read_images(int(p)))
        return [im for im in images if im is not None], int(p)

    @property
    def collate(self) -> Callable[[list[tuple[list[torch.Tensor], int]]], tuple[torch.Tensor, np.ndarray, np.ndarray]]:
        """The ``collate_fn`` for a DataLoader over this dataset (picklable: runs in the workers)."""
        return functools.partial(collate_products, transform=_batched(self.transform))


def collate_products(
    batch: list[tuple[list[torch.Tensor], int]], transform: EvalTransform | None = None
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Concatenate the images of a batch of products (resized and cropped by ``transform.batch`` if given).

    Returns:
        ``(images [N, 3, H, W], owner [N]: the product row of each image, products [B]: the
        product rows of the batch)``, the rows int64 numpy arrays (see :func:`collate_images`); a
        product with no decodable image has no entry in owner.
    """
    products = _indices(p for _, p in batch)
    owner = _indices(p for images, p in batch for _ in images)
    tensors = [t for images, _ in batch for t in images]
    images = _stack(tensors, transform) if tensors else torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    return images, owner, products


@dataclass(frozen=True)
class EvalTransform:
    """A timm model's evaluation preprocessing, split into a per-batch uint8 geometry step and a
    per-batch float step.

    :meth:`batch` maps decoded images (uint8 ``[3, H, W]`` each, any sizes) to one uint8 batch
    ``[B, 3, *size]``: resize (keeping the aspect ratio, shorter side to ``floor(size /
    crop_pct)``; ``squash``: both sides) and centre crop, timm's ``Resize`` + ``CenterCrop``
    geometry. The images of each size are resized together by torch's uint8 antialiased
    kernel (the same filters as Pillow's; pixels within 2 levels of timm's Pillow path).
    :meth:`normalize` then turns the batch into the float tensor the model takes. Filters torch
    lacks (box, hamming, lanczos) use one Pillow resize per image, and other crop modes
    (``border``) timm's own uint8 steps.

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

    def placement(self, width: int, height: int) -> tuple[int, int, int, int]:
        """``(width, height)`` after the resize step, and the ``(top, left)`` of the centre crop in it."""
        nw, nh = self.resized_size(width, height)
        return nw, nh, int(round((nh - self.size[0]) / 2.0)), int(round((nw - self.size[1]) / 2.0))

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The size a JPEG may be decoded at (see :func:`decode_image`), or None to decode it whole."""
        if not (self.draft and self._geometric):
            return None
        w, h = self.resized_size(width, height)
        return (w, h) if width >= 2 * w and height >= 2 * h else None

    @property
    def _geometric(self) -> bool:
        return self.crop_mode in ("center", "squash") and self.crop_pct <= 1.0

    def batch(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Resize and centre-crop decoded images (uint8 ``[3, H, W]`` each) into one uint8 batch
        ``[B, 3, *size]``, stored channels last (what the backbones take; no transposing copy)."""
        out = torch.empty((len(images), *self.size, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
        if not (self._geometric and self.interpolation in _TORCH_FILTERS):
            for k, image in enumerate(images):
                out[k] = self._one_by_pillow(image)
            return out
        by_size: dict[tuple[int, int], list[int]] = {}
        for k, image in enumerate(images):
            by_size.setdefault((int(image.shape[1]), int(image.shape[2])), []).append(k)
        ch, cw = self.size
        for (h, w), members in by_size.items():
            # [n, H, W, 3] viewed as [n, 3, H, W]: channels last, the layout torch's uint8 SIMD kernel takes
            x = torch.stack([images[k].permute(1, 2, 0) for k in members]).permute(0, 3, 1, 2)
            nw, nh, top, left = self.placement(w, h)
            if (nh, nw) != (h, w):
                mode = _TORCH_FILTERS[self.interpolation]
                x = torch.nn.functional.interpolate(x, size=(nh, nw), mode=mode, antialias=mode != "nearest-exact")
            crop = x[:, :, top : top + ch, left : left + cw]
            if len(members) == len(images):
                return out.copy_(crop)
            out.index_copy_(0, torch.tensor(members), crop)
        return out

    def __call__(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        """One decoded image (uint8 ``[3, H, W]``, or a PIL RGB image) resized and cropped: ``[3, *size]``."""
        return self.batch([image if isinstance(image, torch.Tensor) else to_uint8_tensor(image)])[0]

    def _one_by_pillow(self, image: torch.Tensor) -> torch.Tensor:
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        if not self._geometric:
            return _timm_uint8_steps(self)(pil)
        ch, cw = self.size
        nw, nh, top, left = self.placement(pil.width, pil.height)
        fx, fy = pil.width / nw, pil.height / nh
        box = (left * fx, top * fy, (left + cw) * fx, (top + ch) * fy)  # only the kept pixels are computed
        return to_uint8_tensor(pil.resize((cw, ch), _PIL_FILTERS[self.interpolation], box=box))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """A batch ``[B, 3, H, W]`` of uint8 images as the model's normalised float32 input (the ONNX
        engine does this inside its graph instead, see :class:`~hierclass.onnx_runtime.Uint8Input`)."""
        scale, shift = normalisation(self.mean, self.std)
        return torch.addcmul(shift, images.float(), scale)


def normalisation(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)``, float32 ``[1, C, 1, 1]``, such that ``uint8 * scale + shift == (x / 255 - mean) / std``."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(1, -1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], dtype=torch.float32).view(1, -1, 1, 1)
    return scale, shift


_TORCH_FILTERS = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest-exact"}
"""timm's filter names torch's ``interpolate`` has (with Pillow's semantics: antialiased when shrinking)."""

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
