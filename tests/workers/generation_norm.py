"""Worker (2 ranks): the generation term through the real forward step, schedule and DDP.

The same 4 pairs (chosen responses of different lengths) and the same weights are run as
(a) one micro-batch of 4 pairs, (b) 4 micro-batches of 1 pair, (c) micro-batches of 1 and
3 pairs, all on each rank alone, (d) 2 data-parallel ranks x 2 micro-batches of 1 pair
under megatron-core DDP, and (e) 2 ranks holding 1 and 3 pairs. Rank 0
saves every layout's gradient and logged ``loss_generation`` next to gradients of the
TRL/InternVL SFT formula and of the paper's per-sequence formula, both computed here from
the model's logits without the project's loss code. It also checks that ``MPOLoss(config)``
without a group shares delta over the data-parallel group.
"""

import sys

import torch

PAIRS, SEQ, VOCAB = 4, 12, 96
CHOSEN_STARTS = (9, 2, 6, 4)  # chosen responses of 2, 9, 5, 7 tokens


def make_pairs():
    """Per pair: (chosen ids, rejected ids, chosen start, rejected start, ref chosen, ref rejected)."""
    gen = torch.Generator().manual_seed(3)
    pairs = []
    for i in range(PAIRS):
        ids = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
        ref = -torch.rand(2, generator=gen, dtype=torch.float64) * 20
        pairs.append((ids[0], ids[1], CHOSEN_STARTS[i], 3 + i, ref[0], ref[1]))
    return pairs


def collate(pairs):
    """Unpacked PairBatch: rows 0..P-1 chosen (slot = row), rows P..2P-1 rejected."""
    from megatron_mpo.batch import PairBatch

    p = len(pairs)
    ids = torch.stack([x[0] for x in pairs] + [x[1] for x in pairs])
    index = torch.full((2 * p, SEQ), -1)
    for row in range(2 * p):
        start = pairs[row % p][2] if row < p else pairs[row % p][3]
        index[row, start : SEQ - 1] = row
    return PairBatch(
        input_ids=ids, position_ids=torch.arange(SEQ).expand(2 * p, SEQ).clone(),
        labels=torch.roll(ids, -1, dims=1), response_index=index,
        image_token_index=torch.full_like(ids, -1), pixel_values=torch.zeros(0, 3, 8, 8), num_pairs=p,
        ref_chosen_logps=torch.stack([x[4] for x in pairs]), ref_rejected_logps=torch.stack([x[5] for x in pairs]),
    )


def formula_grads(model, pairs, norm):
    """Gradient of the SFT term written out: token = sum of chosen-token NLL / chosen tokens
    (TRL's cross entropy over the batch); sequence = mean over pairs of NLL / length."""
    batch = collate(pairs)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, batch.labels.unsqueeze(-1)).squeeze(-1)
    chosen = (batch.response_index[: len(pairs)] >= 0).float()
    nll = -(logp[: len(pairs)] * chosen)
    if norm == "token":
        loss = nll.sum() / chosen.sum()
    else:
        loss = (nll.sum(-1) / chosen.sum(-1)).mean()
    loss.backward()
    return loss.item(), flat(model, "grad")


def flat(model, attr):
    return torch.cat([getattr(p, attr).detach().reshape(-1).clone() for p in model.parameters()])


def run_layout(model, micro_batches, config, group):
    """One training step's forward/backward; returns the logged metrics."""
    from megatron_mpo.losses import MPOLoss
    from megatron_mpo.training import schedule
    from megatron_mpo.training.forward import StepContext, make_forward_step
    from megatron_mpo.training.metrics import reduce_loss_metrics

    mpo = MPOLoss(config)
    context = StepContext()
    context.start(mpo, micro_batches, group)
    step = make_forward_step(mpo, step=context)
    results = schedule.run_schedule(schedule.forward_backward_func(), step, [model], micro_batches, 0,
                                    forward_only=False)
    return reduce_loss_metrics(results, True, 0)


def wrap_ddp(model):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp = DistributedDataParallel(
        config=model.config, module=model,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False),
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    return ddp


def shared_delta(rank):
    """Step-mode delta after one step where each rank saw different rewards."""
    from megatron_mpo.losses import MPOLoss, MPOLossConfig

    mpo = MPOLoss(MPOLossConfig(beta=0.5))  # no group: megatron's data-parallel group
    one = torch.ones(1, dtype=torch.float64)
    mpo(one * (rank + 1.0), one * -1.0, one * 0.0, one * 0.0, one, one)  # rewards 0.5 (rank + 1), -0.5
    mpo.end_step()
    return mpo.reward_shift.current()


def main(out_path):
    from megatron_mpo import parallel
    from megatron_mpo.losses import LossWeights, MPOLossConfig
    from tests.workers.gpt_logps import build_gpt

    layout = parallel.initialize(1, 1, seed=5, device="cpu")
    rank = torch.distributed.get_rank()
    model = build_gpt(layout)
    pairs = make_pairs()
    out = {"formula": {}, "local": {}, "ddp": {}}
    for norm in ("token", "sequence"):
        out["formula"][norm] = formula_grads(model, pairs, norm)
    configs = {
        norm: MPOLossConfig(generation_norm=norm, weights=LossWeights(0.0, 0.0, 1.0)) for norm in ("token", "sequence")
    }
    configs["token_all_terms"] = MPOLossConfig(generation_norm="token")
    configs["sequence_all_terms"] = MPOLossConfig(generation_norm="sequence")
    # Micro-batches of different sizes (what packed rows produce): the step-level divisors
    # must still give the step's per-pair and per-token means.
    layouts = {"one_of_4": [collate(pairs)], "four_of_1": [collate([x]) for x in pairs],
               "one_then_3": [collate(pairs[:1]), collate(pairs[1:])]}
    for name, config in configs.items():
        for layout_name, micro_batches in layouts.items():
            model.zero_grad(set_to_none=True)
            metrics = run_layout(model, micro_batches, config, group=None)
            out["local"][(name, layout_name)] = (metrics["loss_generation"], flat(model, "grad"))
    model.zero_grad(set_to_none=True)
    ddp = wrap_ddp(model)
    mine = [collate([x]) for x in pairs[2 * rank : 2 * rank + 2]]
    for name, config in configs.items():
        ddp.zero_grad_buffer()
        metrics = run_layout(ddp, mine, config, group=layout.data_group)
        out["ddp"][name] = (metrics["loss_generation"], flat(model, "main_grad"))
    uneven = [collate(pairs[:1])] if rank == 0 else [collate(pairs[1:])]  # 1 pair here, 3 there
    for name, config in configs.items():
        ddp.zero_grad_buffer()
        run_layout(ddp, uneven, config, group=layout.data_group)
        out["ddp_uneven"] = {**out.get("ddp_uneven", {}), name: flat(model, "main_grad")}
    deltas = [None, None]
    torch.distributed.all_gather_object(deltas, shared_delta(rank))
    out["deltas"] = deltas
    if rank == 0:
        torch.save(out, out_path)
    parallel.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
