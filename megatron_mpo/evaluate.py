"""Held-out evaluation of a checkpoint: answer accuracy and preference accuracy.

    [torchrun --nproc-per-node N --no-python] megatron-mpo evaluate --ckpt DIR --out DIR
        [--questions meta.json [-k 8]] [--shards DIR --ref-logps DIR [--tensor-parallel T]]
        [--max-length 8192] [--max-tiles N]
    megatron-mpo evaluate --config run.yaml --out DIR    # the run's last checkpoint on its eval.shards

- ``--questions``: a question set (MMPR-style meta.json whose records carry ``answer``;
  images under each dataset's ``root``). The generation engine answers (greedy, and
  pass@k with ``-k``), each dataset's scorer checks; questions are split over the ranks.
- ``--shards`` + ``--ref-logps``: held-out preference pairs and the initial model's
  reference values of them (megatron-mpo reference). The checkpoint's log-probs
  come from the same forward at ``--tensor-parallel`` / ``--pipeline-parallel`` (ranks
  beyond them are data-parallel); reported: reward-margin accuracy, per-token log-prob
  accuracy, mean margin.

The result (``--out``/eval.json) holds both, per dataset where it applies; see
:mod:`megatron_mpo.generation.evaluation`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from megatron_mpo.console import exit_on_user_error, setup_console
from megatron_mpo.errors import UserError

setup_console()  # at module level: dist_checkpointing's helper processes re-import this file


def _preference(args, rank: int) -> dict:
    """The checkpoint's log-probs of the held-out shards (reference tool's forward), compared."""
    from megatron_mpo.config import load_config
    from megatron_mpo.training.model_dir import follow_latest, tokenizer_source
    from megatron_mpo.generation.evaluation import preference_accuracy
    from megatron_mpo.reference import precompute

    ckpt = follow_latest(args.ckpt, print if rank == 0 else (lambda _m: None))
    policy_dir = os.path.join(args.out, "policy_logps")
    overrides = [f"model.init={ckpt}", f"model.tokenizer={tokenizer_source(ckpt)}", f"data.shards={args.shards}",
                 f"data.ref_logps={policy_dir}", f"data.max_length={args.max_length}",
                 *([f"data.max_tiles={args.max_tiles}"] if args.max_tiles is not None else []),
                 f"parallel.tensor={args.tensor_parallel}",
                 f"parallel.pipeline={args.pipeline_parallel}", f"train.device={args.device}",
                 f"train.micro_batch={args.micro_batch}", "train.global_batch=1", "train.steps=1"]
    if args.template:
        overrides.append(f"data.template={args.template}")
    cfg = load_config(None, overrides)
    cfg.data.system_message = args.system_message  # free text: set as it is, not parsed as a YAML override
    precompute(cfg, log=print if rank == 0 else (lambda _m: None))
    return preference_accuracy(policy_dir, args.ref_logps) if rank == 0 else {}


# With --config: the run's keys as defaults (its last checkpoint, held-out pairs, lengths, layout).
KEYS = {"ckpt": "checkpoint.save", "shards": "eval.shards", "ref_logps": "eval.ref_logps",
        "max_length": "data.max_length", "max_tiles": "data.max_tiles", "template": "data.template",
        "system_message": "data.system_message", "tensor_parallel": "parallel.tensor",
        "pipeline_parallel": "parallel.pipeline", "micro_batch": "train.micro_batch", "device": "train.device"}


def build_parser(prog=None) -> argparse.ArgumentParser:
    from megatron_mpo.config_args import add_config_keys
    from megatron_mpo.generation.cli import add_model_args, add_sampling_args

    parser = argparse.ArgumentParser(prog=prog, description="Answer accuracy and preference accuracy of a checkpoint.")
    parser.add_argument("--ckpt", required=True, help="Megatron model dir, training checkpoint or run save dir "
                        "(or, for answers only, an HF InternVL directory)")
    parser.add_argument("--out", required=True, help="result directory (eval.json; the engine's export)")
    parser.add_argument("--questions", help="held-out question set with answers (meta.json)")
    parser.add_argument("-k", type=int, default=0, help="pass@k over k samples per question (0: greedy only)")
    parser.add_argument("--prompt", default="reasoning", choices=["reasoning", "plain"],
                        help="reasoning: 'Final answer:' instruction; plain: the question as is (short answers)")
    parser.add_argument("--shards", help="held-out preference shards (megatron-mpo shards) for preference accuracy")
    parser.add_argument("--ref-logps", help="the initial model's reference sidecars of --shards")
    parser.add_argument("--pipeline-parallel", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=1)
    add_model_args(parser, model=False)
    add_sampling_args(parser, {"n": 1, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "max_new_tokens": 1024})
    add_config_keys(parser, KEYS)
    return parser


@exit_on_user_error
def main(argv=None, prog=None) -> dict:
    from megatron_mpo.config_args import parse_with_config
    from megatron_mpo.generation.cli import dist_rank

    args = parse_with_config(build_parser(prog), argv, KEYS)
    args.model = args.ckpt
    if not args.questions and not args.shards:
        raise UserError("nothing to evaluate: give --questions (answer accuracy) and/or --shards with --ref-logps")
    if bool(args.shards) != bool(args.ref_logps):
        raise UserError("preference accuracy needs both --shards and --ref-logps (the initial model's values)")
    if args.max_length < 2:
        raise UserError("--max-length must be >= 2")
    rank, world = dist_rank()
    log = print if rank == 0 else (lambda _m: None)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    result: dict = {"checkpoint": str(args.ckpt), "max_length": args.max_length}
    from megatron_mpo.generation.evaluation import write_json

    if args.questions:
        from megatron_mpo.generation.cli import open_engine
        from megatron_mpo.generation.engines import SamplingSettings
        from megatron_mpo.generation.evaluation import answer_accuracy
        from megatron_mpo.generation.questions import load_questions

        qset = load_questions(args.questions, allow_outside_root=args.allow_outside_root)
        if not any(q.answer is not None for q in qset.questions):
            raise UserError(f"{args.questions} has no question with an 'answer': nothing to score")
        _model, _tok, builder, engine = open_engine(args, args.out, log)
        mine = [q for i, q in enumerate(qset.questions) if i % world == rank]
        settings = SamplingSettings(n=max(args.k, 1), temperature=args.temperature, top_k=args.top_k,
                                    top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed)
        counts = answer_accuracy(engine, builder, mine, prompt_style=args.prompt, k=args.k, settings=settings)
        write_json(os.path.join(args.out, f"answers_rank{rank:05d}.json"), counts)
        result["refused_questions"] = dict(qset.refused)
    if args.shards:
        result["preference"] = _preference(args, rank)  # its barrier: every rank's answers are written
    elif world > 1 and args.questions:
        from megatron_mpo.generation.model_source import wait_for_file

        for r in range(world):
            wait_for_file(Path(args.out) / f"answers_rank{r:05d}.json", "answers of every rank")
    if rank != 0:
        return {}
    if args.questions:
        from megatron_mpo.generation.evaluation import summarize_answers

        parts = [json.loads((Path(args.out) / f"answers_rank{r:05d}.json").read_text()) for r in range(world)]
        result["answers"] = summarize_answers(parts, args.k)
        overall = result["answers"]["overall"]
        if not overall["questions"]:
            raise UserError(f"no held-out question could be asked (skipped: {overall.get('skipped', {})}); "
                            f"prompt_too_long: raise --max-length (now {args.max_length}) or lower --max-tiles")
    write_json(os.path.join(args.out, "eval.json"), result)
    print(json.dumps(result, indent=1, ensure_ascii=False))
    return result


if __name__ == "__main__":
    main()
