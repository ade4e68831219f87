"""Simulated Cdiscount-scale features: the real label space and imbalance, synthetic pixels.

The real Cdiscount images are out of reach here; its taxonomy (5,270 leaves) and its
per-leaf image counts (``category_count_level3.csv``, 12,371,293 images) are not. This
module draws N labelled feature rows with that label distribution and a hierarchical
structure (a mean per level-1 branch, an offset per level-2 node, an offset per leaf, plus
noise), and streams them into an on-disk float16 :class:`~hierclass.featurestore.FeatureStore`
chunk by chunk, so N is bounded by disk, not memory.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hierclass.featurestore import OK, FeatureStore
from hierclass.taxonomy import Taxonomy


def _name_key(name: str) -> str:
    # category_count_level3.csv lost the non-ASCII characters (Œ, ’, –, È) and turned "0,07" into "0.07".
    return name.encode("ascii", "ignore").decode().replace(",", ".")


def leaf_image_counts(taxonomy: Taxonomy, counts_csv: str | Path) -> np.ndarray:
    """Real image counts per leaf, joined by name; a name shared by two leaves splits its count.

    Raises:
        ValueError: a leaf name has no count (the files do not belong together).
    """
    with Path(counts_csv).open(encoding="utf-8", newline="") as f:
        counts = {_name_key(name): int(n) for name, n in csv.reader(f)}
    keys = [_name_key(n) for n in taxonomy.leaf_names]
    missing = sorted({k for k in keys if k not in counts})
    if missing:
        raise ValueError(f"{counts_csv}: no count for {len(missing)} leaf name(s), e.g. {missing[0]!r}")
    share = {k: keys.count(k) for k in set(keys)} if len(set(keys)) < len(keys) else {}
    return np.array([counts[k] / share.get(k, 1) for k in keys], dtype=np.float64)


@dataclass(frozen=True)
class Structure:
    """Scales of the hierarchical feature model (per component, before noise)."""

    # Tuned with a nearest-class-mean (linear) classifier on 300k rows of the real label
    # distribution: (0.08, 0.06, 0.08) gave 60% leaf / 85% level-1, (0.1, 0.08, 0.06) 53% / 94%;
    # in 1,280 dimensions even small offsets separate well, hence the small scales.
    level1: float = 0.08  # spread of the branch means
    level2: float = 0.06  # spread of the level-2 offsets
    leaf: float = 0.09  # spread of the leaf offsets
    noise: float = 1.0  # per-image noise


class FeatureSimulator:
    """Draw hierarchical features for a taxonomy; the class means are fixed by ``seed``."""

    def __init__(self, taxonomy: Taxonomy, dim: int = 1280, structure: Structure = Structure(), seed: int = 0):
        rng = np.random.default_rng(seed)
        self.taxonomy, self.dim, self.structure = taxonomy, dim, structure
        mu1 = rng.normal(0, structure.level1, (taxonomy.n_level1, dim)).astype(np.float32)
        mu2 = rng.normal(0, structure.level2, (taxonomy.n_level2, dim)).astype(np.float32)
        mu3 = rng.normal(0, structure.leaf, (taxonomy.n_leaves, dim)).astype(np.float32)
        self.leaf_means = mu1[taxonomy.leaf_level1] + mu2[taxonomy.leaf_level2] + mu3

    def sample(self, leaves: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Features (float32) for images of the given leaves."""
        noise = rng.standard_normal((len(leaves), self.dim), dtype=np.float32) * self.structure.noise
        return self.leaf_means[leaves] + noise

    def write_store(
        self,
        out: str | Path,
        leaf_weights: np.ndarray,
        n: int,
        seed: int,
        chunk: int = 32_768,
        progress: bool = True,
    ) -> FeatureStore:
        """Stream ``n`` rows with leaves drawn from ``leaf_weights`` into a FeatureStore at ``out``."""
        rng = np.random.default_rng(seed)
        p = leaf_weights / leaf_weights.sum()
        leaves = rng.choice(self.taxonomy.n_leaves, size=n, p=p).astype(np.int64)
        store = FeatureStore.create(
            out,
            dim=self.dim,
            product_id=np.arange(n, dtype=np.int64),  # one image per simulated product
            image_number=np.zeros(n, dtype=np.int64),
            leaf=leaves,
            meta={
                "taxonomy_fingerprint": self.taxonomy.fingerprint,
                "backbone": {"name": "simulated", "structure": self.structure.__dict__, "dim": self.dim},
                "source": {"path": "simulated", "seed": seed},
            },
        )
        for start in tqdm(range(0, n, chunk), desc=f"simulate {Path(out).name}", unit="chunk", disable=not progress):
            rows = np.arange(start, min(start + chunk, n))
            store.write(rows, {"orig": self.sample(leaves[rows], rng)}, np.full(len(rows), OK, dtype=np.int8))
        store.mark_complete()
        return FeatureStore.open(out)
