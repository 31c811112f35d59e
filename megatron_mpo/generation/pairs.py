"""Preference pairs from sampled responses, written in MMPR format.

Correctness pairs (the paper's pipeline for questions with a ground truth): each sample's
final answer is scored in its dataset's mode; right ones are positives, wrong ones and
those without a final answer negatives; pairs are positives x negatives, skipping a pair
whose rejected answer contains the chosen one, shuffled with the run's seed and capped per
question. A question whose samples are all right or all wrong gives none (counted).

Dropout NTP pairs (questions without a ground truth): chosen = the answer with the
image, rejected = its first half continued without the image.

Output: ``meta.json`` (one dataset per source dataset and kind, ``root`` the source's image
root) plus JSONL records ``{image, question, chosen, rejected, ...provenance}``, which
``megatron-mpo shards`` reads unchanged; ``summary.json`` holds the counts.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from megatron_mpo.errors import UserError
from megatron_mpo.fileio import write_atomic
from megatron_mpo.generation.sampler import RUN_FILE, SAMPLES_DIR
from megatron_mpo.generation.scoring import answer_in, score_response

SUMMARY_FILE = "summary.json"
COUNT_KEYS = ("questions", "samples", "no_final_answer", "all_correct", "all_wrong", "pairs",
              "entailment_skips", "dropout_ntp_pairs")

Log = Callable[[str], None]


def read_samples(sample_dir: str) -> Tuple[dict, List[dict]]:
    """(run.json, every sampled record in part order); UserError while parts are missing."""
    base = Path(sample_dir)
    run_path = base / RUN_FILE
    if not run_path.is_file():
        raise UserError(f"{sample_dir} has no {RUN_FILE}: run megatron-mpo sample into it first")
    run = json.loads(run_path.read_text())
    missing = [p for p in run["parts"] if not (base / SAMPLES_DIR / f"{p}.jsonl").is_file()]
    if missing:
        raise UserError(f"{len(missing)} of {len(run['parts'])} sample parts are missing (first: {missing[0]}); "
                        "rerun the same megatron-mpo sample command to finish them")
    records = []
    for part in run["parts"]:
        path = base / SAMPLES_DIR / f"{part}.jsonl"
        records += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return run, records


def correctness_pairs(record: dict, counts: Counter, max_pairs: Optional[int], rng: random.Random
                      ) -> List[Tuple[str, str, dict]]:
    """(chosen, rejected, provenance) pairs of one sampled question."""
    positives, negatives = [], []
    for sample in record.get("responses", []):
        if sample.get("problem"):
            continue  # empty / non-UTF-8: neither a target nor a fair negative
        counts["samples"] += 1
        score = score_response(sample["text"], record["answer"], record.get("mode") or "default",
                               record.get("choices"))
        if score.answer is None:
            counts["no_final_answer"] += 1
        (positives if score.correct else negatives).append((sample["text"], score.answer))
    if not positives or not negatives:
        counts["all_correct" if positives else "all_wrong"] += 1
        return []
    pairs = []
    for chosen, chosen_answer in positives:
        for rejected, rejected_answer in negatives:
            if answer_in(rejected_answer, chosen_answer or ""):
                counts["entailment_skips"] += 1
                continue
            pairs.append((chosen, rejected, {"chosen_answer": chosen_answer, "rejected_answer": rejected_answer}))
    rng.shuffle(pairs)
    if max_pairs is not None and len(pairs) > max_pairs:
        counts["capped_pairs"] += len(pairs) - max_pairs
        pairs = pairs[:max_pairs]
    counts["pairs"] += len(pairs)
    return pairs


def dropout_ntp_pair(record: dict, counts: Counter) -> List[Tuple[str, str, dict]]:
    chosen, cont = record.get("chosen"), record.get("continuation")
    if not chosen or not cont or chosen.get("problem") or cont.get("problem"):
        counts["dropout_ntp_unusable"] += 1
        return []
    counts["samples"] += 2
    rejected = record["prefix"] + cont["text"]
    if rejected.strip() == chosen["text"].strip():
        counts["dropout_ntp_identical"] += 1
        return []
    counts["dropout_ntp_pairs"] += 1
    return [(chosen["text"], rejected, {"prefix": record["prefix"]})]


def build_pairs(sample_dir: str, out_dir: str, *, max_pairs_per_question: Optional[int] = 15, seed: int = 0,
                overwrite: bool = False, log: Log = print) -> dict:
    """Score the samples of ``sample_dir`` and write MMPR pairs to ``out_dir``; the summary."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} is not empty; choose a new --out or pass --overwrite")
    if max_pairs_per_question is not None and max_pairs_per_question < 1:
        raise UserError("--max-pairs-per-question must be >= 1")
    run, records = read_samples(sample_dir)
    counts: Counter = Counter({k: 0 for k in COUNT_KEYS})
    rows: Dict[Tuple[str, str], List[dict]] = {}
    roots: Dict[str, Tuple[str, Optional[int]]] = {}
    for record in records:
        if "error" in record:
            counts[f"refused_{record['error']}"] += 1
            continue
        counts["questions"] += 1
        rng = random.Random(f"{seed}:{record['key']}")
        kind = record["kind"]
        made = (correctness_pairs(record, counts, max_pairs_per_question, rng) if kind == "correctness"
                else dropout_ntp_pair(record, counts))
        roots.setdefault(record["dataset"], (record.get("root", ""), record.get("max_dynamic_patch")))
        for chosen, rejected, extra in made:
            rows.setdefault((record["dataset"], kind), []).append({
                "image": record.get("image"), "question": record["prompt"], "chosen": chosen, "rejected": rejected,
                "source": {"dataset": record["dataset"], "line": record["line"], "id": record.get("id"),
                           "key": record["key"], "kind": kind, "answer": record.get("answer"), **extra},
                "model": run["model"], "sampling": run["sampling"],
            })
    summary = {**{k: counts[k] for k in COUNT_KEYS}, **{k: v for k, v in sorted(counts.items()) if k not in COUNT_KEYS},
               "samples_dir": str(Path(sample_dir).absolute()), "seed": run["sampling"]["seed"],
               "max_pairs_per_question": max_pairs_per_question}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=1))
    log("pairs: " + ", ".join(f"{k} {summary[k]}" for k in COUNT_KEYS))
    if not rows:
        raise UserError(f"no pair could be built from {sample_dir} ({summary['all_correct']} questions all right, "
                        f"{summary['all_wrong']} all wrong, {summary['no_final_answer']} samples without a final "
                        f"answer; counts in {out / SUMMARY_FILE}): sample more answers (-n) or a higher temperature")
    _write(out, rows, roots, overwrite)
    return summary


def _write(out: Path, rows: Dict[Tuple[str, str], List[dict]], roots: Dict[str, Tuple[str, Optional[int]]],
           overwrite: bool) -> None:
    """meta.json + one JSONL per (dataset, kind); meta.json last, so a half-written folder
    has no meta file for make_shards to read."""
    out.mkdir(parents=True, exist_ok=True)
    if overwrite and (out / "meta.json").exists():
        (out / "meta.json").unlink()
    meta = {}
    for (dataset, kind), items in sorted(rows.items()):
        name = f"{dataset}_{kind}"
        annotation = f"{name}.jsonl"
        write_atomic(out / annotation, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items))
        root, patch = roots[dataset]
        meta[name] = {"root": root, "annotation": annotation, "repeat_time": 1, "length": len(items)}
        if patch is not None:
            meta[name]["max_dynamic_patch"] = patch
    write_atomic(out / "meta.json", json.dumps(meta, indent=1))
