"""The MLP tensors of one LLM layer: dense (SwiGLU) or mixture of experts (Qwen3-MoE).

Hugging Face (``h`` = ``model.language_model.layers.N.``)     megatron (``m`` = ``...decoder.layers.N.``)
  dense: mlp.{gate,up,down}_proj.weight (Phi-3: gate_up_proj)  mlp.linear_fc1.weight [gate; up], mlp.linear_fc2.weight
  experts: mlp.gate.weight [E, H]                               mlp.router.weight
    module names (transformers >= 5, experts as 3-D tensors):
      mlp.experts.gate_up_proj [E, 2I, H]                       mlp.experts.local_experts.e.linear_fc1.weight [gate; up]
      mlp.experts.down_proj [E, H, I]                           mlp.experts.local_experts.e.linear_fc2.weight
    checkpoint names (what ``save_pretrained`` writes and the Hub holds, one per expert):
      mlp.experts.e.{gate,up,down}_proj.weight

Either Hugging Face naming is read; :func:`mlp_to_hf` writes the module names for
``layout="module"`` and the per-expert names for ``layout="checkpoint"``. Expert ``e`` here
is the global index: megatron-core's distributed checkpoint shards the experts over the
expert-parallel ranks (``SequentialMLP.sharded_state_dict``), so these full, single-process
names load at any expert / tensor / pipeline layout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_mpo.errors import UserError

__all__ = ["mlp_to_megatron", "mlp_to_hf", "split_fused_experts"]

_LOCAL = "mlp.experts.local_experts."


def _dense_to_megatron(src, out: dict, h: str, m: str, fused: bool) -> None:
    if fused:
        out[m + "mlp.linear_fc1.weight"] = src.pop(h + "mlp.gate_up_proj.weight")
    else:
        out[m + "mlp.linear_fc1.weight"] = torch.cat([src.pop(h + "mlp.gate_proj.weight"),
                                                      src.pop(h + "mlp.up_proj.weight")])
    out[m + "mlp.linear_fc2.weight"] = src.pop(h + "mlp.down_proj.weight")


def _experts_to_megatron(src, out: dict, h: str, m: str, num_experts: int) -> None:
    out[m + "mlp.router.weight"] = src.pop(h + "mlp.gate.weight")
    gate_up, down = src.maybe(h + "mlp.experts.gate_up_proj"), src.maybe(h + "mlp.experts.down_proj")
    if (gate_up is None) != (down is None):
        raise UserError(f"checkpoint has only one of {h}mlp.experts.gate_up_proj / down_proj")
    if gate_up is not None and (gate_up.shape[0] != num_experts or down.shape[0] != num_experts):
        raise UserError(f"{h}mlp.experts holds {gate_up.shape[0]} experts; the config says {num_experts}")
    for e in range(num_experts):
        x = f"{m}{_LOCAL}{e}."
        if gate_up is not None:
            out[x + "linear_fc1.weight"] = gate_up[e]
            out[x + "linear_fc2.weight"] = down[e]
        else:
            p = f"{h}mlp.experts.{e}."
            out[x + "linear_fc1.weight"] = torch.cat([src.pop(p + "gate_proj.weight"), src.pop(p + "up_proj.weight")])
            out[x + "linear_fc2.weight"] = src.pop(p + "down_proj.weight")


def mlp_to_megatron(src, out: dict, h: str, m: str, lang, layer: int) -> None:
    """Pop layer ``layer``'s Hugging Face MLP tensors from ``src`` into megatron names in ``out``."""
    if lang.is_moe_layer(layer):
        _experts_to_megatron(src, out, h, m, lang.num_experts)
    else:
        _dense_to_megatron(src, out, h, m, fused=lang.family == "phi3")


def _dense_to_hf(src, out: dict, h: str, m: str, fused: bool) -> None:
    fc1 = src.pop(m + "mlp.linear_fc1.weight")
    if fused:
        out[h + "mlp.gate_up_proj.weight"] = fc1
    else:
        gate, up = torch.chunk(fc1, 2, dim=0)
        out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate.clone(), up.clone()
    out[h + "mlp.down_proj.weight"] = src.pop(m + "mlp.linear_fc2.weight")


def _experts_to_hf(src, out: dict, h: str, m: str, num_experts: int, layout: str) -> None:
    out[h + "mlp.gate.weight"] = src.pop(m + "mlp.router.weight")
    fc1: list[Tensor] = []
    fc2: list[Tensor] = []
    for e in range(num_experts):
        fc1.append(src.pop(f"{m}{_LOCAL}{e}.linear_fc1.weight"))
        fc2.append(src.pop(f"{m}{_LOCAL}{e}.linear_fc2.weight"))
    if layout == "module":
        out[h + "mlp.experts.gate_up_proj"] = torch.stack(fc1)
        out[h + "mlp.experts.down_proj"] = torch.stack(fc2)
        return
    for e, (w1, w2) in enumerate(zip(fc1, fc2)):
        gate, up = torch.chunk(w1, 2, dim=0)
        p = f"{h}mlp.experts.{e}."
        out[p + "gate_proj.weight"], out[p + "up_proj.weight"] = gate.clone(), up.clone()
        out[p + "down_proj.weight"] = w2


def mlp_to_hf(src, out: dict, h: str, m: str, lang, layer: int, layout: str) -> None:
    """Pop layer ``layer``'s megatron MLP tensors from ``src`` into Hugging Face names in ``out``."""
    if lang.is_moe_layer(layer):
        _experts_to_hf(src, out, h, m, lang.num_experts, layout)
    else:
        _dense_to_hf(src, out, h, m, fused=lang.family == "phi3")


def split_fused_experts(sd: dict) -> dict:
    """Module-named 3-D expert tensors (``mlp.experts.gate_up_proj`` / ``down_proj``) -> the
    per-expert checkpoint names; every other tensor passes through (the same object)."""
    out = {}
    for key, value in sd.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            base = key[: -len("gate_up_proj")]
            for e, w in enumerate(value):
                gate, up = torch.chunk(w, 2, dim=0)
                out[f"{base}{e}.gate_proj.weight"], out[f"{base}{e}.up_proj.weight"] = gate.clone(), up.clone()
        elif key.endswith("mlp.experts.down_proj"):
            base = key[: -len("down_proj")]
            for e, w in enumerate(value):
                out[f"{base}{e}.down_proj.weight"] = w.clone()
        else:
            out[key] = value
    return out
