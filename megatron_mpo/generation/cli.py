"""Command lines of the pair pipeline (``megatron-mpo sample``, ``megatron-mpo pairs``)."""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from typing import Optional, Sequence

from megatron_mpo.errors import UserError

SAMPLING_DEFAULTS = {"n": 8, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "max_new_tokens": 2048}
# With --config: the run's keys as defaults, so prompts are cut and tiled as its training's, from
# the policy the run starts from (on-policy pairs for that run).
SAMPLE_KEYS = {"model": "model.init", "template": "data.template", "system_message": "data.system_message",
               "max_length": "data.max_length", "max_tiles": "data.max_tiles", "device": "train.device"}


def add_model_args(parser: argparse.ArgumentParser, model: bool = True) -> None:
    from megatron_mpo.data.config import DataConfig

    data = DataConfig()  # prompts are cut and tiled as training's defaults say
    if model:
        parser.add_argument("--model", required=True, help="HF InternVL dir (native or original layout), Megatron "
                            "model dir, training checkpoint (save/step_N) or a run's save dir (exported first)")
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"],
                        help="transformers: generate with a KV cache, anywhere; vllm: CUDA clusters")
    parser.add_argument("--template", help="chat template (default: the model's own)")
    parser.add_argument("--system-message", help="system message (default: the template's; 'thinking' = R1)")
    parser.add_argument("--max-length", type=int, default=data.max_length,
                        help="longest prompt in tokens, image tokens included (longer: counted prompt_too_long)")
    parser.add_argument("--max-tiles", type=int, default=data.max_tiles,
                        help="tile budget per question (default: the model's own, as training's data.max_tiles)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--dtype", default="auto", help="transformers engine dtype: auto, float32, bfloat16")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="vllm: GPUs per engine (inside a node)")
    parser.add_argument("--allow-outside-root", action="store_true")


def add_sampling_args(parser: argparse.ArgumentParser, defaults: dict = SAMPLING_DEFAULTS) -> None:
    parser.add_argument("--samples", "-n", type=int, default=defaults["n"], help="samples per question")
    parser.add_argument("--temperature", type=float, default=defaults["temperature"])
    parser.add_argument("--top-k", type=int, default=defaults["top_k"])
    parser.add_argument("--top-p", type=float, default=defaults["top_p"])
    parser.add_argument("--max-new-tokens", type=int, default=defaults["max_new_tokens"])
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (recorded; the transformers engine "
                        "reproduces a question's samples from it)")


def dist_rank() -> tuple[int, int]:
    """(rank, world) from torchrun's environment; questions are split over them."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def open_engine(args, out_dir: str, log):
    """(model source, tokenizer, prompt builder, engine) for parsed ``add_model_args``."""
    from megatron_mpo.data import load_tokenizer
    from megatron_mpo.generation.engines import make_engine
    from megatron_mpo.generation.model_source import prompt_builder, resolve_model

    rank, _ = dist_rank()
    model = resolve_model(args.model, args.engine, out_dir, rank=rank, template=args.template, log=log)
    tok = load_tokenizer(model.tokenizer_dir)
    builder = prompt_builder(model, tok, max_length=args.max_length, max_tiles=args.max_tiles,
                             system_message=args.system_message)
    if args.engine == "transformers":
        options = {"device": args.device, "dtype": args.dtype}
    else:  # the engine's context holds the prompt and the answer
        options = {"tensor_parallel_size": args.tensor_parallel, "max_model_len": args.max_length + args.max_new_tokens,
                   "min_tiles": builder.min_tiles}
    engine = make_engine(args.engine, model.hf_dir, tok, **options)
    return model, tok, builder, engine


def sample_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    from megatron_mpo.config_args import add_config_keys

    parser = argparse.ArgumentParser(prog=prog, description="Sample responses of your own model for a question set "
                                     "(MPO's pair construction, step 1 of 2).")
    parser.add_argument("--questions", required=True, help="meta.json of question sets (records: image, question, "
                        "answer, [choices]; datasets: root, annotation, [scoring])")
    parser.add_argument("--out", required=True, help="sample directory (rerun the same command to resume)")
    add_model_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--prompt", default="reasoning", choices=["reasoning", "plain"],
                        help="reasoning: InternVL's step-by-step 'Final answer:' instruction (default)")
    parser.add_argument("--no-dropout-ntp", action="store_true",
                        help="refuse questions without 'answer' (no_answer) instead of Dropout NTP")
    parser.add_argument("--part-size", type=int, default=64, help="questions per resumable part")
    parser.add_argument("--overwrite", action="store_true", help="start over in a --out made with other settings")
    add_config_keys(parser, SAMPLE_KEYS)
    return parser


def sample_main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> dict:
    from megatron_mpo.config_args import parse_with_config
    from megatron_mpo.generation.engines import SamplingSettings
    from megatron_mpo.generation.questions import load_questions
    from megatron_mpo.generation.sampler import Sampler, check_run_record, make_parts, run_record

    args = parse_with_config(sample_parser(prog), argv, SAMPLE_KEYS)
    rank, world = dist_rank()
    log = print if rank == 0 else (lambda m: print(m) if m.startswith("[rank") else None)
    if args.overwrite and world > 1:  # ranks could write parts while rank 0 clears the folder
        raise UserError(f"--overwrite starts {args.out} over: delete it first, or run --overwrite without torchrun")

    settings = SamplingSettings(n=args.samples, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                max_new_tokens=args.max_new_tokens, seed=args.seed)
    qset = load_questions(args.questions, seed=args.seed, allow_outside_root=args.allow_outside_root)
    for reason, n in sorted(qset.refused.items()):
        first = next(r for r in qset.refusals if r["reason"] == reason)
        log(f"refused {n} question(s) as {reason} (first: {first['dataset']} line {first['line']}: {first['detail']})")
    if not qset.questions:
        raise UserError(f"{args.questions} has no usable question ({dict(qset.refused)})")
    parts = make_parts(qset, args.part_size)
    model, tok, builder, engine = open_engine(args, args.out, log)
    record = run_record(model=args.model, engine=engine.describe(), settings=settings, prompt_style=args.prompt,
                        dropout_ntp=not args.no_dropout_ntp, meta=args.questions, parts=parts, builder=builder)
    if rank == 0:
        check_run_record(args.out, record, overwrite=args.overwrite)
        from megatron_mpo.fileio import write_atomic

        write_atomic(os.path.join(args.out, "refused.jsonl"), "".join(json.dumps(r) + "\n" for r in qset.refusals))
    else:
        from pathlib import Path

        from megatron_mpo.generation.model_source import wait_for_file

        wait_for_file(Path(args.out) / "run.json", "run.json", timeout_s=600)
        check_run_record(args.out, record)
    log(f"sampling {len(qset.questions)} questions ({sum(q.answer is not None for q in qset.questions)} with an "
        f"answer) from {model.source} with {engine.name}, template {model.template}, {settings.n} samples each, "
        f"T {settings.temperature}, top-k {settings.top_k}, top-p {settings.top_p}, seed {settings.seed}")
    sampler = Sampler(engine, builder, settings, args.out, prompt_style=args.prompt,
                      dropout_ntp=not args.no_dropout_ntp, log=log)
    counts: Counter = sampler.run(parts, rank, world)
    if counts:
        print(f"[rank {rank}] counted: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), flush=True)
    return dict(counts)


def pairs_main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> dict:
    from megatron_mpo.generation.pairs import build_pairs

    parser = argparse.ArgumentParser(prog=prog, description="Score sampled responses and write MPO preference pairs "
                                     "in MMPR format (step 2 of 2; then megatron-mpo shards).")
    parser.add_argument("--samples", required=True, help="the --out of megatron-mpo sample")
    parser.add_argument("--out", required=True, help="pair directory: meta.json + JSONL + summary.json")
    parser.add_argument("--max-pairs-per-question", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0, help="pair shuffle seed")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    return build_pairs(args.samples, args.out, max_pairs_per_question=args.max_pairs_per_question, seed=args.seed,
                       overwrite=args.overwrite)
