"""torchrun on the CPU (gloo): two processes with batch B take the same steps as one process with batch 2B.

The model is a random-init timm test_efficientnet with ``--bn frozen`` (batch norms use their stored
statistics: per-process batch statistics of B images would differ from those of 2B, by design of
BatchNorm, not of the training) and no augmentation (``--no-augment``), so the only difference left
is the order of floating-point sums in the gradient all-reduce.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hierclass.data.splits import holdout_mask
from hierclass.data.training import ImageRows
from hierclass.engine import TrainConfig, train_head
from hierclass.taxonomy import Taxonomy

REPO = Path(__file__).resolve().parents[1]

B = 8  # images per process and step
COMMON = {"backbone": "test_efficientnet", "pretrained": "none", "image_size": 32, "epochs": 1, "lr": 3e-3}
COMMON |= {"augment": False, "bn": "frozen", "workers": 0, "top_lr_ratio": 1.0, "progress": False}


def _even_holdout(images: ImageRows) -> float:
    """A holdout fraction that leaves an even number of training images: the two processes then get equal
    shares of every step (DistributedSampler pads an odd count by repeating an image, one process does not)."""
    for fraction in (0.1, 0.15, 0.2, 0.25):
        if (~holdout_mask(images.product_id, images.leaf, fraction, 0)).sum() % 2 == 0:
            return fraction
    raise AssertionError("no holdout fraction gives an even training set")


def test_two_gloo_processes_with_batch_b_equal_one_with_batch_2b(
    cdiscount_sample_bson: Path, cdiscount_taxonomy_csv: Path, tmp_path: Path
) -> None:
    tax = Taxonomy.from_csv(cdiscount_taxonomy_csv)
    images = ImageRows.open(cdiscount_sample_bson, tax)
    holdout = _even_holdout(images)
    torch.set_num_threads(1)
    one = train_head(
        "flat", images, None, tax, TrainConfig(**COMMON, holdout=holdout, batch_size=2 * B), tmp_path / "one"
    )
    assert one["n_train"] % 2 == 0 and one["n_train"] > 4 * B  # several steps, some of them full

    args = ["--train", str(cdiscount_sample_bson), "--taxonomy", str(cdiscount_taxonomy_csv)]
    args += ["--run-dir", str(tmp_path / "two"), "--batch-size", str(B), "--holdout", str(holdout)]
    args += ["--backbone", "test_efficientnet", "--pretrained", "none", "--image-size", "32", "--epochs", "1"]
    args += ["--lr", "3e-3", "--no-augment", "--bn", "frozen", "--workers", "0", "--top-lr-ratio", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*launcher, "-m", "hierclass", "train-flat", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("saved ") == 1  # rank 0 alone reports and writes
    meta_two = (tmp_path / "two" / "flat" / "meta.json").read_text()
    assert '"world_size": 2' in meta_two

    for part in ("backbone.safetensors", "model.safetensors"):
        a, b = load_file(str(tmp_path / "one" / part)), load_file(str(tmp_path / "two" / "flat" / part))
        assert a.keys() == b.keys()
        for name in a:
            assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), (part, name, (a[name] - b[name]).abs().max())
    start = _fresh_backbone()
    trained = load_file(str(tmp_path / "two" / "flat" / "backbone.safetensors"))
    assert any(not torch.equal(trained[k], start[k]) for k in start if k.endswith("weight"))  # it did train
    np.testing.assert_allclose(_holdout_loss(tmp_path / "two" / "flat"), _holdout_loss(tmp_path / "one"), rtol=1e-4)


def _fresh_backbone() -> dict[str, torch.Tensor]:
    from hierclass.models.backbone import create_backbone

    return create_backbone("test_efficientnet", "none").state_dict()


def _holdout_loss(head_dir: Path) -> float:
    import json

    return float(json.loads((head_dir / "meta.json").read_text())["metrics"]["holdout_loss"])


def test_heads_on_stored_features_train_the_same_under_torchrun(tmp_path: Path) -> None:
    """The same loop on a feature folder (no real data needed): experts of MLP heads, whose batches only run
    some experts (DDP's unused parameters), 2 processes x B = 1 process x 2B."""
    import csv

    from hierclass.featurestore import FeatureStore
    from hierclass.synthetic import write_synthetic_store

    csv_path = tmp_path / "category_names.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["category_id", "category_level1", "category_level2", "category_level3"])
        w.writerows((i, f"BRANCH {i % 3}", f"mid {i % 4}", f"leaf {i}") for i in range(12))
    tax = Taxonomy.from_csv(csv_path)
    write_synthetic_store(tmp_path / "feats", tax, 400, 8, seed=1, noise=0.3)
    store = FeatureStore.open(tmp_path / "feats")
    holdout = next(
        h for h in (0.1, 0.15, 0.2, 0.25) if (~holdout_mask(store.product_id, store.leaf, h, 0)).sum() % 2 == 0
    )
    options = {"solver": "adamw", "hidden": 8, "epochs": 2, "lr": 0.01, "holdout": holdout, "progress": False}
    torch.set_num_threads(1)
    train_head("experts", store, None, tax, TrainConfig(**options, batch_size=2 * B), tmp_path / "one")

    args = ["--train", str(tmp_path / "feats"), "--taxonomy", str(csv_path), "--run-dir", str(tmp_path / "two")]
    args += ["--solver", "adamw", "--hidden", "8", "--epochs", "2", "--lr", "0.01", "--holdout", str(holdout)]
    args += ["--batch-size", str(B)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*launcher, "-m", "hierclass", "train-experts", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (
        load_file(str(tmp_path / "one" / "model.safetensors")),
        load_file(str(tmp_path / "two" / "experts" / "model.safetensors")),
    )
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), (name, (a[name] - b[name]).abs().max())
    assert _holdout_loss(tmp_path / "two" / "experts") == pytest.approx(_holdout_loss(tmp_path / "one"), rel=1e-4)


def test_extraction_under_torchrun_writes_one_shard_per_process(tmp_path: Path) -> None:
    """Each process extracts its own shard; merging them gives the one-process store, byte for byte."""
    from hierclass.data.synthetic import make_synthetic_catalogue
    from hierclass.features import extract_features
    from hierclass.featurestore import FeatureStore

    cat = make_synthetic_catalogue(tmp_path / "cat", n_train=24, n_val=4)
    common = ["--taxonomy", str(cat.taxonomy), "--backbone", "test_efficientnet", "--pretrained", "none"]
    common += ["--image-size", "32", "--batch-size", "8", "--engine", "torch", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = tmp_path / "feats"
    done = subprocess.run(
        [*launcher, "-m", "hierclass", "extract-features", "--data", str(cat.train), "--out", str(out), *common],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    shards = sorted(out.glob("shard-*-of-2"))
    assert [p.name for p in shards] == ["shard-0-of-2", "shard-1-of-2"]
    from hierclass.features import merge_features

    merged = merge_features(shards, tmp_path / "merged")
    torch.set_num_threads(1)
    whole = extract_features(
        cat.train, Taxonomy.from_csv(cat.taxonomy), "test_efficientnet", "none", tmp_path / "whole",
        engine="torch", image_size=32, batch_size=8, progress=False, device="cpu",
    )  # fmt: skip
    assert np.asarray(merged.features()).tobytes() == np.asarray(whole.features()).tobytes()
    assert np.array_equal(merged.product_id, whole.product_id)
    assert FeatureStore.open(tmp_path / "merged").meta["complete"]


def test_torchrun_killed_mid_epoch_resumes_on_every_rank(tmp_path: Path) -> None:
    """kill -9 of the whole torchrun job once rank 0 saved a mid-epoch state, then the same command: every rank
    resumes from rank 0's state and the job ends as one process with batch 2B does."""
    import contextlib
    import signal
    import time

    from hierclass.data.synthetic import make_synthetic_catalogue
    from hierclass.engine import RESUME_FILE

    cat = make_synthetic_catalogue(tmp_path / "cat", n_train=40, n_val=4)
    tax = Taxonomy.from_csv(cat.taxonomy)
    images = ImageRows.open(cat.train, tax)
    holdout = _even_holdout(images)
    per_rank = 4
    options = {**COMMON, "epochs": 3, "patience": 0, "holdout": holdout, "checkpoint_every": 3}
    torch.set_num_threads(1)
    train_head("flat", images, None, tax, TrainConfig(**options, batch_size=2 * per_rank), tmp_path / "one")

    args = ["--train", str(cat.train), "--taxonomy", str(cat.taxonomy), "--run-dir", str(tmp_path / "two")]
    args += ["--backbone", "test_efficientnet", "--pretrained", "none", "--image-size", "32", "--epochs", "3"]
    args += ["--lr", "3e-3", "--no-augment", "--bn", "frozen", "--workers", "0", "--top-lr-ratio", "1"]
    args += ["--holdout", str(holdout), "--patience", "0", "--checkpoint-every", "3", "--batch-size", str(per_rank)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "hierclass", "train-flat", *args]
    state = tmp_path / "two" / "flat" / RESUME_FILE
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 200
    while not state.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # The ranks first (torchrun starts them in sessions of their own), then the launcher.
    ranks = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    for pid in [*map(int, ranks), job.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    job.communicate()
    assert len(ranks) == 2
    assert job.returncode == -signal.SIGKILL, "the job ended before its first checkpoint could be killed"
    assert not (tmp_path / "two" / "flat" / "meta.json").exists()
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from epoch" in again.stderr
    for part in ("backbone.safetensors", "model.safetensors"):
        a, b = load_file(str(tmp_path / "one" / part)), load_file(str(tmp_path / "two" / "flat" / part))
        for name in a:
            assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), (part, name, (a[name] - b[name]).abs().max())
