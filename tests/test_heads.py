from __future__ import annotations

import numpy as np
import pytest
import torch

from hierclass.models.heads import ExpertHeads, FlatHead, RouterHead, build_head, segment_log_softmax
from hierclass.taxonomy import Taxonomy


@pytest.fixture
def tax() -> Taxonomy:
    # Branch sizes 5, 4, 1 (single-leaf), 3; rows deliberately unsorted.
    rows = [(10 + i, "B", f"b{i % 2}", f"leaf{i}") for i in range(4)]
    rows += [(30 + i, "A", f"a{i % 3}", f"leaf{i}") for i in range(5)]
    rows += [(50, "C", "c", "only"), (60, "D", "d", "x"), (61, "D", "d", "y"), (62, "D", "e", "z")]
    return Taxonomy.from_rows(rows)


def loop_reference(logits: torch.Tensor, tax: Taxonomy) -> torch.Tensor:
    out = torch.empty_like(logits)
    for b in range(tax.n_level1):
        s, e = int(tax.branch_start[b]), int(tax.branch_start[b + 1])
        out[:, s:e] = torch.log_softmax(logits[:, s:e], dim=1)
    return out


def test_segment_log_softmax_matches_loop(tax: Taxonomy) -> None:
    logits = torch.randn(9, tax.n_leaves, dtype=torch.float64) * 30  # large values test the per-segment shift
    got = segment_log_softmax(logits, tax)
    torch.testing.assert_close(got, loop_reference(logits, tax))
    assert (got[:, tax.branch_start[2]] == 0).all()  # single-leaf branch C
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: segment_log_softmax(z, tax), (logits[:2].detach().requires_grad_(),))
    with pytest.raises(ValueError, match="columns"):
        segment_log_softmax(torch.zeros(2, 3), tax)


@pytest.mark.parametrize("hidden", [None, 6])
def test_expert_heads_outputs(tax: Taxonomy, hidden: int | None) -> None:
    torch.manual_seed(0)
    model = ExpertHeads(8, tax, hidden=hidden).eval()
    x = torch.randn(11, 8)
    full = model(x)
    assert full.shape == (11, tax.n_leaves)
    log_probs = model.log_probs(x)
    for b in range(tax.n_level1):
        s, e = int(tax.branch_start[b]), int(tax.branch_start[b + 1])
        torch.testing.assert_close(model.branch_logits(x, b), full[:, s:e])
        torch.testing.assert_close(log_probs[:, s:e].exp().sum(1), torch.ones(11))
    branch = torch.tensor([0, 1, 3, 3, 0, 2, 1, 1, 0, 3, 3])
    routed = model.routed_logits(x, branch)
    assert routed.shape == (11, max(tax.branch_sizes))
    for i, b in enumerate(branch.tolist()):
        s, size = int(tax.branch_start[b]), int(tax.branch_sizes[b])
        torch.testing.assert_close(routed[i, :size], full[i, s : s + size])
        assert torch.isneginf(routed[i, size:]).all()
    with pytest.raises(IndexError):
        model.branch_logits(x, tax.n_level1)


@pytest.mark.parametrize("hidden", [None, 6])
def test_routed_loss_touches_only_own_experts(tax: Taxonomy, hidden: int | None) -> None:
    model = ExpertHeads(8, tax, hidden=hidden)
    branch = torch.tensor([1, 1, 3])
    out = model.routed_logits(torch.randn(3, 8), branch)
    torch.log_softmax(out, 1)[:, 0].sum().backward()
    for b in range(tax.n_level1):
        grads = [p.grad[i] for p, i in model.branch_parameters(b).values()]
        touched = any(g.abs().sum() > 0 for g in grads)
        assert touched == (b in (1, 3)), b


def test_grouped_linear_experts_match_packed_matmul(tax: Taxonomy) -> None:
    # Training runs one matmul per branch present; it must equal gathering from the packed all-experts matmul.
    torch.manual_seed(0)
    model = ExpertHeads(8, tax)
    x = torch.randn(40, 8)
    branch = torch.randint(0, tax.n_level1, (40,))
    target = (torch.rand(40) * model.sizes[branch]).long()

    def loss_and_grads(routed: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(routed, target)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    local = torch.arange(model.max_size)
    cols = (model.starts[branch].unsqueeze(1) + local).clamp_max(tax.n_leaves - 1)
    packed = model(x).gather(1, cols).masked_fill(local >= model.sizes[branch].unsqueeze(1), float("-inf"))
    want_loss, want_grads = loss_and_grads(packed)
    got_loss, got_grads = loss_and_grads(model.routed_logits(x, branch))
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert model.routed_logits(x[:0], branch[:0]).shape == (0, model.max_size)


def test_copy_branch_changes_only_that_branch(tax: Taxonomy) -> None:
    torch.manual_seed(0)
    a, b = ExpertHeads(4, tax, hidden=3), ExpertHeads(4, tax, hidden=3)
    x = torch.randn(5, 4)
    before = a(x)
    a.copy_branch_(b, 1)
    after = a(x)
    s, e = int(tax.branch_start[1]), int(tax.branch_start[2])
    torch.testing.assert_close(after[:, s:e], b(x)[:, s:e])
    keep = np.r_[0:s, e : tax.n_leaves]
    torch.testing.assert_close(after[:, keep], before[:, keep])


@pytest.mark.parametrize("hidden", [None, 5])
def test_dense_heads_and_build_head(tax: Taxonomy, hidden: int | None) -> None:
    x = torch.randn(3, 7)
    for model in (RouterHead(7, tax.n_level1, hidden=hidden), FlatHead(7, tax.n_leaves, hidden=hidden, dropout=0.1)):
        assert model(x).shape == (3, model.n_out)
        rebuilt = build_head(model.config(), tax)
        assert type(rebuilt) is type(model) and rebuilt.config() == model.config()
    experts = ExpertHeads(7, tax, hidden=hidden)
    assert build_head(experts.config(), tax).config() == experts.config()
    with pytest.raises(ValueError, match="classes"):
        build_head({**experts.config(), "n_classes": 3}, tax)
    with pytest.raises(ValueError, match="hidden"):
        RouterHead(7, 3, hidden=0)


@pytest.mark.parametrize("hidden", [None, 6])
def test_expert_heads_with_other(tax: Taxonomy, hidden: int | None) -> None:
    torch.manual_seed(0)
    model = ExpertHeads(8, tax, hidden=hidden, other=True).eval()
    x = torch.randn(11, 8)
    leaves, other = model.all_logits(x)
    assert leaves.shape == (11, tax.n_leaves) and other.shape == (11, tax.n_level1)
    torch.testing.assert_close(model(x), leaves)
    torch.testing.assert_close(model.other_logits(x), other)
    leaf_lp, other_lp = model.log_probs_with_other(x)
    torch.testing.assert_close(model.log_probs(x), leaf_lp)
    for b in range(tax.n_level1):  # single-leaf branch C too: its leaf vs other
        s, e = int(tax.branch_start[b]), int(tax.branch_start[b + 1])
        torch.testing.assert_close(leaf_lp[:, s:e].exp().sum(1) + other_lp[:, b].exp(), torch.ones(11))
        both = model.branch_logits(x, b, include_other=True)
        assert both.shape == (11, e - s + 1)
        torch.testing.assert_close(both[:, :-1], leaves[:, s:e])
        torch.testing.assert_close(both[:, -1], other[:, b])
        torch.testing.assert_close(model.branch_logits(x, b), leaves[:, s:e])
        ref = torch.log_softmax(torch.cat([leaves[:, s:e], other[:, b : b + 1]], 1), dim=1)
        torch.testing.assert_close(leaf_lp[:, s:e], ref[:, :-1])
        torch.testing.assert_close(other_lp[:, b], ref[:, -1])
    # A temperature divides every logit, the other one included.
    hot_leaf, hot_other = model.log_probs_with_other(x, temperature=2.0)
    ref = torch.log_softmax(torch.cat([leaves[:, :5], other[:, :1]], 1) / 2.0, dim=1)
    torch.testing.assert_close(hot_leaf[:, :5], ref[:, :-1])
    torch.testing.assert_close(hot_other[:, 0], ref[:, -1])
    # Training path unchanged: routed logits are leaf logits only.
    routed = model.routed_logits(x, torch.zeros(11, dtype=torch.long))
    torch.testing.assert_close(routed[:, :5], leaves[:, :5])


def test_expert_heads_other_config_and_copy(tax: Taxonomy) -> None:
    torch.manual_seed(0)
    for hidden in (None, 6):
        a, b = ExpertHeads(8, tax, hidden=hidden, other=True), ExpertHeads(8, tax, hidden=hidden, other=True)
        assert a.config()["other"] is True
        rebuilt = build_head(a.config(), tax)
        assert isinstance(rebuilt, ExpertHeads) and rebuilt.other
        assert set(rebuilt.state_dict()) == set(a.state_dict())
        x = torch.randn(4, 8)
        a.copy_branch_(b, 1)
        torch.testing.assert_close(a.branch_logits(x, 1, include_other=True), b.branch_logits(x, 1, include_other=True))
        assert not torch.allclose(a.other_logits(x)[:, 0], b.other_logits(x)[:, 0])
    plain = ExpertHeads(8, tax)
    assert plain.config()["other"] is False and plain.all_logits(torch.randn(2, 8))[1] is None
    assert not any("other" in k for k in plain.state_dict())  # old checkpoints keep their keys
    old = {k: v for k, v in plain.config().items() if k != "other"}  # a config saved before the option
    assert build_head(old, tax).other is False
    with pytest.raises(ValueError, match="no 'other' class"):
        plain.branch_logits(torch.randn(2, 8), 0, include_other=True)
    with pytest.raises(ValueError, match="no 'other' class"):
        plain.other_logits(torch.randn(2, 8))
