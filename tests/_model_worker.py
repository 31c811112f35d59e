"""Multi-rank half of tests/test_model.py, plus helpers both halves share.

Launched on 4 gloo processes, it re-initialises megatron-core's parallel state as
TP=2/PP=1, TP=1/PP=2, TP=2/PP=2 and TP=1/PP=2 with 2 virtual stages (interleaved) in the
same processes (one launch, since every process pays for importing megatron-core). For each grouping and each reference model
it loads this rank's slice of the full converted state dict, runs the micro-batch cases
through megatron-core's real pipeline schedules, compares logits, per-token losses and
(for the image pair case and a row packed with three pairs) gradients with the
transformers reference, and finally saves
a TP=2/PP=2 distributed checkpoint and reloads it at TP=1 (sharded_state_dict check).
At TP=2/PP=1 (two data-parallel replicas) it also trains the qwen2 model with drop path on
the vision tower: each replica's losses and gradients must equal the TP=1 run seeded for its
data-parallel rank (same masks on the TP ranks of a replica, the replica's own masks).

Usage: python -m torch.distributed.run --nproc-per-node=4 tests/_model_worker.py ARTIFACTS
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

LOGIT_ATOL = 1e-5
GRAD_ATOL = 1e-4
GRAD_RTOL = 1e-4
GROUPINGS = ((2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 2, 2))  # (TP, PP, virtual stages)
DROP_PATH_RATE = 0.4
DROP_PATH_CASES = ("pair", "several_tiles")
DROP_PATH_SEED = 1234


# ---- helpers shared with the in-process test ------------------------------------------


def _global_name(model, name: str) -> str:
    """Local state-dict name -> name in the full (TP=1/PP=1) state dict."""
    prefix = "language_model.decoder.layers."
    if name.startswith(prefix):
        index, rest = name[len(prefix):].split(".", 1)
        layer = model.language_model.decoder.layers[int(index)]
        return f"{prefix}{layer.layer_number - 1}.{rest}"
    if name == "language_model.output_layer.weight" and model.arch.language.tie_embeddings:
        return "language_model.embedding.word_embeddings.weight"  # last-stage copy of the tied weight
    return name


def _is_gated_fc1(name: str) -> bool:
    """The LLM's SwiGLU fc1 [gate; up] (dense MLPs and MoE experts)."""
    return name.startswith("language_model.") and name.endswith("linear_fc1.weight")


def shard_state_dict(model, full: dict, tp_rank: int, tp_size: int) -> dict:
    """This rank's slice of the full megatron state dict, by each parameter's TP attributes."""
    import torch

    params = dict(model.named_parameters())
    local = {}
    for name, value in model.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        tensor = full[_global_name(model, name)]
        param = params.get(name)
        if param is not None and getattr(param, "tensor_model_parallel", False) and tp_size > 1:
            dim = param.partition_dim
            if _is_gated_fc1(name):  # [gate; up]: each rank holds [gate_r; up_r]
                gate, up = torch.chunk(tensor, 2, dim=0)
                tensor = torch.cat([gate.chunk(tp_size, dim)[tp_rank], up.chunk(tp_size, dim)[tp_rank]])
            else:
                tensor = tensor.chunk(tp_size, dim)[tp_rank]
        if tuple(tensor.shape) != tuple(value.shape):
            raise AssertionError(f"{name}: shard {tuple(tensor.shape)} != parameter {tuple(value.shape)}")
        local[name] = tensor.clone()
    return local


def load_full(model, full: dict, tp_rank: int = 0, tp_size: int = 1) -> None:
    missing, unexpected = model.load_state_dict(shard_state_dict(model, full, tp_rank, tp_size), strict=False)
    bad = [k for k in missing if not k.endswith("_extra_state")] + list(unexpected)
    if bad:
        raise AssertionError(f"state dict mismatch: {bad[:5]}")


def gather_full_grad(name: str, param, tp_group, tp_size: int):
    """This parameter's gradient as a full (TP=1) tensor."""
    import torch
    import torch.distributed as dist

    grad = param.grad
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return grad
    parts = [torch.empty_like(grad) for _ in range(tp_size)]
    dist.all_gather(parts, grad.contiguous(), group=tp_group)
    dim = param.partition_dim
    if _is_gated_fc1(name):
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([torch.cat([h[0] for h in halves], dim), torch.cat([h[1] for h in halves], dim)])
    return torch.cat(parts, dim)


def run_schedule(model, case: dict, labels: bool, forward_only: bool = True):
    """The case through megatron-core's real schedule (interleaved when ``model`` is a list
    of chunks: then PP micro-batches, all the same case); the last stage gets the output."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = model if isinstance(model, list) else [model]
    micro = parallel_state.get_pipeline_model_parallel_world_size() if len(chunks) > 1 else 1
    iterators = [iter([case] * micro) for _ in chunks]
    store = {}

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        output = chunk(
            batch["input_ids"], batch["position_ids"], batch.get("attention_mask"),
            labels=batch["labels"] if labels else None,
            pixel_values=batch["pixel_values"], image_token_index=batch["image_token_index"],
            runtime_gather_output=True,
        )

        def loss_func(out):
            store["out"] = out.detach().clone()
            return out.sum(), {}

        return output, loss_func

    R, S = case["input_ids"].shape
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks, num_microbatches=micro, seq_length=S, micro_batch_size=R, forward_only=forward_only,
    )
    return store.get("out")


def check_case(model, case: dict, where: str) -> list[str]:
    """Logits and per-token losses of one case against the reference; returns failures."""
    import torch

    failures = []
    logits = run_schedule(model, case, labels=False)
    losses = run_schedule(model, case, labels=True)
    if logits is None:
        return failures
    ref = case["ref_logits"]
    diff = (logits - ref).abs().max().item() if logits.shape == ref.shape else float("inf")
    if not diff <= LOGIT_ATOL:
        failures.append(f"{where} {case['name']}: logits {tuple(logits.shape)} differ by {diff:.3g}")
    ref_loss = -torch.log_softmax(ref.double(), -1).gather(-1, case["labels"].unsqueeze(-1)).squeeze(-1)
    diff = (losses.double() - ref_loss).abs().max().item()
    if not diff <= LOGIT_ATOL:
        failures.append(f"{where} {case['name']}: per-token loss differs by {diff:.3g}")
    return failures


def check_grads(
    model, case: dict, ref_grads: dict, where: str, tp_group, tp_size: int, embedding_group=None
) -> list[str]:
    """Backward of sum(per-token loss) through the schedule; every gradient vs reference."""
    import torch
    import torch.distributed as dist

    chunks = model if isinstance(model, list) else [model]
    for chunk in chunks:
        chunk.zero_grad(set_to_none=True)
    # With several micro-batches (all this case) the schedule averages them: same gradient.
    run_schedule(model, case, labels=True, forward_only=False)
    failures = []
    tied = chunks[0].arch.language.tie_embeddings
    named = [(chunk, name, param) for chunk in chunks for name, param in chunk.named_parameters()]
    for chunk, name, param in named:
        if param.grad is None:
            failures.append(f"{where}: no gradient for {name}")
            continue
        grad = gather_full_grad(name, param, tp_group, tp_size)
        global_name = _global_name(chunk, name)
        if tied and global_name == "language_model.embedding.word_embeddings.weight" and embedding_group is not None:
            grad = grad.clone()
            dist.all_reduce(grad, group=embedding_group)  # what finalize_model_grads does
        ref = ref_grads[global_name]
        if not torch.allclose(grad, ref, atol=GRAD_ATOL, rtol=GRAD_RTOL):
            failures.append(f"{where}: grad of {global_name} differs by {(grad - ref).abs().max().item():.3g}")
    return failures


def drop_path_run(model, cases: list, tp_group, tp_size: int, data_rank=None) -> dict:
    """Training forward + backward of ``DROP_PATH_CASES`` from a freshly seeded drop-path
    stream (``data_rank`` None: this rank's); per-token losses and every full gradient."""
    from megatron_mpo.models import drop_path

    drop_path.seed_rng(DROP_PATH_SEED, data_rank=data_rank)
    model.train()
    model.zero_grad(set_to_none=True)
    losses = [run_schedule(model, next(c for c in cases if c["name"] == name), labels=True, forward_only=False)
              for name in DROP_PATH_CASES]
    grads = {_global_name(model, n): gather_full_grad(n, p, tp_group, tp_size) for n, p in model.named_parameters()}
    return dict(losses=losses, grads=grads)


def check_drop_path(run: dict, expected: dict, where: str) -> list[str]:
    """A drop-path run against the TP=1 run of the same data-parallel rank."""
    import torch

    failures = []
    for name, loss, ref in zip(DROP_PATH_CASES, run["losses"], expected["losses"]):
        if not torch.allclose(loss, ref, atol=LOGIT_ATOL, rtol=0):
            failures.append(f"{where} {name}: losses differ by {(loss - ref).abs().max().item():.3g}")
    for name, grad in run["grads"].items():
        ref = expected["grads"][name]
        if not torch.allclose(grad, ref, atol=GRAD_ATOL, rtol=GRAD_RTOL):
            failures.append(f"{where}: grad of {name} differs by {(grad - ref).abs().max().item():.3g}")
    return failures


# ---- the multi-rank run ---------------------------------------------------------------


def _run(artifacts: Path, checked: list) -> list[str]:
    from megatron_mpo.parallel import release_model_parallel  # its torch.distributed groups too

    import torch
    import torch.distributed as dist

    from megatron_mpo import platform

    platform.setup("cpu")
    platform.init_distributed()
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_mpo.models.config import InternVLConfig
    from megatron_mpo.models.internvl import build_model

    kinds = json.loads((artifacts / "kinds.json").read_text())
    data = {}
    for kind in kinds:
        d = artifacts / kind
        data[kind] = dict(
            config=InternVLConfig.from_json((d / "config.json").read_text()),
            full=torch.load(d / "mcore.pt"),
            cases=torch.load(d / "cases.pt"),
            grads=torch.load(d / "grads.pt"),
            packed_grads=torch.load(d / "packed_grads.pt"),
        )
    drop_path_tp1 = torch.load(artifacts / "drop_path.pt")  # TP=1 runs per data-parallel rank
    failures: list[str] = []
    ckpt_dir = artifacts / "dist_ckpt"
    for tp, pp, vp in GROUPINGS:
        parallel_state.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=vp if vp > 1 else None)
        model_parallel_cuda_manual_seed(1234)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_group = parallel_state.get_tensor_model_parallel_group()
        emb_group = parallel_state.get_embedding_group() if pp > 1 else None
        for kind, d in data.items():
            cfg = d["config"]
            layers = cfg.language.num_layers
            if layers % (pp * vp) and vp > 1:
                continue  # the interleaved grouping runs the 4-layer model only
            pipeline_layers = None  # 3 LLM layers on 2 stages: an uneven [1, 2] split
            if layers % pp:
                pipeline_layers = [layers // pp] * (pp - 1) + [layers - layers // pp * (pp - 1)]
            where = f"TP{tp}PP{pp}VP{vp} {kind} rank{dist.get_rank()}"
            try:
                chunks = []
                for stage in range(vp):
                    if vp > 1:
                        parallel_state.set_virtual_pipeline_model_parallel_rank(stage)
                    chunks.append(build_model(cfg, pipeline_layers=pipeline_layers, vp_stage=stage if vp > 1 else None))
                    load_full(chunks[-1], d["full"], tp_rank, tp)
                    chunks[-1].eval()
                model = chunks if vp > 1 else chunks[0]
                for case in d["cases"]:
                    failures += check_case(model, case, where)
                for chunk in chunks:
                    chunk.train()
                pair = next(c for c in d["cases"] if c["name"] == "pair")
                failures += check_grads(model, pair, d["grads"], where, tp_group, tp, emb_group)
                packed = next(c for c in d["cases"] if c["name"] == "packed_pairs")  # 3 pairs in one row
                failures += check_grads(model, packed, d["packed_grads"], f"{where} packed_pairs", tp_group, tp,
                                        emb_group)
                checked.append(f"TP{tp}PP{pp}VP{vp} {kind}")
                if (tp, pp, vp) == (2, 1, 1) and kind == "qwen2":
                    dropping = build_model(cfg, drop_path_rate=DROP_PATH_RATE)
                    load_full(dropping, d["full"], tp_rank, tp)
                    dp_rank = parallel_state.get_data_parallel_rank()
                    failures += check_drop_path(drop_path_run(dropping, d["cases"], tp_group, tp),
                                                drop_path_tp1[dp_rank], f"{where} drop path DP{dp_rank}")
                    checked.append(f"TP{tp}PP{pp}VP{vp} {kind} drop path")
                if (tp, pp, vp) == (2, 2, 1):
                    save_dist_checkpoint(model, ckpt_dir / kind)
            except Exception:
                failures.append(f"{where}: {traceback.format_exc()}")
        release_model_parallel()
    # Reload the TP=2/PP=2 distributed checkpoint at TP=1/PP=1: the same full state dict.
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    for kind, d in data.items():
        try:
            model = build_model(d["config"])
            loaded = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt_dir / kind))
            model.load_state_dict(loaded, strict=False)
            for name, value in model.state_dict().items():
                if not name.endswith("_extra_state") and not torch.equal(value, d["full"][name]):
                    failures.append(f"dist checkpoint TP2PP2 -> TP1 {kind}: {name} changed")
        except Exception:
            failures.append(f"dist checkpoint {kind} rank{dist.get_rank()}: {traceback.format_exc()}")
    release_model_parallel()
    return failures


def main() -> int:
    artifacts = Path(sys.argv[1])
    checked: list = []
    failures = _run(artifacts, checked)
    return write_report(artifacts, failures, checked)


def save_dist_checkpoint(model, target: Path) -> None:
    """megatron-core's distributed checkpoint of ``model`` (this layout) into ``target``."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        target.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(target))


def write_report(artifacts: Path, failures: list, checked: list) -> int:
    """Every rank's failures and checked groupings -> ARTIFACTS/failures.json (rank 0)."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (failures, checked))
    if dist.get_rank() == 0:
        everything = [f for rank_failures, _ in gathered for f in rank_failures]
        done = sorted({c for _, rank_checked in gathered for c in rank_checked})
        (artifacts / "failures.json").write_text(json.dumps({"failures": everything, "checked": done}, indent=1))
        for line in everything:
            print("FAIL", line, flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
