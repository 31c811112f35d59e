"""Worker: per-sequence log-probs of a small GPTModel at TP=1/PP=1 vs TP=2/PP=2.

Every rank first builds the TP1/PP1 model (same seed -> identical weights), runs the
MPO forward/backward through get_forward_backward_func() and saves the model with
dist_checkpointing; then the same processes re-form as TP=2 x PP=2, load that
checkpoint and run again. Rank 0 writes both results for the test to compare.
"""

import os
import sys

import torch


def build_gpt(layout, experts=None):
    """The small GPTModel at ``layout``; ``experts``: that many MoE experts per layer (top-2)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        use_cpu_initialization=True, pipeline_dtype=torch.float32, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False,
        tensor_model_parallel_size=layout.tensor, pipeline_model_parallel_size=layout.pipeline,
        persist_layer_norm=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
        variable_seq_lengths=True, moe_token_dispatcher_type="alltoall",
        num_moe_experts=experts, expert_model_parallel_size=layout.expert,
    )
    return GPTModel(
        config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(num_experts=experts), vocab_size=96,
        max_sequence_length=64, pre_process=layout.is_first_stage, post_process=layout.is_last_stage,
        position_embedding_type="rope",
    )


def make_batches(num):
    from megatron_mpo.batch import PairBatch

    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(num):
        pairs, seq = 2, 12
        ids = torch.randint(0, 96, (2 * pairs, seq), generator=gen)
        labels = torch.roll(ids, -1, dims=1)
        index = torch.full((2 * pairs, seq), -1)
        for row in range(2 * pairs):
            start = int(torch.randint(3, 7, (1,), generator=gen))
            index[row, start : seq - 1] = row
        out.append(
            PairBatch(
                input_ids=ids, position_ids=torch.arange(seq).expand(2 * pairs, seq).clone(),
                labels=labels, response_index=index, image_token_index=torch.full_like(ids, -1),
                pixel_values=torch.zeros(0, 3, 8, 8), num_pairs=pairs,
                ref_chosen_logps=-torch.rand(pairs, generator=gen) * 30,
                ref_rejected_logps=-torch.rand(pairs, generator=gen) * 30,
            )
        )
    return out


def run(layout, model):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_mpo.losses import MPOLoss, MPOLossConfig
    from megatron_mpo.training.forward import make_forward_step

    step = make_forward_step(MPOLoss(MPOLossConfig()))
    results = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(make_batches(3)), model=[model],
        num_microbatches=3, seq_length=12, micro_batch_size=4, forward_only=False,
    )
    grads = {n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None}
    if not layout.is_last_stage:
        return None, grads
    return [(r["policy_chosen_logps"], r["policy_rejected_logps"], r["loss"]) for r in results], grads


def gather_to_rank0(obj):
    items = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(items, obj)
    return items


def main(out_path, ckpt_dir):
    from megatron.core import dist_checkpointing

    from megatron_mpo import parallel

    layout = parallel.initialize(1, 1, seed=11)
    model = build_gpt(layout)
    reference, ref_grads = run(layout, model)
    model.zero_grad(set_to_none=True)
    if torch.distributed.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)

    layout = parallel.initialize(2, 2, seed=99)  # other seed: weights must come from the file
    model = build_gpt(layout)
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
    model.load_state_dict(state)
    parallel_result, grads = run(layout, model)
    everything = gather_to_rank0((layout.pipeline_rank, layout.tensor_rank, parallel_result, grads))
    if torch.distributed.get_rank() == 0:
        last = [r for pp, tp, r, _ in everything if r is not None]
        torch.save(
            {
                "reference": reference,
                "parallel": last,
                "ref_grads": ref_grads,
                "parallel_grads": [(pp, tp, g) for pp, tp, _, g in everything],
            },
            out_path,
        )
    parallel.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
