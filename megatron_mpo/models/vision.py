"""InternViT on a megatron-core TransformerBlock, pixel shuffle, and the mlp1 projector.

The vision side is never pipeline-split: it lives whole on the first pipeline stage and is
tensor-parallel over the same TP group as the LLM (its config has PP size 1).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mpo.models.drop_path import layer_rates
from megatron_mpo.models.specs import ProjectorSubmodules

__all__ = ["InternViTModel", "InternVLProjector", "pixel_shuffle", "interpolate_pos_embed"]


def interpolate_pos_embed(pos: Tensor, grid: int) -> Tensor:
    """Class + patch position embeddings ``[1 + g0*g0, C]`` resized (bicubic) to ``grid``.

    Same arithmetic as transformers' ``InternVLVisionEmbeddings.interpolate_pos_encoding``
    (and the original InternViT ``_get_pos_embed``); identity when the grids agree.
    """
    old = int(round((pos.shape[0] - 1) ** 0.5))
    if old == grid:
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    patch_pos = patch_pos.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)
    return torch.cat([cls_pos, patch_pos], dim=0)


def pixel_shuffle(features: Tensor, scale_factor: float = 0.5) -> Tensor:
    """``[T, N, C]`` patch features -> ``[T, N*s^2, C/s^2]`` (InternVL ``ps_version`` v2).

    Step for step the same views and permutes as InternVL / transformers, so the channel
    order of the merged tokens -- which the projector's weights depend on -- is identical.
    """
    tiles, tokens, channels = features.shape
    side = int(round(tokens**0.5))
    x = features.reshape(tiles, side, side, channels)
    n, w, h, c = x.shape
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    x = x.permute(0, 2, 1, 3).contiguous()
    return x.reshape(n, -1, x.shape[-1])


class InternViTModel(MegatronModule):
    """Patch conv + class token + (interpolated) position embedding, then InternViT layers.

    Returns the last layer's patch features ``[T, N, C]`` with the class token dropped;
    there is no final norm (InternVL uses ``use_mean_pooling`` = identity).
    ``drop_path_rate``: stochastic depth in training (:mod:`~megatron_mpo.models.drop_path`);
    each tile is a sample.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_spec: ModuleSpec,
        image_size: int,
        patch_size: int,
        num_positions: int,
        pg_collection=None,
        drop_path_rate: float = 0.0,
    ):
        super().__init__(config=config)
        hidden = config.hidden_size
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.conv1 = torch.nn.Conv2d(
            3, hidden, kernel_size=patch_size, stride=patch_size, bias=True, dtype=config.params_dtype
        )
        self.class_token = torch.nn.Parameter(torch.zeros(1, 1, hidden, dtype=config.params_dtype))
        self.position_embeddings = torch.nn.Embedding(num_positions, hidden, dtype=config.params_dtype)
        if config.perform_initialization:
            torch.nn.init.normal_(self.class_token, std=config.init_method_std)
        self.decoder = TransformerBlock(
            config=config, spec=layer_spec, pre_process=True, post_process=False, pg_collection=pg_collection
        )
        # InternVL's stochastic depth: 0 for the first layer up to drop_path_rate for the last.
        for layer, rate in zip(self.decoder.layers, layer_rates(drop_path_rate, len(self.decoder.layers))):
            layer.drop_path_rate = rate

    def set_input_tensor(self, input_tensor: Optional[Tensor]) -> None:
        self.decoder.set_input_tensor(input_tensor)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """``[T, 3, H, W]`` tiles -> ``[T, (H/p)*(W/p), C]`` patch features."""
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype))  # [T, C, g, g]
        grid = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)  # [T, g*g, C]
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + interpolate_pos_embed(self.position_embeddings.weight, grid).unsqueeze(0)
        x = x.transpose(0, 1).contiguous()  # [S, T, C]: megatron-core is sequence-first
        x = self.decoder(hidden_states=x, attention_mask=None)
        return x[1:].transpose(0, 1).contiguous()


class InternVLProjector(MegatronModule):
    """mlp1: LayerNorm(4C) -> Linear(4C, H) -> GELU -> Linear(H, H), tensor-parallel."""

    def __init__(
        self, config: TransformerConfig, submodules: ProjectorSubmodules, input_size: int, eps: float, tp_group=None
    ):
        super().__init__(config=config)
        self.layer_norm = build_module(submodules.layer_norm, config=config, hidden_size=input_size, eps=eps)
        self.encoder = MLP(
            config=config, submodules=submodules.mlp, input_size=input_size,
            ffn_hidden_size=config.ffn_hidden_size, tp_group=tp_group,
        )

    def forward(self, features: Tensor) -> Tensor:
        out, bias = self.encoder(self.layer_norm(features))
        return out if bias is None else out + bias
