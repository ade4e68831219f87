"""The classification heads trained on frozen backbone features: router, experts, flat.

* :class:`RouterHead` scores the level-1 branches.
* :class:`ExpertHeads` packs one expert per branch into a single module. Its output has
  one column per leaf, in the taxonomy's leaf order; branch ``b``'s expert owns columns
  ``branch_start[b]:branch_start[b + 1]`` and is normalised within that segment only
  (:func:`segment_log_softmax`), so ``log_probs`` is ``log P(leaf | its branch)``.
  With ``other=True`` each expert also scores "not my branch" and normalises over its
  leaves plus that other class (trained on every branch's samples; see hierclass.engine).
* :class:`FlatHead` scores every leaf at once (the baseline).

Each head is a linear layer by default, or a small MLP (Linear - GELU - Dropout - Linear)
when ``hidden`` is given. Every head describes itself with :meth:`config`, which is what
a checkpoint stores to rebuild it.

Packed MLP experts. A per-branch hidden layer as 49 ``nn.Linear`` modules would be 49
matmuls per batch. Instead every expert keeps its own hidden layer, stored as one
``[n_branches, dim, hidden]`` weight, and its output layer as one ``[n_branches, hidden,
max_branch_size]`` weight (columns beyond a branch's size are padding, never read). Training
groups a batch's samples by branch into a padded ``[n_branches, max_count, dim]`` block and
runs both layers as two ``bmm`` calls (:meth:`ExpertHeads.routed_logits`). A hidden layer
shared by all experts would be cheaper, but it would couple the experts: retraining one
branch (``--branch``) would change every other expert through the shared layer, and the
"experts" would become a flat MLP with a per-branch softmax. Per-branch hidden layers keep
each expert independent, which is the point of the two-stage model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hierclass.taxonomy import Taxonomy

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


def _check_head_args(dim: int, n_out: int, hidden: int | None, dropout: float, activation: str) -> None:
    if dim < 1 or n_out < 1:
        raise ValueError(f"dim and the number of classes must be >= 1, got dim={dim}, classes={n_out}")
    if hidden is not None and hidden < 1:
        raise ValueError(f"hidden must be None (linear head) or >= 1, got {hidden}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")


class Standardize(nn.Module):
    """``(x - mean) / std`` with the training features' statistics, saved with the head.

    A fresh one is the identity; :meth:`set_` fills it before training, and inference applies
    it as part of the head, so callers always pass raw features.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    @torch.no_grad()
    def set_(self, mean: Tensor, std: Tensor) -> None:
        """Use these statistics (a constant feature, std 0, is only centred)."""
        self.mean.copy_(mean)
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Heads saved before they standardised their input: the identity.
        state_dict.setdefault(prefix + "mean", torch.zeros_like(self.mean))
        state_dict.setdefault(prefix + "std", torch.ones_like(self.std))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _DenseHead(nn.Module):
    """Linear, or Linear - activation - Dropout - Linear, from ``dim`` features to ``n_out`` logits."""

    kind = ""

    def __init__(self, dim: int, n_out: int, hidden: int | None = None, dropout: float = 0.0, activation: str = "gelu"):
        super().__init__()
        _check_head_args(dim, n_out, hidden, dropout, activation)
        self.dim, self.n_out, self.hidden, self.dropout, self.activation = dim, n_out, hidden, dropout, activation
        self.norm = Standardize(dim)
        if hidden is None:
            # Dropout on the input features is the only regulariser a linear head can use.
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, n_out))
        else:
            act = nn.GELU() if activation == "gelu" else nn.ReLU()
            self.net = nn.Sequential(nn.Linear(dim, hidden), act, nn.Dropout(dropout), nn.Linear(hidden, n_out))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, n_classes]`` for features ``x [N, dim]``."""
        return self.net(self.norm(x))

    def config(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this head."""
        return {
            "kind": self.kind,
            "dim": self.dim,
            "n_classes": self.n_out,
            "hidden": self.hidden,
            "dropout": self.dropout,
            "activation": self.activation,
        }


class RouterHead(_DenseHead):
    """Scores the level-1 branches: ``forward(x [N, dim]) -> logits [N, n_level1]``.

    Args:
        dim: the feature size.
        n_level1: the number of level-1 branches.
        hidden: None for a linear head, else the width of one hidden layer.
        dropout: dropout probability (on the input for a linear head, after the hidden layer otherwise).
        activation: ``"gelu"`` or ``"relu"`` (MLP only).
    """

    kind = "router"

    def __init__(
        self, dim: int, n_level1: int, hidden: int | None = None, dropout: float = 0.0, activation: str = "gelu"
    ):
        super().__init__(dim, n_level1, hidden, dropout, activation)


class FlatHead(_DenseHead):
    """Scores every leaf: ``forward(x [N, dim]) -> logits [N, n_leaves]`` (the baseline).

    Args:
        dim: the feature size.
        n_leaves: the number of leaves.
        hidden: None for a linear head, else the width of one hidden layer.
        dropout: dropout probability.
        activation: ``"gelu"`` or ``"relu"`` (MLP only).
    """

    kind = "flat"

    def __init__(
        self, dim: int, n_leaves: int, hidden: int | None = None, dropout: float = 0.0, activation: str = "gelu"
    ):
        super().__init__(dim, n_leaves, hidden, dropout, activation)


def _segment_log_softmax(logits: Tensor, segment: Tensor, n_segments: int) -> Tensor:
    """Log-softmax of each row within the column segments given by ``segment`` (one id per column)."""
    n = logits.shape[0]
    index = segment.unsqueeze(0).expand(n, -1)
    # The shift only keeps exp() in range; any constant per segment gives the same result, so no gradient.
    peak = logits.new_full((n, n_segments), -math.inf).scatter_reduce(1, index, logits.detach(), "amax")
    shifted = logits - peak.gather(1, index)
    total = logits.new_zeros((n, n_segments)).index_add(1, segment, shifted.exp())
    return shifted - total.log().gather(1, index)


def segment_log_softmax(logits: Tensor, taxonomy: Taxonomy) -> Tensor:
    """Log-softmax of leaf logits within each branch's segment: ``log P(leaf | its branch)``.

    Vectorised over all branches (a per-segment max by ``scatter_reduce``, ``exp``, a sum by
    ``index_add``, ``log``). A single-leaf branch gets 0.

    Args:
        logits: ``[N, n_leaves]`` in the taxonomy's leaf order.
        taxonomy: gives each leaf's branch.
    """
    if logits.shape[-1] != taxonomy.n_leaves:
        raise ValueError(f"logits have {logits.shape[-1]} columns; the taxonomy has {taxonomy.n_leaves} leaves")
    segment = torch.tensor(taxonomy.leaf_level1, device=logits.device)
    return _segment_log_softmax(logits, segment, taxonomy.n_level1)


class ExpertHeads(nn.Module):
    """One expert per level-1 branch, packed in one module.

    ``forward(x)`` returns ``[N, n_leaves]`` logits where branch ``b``'s expert fills columns
    ``branch_start[b]:branch_start[b + 1]``; :meth:`log_probs` normalises each segment
    (``log P(leaf | branch)``); :meth:`branch_logits` runs one expert only; :meth:`routed_logits`
    runs, for each sample, only the expert of a given branch (training).

    Linear experts are one ``nn.Linear(dim, n_leaves)``: all experts in one matmul at inference,
    one matmul per branch present on its own samples in training (:meth:`routed_logits`). MLP experts
    (``hidden`` given) have a hidden layer per branch, batched as described in the module doc.

    With ``other=True`` every expert (single-leaf branches' too) also has an "other" logit: "this
    sample is not of my branch". :meth:`all_logits` returns the leaf logits and the ``[N, n_level1]``
    other logits from one pass; :meth:`log_probs_with_other` normalises each branch over its leaves
    and its other logit (:meth:`log_probs` keeps the leaf part, whose segments then sum to
    ``1 - P_b(other)``); ``branch_logits(x, b, include_other=True)`` appends branch b's other logit.
    Linear experts keep ``linear`` (leaves) and add ``other_linear = nn.Linear(dim, n_level1)``;
    MLP experts add ``w_other [b, hidden]`` and ``b_other [b]`` fed by each expert's hidden layer.

    Args:
        dim: the feature size.
        taxonomy: gives the branches and their sizes (only sizes are stored; a checkpoint checks the rest).
        hidden: None for linear experts, else the hidden width of every expert.
        dropout: dropout probability.
        activation: ``"gelu"`` or ``"relu"`` (MLP only).
        other: give every expert an "other" class (see above).
    """

    kind = "experts"

    def __init__(
        self,
        dim: int,
        taxonomy: Taxonomy,
        hidden: int | None = None,
        dropout: float = 0.0,
        activation: str = "gelu",
        other: bool = False,
    ):
        super().__init__()
        _check_head_args(dim, taxonomy.n_leaves, hidden, dropout, activation)
        self.dim, self.hidden, self.dropout, self.activation = dim, hidden, dropout, activation
        self.other = bool(other)
        self.n_branches, self.n_leaves = taxonomy.n_level1, taxonomy.n_leaves
        self.branch_start: list[int] = [int(s) for s in taxonomy.branch_start]
        self.branch_sizes: list[int] = [int(s) for s in taxonomy.branch_sizes]
        self.max_size = max(self.branch_sizes)
        # Index buffers (not saved: they follow from the taxonomy, which the checkpoint checks).
        self.register_buffer("leaf_branch", torch.tensor(taxonomy.leaf_level1), persistent=False)
        self.register_buffer("leaf_local", torch.tensor(taxonomy.leaf_local), persistent=False)
        self.register_buffer("starts", torch.tensor(taxonomy.branch_start[:-1]), persistent=False)
        self.register_buffer("sizes", torch.tensor(taxonomy.branch_sizes), persistent=False)
        self.norm = Standardize(dim)
        self.drop = nn.Dropout(dropout)
        self._act = ACTIVATIONS[activation]
        # Column segments of [leaf logits | other logits]: leaf columns by branch, then one other column per branch.
        self.register_buffer(
            "other_segment", torch.cat([self.leaf_branch, torch.arange(self.n_branches)]), persistent=False
        )
        if hidden is None:
            self.linear = nn.Linear(dim, self.n_leaves)
            if self.other:
                self.other_linear = nn.Linear(dim, self.n_branches)
        else:
            b, h, m = self.n_branches, hidden, self.max_size
            # Same init as nn.Linear, per expert; output padding starts (and stays, by weight decay) at 0.
            self.w1 = nn.Parameter(torch.empty(b, dim, h).uniform_(-(dim**-0.5), dim**-0.5))
            self.b1 = nn.Parameter(torch.empty(b, h).uniform_(-(dim**-0.5), dim**-0.5))
            pad = torch.arange(m).unsqueeze(0) < self.sizes.unsqueeze(1)  # [b, m] real output columns
            self.w2 = nn.Parameter(torch.empty(b, h, m).uniform_(-(h**-0.5), h**-0.5) * pad.unsqueeze(1))
            self.b2 = nn.Parameter(torch.empty(b, m).uniform_(-(h**-0.5), h**-0.5) * pad)
            if self.other:
                self.w_other = nn.Parameter(torch.empty(b, h).uniform_(-(h**-0.5), h**-0.5))
                self.b_other = nn.Parameter(torch.empty(b).uniform_(-(h**-0.5), h**-0.5))

    # ------------------------------------------------------------------ inference
    def forward(self, x: Tensor, branch: Tensor | None = None) -> Tensor:
        """Every expert's logits on every sample, ``[N, n_leaves]`` in leaf order; with ``branch`` (one per
        sample), each sample's own expert only (:meth:`routed_logits`, training)."""
        if branch is not None:
            return self.routed_logits(x, branch)
        return self.all_logits(x)[0]

    def all_logits(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Every expert's leaf logits ``[N, n_leaves]`` and other logits ``[N, n_level1]`` (None without other)."""
        x = self.norm(x)
        if self.hidden is None:
            x = self.drop(x)
            return self.linear(x), (self.other_linear(x) if self.other else None)
        h = self.drop(self._act(torch.einsum("nd,bdh->bnh", x, self.w1) + self.b1.unsqueeze(1)))  # [b, N, h]
        out = torch.baddbmm(self.b2.unsqueeze(1), h, self.w2)  # [b, N, max_size]
        flat_col = self.leaf_branch * self.max_size + self.leaf_local
        leaves = out.permute(1, 0, 2).reshape(x.shape[0], -1)[:, flat_col]
        if not self.other:
            return leaves, None
        return leaves, torch.einsum("bnh,bh->nb", h, self.w_other) + self.b_other

    def other_logits(self, x: Tensor) -> Tensor:
        """Every expert's "other" logit, ``[N, n_level1]`` (experts built with ``other=True`` only)."""
        self._need_other()
        return self.all_logits(x)[1]

    def log_probs(self, x: Tensor) -> Tensor:
        """``log P_b(leaf)`` for every leaf, ``[N, n_leaves]``, each expert normalised over its own classes.

        Without other each segment's probabilities sum to 1 (``log P(leaf | its branch)``); with other
        they sum to ``1 - P_b(other)`` (see :meth:`log_probs_with_other`).
        """
        return self.log_probs_with_other(x)[0]

    def log_probs_with_other(self, x: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor | None]:
        """``(log P_b(leaf) [N, n_leaves], log P_b(other) [N, n_level1])``: each expert's log-softmax over
        its leaves and its other logit (the second is None without other), logits divided by ``temperature``."""
        leaves, other = self.all_logits(x)
        if other is None:
            return _segment_log_softmax(leaves / temperature, self.leaf_branch, self.n_branches), None
        both = _segment_log_softmax(torch.cat([leaves, other], 1) / temperature, self.other_segment, self.n_branches)
        return both[:, : self.n_leaves], both[:, self.n_leaves :]

    def branch_logits(self, x: Tensor, branch: int, include_other: bool = False) -> Tensor:
        """One expert's logits, ``[N, size_b]`` in branch-local order (the other experts are not run).

        With ``include_other`` (experts built with ``other=True``), its other logit is appended as the
        last column: ``[N, size_b + 1]``.
        """
        if not 0 <= branch < self.n_branches:
            raise IndexError(f"branch {branch} is out of range: there are {self.n_branches} branches")
        if include_other:
            self._need_other()
        start, size = self.branch_start[branch], self.branch_sizes[branch]
        x = self.norm(x)
        if self.hidden is None:
            x = self.drop(x)
            out = F.linear(x, self.linear.weight[start : start + size], self.linear.bias[start : start + size])
            if not include_other:
                return out
            one = slice(branch, branch + 1)
            other = F.linear(x, self.other_linear.weight[one], self.other_linear.bias[one])
            return torch.cat([out, other], 1)
        h = self.drop(self._act(x @ self.w1[branch] + self.b1[branch]))
        out = h @ self.w2[branch, :, :size] + self.b2[branch, :size]
        if not include_other:
            return out
        return torch.cat([out, (h @ self.w_other[branch] + self.b_other[branch]).unsqueeze(1)], 1)

    def _need_other(self) -> None:
        if not self.other:
            raise ValueError("these experts have no 'other' class; build them with other=True")

    # ------------------------------------------------------------------ training
    def routed_logits(self, x: Tensor, branch: Tensor) -> Tensor:
        """For each sample, the logits of the expert of ``branch[i]`` only.

        Returns:
            ``[N, max_branch_size]`` in branch-local order; columns past a sample's branch size are ``-inf``.
        """
        local = torch.arange(self.max_size, device=x.device)
        real = local.unsqueeze(0) < self.sizes[branch].unsqueeze(1)
        x = self.norm(x)
        out = self._grouped_linear(x, branch) if self.hidden is None else self._grouped_mlp(x, branch)
        return out.masked_fill(~real, -math.inf)

    def _grouped_linear(self, x: Tensor, branch: Tensor) -> Tensor:
        """Run each sample through its own branch's rows of the packed linear layer only.

        Sorting the batch by branch and running one matmul per branch present costs each sample
        its branch's size in columns instead of all ``n_leaves`` (~190 instead of 5,270 on
        Cdiscount). The weight is cut with ``split``, whose backward writes each branch's
        gradient into one buffer; slicing it per branch would add a full-size gradient per branch
        (5x slower on CPU). A padded ``bmm`` over gathered weights (the MLP path) measured 4x slower.
        """
        counts = torch.bincount(branch, minlength=self.n_branches).tolist()
        grouped = len(branch) < 2 or bool((branch[1:] >= branch[:-1]).all())  # e.g. a full batch sorted once
        order = None if grouped else torch.argsort(branch, stable=True)
        xs = (self.drop(x) if grouped else self.drop(x)[order]).split(counts)
        weights = self.linear.weight.split(self.branch_sizes)
        biases = self.linear.bias.split(self.branch_sizes)
        parts = [
            F.pad(F.linear(xs[b], weights[b], biases[b]), (0, self.max_size - self.branch_sizes[b]))
            for b in range(self.n_branches)
            if counts[b]
        ]
        if not parts:
            return x.new_empty((len(branch), self.max_size))
        if order is None:
            return torch.cat(parts)
        out = x.new_empty((len(branch), self.max_size))
        out[order] = torch.cat(parts)
        return out

    def _grouped_mlp(self, x: Tensor, branch: Tensor) -> Tensor:
        """Run each sample through its own branch's MLP: group by branch, pad, two bmm calls."""
        order = torch.argsort(branch, stable=True)
        sorted_branch = branch[order]
        counts = torch.bincount(branch, minlength=self.n_branches)
        group_start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(branch), device=x.device) - group_start[sorted_branch]
        # Only the branches present in the batch are computed.
        present = torch.nonzero(counts, as_tuple=True)[0]
        slot = torch.empty_like(counts).index_put_((present,), torch.arange(len(present), device=x.device))
        block = x.new_zeros((len(present), int(counts.max()), self.dim))
        block[slot[sorted_branch], rank] = x[order]
        h = self._act(torch.baddbmm(self.b1[present].unsqueeze(1), block, self.w1[present]))
        out = torch.baddbmm(self.b2[present].unsqueeze(1), self.drop(h), self.w2[present])
        result = torch.empty((len(branch), self.max_size), dtype=out.dtype, device=x.device)
        result[order] = out[slot[sorted_branch], rank]
        return result

    # ------------------------------------------------------------------ per-branch parameters
    def branch_parameters(self, branch: int) -> dict[str, tuple[Tensor, tuple[slice | int, ...]]]:
        """Each parameter tensor and the index of branch ``branch``'s part of it."""
        if self.hidden is None:
            rows = slice(self.branch_start[branch], self.branch_start[branch] + self.branch_sizes[branch])
            out = {"linear.weight": (self.linear.weight, (rows,)), "linear.bias": (self.linear.bias, (rows,))}
            if self.other:
                out |= {f"other_linear.{n}": (getattr(self.other_linear, n), (branch,)) for n in ("weight", "bias")}
            return out
        names = ("w1", "b1", "w2", "b2") + (("w_other", "b_other") if self.other else ())
        return {name: (getattr(self, name), (branch,)) for name in names}

    @torch.no_grad()
    def copy_branch_(self, source: ExpertHeads, branch: int) -> None:
        """Copy one expert's weights from ``source`` (same shapes) into this module, in place."""
        if source.config() != self.config() or source.branch_sizes != self.branch_sizes:
            raise ValueError("copy_branch_ needs two ExpertHeads with the same config and taxonomy")
        theirs = source.branch_parameters(branch)
        for name, (mine, index) in self.branch_parameters(branch).items():
            mine[index] = theirs[name][0][index]

    def config(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this head (with the taxonomy)."""
        return {
            "kind": self.kind,
            "dim": self.dim,
            "n_classes": self.n_leaves,
            "hidden": self.hidden,
            "dropout": self.dropout,
            "activation": self.activation,
            "other": self.other,
        }


def build_head(config: dict[str, Any], taxonomy: Taxonomy) -> nn.Module:
    """Rebuild a head from its :meth:`config` (what checkpoints store).

    Raises:
        ValueError: unknown kind, or the class count does not fit the taxonomy.
    """
    kind = config.get("kind")
    if "top" in config:  # a CNN top on trunk maps (hierclass.models.tops)
        from hierclass.models.tops import build_top

        if int(config.get("n_classes", -1)) != (taxonomy.n_level1 if kind == "router" else taxonomy.n_leaves):
            raise ValueError(f"the {kind} top has {config.get('n_classes')} classes; the taxonomy differs")
        return build_top(config, taxonomy)
    common = {"hidden": config.get("hidden"), "dropout": float(config.get("dropout", 0.0))}
    common["activation"] = config.get("activation", "gelu")
    n = {"router": taxonomy.n_level1, "flat": taxonomy.n_leaves, "experts": taxonomy.n_leaves}.get(str(kind))
    if n is None:
        raise ValueError(f"unknown head kind {kind!r}; expected router, experts or flat")
    if int(config.get("n_classes", -1)) != n:
        raise ValueError(f"the {kind} head has {config.get('n_classes')} classes; the taxonomy gives {n}")
    dim = int(config["dim"])
    if kind == "router":
        return RouterHead(dim, n, **common)
    if kind == "flat":
        return FlatHead(dim, n, **common)
    return ExpertHeads(dim, taxonomy, **common, other=bool(config.get("other", False)))  # old checkpoints: no other
