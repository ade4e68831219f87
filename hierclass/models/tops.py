"""CNN tops: the router, the experts and the flat model as the upper stages of the backbone.

On a feature store of trunk maps (``extract-features --top-stages N``) every model owns the
backbone's last N stages, its final conv / norm and pooling (:func:`hierclass.models.trunk.split_model`),
then a linear classifier:

* :class:`TopHead` (router over the level-1 branches, flat over every leaf): one top.
* :class:`ExpertTops`: one top per branch with more than one leaf, each with a classifier over
  its branch's leaves, as in HD-CNN (per-group copies of the upper layers, each initialised from
  the pretrained network, or from the trained flat top with :meth:`ExpertTops.init_from_flat_`).
  A batch runs each branch's samples once through that branch's top (:meth:`ExpertTops.routed_logits`).

Inputs are the flattened maps ``[N, C*H*W]`` the store holds (float16 on disk); the models
reshape them. They follow the interface of the pooled heads (:mod:`hierclass.models.heads`):
``forward``, ``config()``, and for experts ``branch_logits``, ``routed_logits``, ``log_probs``,
so training (:mod:`hierclass.engine`) and inference (:mod:`hierclass.inference`) use both alike.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from hierclass.config import BN_MODES
from hierclass.models.heads import _segment_log_softmax
from hierclass.taxonomy import Taxonomy


def make_top(backbone: str, pretrained: str, top_stages: int) -> nn.Module:
    """The top of ``backbone`` cut before its last ``top_stages`` stages, with weights from ``pretrained``."""
    from hierclass.models.backbone import create_backbone
    from hierclass.models.trunk import split_model

    return split_model(create_backbone(backbone, pretrained), top_stages)[1]


class _Tops(nn.Module):
    """What both top models share: the map shape, dropout, batch-norm mode and parameter groups."""

    kind: str

    def __init__(self, spec: dict[str, Any], dropout: float, bn: str) -> None:
        super().__init__()
        if bn not in BN_MODES:
            raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.spec = {k: spec[k] for k in ("backbone", "top_stages", "map_shape", "num_features")}
        self.map_shape = tuple(int(d) for d in spec["map_shape"])
        self.dim = math.prod(self.map_shape)
        self.num_features = int(spec["num_features"])
        self.dropout, self.bn = float(dropout), bn
        self.hidden = None  # the pooled heads' attribute: tops have no hidden layer
        self.other = False
        self.drop = nn.Dropout(dropout)

    def maps(self, x: Tensor) -> Tensor:
        """Flattened store rows ``[N, C*H*W]`` as maps ``[N, C, H, W]``, channels-last (faster convs on CPU)."""
        return x.reshape(-1, *self.map_shape).contiguous(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> _Tops:
        """As ``nn.Module.train``; with ``bn="frozen"`` the batch norms keep their running statistics."""
        super().train(mode)
        if mode and self.bn == "frozen":
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def pretrained_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters that come from the backbone (trained with a lower learning rate)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this model (with the taxonomy)."""
        return {
            "kind": self.kind,
            "dim": self.dim,
            "n_classes": self.n_classes,
            "dropout": self.dropout,
            "bn": self.bn,
            "top": dict(self.spec),
        }

    n_classes: int


class TopHead(_Tops):
    """A router or flat model: one top, then a linear classifier over ``n_classes``.

    Args:
        kind: ``"router"`` or ``"flat"``.
        n_classes: level-1 branches (router) or leaves (flat).
        spec: backbone, top_stages, map_shape ``[C, H, W]`` and num_features of the top.
        top: the top module (:func:`make_top`); built from ``spec`` with random weights when None.
        dropout: before the classifier.
        bn: ``"train"`` or ``"frozen"`` batch-norm statistics while training.
    """

    def __init__(
        self,
        kind: str,
        n_classes: int,
        spec: dict[str, Any],
        top: nn.Module | None = None,
        dropout: float = 0.0,
        bn: str = "train",
    ) -> None:
        super().__init__(spec, dropout, bn)
        if kind not in ("router", "flat"):
            raise ValueError(f"kind must be router or flat, got {kind!r}")
        self.kind, self.n_classes = kind, int(n_classes)
        self.top = top if top is not None else make_top(spec["backbone"], "none", int(spec["top_stages"]))
        self.classifier = nn.Linear(self.num_features, self.n_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, n_classes]`` of flattened maps ``[N, C*H*W]``."""
        return self.classifier(self.drop(self.top(self.maps(x))))

    def pretrained_parameters(self) -> Iterator[nn.Parameter]:
        return self.top.parameters()


class ExpertTops(_Tops):
    """One top and classifier per branch with more than one leaf (a single-leaf branch needs none).

    ``forward(x)`` gives ``[N, n_leaves]`` logits in leaf order, branch ``b``'s expert filling its
    segment (a single-leaf branch's column is 0); :meth:`branch_logits` runs one expert;
    :meth:`routed_logits` runs each sample through its given branch's expert only.

    Args:
        taxonomy: the branches and their sizes.
        spec: as for :class:`TopHead`.
        top: the top every expert starts from (copied per expert, :func:`make_top`); random weights when None.
        dropout, bn: as for :class:`TopHead`.
    """

    kind = "experts"

    def __init__(
        self,
        taxonomy: Taxonomy,
        spec: dict[str, Any],
        top: nn.Module | None = None,
        dropout: float = 0.0,
        bn: str = "train",
    ) -> None:
        super().__init__(spec, dropout, bn)
        self.n_branches, self.n_leaves = taxonomy.n_level1, taxonomy.n_leaves
        self.n_classes = self.n_leaves
        self.branch_start: list[int] = [int(s) for s in taxonomy.branch_start]
        self.branch_sizes: list[int] = [int(s) for s in taxonomy.branch_sizes]
        self.max_size = max(self.branch_sizes)
        self.register_buffer("leaf_branch", torch.tensor(taxonomy.leaf_level1), persistent=False)
        self.register_buffer("leaf_local", torch.tensor(taxonomy.leaf_local), persistent=False)
        self.register_buffer("sizes", torch.tensor(taxonomy.branch_sizes), persistent=False)
        learn = [b for b in range(self.n_branches) if self.branch_sizes[b] > 1]
        if learn:
            template = top if top is not None else make_top(spec["backbone"], "none", int(spec["top_stages"]))
            self.tops = nn.ModuleDict({str(b): copy.deepcopy(template) for b in learn})
        else:
            self.tops = nn.ModuleDict()
        self.classifiers = nn.ModuleDict({str(b): nn.Linear(self.num_features, self.branch_sizes[b]) for b in learn})

    def branch_logits(self, x: Tensor, branch: int, include_other: bool = False) -> Tensor:
        """One expert's logits ``[N, size_b]`` in branch-local order (a single-leaf branch: zeros ``[N, 1]``)."""
        if include_other:
            raise ValueError("expert tops have no 'other' class")
        if not 0 <= branch < self.n_branches:
            raise IndexError(f"branch {branch} is out of range: there are {self.n_branches} branches")
        key = str(branch)
        if key not in self.tops:
            return x.new_zeros((x.shape[0], 1), dtype=torch.float32)
        return self.classifiers[key](self.drop(self.tops[key](self.maps(x))))

    def forward(self, x: Tensor, branch: Tensor | None = None) -> Tensor:
        """Every expert's logits on every sample, ``[N, n_leaves]`` in leaf order; with ``branch`` (one per
        sample), each sample's own expert only (:meth:`routed_logits`, training)."""
        if branch is not None:
            return self.routed_logits(x, branch)
        parts = [self.branch_logits(x, b) for b in range(self.n_branches)]
        return torch.cat(parts, 1)

    def routed_logits(self, x: Tensor, branch: Tensor) -> Tensor:
        """For each sample, the logits of the expert of ``branch[i]`` only: ``[N, max_size]``, ``-inf`` padded.

        The samples of each branch present go through that branch's top once.
        """
        out = torch.full((x.shape[0], self.max_size), -math.inf, dtype=torch.float32, device=x.device)
        for b in torch.unique(branch).tolist():
            rows = torch.nonzero(branch == b, as_tuple=True)[0]
            out = out.index_put(
                (rows[:, None], torch.arange(self.branch_sizes[b], device=x.device)[None]),
                self.branch_logits(x[rows], b).float(),
            )
        return out

    def log_probs(self, x: Tensor) -> Tensor:
        """``log P(leaf | its branch)`` for every leaf, ``[N, n_leaves]``."""
        return _segment_log_softmax(self.forward(x), self.leaf_branch, self.n_branches)

    def log_probs_with_other(self, x: Tensor, temperature: float = 1.0) -> tuple[Tensor, None]:
        """As the pooled experts' (no other class: the second is None)."""
        return _segment_log_softmax(self.forward(x) / temperature, self.leaf_branch, self.n_branches), None

    def pretrained_parameters(self) -> Iterator[nn.Parameter]:
        return self.tops.parameters()

    @torch.no_grad()
    def init_from_flat_(self, flat: TopHead) -> None:
        """Start every expert from a trained flat top: its top's weights and its classifier's rows of the branch."""
        if flat.spec != self.spec or flat.n_classes != self.n_leaves:
            raise ValueError("the flat top was trained on other maps or another taxonomy than these experts")
        for key, top in self.tops.items():
            b = int(key)
            top.load_state_dict(flat.top.state_dict())
            rows = slice(self.branch_start[b], self.branch_start[b] + self.branch_sizes[b])
            self.classifiers[key].weight.copy_(flat.classifier.weight[rows])
            self.classifiers[key].bias.copy_(flat.classifier.bias[rows])

    @torch.no_grad()
    def copy_branch_(self, source: ExpertTops, branch: int) -> None:
        """Copy one expert's top and classifier from ``source`` (same config and taxonomy), in place."""
        if source.config() != self.config() or source.branch_sizes != self.branch_sizes:
            raise ValueError("copy_branch_ needs two ExpertTops with the same config and taxonomy")
        key = str(branch)
        if key in self.tops:
            self.tops[key].load_state_dict(source.tops[key].state_dict())
            self.classifiers[key].load_state_dict(source.classifiers[key].state_dict())


def build_top_model(
    kind: str, taxonomy: Taxonomy, spec: dict[str, Any], pretrained: str | None, dropout: float = 0.0, bn: str = "train"
) -> _Tops:
    """A top model for ``kind``, its tops starting from ``pretrained`` weights (None: random, to load a checkpoint)."""
    top = make_top(spec["backbone"], pretrained, int(spec["top_stages"])) if pretrained is not None else None
    if kind == "experts":
        return ExpertTops(taxonomy, spec, top, dropout, bn)
    n = taxonomy.n_level1 if kind == "router" else taxonomy.n_leaves
    return TopHead(kind, n, spec, top, dropout, bn)


def build_top(config: dict[str, Any], taxonomy: Taxonomy) -> _Tops:
    """Rebuild a top model from its :meth:`config` (random weights, for a checkpoint to load)."""
    return build_top_model(
        str(config["kind"]), taxonomy, config["top"], None, float(config.get("dropout", 0.0)), config.get("bn", "train")
    )
