"""Generated images and dumps, for tests and the demo (no real data needed).

Two kinds: :func:`make_jpeg` / :func:`synthetic_products` make small noise images for
reader tests; :func:`make_synthetic_catalogue` makes a small catalogue whose images carry
visible structure at each level of a synthetic 3-level taxonomy, for ``hierclass demo``:

* level 1 (branch) -> the background colour;
* level 2           -> the shape drawn (disc, square, triangle, bars);
* leaf              -> the shape's colour and how many copies are drawn,

with random position, size, colour jitter and pixel noise, so that the leaf is harder to
tell than the branch (as in real catalogues). Accuracy on it says nothing about real
catalogues: everything that prints such figures labels them as synthetic.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from hierclass.data.sources import write_dump
from hierclass.taxonomy import COLUMNS, Taxonomy


def make_jpeg(seed: int = 0, size: tuple[int, int] = (32, 24), quality: int = 90) -> bytes:
    """A small random-noise RGB JPEG, different for each seed."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def synthetic_products(
    n_products: int, n_categories: int = 3, max_images: int = 3, seed: int = 0, size: tuple[int, int] = (32, 24)
) -> list[tuple[int, int, list[bytes]]]:
    """``n_products`` products ``(_id, category_id, [JPEG bytes, ...])`` for :func:`write_dump`.

    Product ``k`` has ``_id`` 1000 + k, category_id 10 + (k mod n_categories) and
    1 + (k mod max_images) images.
    """
    products = []
    for k in range(n_products):
        jpegs = [make_jpeg(seed * 100_000 + k * 10 + j, size) for j in range(1 + k % max_images)]
        products.append((1000 + k, 10 + k % n_categories, jpegs))
    return products


BRANCHES = {  # level-1 name -> background RGB
    "SYNTH HOME": (205, 180, 150),
    "SYNTH FASHION": (150, 170, 210),
    "SYNTH GARDEN": (150, 200, 150),
    "SYNTH TOYS": (215, 160, 190),
    "SYNTH BOOKS": (190, 190, 190),
}
SHAPES = ("DISC", "SQUARE", "TRIANGLE", "BARS")
INKS = {"RED": (200, 40, 40), "BLUE": (40, 60, 200), "BLACK": (30, 30, 30), "YELLOW": (230, 200, 40)}


@dataclass(frozen=True)
class SyntheticLeaf:
    category_id: int
    level1: str
    shape: str
    ink: str
    copies: int

    @property
    def name(self) -> str:
        return f"{self.ink} {self.shape}" + (f" X{self.copies}" if self.copies > 1 else "")


def synthetic_leaves() -> list[SyntheticLeaf]:
    """The leaves of the synthetic taxonomy: 5 branches of 1 to 12 leaves (33 in all)."""
    plan = {  # branch -> (shapes, inks, copies)
        "SYNTH HOME": (SHAPES[:3], ("RED", "BLUE"), (1, 2)),
        "SYNTH FASHION": (SHAPES[:2], ("RED", "BLUE", "BLACK"), (1,)),
        "SYNTH GARDEN": (SHAPES[1:], ("BLACK", "YELLOW"), (1,)),
        "SYNTH TOYS": (SHAPES, ("RED", "YELLOW"), (1,)),
        "SYNTH BOOKS": (("BARS",), ("BLACK",), (1,)),  # a single-leaf branch: needs no expert
    }
    leaves, cid = [], 9_000_001
    for level1, (shapes, inks, copies) in plan.items():
        for shape in shapes:
            for ink in inks:
                for n in copies:
                    leaves.append(SyntheticLeaf(cid, level1, shape, ink, n))
                    cid += 1
    return leaves


def write_taxonomy(path: Path, leaves: list[SyntheticLeaf]) -> Taxonomy:
    """Write the synthetic taxonomy as a category_names.csv and load it back."""
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for leaf in leaves:
            w.writerow([leaf.category_id, leaf.level1, f"{leaf.level1.split()[1]} {leaf.shape}", leaf.name])
    return Taxonomy.from_csv(path)


def draw_image(leaf: SyntheticLeaf, rng: np.random.Generator, size: int = 64) -> bytes:
    """One JPEG of a product of ``leaf``."""
    bg = np.array(BRANCHES[leaf.level1]) + rng.integers(-25, 26, 3)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in np.clip(bg, 0, 255)))
    draw = ImageDraw.Draw(img)
    ink = tuple(int(c) for c in np.clip(np.array(INKS[leaf.ink]) + rng.integers(-30, 31, 3), 0, 255))
    for _ in range(leaf.copies):
        r = int(rng.integers(size // 8, size // 4))
        x, y = (int(v) for v in rng.integers(r, size - r, 2))
        if leaf.shape == "DISC":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=ink)
        elif leaf.shape == "SQUARE":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=ink)
        elif leaf.shape == "TRIANGLE":
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=ink)
        else:  # BARS
            for k in range(3):
                draw.rectangle((x - r, y - r + 2 * k * r // 3, x + r, y - r + (2 * k + 1) * r // 3), fill=ink)
    pixels = np.asarray(img, dtype=np.int16) + rng.normal(0, 12, (size, size, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def catalogue_products(
    leaves: list[SyntheticLeaf], n_products: int, seed: int, first_id: int = 1
) -> Iterator[tuple[int, int, list[bytes]]]:
    """Products ``(_id, category_id, [jpeg, ...])``: long-tailed leaf frequencies, 1-3 images each."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(leaves) + 1) ** 0.7  # a long tail, as in real catalogues
    weights = np.random.default_rng(0).permutation(weights / weights.sum())  # same tail for every split
    for pid in range(first_id, first_id + n_products):
        leaf = leaves[int(rng.choice(len(leaves), p=weights))]
        yield pid, leaf.category_id, [draw_image(leaf, rng) for _ in range(int(rng.integers(1, 4)))]


@dataclass(frozen=True)
class SyntheticCatalogue:
    taxonomy: Path
    train: Path
    val: Path


def make_synthetic_catalogue(
    out_dir: str | Path, n_train: int = 1200, n_val: int = 400, seed: int = 0
) -> SyntheticCatalogue:
    """Write a synthetic taxonomy and train / validation dumps into ``out_dir`` (kept if already there)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cat = SyntheticCatalogue(out / "category_names.csv", out / "train.bson", out / "val.bson")
    leaves = synthetic_leaves()
    write_taxonomy(cat.taxonomy, leaves)
    if not cat.train.exists():
        write_dump(cat.train, catalogue_products(leaves, n_train, seed))
    if not cat.val.exists():
        write_dump(cat.val, catalogue_products(leaves, n_val, seed + 1, first_id=n_train + 1))
    return cat
