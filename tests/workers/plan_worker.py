"""What a built model and optimizer really hold, for tests/test_plan.py (which compares it
with the planner): model-state bytes and the saved-activation peak of a training step.

* Model state: megatron-core DDP's parameter and gradient buffers (dense and expert), and
  the optimizer's fp32 master copies (the parameters it steps that are not views of the
  DDP buffer) and Adam moments, after one step (Adam creates its state lazily).
* Activations: every tensor autograd saves during a forward/backward schedule, through
  ``torch.autograd.graph.saved_tensors_hooks``: a storage is counted once however many
  views of it are saved, from its first save until the last reference autograd holds is
  dropped; parameters and module buffers are not activations. The peak of that live
  total over the schedule is the activation memory (with several micro-batches in flight
  and with recomputation's rebuilt layer included).

Run as a script under torchrun (2 gloo processes), it measures the layouts that need
several ranks, one after the other in the same processes, and writes
``RESULTS/rank<r>.json``.

Usage: python -m torch.distributed.run --nproc-per-node=2 tests/workers/plan_worker.py RESULTS
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# name, preset, (TP, PP, EP), sequence parallel, micro-batches per step, recompute, packed
CASES = (
    ("tp2", "tiny", (2, 1, 1), False, 1, None, False),
    ("tp2_sp", "tiny", (2, 1, 1), True, 1, None, False),
    ("tp2_sp_full", "tiny", (2, 1, 1), True, 1, "full", False),
    ("pp2", "tiny", (1, 2, 1), False, 3, None, False),
    ("pp2_packed_full", "tiny", (1, 2, 1), False, 3, "full", True),
    ("dp2", "tiny", (1, 1, 1), False, 1, None, False),
    ("moe_ep2", "tiny-moe", (1, 1, 2), False, 1, None, False),
    ("moe_tp2_sp", "tiny-moe", (2, 1, 1), True, 1, None, False),
)
PAIR = dict(prompt=40, response=50, tiles=3)  # tokens of the prompt (image tokens included), each response


def run_config(preset: str, *, tensor=1, pipeline=1, expert=1, sequence=False, recompute=None, packed=False,
               dtype="bf16"):
    """The run config of one measured layout (its shards are never read)."""
    from megatron_mpo.config import from_dict

    return from_dict({
        "model": {"preset": preset, "recompute": recompute},
        "parallel": {"tensor": tensor, "pipeline": pipeline, "expert": expert, "sequence": sequence},
        "precision": {"dtype": dtype},
        "data": {"shards": "unused", "ref_logps": "unused", "packing": packed, "max_length": 4096},
        "train": {"steps": 1, "device": "cpu", "global_batch": 64},
    })


def build(cfg, model_config, layout):
    """This rank's DDP-wrapped chunks and optimizer, as the trainer builds them."""
    from megatron_mpo.training import model_setup
    from megatron_mpo.training.optim import build_optimizer, wrap_data_parallel

    chunks = model_setup.build_model_chunks(cfg, model_config, layout)
    model = wrap_data_parallel(chunks, cfg.precision)
    return model, build_optimizer(model, cfg.train, cfg.precision)


def state_bytes(model, optimizer) -> dict:
    """Bytes of weights, gradients, master weights and Adam moments this rank holds."""
    import torch

    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    optimizer.step()
    buffers = [b for chunk in model for b in [*chunk.buffers, *chunk.expert_parallel_buffers]]
    owned = {b.param_data.untyped_storage().data_ptr() for b in buffers if b.param_data is not None}
    out = {
        "weights": sum(b.param_data.numel() * b.param_data.element_size() for b in buffers if b.param_data is not None),
        "grads": sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers),
        "master": 0, "adam": 0,
        "params": sum(p.numel() for chunk in model for p in chunk.parameters()),
    }
    for wrapper in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = wrapper.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                if param.untyped_storage().data_ptr() not in owned:
                    out["master"] += param.numel() * param.element_size()
                for value in inner.state.get(param, {}).values():
                    if torch.is_tensor(value) and value.numel() > 1:
                        out["adam"] += value.numel() * value.element_size()
    return out


class SavedBytes:
    """Live bytes of the storages autograd holds for backward, and their peak."""

    def __init__(self, model):
        self.skip = set()
        for chunk in model:
            module = getattr(chunk, "module", chunk)  # DDP's own ``buffers`` are its grad buffers
            self.skip |= {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
        self.live: dict = {}  # storage pointer -> [references, bytes]
        self.now = self.peak = 0

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.skip or storage.nbytes() == 0:
            return tensor
        return _Held(self, tensor, ptr, storage.nbytes())

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held


class _Held:
    def __init__(self, owner: SavedBytes, tensor, ptr: int, nbytes: int):
        self.owner, self.tensor, self.ptr = owner, tensor, ptr
        entry = owner.live.get(ptr)
        if entry is None:
            owner.live[ptr] = [1, nbytes]
            owner.now += nbytes
            owner.peak = max(owner.peak, owner.now)
        else:
            entry[0] += 1

    def __del__(self):
        entry = self.owner.live[self.ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.owner.now -= entry[1]
            del self.owner.live[self.ptr]


def micro_batches(cfg, model_config, count: int, prompt: int, response: int, tiles: int) -> list:
    """``count`` micro-batches of one pair of this shape, collated as the trainer's loader does."""
    import torch

    from megatron_mpo.data.collate import collate_pairs
    from megatron_mpo.data.samples import TokenizedPair
    from megatron_mpo.training import precision
    from megatron_mpo.training.row_layout import pad_multiple, packing_layout

    tpt, image = model_config.tokens_per_tile, model_config.img_context_token_id
    text = prompt - tiles * tpt
    ids = [5 + i % 200 for i in range(text // 2)] + [image] * (tiles * tpt) + [7] * (text - text // 2)
    gen = torch.Generator().manual_seed(0)
    size = model_config.vision.image_size
    batches = []
    for i in range(count):
        pair = TokenizedPair(f"s/{i}", ids, [11 + i] * response, [13 + i] * response,
                             torch.randn(tiles, 3, size, size, generator=gen), -10.0, -12.0)
        multiple = pad_multiple(cfg, precision.training_precision(cfg))
        batches.append(collate_pairs([pair], 0, image, tpt, pad_multiple=multiple, layout=packing_layout(cfg),
                                     row_length=None, max_pairs_per_row=None))
    return batches


def saved_peak(model, cfg, batches) -> int:
    """Peak live saved bytes of one training step over ``batches`` (the trainer's schedule)."""
    import torch

    from megatron_mpo.losses import MPOLoss
    from megatron_mpo.training import schedule
    from megatron_mpo.training.forward import StepContext, make_forward_step

    mpo = MPOLoss(cfg.mpo)
    context = StepContext()
    context.start(mpo, batches, None)
    saved = SavedBytes(model)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        schedule.run_schedule(schedule.forward_backward_func(), make_forward_step(mpo, step=context), model,
                              batches, 0, forward_only=False)
    return saved.peak


def measure(cfg, *, tensor=1, pipeline=1, expert=1, count=1, architecture=None, **pair) -> dict:
    """Start this layout's groups, build (``architecture``: an InternVLConfig in place of the
    config's preset), and measure model state and the step's saved peak."""
    from megatron_mpo import parallel
    from megatron_mpo.training import model_setup

    layout = parallel.initialize(tensor, pipeline, expert=expert, device="cpu")
    model_config = architecture or model_setup.model_config(cfg)
    model, optimizer = build(cfg, model_config, layout)
    result = state_bytes(model, optimizer)
    for chunk in model:
        chunk.zero_grad_buffer()
    result["saved_peak"] = saved_peak(model, cfg, micro_batches(cfg, model_config, count, **pair))
    result.update(stage=layout.pipeline_rank, data=layout.data)
    return result


def main(out_dir: str) -> int:
    import torch.distributed as dist

    from megatron_mpo import parallel

    results, failures = {}, []
    for name, preset, (tp, pp, ep), sequence, count, recompute, packed in CASES:
        try:
            cfg = run_config(preset, tensor=tp, pipeline=pp, expert=ep, sequence=sequence, recompute=recompute,
                             packed=packed)
            results[name] = measure(cfg, tensor=tp, pipeline=pp, expert=ep, count=count, **PAIR)
        except Exception:
            failures.append(f"{name}: {traceback.format_exc()}")
    rank = dist.get_rank()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"results": results, "failures": failures}))
    parallel.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
