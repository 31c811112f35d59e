"""Worker: TP=2 with sequence parallelism equals TP=2 without it, through the trainer's path.

Both TP ranks build the run's model chunks (``model_setup.build_model_chunks``) from the
same initial checkpoint, once with ``parallel.sequence`` off and once on, for packed and
unpacked rows, wrap them in megatron-core DDP (whose finalize step sums the sequence-parallel
norm gradients over TP), and run the same micro-batches -- padded to the sequence-parallel
multiple -- through megatron-core's schedule with the MPO forward step. Each rank saves its
per-pair log-probs, its local gradient shards, and the number of rows the output layer
ran on, for the test to compare.

Usage: python -m torch.distributed.run --nproc-per-node=2 tests/workers/sp_worker.py CONFIG.yaml OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

MICRO_BATCHES = 3


def _run(cfg, batches, tok) -> dict:
    from megatron_mpo import parallel
    from megatron_mpo.losses import MPOLoss
    from megatron_mpo.training import model_setup, schedule
    from megatron_mpo.training.checkpoint import load_model_weights
    from megatron_mpo.training.forward import make_forward_step
    from megatron_mpo.training.optim import wrap_data_parallel

    layout = parallel.initialize(cfg.parallel.tensor, 1, seed=cfg.train.seed, device="cpu")
    model_config = model_setup.model_config(cfg)
    chunks = model_setup.build_model_chunks(cfg, model_config, layout)
    load_model_weights(cfg.model.init, chunks)
    output_rows = []
    output_layer = chunks[0].language_model.output_layer
    output_layer.register_forward_hook(lambda _m, args, _out: output_rows.append(int(args[0].shape[0])))
    model = wrap_data_parallel(chunks, cfg.precision)
    for chunk in model:
        chunk.zero_grad_buffer()
    mpo = MPOLoss(cfg.mpo, group=layout.data_group)
    results = schedule.run_schedule(schedule.forward_backward_func(), make_forward_step(mpo), model, batches,
                                    tok.pad_id, forward_only=False)
    grads = {name: p.main_grad.detach().clone() for name, p in chunks[0].named_parameters() if p.requires_grad}
    return {
        "chosen": torch.cat([r["policy_chosen_logps"] for r in results]),
        "rejected": torch.cat([r["policy_rejected_logps"] for r in results]),
        "loss": torch.stack([r["loss"].detach() for r in results]),
        "grads": grads,
        "output_rows": output_rows,
        "positions": [int(b.input_ids.numel()) for b in batches],
        "scored": [int(b.response_mask().sum()) for b in batches],
    }


def main() -> int:
    import dataclasses

    from megatron_mpo import parallel, platform
    from megatron_mpo.config import load_config
    from megatron_mpo.data import build_loader
    from megatron_mpo.training import data_setup, model_setup

    config_path, out_dir = sys.argv[1], Path(sys.argv[2])
    platform.setup("cpu")
    rank = int(__import__("os").environ["RANK"])
    for packing in (True, False):
        base = load_config(config_path, [f"data.packing={str(packing).lower()}", "parallel.tensor=2"])
        sp_cfg = dataclasses.replace(base, parallel=dataclasses.replace(base.parallel, sequence=True))
        tok = data_setup.tokenizer(base)
        # One set of micro-batches for both runs, padded to the sequence-parallel multiple.
        model_config = model_setup.model_config(sp_cfg)
        data = dataclasses.replace(data_setup.loader_data(sp_cfg, model_config), num_workers=0, shuffle_buffer=0)
        loading = dataclasses.replace(data_setup.loader_plan(sp_cfg, model_config), shuffle_shards=False)
        loader = iter(build_loader(data, loading, tok))
        batches = [next(loader) for _ in range(MICRO_BATCHES)]
        loader.close()
        result = {"pad_multiple": loading.pad_multiple}
        for name, cfg in (("plain", base), ("sp", sp_cfg)):
            result[name] = _run(cfg, batches, tok)  # re-forms the model-parallel groups each time
        torch.save(result, out_dir / f"{'packed' if packing else 'unpacked'}_rank{rank}.pt")
    parallel.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
