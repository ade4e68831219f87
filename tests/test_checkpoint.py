from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hierclass.checkpoint import class_order, load_model, save_model
from hierclass.errors import CheckpointError
from hierclass.models.heads import ExpertHeads, FlatHead, RouterHead
from hierclass.taxonomy import Taxonomy

ROWS = [(i, f"L1-{i % 3}", f"L2-{i % 5}", f"leaf{i}") for i in range(12)]


@pytest.fixture
def tax() -> Taxonomy:
    return Taxonomy.from_rows(ROWS, source="tax.csv")


def meta_for(kind: str, tax: Taxonomy) -> dict:
    return {
        "kind": kind,
        "taxonomy": {"fingerprint": tax.fingerprint, "source": tax.source},
        "class_order": class_order(kind, tax),
    }


def heads(tax: Taxonomy) -> list:
    return [
        RouterHead(6, tax.n_level1),
        FlatHead(6, tax.n_leaves, hidden=4),
        ExpertHeads(6, tax),
        ExpertHeads(6, tax, hidden=4, dropout=0.2, activation="relu"),
    ]


@pytest.mark.parametrize("index", range(4))
def test_round_trip(tmp_path: Path, tax: Taxonomy, index: int) -> None:
    model = heads(tax)[index].eval()
    save_model(tmp_path / "ckpt", model, meta_for(model.kind, tax))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["meta.json", "model.safetensors"]
    loaded, meta = load_model(tmp_path / "ckpt", tax)
    x = torch.randn(5, 6)
    assert torch.equal(loaded(x), model(x))
    assert meta["head"] == model.config() and meta["hierclass_version"]
    assert not loaded.training


def test_refuses_other_taxonomy(tmp_path: Path, tax: Taxonomy) -> None:
    save_model(tmp_path / "ckpt", FlatHead(6, tax.n_leaves), meta_for("flat", tax))
    other = Taxonomy.from_rows([*ROWS[:-1], (11, "L1-2", "L2-1", "renamed")], source="other.csv")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "ckpt", other)
    msg = str(e.value)
    assert str(tmp_path / "ckpt") in msg and tax.fingerprint in msg and other.fingerprint in msg
    assert "\n" not in msg and "category_names.csv" in msg


def test_refuses_other_class_order(tmp_path: Path, tax: Taxonomy) -> None:
    meta = meta_for("router", tax)
    meta["class_order"] = meta["class_order"][::-1]
    save_model(tmp_path / "ckpt", RouterHead(6, tax.n_level1), meta)
    with pytest.raises(CheckpointError, match="class order"):
        load_model(tmp_path / "ckpt", tax)


def test_missing_and_corrupt(tmp_path: Path, tax: Taxonomy) -> None:
    ckpt = tmp_path / "ckpt"
    with pytest.raises(CheckpointError, match="meta.json missing"):
        load_model(ckpt, tax)
    save_model(ckpt, ExpertHeads(6, tax), meta_for("experts", tax))
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(ckpt, tax)
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["weights_sha256"]  # without the hash, safetensors itself must refuse the truncated file
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        load_model(ckpt, tax)
    weights.unlink()
    with pytest.raises(CheckpointError, match="weights file missing"):
        load_model(ckpt, tax)
    (ckpt / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt checkpoint metadata"):
        load_model(ckpt, tax)


def test_wrong_shapes_are_refused(tmp_path: Path, tax: Taxonomy) -> None:
    save_model(tmp_path / "ckpt", FlatHead(6, tax.n_leaves), meta_for("flat", tax))
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    meta["head"]["dim"] = 7
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        load_model(tmp_path / "ckpt", tax)


@pytest.mark.parametrize("hidden", [None, 4])
def test_round_trip_experts_with_other(tmp_path: Path, tax: Taxonomy, hidden: int | None) -> None:
    model = ExpertHeads(6, tax, hidden=hidden, other=True).eval()
    save_model(tmp_path / "ckpt", model, meta_for("experts", tax))
    loaded, meta = load_model(tmp_path / "ckpt", tax)
    assert loaded.other and meta["head"]["other"] is True
    x = torch.randn(5, 6)
    for got, want in zip(loaded.all_logits(x), model.all_logits(x), strict=True):
        assert torch.equal(got, want)


def test_loads_experts_saved_before_the_other_option(tmp_path: Path, tax: Taxonomy) -> None:
    model = ExpertHeads(6, tax, hidden=4).eval()
    save_model(tmp_path / "ckpt", model, meta_for("experts", tax))
    meta_path = tmp_path / "ckpt" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["head"]["other"]  # what older versions wrote
    meta_path.write_text(json.dumps(meta))
    loaded, _ = load_model(tmp_path / "ckpt", tax)
    assert loaded.other is False
    x = torch.randn(5, 6)
    assert torch.equal(loaded(x), model(x))
    # A checkpoint with other=True but without its weights is refused as corrupt, in one line.
    meta["head"]["other"] = True
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        load_model(tmp_path / "ckpt", tax)


def _save_killed_at(ckpt: Path, model: torch.nn.Module, meta: dict, event: int) -> bool:
    """Save ``model`` in a child process killed (``os._exit``, no cleanup) at the ``event``-th step of the
    save: before or after each write, fsync and rename. True when the save ran to its end first."""
    import os

    import hierclass.checkpoint as checkpoint

    pid = os.fork()
    if pid == 0:  # the child: count the steps, die at the chosen one
        try:
            steps = [0]

            def step() -> None:
                if steps[0] == event:
                    os._exit(137)
                steps[0] += 1

            def wrap(func):  # noqa: ANN001, ANN202
                def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                    step()
                    result = func(*args, **kwargs)
                    step()
                    return result

                return wrapper

            os.replace, os.fsync = wrap(os.replace), wrap(os.fsync)
            checkpoint.save_file = wrap(checkpoint.save_file)
            checkpoint.write_json_atomic = wrap(checkpoint.write_json_atomic)
            save_model(ckpt, model, meta)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 137), code
    return code == 0


def test_a_kill_at_any_step_of_a_save_leaves_a_whole_checkpoint(tmp_path: Path, tax: Taxonomy) -> None:
    """Before: a kill between the weights' rename and meta.json's write left new weights beside the old
    meta.json, and the checkpoint no longer loaded (sha256 differs)."""
    torch.manual_seed(0)
    old, new = FlatHead(6, tax.n_leaves, hidden=4), FlatHead(6, tax.n_leaves, hidden=4)
    states = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in (("old", old), ("new", new))}
    finished, event, seen = False, 0, set()
    while not finished:
        ckpt = tmp_path / f"ckpt{event}"
        save_model(ckpt, old, {**meta_for("flat", tax), "tag": "old"})
        finished = _save_killed_at(ckpt, new, {**meta_for("flat", tax), "tag": "new"}, event)
        model, meta = load_model(ckpt, tax)
        got = model.state_dict()
        assert meta["tag"] in ("old", "new")
        assert all(torch.equal(got[k], v) for k, v in states[meta["tag"]].items()), event
        seen.add(meta["tag"])
        event += 1
    assert seen == {"old", "new"} and meta["tag"] == "new" and event > 6


def test_stale_meta_json_and_a_partial_weights_file(tmp_path: Path, tax: Taxonomy) -> None:
    """New weights beside an old meta.json load as the new checkpoint; a half-copied weights file does not."""
    a, b = tmp_path / "a", tmp_path / "b"
    save_model(a, FlatHead(6, tax.n_leaves), {**meta_for("flat", tax), "tag": "a"})
    save_model(b, FlatHead(6, tax.n_leaves), {**meta_for("flat", tax), "tag": "b"})
    (a / "meta.json").write_bytes((b / "meta.json").read_bytes())
    assert load_model(a, tax)[1]["tag"] == "a"
    (a / "meta.json").unlink()
    assert load_model(a, tax)[1]["tag"] == "a"
    (a / "meta.json").write_bytes((b / "meta.json").read_bytes())
    data = (b / "model.safetensors").read_bytes()
    (a / "model.safetensors").write_bytes(data[: len(data) - 16])
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(a, tax)
