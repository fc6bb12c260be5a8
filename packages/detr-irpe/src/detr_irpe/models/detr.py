"""The DETR detector: backbone, transformer, class and box heads."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from detr_irpe.models.backbone import Joiner, feature_map_size
from detr_irpe.models.transformer import Transformer
from detr_irpe.nested_tensor import NestedTensor, nested_tensor_from_tensor_list

__all__ = ["DETR", "MLP"]


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (keys ``layers.{0..num_layers-1}``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        hidden = [hidden_dim] * (num_layers - 1)
        self.num_layers = num_layers
        self.layers = nn.ModuleList(
            nn.Linear(n_in, n_out)
            for n_in, n_out in zip([input_dim, *hidden], [*hidden, output_dim], strict=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(..., input_dim)`` -> ``(..., output_dim)``."""
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < self.num_layers - 1:
                x = F.relu(x)
        return x


class DETR(nn.Module):
    """DEtection TRansformer.

    Args:
        backbone: :class:`Joiner` of the ResNet and the position encoding.
        transformer: the encoder-decoder.
        num_classes: number of real classes (the class head has ``num_classes + 1`` outputs,
            the last one being "no object").
        num_queries: detection slots per image.
        aux_loss: also return the predictions of every decoder layer but the last.
    """

    def __init__(
        self,
        backbone: Joiner,
        transformer: Transformer,
        num_classes: int,
        num_queries: int,
        aux_loss: bool = False,
    ) -> None:
        super().__init__()
        self.num_queries = num_queries
        # Registration order is the original's state-dict order: transformer, heads,
        # queries, input projection, backbone.
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss
        self.num_classes = num_classes

    def feature_map_size(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` of the feature map (the grid iRPE sees) for a padded ``height x width``
        batch."""
        return feature_map_size(height, width, dilation=self.backbone[0].dilation)

    def forward(self, samples: NestedTensor | Tensor | Sequence[Tensor]) -> dict:
        """
        Args:
            samples: a :class:`NestedTensor` (``tensors (N, 3, Hp, Wp)``, ``mask (N, Hp, Wp)``
                True on padding), or a list of ``(3, H, W)`` images / an ``(N, 3, H, W)`` tensor,
                which is padded the same way.

        Returns:
            dict with
            ``pred_logits (N, num_queries, num_classes + 1)``: class logits, last = no object;
            ``pred_boxes (N, num_queries, 4)``: sigmoid-normalised ``(cx, cy, w, h)`` relative
            to each unpadded image;
            ``aux_outputs`` (only with ``aux_loss``): list of ``dec_layers - 1`` dicts with the
            same two keys for decoder layers ``0 .. dec_layers - 2``.
        """
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(samples)
        features, pos = self.backbone(samples)
        src, mask = features[-1].decompose()
        hs = self.transformer(self.input_proj(src), mask, self.query_embed.weight, pos[-1])[0]
        outputs_class = self.class_embed(hs)
        outputs_coord = self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": logits, "pred_boxes": boxes}
                for logits, boxes in zip(outputs_class[:-1], outputs_coord[:-1], strict=True)
            ]
        return out
