"""Model FLOPs of a training step and the peak FLOP/s that MFU is measured against.

The peak is the device's nominal dense tensor-core rate (bf16, or fp8 when the run uses
FP8) looked up by GPU name; an unknown device gets a measured one: a large matmul repeated
back to back after a warm-up, so launch overhead and clock ramp-up do not count. On CPU
the measured peak is the only one there is.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_mpo import platform
from megatron_mpo.data.balance import CostModel

__all__ = ["FlopCounter", "Peak", "device_peak", "nominal_peak", "measure_matmul_peak", "NOMINAL_PEAKS"]

# Dense (no sparsity) tensor-core TFLOP/s from NVIDIA's data sheets, by the exact name
# torch.cuda.get_device_name reports: (bf16, fp8 or None without FP8 units). Exact, because
# names nest ("NVIDIA L4" / "NVIDIA L40" / "NVIDIA L40S", "NVIDIA H800" / "... PCIe") and a
# part of a name would give a variant the wrong peak; a name not listed is measured.
NOMINAL_PEAKS: dict[str, tuple[float, Optional[float]]] = {
    "NVIDIA GB200": (2500.0, 5000.0),
    "NVIDIA B200": (2250.0, 4500.0),
    "NVIDIA B100": (1750.0, 3500.0),
    "NVIDIA GH200 480GB": (989.4, 1978.9),
    "NVIDIA GH200 144G HBM3e": (989.4, 1978.9),
    "NVIDIA H200": (989.4, 1978.9),
    "NVIDIA H200 NVL": (835.0, 1671.0),
    "NVIDIA H100 80GB HBM3": (989.4, 1978.9),
    "NVIDIA H100 NVL": (835.0, 1671.0),
    "NVIDIA H100 PCIe": (756.0, 1513.0),
    "NVIDIA H800": (989.4, 1978.9),
    "NVIDIA H800 80GB HBM3": (989.4, 1978.9),
    "NVIDIA H800 PCIe": (756.0, 1513.0),
    "NVIDIA H20": (148.0, 296.0),
    "NVIDIA L40S": (362.05, 733.0),
    "NVIDIA L40": (181.05, 362.0),
    "NVIDIA L4": (121.0, 242.5),
    "NVIDIA A100-SXM4-80GB": (312.0, None),
    "NVIDIA A100-SXM4-40GB": (312.0, None),
    "NVIDIA A100 80GB PCIe": (312.0, None),
    "NVIDIA A100-PCIE-40GB": (312.0, None),
    "NVIDIA A800-SXM4-80GB": (312.0, None),
    "NVIDIA A800 80GB PCIe": (312.0, None),
    "NVIDIA A10": (125.0, None),
}

# A measured peak below this is a failed measurement (a timer that did not move, a machine
# busy with other work), not a device: MFU against it would be meaningless or a division by 0.
MIN_MEASURED_PEAK = 1e9
MEASURE_TRIES = 3


@dataclass(frozen=True)
class Peak:
    """A peak FLOP/s and where it came from (printed at start-up)."""

    flops: float
    source: str

    def describe(self) -> str:
        if self.flops >= 1e12:
            return f"{self.flops / 1e12:.1f} TFLOP/s ({self.source})"
        return f"{self.flops / 1e9:.1f} GFLOP/s ({self.source})"  # a CPU: 0.0 TFLOP/s says nothing


def nominal_peak(device_name: str, fp8: bool = False) -> Optional[Peak]:
    """The data-sheet dense peak of a GPU named exactly ``device_name``, or None when unknown."""
    if device_name not in NOMINAL_PEAKS:
        return None
    bf16, fp8_peak = NOMINAL_PEAKS[device_name]
    if fp8 and fp8_peak is not None:
        return Peak(fp8_peak * 1e12, f"nominal dense fp8 peak of {device_name}")
    return Peak(bf16 * 1e12, f"nominal dense bf16 peak of {device_name}")


def device_peak(fp8: bool = False) -> Peak:
    """This process's device: nominal when the GPU is known, else measured."""
    if platform.current().is_cuda:
        found = nominal_peak(torch.cuda.get_device_name(), fp8)
        if found is not None:
            return found
        return _measured_peak(dict(size=8192), f"measured bf16 matmul on {torch.cuda.get_device_name()}")
    return _measured_peak(dict(trials=2, warmup=1), "measured fp32 matmul on this CPU")


def _measured_peak(settings: dict, source: str) -> Peak:
    """A measured peak, taken again while it is not a positive finite rate; floored at
    :data:`MIN_MEASURED_PEAK` (and said so) when every try failed."""
    flops = 0.0
    for _ in range(MEASURE_TRIES):
        flops = measure_matmul_peak(**settings)
        if math.isfinite(flops) and flops >= MIN_MEASURED_PEAK:
            return Peak(flops, source)
    return Peak(MIN_MEASURED_PEAK, f"{source} gave {flops:.3g} FLOP/s {MEASURE_TRIES} times; floored")


def measure_matmul_peak(size: int = 1024, repeats: int = 10, trials: int = 3, warmup: int = 3) -> float:
    """FLOP/s of ``repeats`` back-to-back square matmuls between two syncs (best of ``trials``).

    bf16 on a GPU, fp32 on a CPU. Timing many matmuls per sync keeps launch latency out
    of the figure; the warm-up lets clocks and kernel selection settle. 0.0 when no trial
    took measurable time (the caller measures again).
    """
    dev = platform.device()
    dtype = torch.bfloat16 if platform.current().is_cuda else torch.float32
    # Fixed operands: drawing random ones would move the training RNG streams.
    a = torch.full((size, size), 0.5, device=dev, dtype=dtype)
    b = torch.full((size, size), 0.25, device=dev, dtype=dtype)
    out = torch.empty((size, size), device=dev, dtype=dtype)
    for _ in range(warmup):
        torch.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(trials):
        platform.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b, out=out)
        platform.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed > 0:
            best = min(best, elapsed)
    return 2 * size**3 * repeats / best if math.isfinite(best) else 0.0


class FlopCounter:
    """Model FLOPs of a step, for MFU against the device's peak (:func:`device_peak`).

    The usual "model FLOPs" definition (no recomputation counted): 2 FLOPs per
    multiply-add of every weight matrix touched, plus the attention score / value
    products, times 3 for forward + backward. The LLM is counted per token position of
    the step (padding included), attention per query-key pair it computes (causal rows:
    half the scores; packed rows: within each pair), the output layer
    per scored (response) token, the only positions it runs on; the vision tower
    (patch embedding, InternViT layers with bidirectional attention over patches + class
    token) and the mlp1 projector per image tile. A mixture-of-experts LLM counts the
    parameters a token is routed through (router + top-k experts), as MoE MFU is reported. Frozen parts count what they still run:
    a frozen vision tower only its forward, a frozen projector / LLM forward plus the
    input gradients (2x) when something before them trains.
    """

    def __init__(self, model_config, frozen: Sequence[str] = (), fp8: bool = False) -> None:
        self.cfg = model_config
        self.frozen = set(frozen)
        self.fp8 = fp8
        self._peak: Optional[Peak] = None

    def _passes(self, part: str) -> int:
        """Forward + backward multiples of ``part``: 3 trained, 2 input-grads only, 1 forward only."""
        order = ("vision", "projector", "language")
        if part not in self.frozen:
            return 3
        earlier_trains = any(p not in self.frozen for p in order[: order.index(part)])
        return 2 if earlier_trains else 1

    def llm_flops_per_token(self, seq_len: int) -> float:
        """Weights plus causal attention over a row of ``seq_len`` (half the scores)."""
        return self.llm_linear_flops_per_token() + self.llm_score_flops_per_key() * seq_len / 2

    def llm_linear_flops_per_token(self) -> float:
        lang = self.cfg.language
        head_dim = lang.kv_channels
        q_width = lang.num_heads * head_dim
        attn = lang.hidden_size * (q_width + 2 * lang.num_kv_heads * head_dim) + q_width * lang.hidden_size
        mlp = sum(self._mlp_weights_per_token(i) for i in range(lang.num_layers))
        return self._passes("language") * 2 * (lang.num_layers * attn + mlp)

    def _mlp_weights_per_token(self, layer: int) -> int:
        """Multiply-adds of layer ``layer``'s MLP per token: the dense SwiGLU, or for an MoE
        layer the router plus the ``num_experts_per_tok`` experts a token is sent to (the
        active parameters, not all experts)."""
        lang = self.cfg.language
        if not lang.is_moe_layer(layer):
            return 3 * lang.hidden_size * lang.ffn_hidden_size
        experts = lang.num_experts_per_tok * 3 * lang.hidden_size * lang.moe_intermediate_size
        return lang.hidden_size * lang.num_experts + experts

    def llm_score_flops_per_key(self) -> float:
        """Q K^T and A V of one query-key pair over all layers."""
        lang = self.cfg.language
        return self._passes("language") * lang.num_layers * 2 * 2 * lang.num_heads * lang.kv_channels

    def logits_flops_per_token(self) -> float:
        lang = self.cfg.language  # the padded vocabulary is computed too
        return self._passes("language") * 2 * lang.hidden_size * lang.padded_vocab_size

    def vision_flops_per_tile(self) -> float:
        """InternViT + mlp1 FLOPs of one image tile (forward + backward as trained)."""
        vis = self.cfg.vision
        patches = vis.grid**2
        n = patches + 1  # + class token
        width = vis.num_heads * vis.head_dim  # real heads (zero-padded ones are not model FLOPs)
        embed = 2 * 3 * vis.patch_size**2 * vis.hidden_size * patches
        linear = 2 * n * (vis.hidden_size * 3 * width + width * vis.hidden_size
                          + 2 * vis.hidden_size * vis.ffn_hidden_size)
        scores = 2 * 2 * n * n * width  # Q K^T and A V, bidirectional
        tower = embed + vis.num_layers * (linear + scores)
        hidden = self.cfg.language.hidden_size
        projector = 2 * self.cfg.tokens_per_tile * (self.cfg.projector_input_size * hidden + hidden * hidden)
        return self._passes("vision") * tower + self._passes("projector") * projector

    def step_flops(self, tokens: float, seq_len: int, tiles: float = 0, scored: Optional[float] = None,
                   attended: Optional[float] = None) -> float:
        """``scored`` tokens get logits (default: all ``tokens``). ``attended``: the query-key
        pairs attention computed (:meth:`PairBatch.attended_keys`: packed rows attend within
        each pair only); default every token over a causal row of ``seq_len``."""
        scored = tokens if scored is None else scored
        if attended is None:
            llm = tokens * self.llm_flops_per_token(seq_len)
        else:
            llm = tokens * self.llm_linear_flops_per_token() + attended * self.llm_score_flops_per_key()
        return llm + scored * self.logits_flops_per_token() + tiles * self.vision_flops_per_tile()

    def pair_costs(self, packed: bool) -> CostModel:
        """These FLOP terms per pair, for balancing steps before the model runs
        (:mod:`megatron_mpo.data.balance`): a pair collated alone costs what :meth:`step_flops`
        counts for it."""
        return CostModel(position=self.llm_linear_flops_per_token(), key=self.llm_score_flops_per_key(),
                         scored=self.logits_flops_per_token(), tile=self.vision_flops_per_tile(), packed=packed)

    def peak(self) -> "Peak":
        """The FLOP/s one process counts MFU against (looked up or measured once)."""
        if self._peak is None:
            self._peak = device_peak(fp8=self.fp8)
        return self._peak

    def mfu(self, tokens: float, seconds: float, world_size: int, seq_len: int = 1024, tiles: float = 0,
            scored: Optional[float] = None, attended: Optional[float] = None) -> float:
        if seconds <= 0 or tokens <= 0:
            return 0.0
        achieved = self.step_flops(tokens, seq_len, tiles, scored, attended) / seconds
        return achieved / (self.peak().flops * world_size)
