"""Activation memory of one micro-batch on one pipeline stage: the tensors autograd keeps
from a forward until its backward, counted from the architecture and the rows.

Activation memory *is* what autograd saves for backward (plus, with recomputation, the
one layer rebuilt at a time), so the counts here follow the tensors the modules this
project builds save, term by term; ``tests/test_plan.py`` checks them against
``torch.autograd.graph.saved_tensors_hooks`` totals of real steps. Per LLM layer and token
(``b`` bytes per element, TP ``t``; norms and linear inputs split over ``t`` with sequence
parallelism): two RMSNorms keep their input and an fp32 1/rms; the qkv linear its input;
RoPE a cos and a sin for queries and keys; attention keeps the qkv output (the value is
a view of it), the rotated queries and keys, its output and an fp32 log-sum-exp per head
(fused kernels keep no ``S x S`` scores); SwiGLU keeps the fc1 output (2 x FFN) and fc2
its input. An MoE layer keeps its router's input and routing tables per token and, per
routed token copy, the permuted token, the expert's fc1 output and three FFN-wide
products (SwiGLU with the routing probability). The vision tower does the same per image
tile (LayerNorm keeps mean and rstd, layer scale its branch output, GELU its input), the
projector per image token, the first stage the token ids, the last stage the output
layer's input and the fp32 softmax over the (TP-split, padded) vocabulary per scored
token. Transformer Engine's modules keep the same tensors (its fused norm + linear keeps
the norm's input and output); under FP8 it keeps GEMM inputs in one byte, which this
count, being bf16's, overstates.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Rows", "Phases", "stage_activations"]

LOSS_BYTES_PER_ROW = 10  # per output-layer row: label, index and mask of the vocab-parallel cross entropy
LOSS_BYTES_PER_SCORED = 24  # per scored token: the scattered loss and the per-slot sums
HEAD_BYTES_PER_TOKEN = 9  # labels (int64) + the response mask (bool)
FIRST_BYTES_PER_TOKEN = 9  # token ids (int64) + the image-position mask (bool)
ROUTE_BYTES = (28, 9, 1)  # MoE per token: x top-k, x experts, + 1 (indices, probabilities, scores, maps)


@dataclass(frozen=True)
class Rows:
    """The token rows of one micro-batch of ``pairs`` pairs of one shape (the data
    pipeline's collation, :mod:`megatron_mpo.data.collate`): unpacked, two causal rows per
    pair; packed, one row per pair ``prompt | chosen | rejected`` (the prompt's last token
    repeated before each branch)."""

    pairs: int
    prompt: int  # prompt tokens, image tokens included
    response: int  # tokens of each response
    tiles: int
    packed: bool = False
    pad_multiple: int = 1
    tokens_per_tile: int = 256

    @property
    def rows(self) -> int:
        return self.pairs if self.packed else 2 * self.pairs

    @property
    def row_length(self) -> int:
        length = self.prompt + 2 * self.response + 1 if self.packed else self.prompt + self.response
        m = self.pad_multiple
        return -(-length // m) * m

    @property
    def tokens(self) -> int:
        return self.rows * self.row_length

    @property
    def scored(self) -> int:
        """Positions whose label is a response token (the output layer runs on these)."""
        return 2 * self.pairs * self.response

    @property
    def image_tokens(self) -> int:
        """<IMG_CONTEXT> positions over all rows (each unpacked row repeats the prompt)."""
        per_prompt = self.tiles * self.tokens_per_tile
        return per_prompt * (1 if self.packed else 2) * self.pairs

    @property
    def attended(self) -> int:
        """Query-key pairs attention computes (as :meth:`PairBatch.attended_keys`)."""
        if not self.packed:  # padding included: the kernel computes it
            s = self.row_length
            return self.rows * s * (s + 1) // 2
        head = self.prompt + self.response  # prompt + chosen branch, causal
        tail = self.response + 1  # the rejected branch (behind the repeated last prompt token): the prompt, itself
        pad = self.row_length - (self.prompt + 2 * self.response + 1)  # a causal segment of its own
        return self.pairs * (head * (head + 1) // 2 + tail * (self.prompt - 1) + tail * (tail + 1) // 2
                             + pad * (pad + 1) // 2)

    def scored_spans(self) -> list:
        """[start, end) positions of a row whose label is a response token."""
        p, r = self.prompt, self.response
        return [(p - 1, p - 1 + r), (p + r, p + 2 * r)] if self.packed else [(p - 1, p - 1 + r)]

    def output_rows(self, shards: int) -> tuple[int, int]:
        """(rows this rank's output layer selects, rows its softmax spans): the scored
        positions; with sequence parallelism each rank selects those in its own part of the
        sequence, padded to the fullest part's count, and the parts are gathered."""
        if shards == 1:
            return self.scored, self.scored
        part = -(-self.row_length // shards)
        fullest = max(sum(max(0, min(end, (k + 1) * part) - max(start, k * part)) for start, end in self.scored_spans())
                      for k in range(shards))
        return self.rows * fullest, shards * self.rows * fullest

    @property
    def mask_elements(self) -> int:
        """Per layer: the ``[rejected, pair]`` masks of the packed SDPA path."""
        return self.pairs * (self.response + 1) * (self.prompt + 2 * self.response + 1) if self.packed else 0


@dataclass(frozen=True)
class Phases:
    """Saved bytes of one micro-batch: at the end of its forward (``stored``, what each
    micro-batch in flight holds) and at its highest during its own backward (``peak``:
    with recomputation, one layer's activations rebuilt next to the checkpoints)."""

    stored: float
    peak: float


def _llm_layer(lang, t: int, b: int, moe: bool, attention: str, packed: bool) -> tuple[float, float, float]:
    """(bytes per token, of which sequence parallelism splits, of which selective
    recomputation does not keep: the attention kernel's own saves) of one LLM layer."""
    h, hd = lang.hidden_size, lang.kv_channels
    heads, groups = lang.num_heads, lang.num_kv_heads
    q = heads * hd // t
    kv = groups * hd // t if groups >= t else hd  # fewer KV heads than ranks: one group per rank
    qkv = (heads + 2 * groups) * hd // (t if groups >= t else 1)  # below: gathered whole, then sliced
    split = 2 * (h * b + 4) + h * b  # two norms, the qkv linear's input
    per = 4 * hd * b  # RoPE: cos and sin, for queries and keys
    inner = 4 * heads // t + (q * b if packed and attention == "sdpa" else 0)  # log-sum-exp; packed: per-pair outputs
    per += (qkv + q + kv + q) * b + inner
    if lang.qk_norm:  # per-head q/k norms: their input and an fp32 1/rms per head; the query
        # is a copy where a rank's several KV groups each hold several query heads, else a view
        copied = heads != groups and kv // hd > 1
        per += (q * b if copied else 0) + 4 * (heads // t + kv // hd)
    if moe:
        k, experts = lang.num_experts_per_tok, lang.num_experts
        split += h * b + ROUTE_BYTES[0] * k + ROUTE_BYTES[1] * experts + ROUTE_BYTES[2]
        per += k * (h * b + 4 + 6 * lang.moe_intermediate_size * b // t)
    else:
        split += h * b
        per += 3 * lang.ffn_hidden_size * b // t
    return per + split, split, inner


def _vision_layer(vis, t: int, b: int) -> float:
    """Bytes per patch token of one InternViT layer."""
    c, width, ffn = vis.hidden_size, vis.heads * vis.head_dim // t, vis.ffn_hidden_size // t
    norm = c * b + (8 if vis.norm == "LayerNorm" else 4)
    per = 2 * norm + c * b + 3 * width * b + 4 * vis.heads // t + width * b + 2 * c * b + c * b + 2 * ffn * b
    if vis.qk_norm:  # cross-head norms: normed output, 1/rms, an fp32 copy below fp32; then q', k'
        per += 2 * (width * b + 4 + (4 * width if b != 4 else 0)) + 2 * width * b
    return per


def _vision(model, t: int, b: int, rows: Rows, recompute: bool, trains: bool) -> tuple[float, float]:
    """(stored, extra at the vision backward's peak) of the vision tower and projector; a
    frozen tower runs without grad and keeps nothing."""
    vis, tiles = model.vision, rows.tiles * rows.pairs
    if tiles == 0:
        return 0.0, 0.0
    n = vis.grid**2 + 1
    layer = _vision_layer(vis, t, b) * n * tiles
    pixels = 3 * vis.image_size**2 * b * tiles
    hidden = model.language.hidden_size
    projector = model.tokens_per_tile * tiles * (2 * model.projector_input_size * b + 8 + 2 * hidden * b // t)
    if not trains:
        return projector, 0.0
    if not recompute:
        return pixels + vis.num_layers * layer + projector, 0.0
    checkpoint = vis.hidden_size * b * n * tiles
    return pixels + vis.num_layers * checkpoint + projector, layer - checkpoint


def stage_activations(model, layout, stage: int, layers: tuple, rows: Rows, *, dtype_bytes: int,
                      attention: str = "sdpa", spec: str = "local", frozen: tuple = ()) -> Phases:
    """Saved activation bytes of one micro-batch of ``rows`` on one rank of ``stage``
    (holding LLM ``layers``) under ``layout`` (:class:`~megatron_mpo.plan.params.Parallelism`)."""
    lang, b, t = model.language, dtype_bytes, layout.tensor
    sp = layout.sequence and t > 1
    shard = t if sp else 1
    tokens = rows.tokens
    recompute = layout.recompute
    first, last = stage == 0, stage == layout.pipeline - 1

    full_layers = 0.0
    biggest = 0.0  # one layer's activations (rebuilt by full recompute in its backward)
    for i in layers:
        per, split, inner = _llm_layer(lang, t, b, lang.is_moe_layer(i), attention, rows.packed)
        kernel = rows.mask_elements * b if attention == "sdpa" and rows.packed else 0
        if attention == "te" and rows.packed:  # TE's unfused attention keeps [b, heads, S, S]
            kernel += rows.rows * lang.num_heads // t * rows.row_length**2 * b
        layer = tokens * (per - split + split / shard) + kernel
        if recompute == "selective":  # the core attention is recomputed: its own saves are not kept
            layer -= tokens * inner + kernel
        full_layers += layer
        biggest = max(biggest, layer)
    checkpoint = tokens * lang.hidden_size * b / shard  # a layer's input, what full recompute keeps
    shared = 0.0  # tensors every layer's checkpoint shares: RoPE angles, the local spec's causal mask
    if recompute is not None and layers:
        if recompute == "full":
            shared += tokens * 4 * lang.kv_channels
        if spec == "local" and not rows.packed and attention != "flex":
            shared += rows.row_length**2
    llm = len(layers) * checkpoint if recompute == "full" else full_layers

    before = 0.0
    vision_extra = 0.0
    if first:
        vis_stored, vision_extra = _vision(model, t, b, rows, recompute is not None, "vision" not in frozen)
        before = vis_stored + tokens * FIRST_BYTES_PER_TOKEN + rows.image_tokens * 8
        if sp and layers:  # the first layer's input is a view of the whole embedding output
            before += tokens * lang.hidden_size * b * (shard - 1) / shard
    head = 0.0
    if last:
        vocab = lang.padded_vocab_size // t
        selected, gathered = rows.output_rows(shard)
        head = tokens * ((lang.hidden_size * b + 4) / shard + HEAD_BYTES_PER_TOKEN)
        head += selected * lang.hidden_size * b + gathered * (4 * vocab + LOSS_BYTES_PER_ROW)
        head += rows.scored * LOSS_BYTES_PER_SCORED + vocab
    stored = before + llm + shared + head
    peak = stored
    if recompute == "full" and layers:  # the last layer rebuilt after the head's backward freed it
        peak = max(peak, stored - head - checkpoint + biggest)
    peak = max(peak, before + vision_extra)  # the vision tower's backward comes last
    return Phases(stored=stored, peak=peak)


def in_flight(layout, stage: int, micro_batches: int) -> float:
    """Micro-batches whose activations one rank of ``stage`` holds at once under 1F1B, as
    Megatron-LM's schedules warm up: ``PP - stage``; interleaved, ``2 (PP - stage - 1) +
    (VP - 1) PP + 1`` chunk micro-batches of 1 / VP of the stage's layers each."""
    pp, vp = layout.pipeline, layout.virtual_pipeline or 1
    if vp == 1:
        return float(max(1, min(pp - stage, micro_batches)))
    return max(1.0, min(micro_batches * vp, 2 * (pp - stage - 1) + (vp - 1) * pp + 1) / vp)
