"""A whole CNN fine-tuned from images: a timm backbone (pooled features) followed by a head.

:class:`ImageClassifier` is ``head(backbone(x))``, where the head is the same router, experts
or flat head that trains on cached pooled features (:mod:`hierclass.models.heads`), fed the
backbone's pooled vector instead of a stored one. So the engine trains it through the same
:class:`~hierclass.engine.Task` (``model(x)``, and ``model(x, branch)`` for experts), and a
trained model splits back into the two halves the rest of hierclass already reads: the
backbone's weights (a timm state dict, loadable with ``--pretrained``) and a head checkpoint
on the features that backbone gives. Prediction then extracts those features with the
fine-tuned backbone and applies the head, exactly as for a frozen backbone.

What trains: the whole backbone, or only its last ``trainable_stages`` stages (the stem and
lower stages frozen, their batch norms in eval mode too), and, during the frozen warm-up
(:meth:`ImageClassifier.freeze_backbone`), the head alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

from hierclass.config import BN_MODES


class ImageClassifier(nn.Module):
    """``head(backbone(images))``, with part of the backbone frozen on demand.

    Args:
        backbone: a timm model built with ``num_classes=0`` (pooled features).
        head: a RouterHead, FlatHead or ExpertHeads as wide as the backbone's pooled output.
        trainable_stages: None to train the whole backbone, N to train its last N stages only
            (plus its final conv / norm), the rest frozen.
        bn: ``"train"`` or ``"frozen"`` (every batch norm keeps its running statistics).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, trainable_stages: int | None = None, bn: str = "train"):
        super().__init__()
        if bn not in BN_MODES:
            raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
        self.backbone, self.head, self.bn = backbone, head, bn
        self.frozen_modules = _frozen_part(backbone, trainable_stages)
        self.trainable_stages = trainable_stages
        self.backbone_frozen = False
        self._apply_freezing()

    def forward(self, x: Tensor, branch: Tensor | None = None) -> Tensor:
        """Logits of images ``[N, 3, H, W]`` (normalised); experts with ``branch``: each sample's own expert."""
        features = self.backbone(x).float()
        return self.head(features) if branch is None else self.head(features, branch)

    def freeze_backbone(self, frozen: bool) -> None:
        """Freeze the whole backbone (the warm-up: the head trains alone) or unfreeze its trainable part."""
        self.backbone_frozen = frozen
        self._apply_freezing()
        self.train(self.training)

    def _apply_freezing(self) -> None:
        frozen = {id(p) for m in self.frozen_modules for p in m.parameters()}
        for p in self.backbone.parameters():
            p.requires_grad_(not self.backbone_frozen and id(p) not in frozen)

    def train(self, mode: bool = True) -> ImageClassifier:
        """As ``nn.Module.train``; frozen parts (and, with ``bn="frozen"``, every batch norm) stay in eval mode."""
        super().train(mode)
        if mode:
            parts = [self.backbone] if self.backbone_frozen else self.frozen_modules
            for module in parts:
                module.eval()
            if self.bn == "frozen":
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def pretrained_parameters(self) -> Iterator[nn.Parameter]:
        """The backbone's parameters (trained at ``top_lr_ratio`` of the learning rate)."""
        return self.backbone.parameters()

    def config(self) -> dict[str, Any]:
        """The head's config (what its checkpoint stores; the backbone is saved apart)."""
        return self.head.config()


def _frozen_part(backbone: nn.Module, trainable_stages: int | None) -> list[nn.Module]:
    """The modules of ``backbone`` below its last ``trainable_stages`` stages: its stem and lower stages."""
    if trainable_stages is None:
        return []
    from hierclass.models.trunk import _stem, check_cut

    names = check_cut(backbone, trainable_stages)
    lower = names[: len(names) - trainable_stages]
    return [backbone.get_submodule(n) for n in _stem(backbone, names[0]) + lower]
