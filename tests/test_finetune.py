"""Fine-tuning whole CNNs from images through the one engine: overfitting, the frozen warm-up, options,
AMP on CUDA, resuming mid-epoch, and the saved halves read by evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from hierclass.checkpoint import load_model, read_meta
from hierclass.cli import app
from hierclass.data.synthetic import make_synthetic_catalogue
from hierclass.data.training import ImageRows
from hierclass.engine import TrainConfig, train_head
from hierclass.errors import HierclassError
from hierclass.models.backbone import create_backbone
from hierclass.models.finetune import ImageClassifier
from hierclass.models.heads import FlatHead
from hierclass.taxonomy import Taxonomy

runner = CliRunner()
BACKBONE, SIZE = "test_efficientnet", 32
TINY = {"backbone": BACKBONE, "pretrained": "none", "image_size": SIZE, "workers": 0, "progress": False}


@pytest.fixture(autouse=True)
def one_thread():  # noqa: ANN201
    """One intra-op thread: tiny convolutions gain nothing from more, and on a loaded machine several threads
    spin against other processes (seconds instead of tenths of a second per epoch)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return make_synthetic_catalogue(tmp_path_factory.mktemp("cat"), n_train=40, n_val=12)


@pytest.fixture(scope="module")
def taxonomy(catalogue) -> Taxonomy:  # noqa: ANN001
    return Taxonomy.from_csv(catalogue.taxonomy)


def _backbone_of(head_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(head_dir / "backbone.safetensors"))


def test_a_tiny_cnn_overfits_a_few_images_and_evaluation_reads_the_run(catalogue, taxonomy, tmp_path: Path) -> None:  # noqa: ANN001
    from hierclass.features import extract_features
    from hierclass.inference import FlatClassifier

    images = ImageRows.open(catalogue.train, taxonomy)
    config = TrainConfig(
        **TINY, epochs=30, patience=0, lr=5e-3, top_lr_ratio=1.0, augment=False, batch_size=16, label_smoothing=0.0
    )
    m = train_head("flat", images, None, taxonomy, config, tmp_path / "run" / "flat")
    assert m["solver"] == "adamw" and m["epochs_run"] == 30
    head_dir = tmp_path / "run" / "flat"
    meta = read_meta(head_dir)
    assert meta["features"]["pretrained"] == str((head_dir / "backbone.safetensors").resolve())
    assert meta["training"]["from_images"] == str(catalogue.train)
    # What evaluation does: features of the images by the saved backbone, then the saved head.
    store = extract_features(
        catalogue.train, taxonomy, BACKBONE, meta["features"]["pretrained"], tmp_path / "feats", engine="torch",
        image_size=SIZE, progress=False,
    )  # fmt: skip
    clf = FlatClassifier.from_run(tmp_path / "run", taxonomy)
    pred = clf.predict(np.asarray(store.features(), dtype=np.float32))
    truth = taxonomy.leaf_ids[np.asarray(store.leaf)]
    assert (pred == truth).mean() >= 0.85  # the training images, learnt (33 classes: chance is 3%)
    from hierclass.report import check_store

    check_store(store, {"flat": clf}, tmp_path / "run")  # the run's features meta matches a fresh extraction
    # The user's path: evaluate --data extracts with the run's backbone (ONNX export of the fine-tuned weights).
    out = tmp_path / "report"
    result = runner.invoke(app, ["evaluate", "--run", str(tmp_path / "run"), "--data", str(catalogue.train),
                                 "--out", str(out), "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["flat"]["n_images"] == len(truth)
    assert report["flat"]["leaf_top1"] == pytest.approx((pred == truth).mean(), abs=0.03)  # ONNX as torch
    # --pretrained RUN/flat (the folder) loads the same fine-tuned backbone, e.g. as the experts' trunk.
    by_folder = create_backbone(BACKBONE, str(head_dir)).state_dict()
    for name, value in _backbone_of(head_dir).items():
        assert torch.equal(by_folder[name], value), name


def test_frozen_warmup_trains_the_head_alone_then_the_backbone(
    catalogue, taxonomy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    from hierclass import engine

    monkeypatch.setattr(engine, "_better", lambda a, b: True)  # keep the last epoch, whatever the holdout says
    images = ImageRows.open(catalogue.train, taxonomy)
    start = create_backbone(BACKBONE, "none").state_dict()
    warm = TrainConfig(**TINY, epochs=1, warmup_frozen_epochs=1, batch_size=16)
    train_head("router", images, None, taxonomy, warm, tmp_path / "warm")
    frozen = _backbone_of(tmp_path / "warm")
    assert frozen.keys() == start.keys()
    for name, value in start.items():  # weights and batch-norm statistics: untouched
        assert torch.equal(frozen[name], value), name
    head, _ = load_model(tmp_path / "warm", taxonomy)
    assert not torch.equal(head.net[-1].weight, _fresh_router_weight(taxonomy))  # the head learnt
    assert '"backbone_frozen": true' in (tmp_path / "warm" / "log.jsonl").read_text()

    both = TrainConfig(**TINY, epochs=2, warmup_frozen_epochs=1, batch_size=16, patience=0)
    train_head("router", images, None, taxonomy, both, tmp_path / "both")
    after = _backbone_of(tmp_path / "both")
    changed = [n for n in start if n.endswith("weight") and not torch.equal(after[n], start[n])]
    assert changed  # unfrozen in epoch 2
    records = [json.loads(line) for line in (tmp_path / "both" / "log.jsonl").read_text().splitlines()]
    assert [r.get("backbone_frozen", False) for r in records] == [True, False]


def _fresh_router_weight(taxonomy: Taxonomy) -> torch.Tensor:
    """The router head's weight as train_head initialises it (seed 0), to tell a trained head from a fresh one."""
    from hierclass.engine import Task

    torch.manual_seed(0)
    dim = int(create_backbone(BACKBONE, "none").num_features)
    return Task("router", taxonomy).build_model(dim, TrainConfig(standardize=False)).net[-1].weight


def test_top_stages_freeze_the_stem_and_lower_stages() -> None:
    backbone = create_backbone(BACKBONE, "none")
    model = ImageClassifier(backbone, FlatHead(int(backbone.num_features), 3), trainable_stages=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    last = f"backbone.blocks.{len(backbone.blocks) - 1}."
    assert any(n.startswith(last) for n in trainable) and any(n.startswith("head.") for n in trainable)
    assert not any(n.startswith(("backbone.conv_stem", "backbone.blocks.0.")) for n in trainable)
    model.train()
    assert not backbone.blocks[0].training and backbone.blocks[-1].training  # frozen BN statistics stay put
    model.freeze_backbone(True)
    assert not any(p.requires_grad for p in backbone.parameters()) and not backbone.blocks[-1].training
    model.freeze_backbone(False)
    assert any(p.requires_grad for p in backbone.blocks[-1].parameters())


def test_killed_mid_epoch_resumes_to_the_same_weights(
    catalogue, taxonomy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    """A kill right after a mid-epoch checkpoint (--checkpoint-every), with augmentation (RandAugment too,
    decoded in a worker process), dropout and EMA on: the restarted run skips the batches done and ends
    with the uninterrupted run's weights, bit for bit."""
    from hierclass import engine

    images = ImageRows.open(catalogue.train, taxonomy)
    options = {**TINY, "workers": 1, "rand_augment": "rand-m9-mstd0.5", "epochs": 2, "patience": 0}
    config = TrainConfig(**options, batch_size=8, dropout=0.2, checkpoint_every=3, ema_decay=0.9)
    whole = train_head("flat", images, None, taxonomy, config, tmp_path / "whole")
    real_save, saves = engine._save_resume, []

    def killed_after_second_checkpoint(path: Path, state: dict) -> None:
        real_save(path, state)
        saves.append(state["batch"])
        if len(saves) == 2:
            raise KeyboardInterrupt  # as a kill -9 right after the state reached the disk

    monkeypatch.setattr(engine, "_save_resume", killed_after_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_head("flat", images, None, taxonomy, config, tmp_path / "killed")
    assert saves[-1] > 0  # killed within an epoch, not at its end
    monkeypatch.setattr(engine, "_save_resume", real_save)
    lines: list[str] = []
    again = train_head("flat", images, None, taxonomy, config, tmp_path / "killed", echo=lines.append)
    assert any("resuming from epoch" in line and f"batch {saves[-1]}" in line for line in lines)
    assert again["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-6)
    for part in ("backbone.safetensors", "model.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / part)), load_file(str(tmp_path / "killed" / part))
        for name in a:
            assert torch.equal(a[name], b[name]), (part, name)
    assert not (tmp_path / "killed" / engine.RESUME_FILE).exists()


def test_options_that_do_not_fit_the_data_are_refused_in_one_line(catalogue, taxonomy, tmp_path: Path) -> None:  # noqa: ANN001
    images = ImageRows.open(catalogue.train, taxonomy)
    with pytest.raises(HierclassError, match="--amp bf16 needs a CUDA GPU"):
        train_head("flat", images, None, taxonomy, TrainConfig(**TINY, amp="bf16"), tmp_path / "a")
    with pytest.raises(HierclassError, match="--mixup and --cutmix .* router or flat"):
        train_head("experts", images, None, taxonomy, TrainConfig(**TINY, mixup=0.2), tmp_path / "b")
    args = ["train-flat", "--train", str(catalogue.train), "--run", str(tmp_path / "r"), "--taxonomy",
            str(catalogue.taxonomy), "--backbone", BACKBONE, "--pretrained", "none", "--amp", "fp16"]  # fmt: skip
    result = runner.invoke(app, args)
    assert (
        result.exit_code == 1 and "needs a CUDA GPU" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    )
    no_tax = runner.invoke(app, ["train-flat", "--train", str(catalogue.train), "--run", str(tmp_path / "r2")])
    assert no_tax.exit_code == 1 and "pass --taxonomy" in no_tax.stderr


def test_feature_folders_refuse_the_image_options(tmp_path: Path) -> None:
    from hierclass.engine import _check_image_options

    with pytest.raises(HierclassError, match="--backbone, --top-stages apply to training from images"):
        _check_image_options(TrainConfig(backbone="resnet18", top_stages=2), False, "flat", None)
    assert _check_image_options(TrainConfig(), False, "flat", None) == TrainConfig()
    filled = _check_image_options(TrainConfig(), True, "flat", None)
    assert filled.backbone and filled.pretrained and filled.smoothing == 0.1  # fine-tuning defaults


@pytest.mark.skipif(not torch.cuda.is_available(), reason="AMP and channels_last train on CUDA only; no GPU here")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_and_channels_last_train_on_cuda(catalogue, taxonomy, tmp_path: Path, amp: str) -> None:  # noqa: ANN001
    images = ImageRows.open(catalogue.train, taxonomy)
    config = TrainConfig(**TINY, epochs=1, batch_size=16, device="cuda", amp=amp, channels_last=True, grad_clip=1.0)
    m = train_head("flat", images, None, taxonomy, config, tmp_path / amp)
    assert np.isfinite(m["train_loss"]) and (tmp_path / amp / "backbone.safetensors").is_file()


def test_kill_9_and_the_same_command_again_continues_to_the_same_weights(catalogue, taxonomy, tmp_path: Path) -> None:  # noqa: ANN001
    """The command line killed with SIGKILL once its resume state is on disk, then run again unchanged."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from hierclass.engine import RESUME_FILE

    options = {"epochs": 3, "patience": 0, "batch_size": 4, "checkpoint_every": 2, "dropout": 0.1}
    whole = TrainConfig(**TINY, **options)
    train_head("flat", ImageRows.open(catalogue.train, taxonomy), None, taxonomy, whole, tmp_path / "whole")

    args = ["train-flat", "--train", str(catalogue.train), "--taxonomy", str(catalogue.taxonomy)]
    args += ["--run-dir", str(tmp_path / "run"), "--backbone", BACKBONE, "--pretrained", "none"]
    args += ["--image-size", str(SIZE), "--workers", "0", "--no-progress"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "hierclass", *args]
    state = tmp_path / "run" / "flat" / RESUME_FILE
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the training ended before its first checkpoint could be killed"
    assert state.exists() and not (tmp_path / "run" / "flat" / "meta.json").exists()
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from epoch" in again.stderr
    for part in ("backbone.safetensors", "model.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / part)), load_file(str(tmp_path / "run" / "flat" / part))
        for name in a:
            assert torch.equal(a[name], b[name]), (part, name)


def test_the_head_is_as_wide_as_what_the_backbone_returns() -> None:
    from hierclass.models.backbone import pooled_dim

    for name in ("mobilenetv3_small_050", BACKBONE):  # MobileNetV3: a conv head after the pooling, 288 -> 1024
        backbone = create_backbone(name, "none")
        with torch.no_grad():
            assert backbone(torch.zeros(1, 3, SIZE, SIZE)).shape[1] == pooled_dim(backbone), name


def test_experts_and_router_fine_tune_from_images_through_the_cli(catalogue, tmp_path: Path) -> None:  # noqa: ANN001
    base = ["--train", str(catalogue.train), "--val", str(catalogue.val), "--taxonomy", str(catalogue.taxonomy)]
    base += ["--run-dir", str(tmp_path / "run"), "--backbone", BACKBONE, "--pretrained", "none"]
    base += ["--image-size", str(SIZE), "--workers", "0", "--epochs", "1", "--batch-size", "16"]
    for command, kind in (("train-experts", "experts"), ("train-router", "router")):
        result = runner.invoke(app, [command, *base])
        assert result.exit_code == 0, result.output
        assert f"{kind}: AdamW, best epoch 1/1" in result.stdout and "val acc" in result.stdout
        model, meta = load_model(tmp_path / "run" / kind, Taxonomy.from_csv(catalogue.taxonomy))
        assert meta["head"]["kind"] == kind and meta["features"]["dim"] == model.dim
    wrong = runner.invoke(app, ["train-experts", *base, "--branch", "SYNTH HOME", "--overwrite"])
    assert wrong.exit_code == 1 and "--branch retrains one expert on features" in wrong.stderr


def test_mixup_cutmix_randaugment_clipping_and_top_stages_train_together(catalogue, taxonomy, tmp_path: Path) -> None:  # noqa: ANN001
    images = ImageRows.open(catalogue.train, taxonomy)
    config = TrainConfig(
        **TINY, epochs=1, batch_size=8, mixup=0.2, cutmix=1.0, rand_augment="rand-m9-mstd0.5", grad_clip=0.5,
        top_stages=1,
    )  # fmt: skip
    m = train_head("flat", images, None, taxonomy, config, tmp_path / "flat")
    assert np.isfinite(m["train_loss"])
    start, after = create_backbone(BACKBONE, "none").state_dict(), _backbone_of(tmp_path / "flat")
    last = f"blocks.{len(create_backbone(BACKBONE, 'none').blocks) - 1}."
    for name, value in start.items():
        if name.startswith(("conv_stem", "bn1", "blocks.0.")):
            assert torch.equal(after[name], value), name  # below the last stage: frozen
    assert any(not torch.equal(after[n], start[n]) for n in start if n.startswith(last))


def test_experts_tops_train_on_the_maps_of_a_fine_tuned_backbone(catalogue, taxonomy, tmp_path: Path) -> None:  # noqa: ANN001
    """HD-CNN style: a flat CNN fine-tuned from images is the trunk whose maps the experts' tops train on."""
    from hierclass.features import extract_features

    images = ImageRows.open(catalogue.train, taxonomy)
    train_head("flat", images, None, taxonomy, TrainConfig(**TINY, epochs=1, batch_size=16), tmp_path / "ft" / "flat")
    maps = extract_features(
        catalogue.train, taxonomy, BACKBONE, str(tmp_path / "ft" / "flat"), tmp_path / "maps", engine="torch",
        image_size=SIZE, top_stages=1, progress=False,
    )  # fmt: skip
    assert maps.meta["pretrained_sha256"]  # the fine-tuned weights, fingerprinted
    config = TrainConfig(epochs=1, progress=False)
    m = train_head("experts", maps, None, taxonomy, config, tmp_path / "tops" / "experts")
    assert m["solver"] == "adamw" and np.isfinite(m["train_loss"])
    from hierclass.models.tops import make_top

    # The tops start from the fine-tuned last stage, not from the backbone it was fine-tuned from.
    top = make_top(BACKBONE, maps.meta["pretrained"], 1).state_dict()
    tuned, untuned = _backbone_of(tmp_path / "ft" / "flat"), create_backbone(BACKBONE, "none").state_dict()
    last = f"blocks.{len(create_backbone(BACKBONE, 'none').blocks) - 1}."
    names = [n for n in tuned if n.startswith(last)]
    assert names and all(torch.equal(top[n], tuned[n]) for n in names)
    assert any(not torch.equal(tuned[n], untuned[n]) for n in names)
