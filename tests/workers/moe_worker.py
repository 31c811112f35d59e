"""Multi-rank half of tests/test_moe.py: the tiny Qwen3-MoE InternVL at expert parallelism.

Launched on 4 gloo processes. For each (TP, PP, EP) grouping, in the same processes, it
builds the model at that layout, loads the model directory the parent converted from
transformers (a distributed checkpoint written at TP1/PP1/EP1, so this is the "any layout
loads any other" path), and checks logits and per-token losses of every case against
transformers, then (without TP: megatron-core trains MoE under TP only with sequence
parallelism) every gradient of the image pair and of the packed row of three pairs.
All ranks run the same data, so an expert that receives tokens from ``EP`` identical
replicas accumulates ``EP`` times the single-replica gradient (the data-parallel reduction
divides it back in training): the check divides expert gradients by EP. Finally it saves
the EP2 x PP2 model as a distributed checkpoint and reloads it at TP1/PP1/EP1: the same
full state dict, and checks that a NaN in its expert-parallel gradient buffer fails the
trainer's finiteness guard. At TP2 with sequence parallelism the trainer's load-balancing
term (padding left out) must not move with more padding and must equal TP1's.

Usage: python -m torch.distributed.run --nproc-per-node=4 tests/workers/moe_worker.py ARTIFACTS
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests import _model_worker as common  # noqa: E402

GROUPINGS = ((2, 1, 1), (1, 2, 2))  # (TP, PP, EP); EP1 at TP1: tests/test_moe.py in-process
_EXPERT = re.compile(r"local_experts\.(\d+)\.")


def _global_expert_name(model, name: str, ep_rank: int) -> str:
    name = common._global_name(model, name)
    match = _EXPERT.search(name)
    if not match:
        return name
    per_rank = model.config.num_moe_experts // _ep_size()
    return name[:match.start(1)] + str(ep_rank * per_rank + int(match.group(1))) + name[match.end(1):]


def _ep_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_expert_model_parallel_world_size()


def check_grads(model, case: dict, ref_grads: dict, where: str, tp_group, tp: int, ep_rank: int, ep: int) -> list:
    import torch

    model.zero_grad(set_to_none=True)
    common.run_schedule(model, case, labels=True, forward_only=False)
    failures = []
    for name, param in model.named_parameters():
        if param.grad is None:
            failures.append(f"{where}: no gradient for {name}")
            continue
        grad = common.gather_full_grad(name, param, tp_group, tp)
        if _EXPERT.search(name):
            grad = grad / ep
        global_name = _global_expert_name(model, name, ep_rank)
        ref = ref_grads[global_name]
        if not torch.allclose(grad, ref, atol=common.GRAD_ATOL, rtol=common.GRAD_RTOL):
            failures.append(f"{where}: grad of {global_name} differs by {(grad - ref).abs().max().item():.3g}")
    return failures


def check_expert_grad_guard(model, where: str) -> list:
    """Wrapped in megatron-core DDP at EP2, the expert weights' gradients live in buffers of
    their own (``expert_parallel_buffers``); a NaN there must fail the trainer's guard."""
    from megatron_mpo.config import PrecisionSection
    from megatron_mpo.training.optim import grads_are_finite, wrap_data_parallel

    (wrapped,) = wrap_data_parallel([model], PrecisionSection())
    if not wrapped.expert_parallel_buffers:
        return [f"{where}: DDP made no expert-parallel gradient buffer"]
    if not grads_are_finite([wrapped]):
        return [f"{where}: zeroed gradient buffers reported non-finite"]
    wrapped.expert_parallel_buffers[0].grad_data.fill_(float("nan"))
    return [] if not grads_are_finite([wrapped]) else [f"{where}: a NaN expert gradient passed grads_are_finite"]


def aux_terms(config, artifacts: Path, sequence_parallel: bool) -> list:
    """The load-balancing term the trainer logs (coefficient 0.01) for three pairs collated
    unpacked and packed, each with its rows' own padding and with 6 padded positions more
    (lengths even, for the sequence-parallel split): training-mode forwards of the model
    directory at the current layout. A collective on every rank."""
    import dataclasses

    from megatron_mpo.batch import pad_to_length
    from megatron_mpo.data.collate import collate_pairs
    from megatron_mpo.models.internvl import build_model
    from megatron_mpo.training.checkpoint import load_model_weights
    from megatron_mpo.training.forward import model_inputs
    from megatron_mpo.training.metrics import router_aux_loss
    from tests.test_model import IMG_ID, _packed_pairs
    import torch

    language = dataclasses.replace(config.language, router_aux_loss_coef=0.01)
    model = build_model(dataclasses.replace(config, language=language), sequence_parallel=sequence_parallel,
                        attention_mask="arbitrary")
    load_model_weights(artifacts / "megatron", [model])
    model.train()
    terms = []
    for layout in ("unpacked", "packed"):
        batch = collate_pairs(_packed_pairs(torch.Generator().manual_seed(11)), 0, IMG_ID, 4, pad_multiple=2,
                              layout=layout, row_length=40, max_pairs_per_row=2)
        for extra in (0, 6):
            model(**model_inputs(model, pad_to_length(batch, batch.input_ids.shape[1] + extra)))
            terms.append(router_aux_loss([model], micro_batches=1, pipeline_rank=0))
    return terms


def check_aux_terms(terms: list, reference: list, where: str) -> list:
    """Padding changes no term; the terms equal ``reference`` (TP1's)."""
    import math

    failures = [f"{where}: 6 more padded positions moved the load-balancing term {a} -> {b}"
                for a, b in zip(terms[::2], terms[1::2]) if not math.isclose(a, b, rel_tol=1e-6)]
    if not all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(terms, reference)):
        failures.append(f"{where}: load-balancing terms {terms} differ from TP1's {reference}")
    return failures


def _run(artifacts: Path, checked: list) -> list:
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
    from megatron_mpo.training.checkpoint import load_model_weights

    config = InternVLConfig.from_json((artifacts / "config.json").read_text())
    full = torch.load(artifacts / "mcore.pt")
    cases = torch.load(artifacts / "cases.pt")
    grads = torch.load(artifacts / "grads.pt")
    packed_grads = torch.load(artifacts / "packed_grads.pt")
    layers = config.language.num_layers
    failures: list = []
    sp_terms = None  # the TP2 sequence-parallel load-balancing terms, checked against TP1's at the end
    only = os.environ.get("MOE_WORKER_GROUPINGS")  # e.g. "1,2,2" while debugging
    groupings = [tuple(map(int, g.split(","))) for g in only.split(";")] if only else GROUPINGS
    for tp, pp, ep in groupings:
        parallel_state.initialize_model_parallel(tp, pp, expert_model_parallel_size=ep)
        model_parallel_cuda_manual_seed(1234)
        where = f"TP{tp}PP{pp}EP{ep} rank{dist.get_rank()}"
        print(f"[{where}] start", flush=True)
        try:
            pipeline_layers = None if layers % pp == 0 else [layers // pp] * (pp - 1) + [layers - layers // pp * (pp - 1)]
            model = build_model(config, pipeline_layers=pipeline_layers)
            load_model_weights(artifacts / "megatron", [model])
            model.eval()
            for case in cases:
                failures += common.check_case(model, case, where)
            if tp > 1:
                # megatron-core trains MoE layers under TP only with sequence parallelism,
                # which needs rows split evenly over the TP ranks: forward checked here, and
                # the training-mode load-balancing term with sequence parallelism.
                sp_terms = aux_terms(config, artifacts, sequence_parallel=True)
                checked.append(f"TP{tp}PP{pp}EP{ep} forward")
                release_model_parallel()
                continue
            model.train()
            tp_group = parallel_state.get_tensor_model_parallel_group()
            ep_rank = parallel_state.get_expert_model_parallel_rank()
            pair = next(c for c in cases if c["name"] == "pair")
            failures += check_grads(model, pair, grads, where, tp_group, tp, ep_rank, ep)
            packed = next(c for c in cases if c["name"] == "packed_pairs")
            failures += check_grads(model, packed, packed_grads, f"{where} packed_pairs", tp_group, tp, ep_rank, ep)
            checked.append(f"TP{tp}PP{pp}EP{ep}")
            if (tp, pp, ep) == (1, 2, 2):
                common.save_dist_checkpoint(model, artifacts / "dist_ckpt")
                failures += check_expert_grad_guard(model, where)
                checked.append("EP2 expert-gradient guard")
        except Exception:
            failures.append(f"{where}: {traceback.format_exc()}")
            print(failures[-1], flush=True)
        release_model_parallel()
    # The EP2 x PP2 checkpoint read back at TP1/PP1/EP1: every tensor as converted.
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    try:
        model = build_model(config)
        loaded = dist_checkpointing.load(model.sharded_state_dict(), str(artifacts / "dist_ckpt"))
        model.load_state_dict(loaded, strict=False)
        for name, value in model.state_dict().items():
            if not name.endswith("_extra_state") and not torch.equal(value, full[name]):
                failures.append(f"dist checkpoint EP2PP2 -> EP1: {name} changed")
        checked.append("EP2PP2->EP1 checkpoint")
    except Exception:
        failures.append(f"dist checkpoint rank{dist.get_rank()}: {traceback.format_exc()}")
    if sp_terms is not None:  # else the TP2 grouping has reported why
        try:
            failures += check_aux_terms(sp_terms, aux_terms(config, artifacts, sequence_parallel=False),
                                        f"TP2 sequence-parallel rank{dist.get_rank()}")
            checked.append("TP2 sequence-parallel load balancing")
        except Exception:
            failures.append(f"TP1 load balancing rank{dist.get_rank()}: {traceback.format_exc()}")
    release_model_parallel()
    return failures


def main() -> int:
    import faulthandler

    # A hung collective shows every rank's stack instead of running into the test's timeout.
    faulthandler.dump_traceback_later(int(os.environ.get("MOE_WORKER_TIMEOUT_S", "600")), exit=True)
    artifacts = Path(sys.argv[1])
    checked: list = []
    failures = _run(artifacts, checked)
    return common.write_report(artifacts, failures, checked)


if __name__ == "__main__":
    sys.exit(main())
