"""Held-out evaluation from the pair pipeline's machinery.

- **Answer accuracy** (per dataset): the engine answers held-out questions with a ground
  truth, the dataset's scorer checks them: greedy accuracy, and over ``k`` samples pass@k
  (a question counts when any of its samples is right) and the sampled accuracy (the share
  of right samples: pass@1 at the sampling temperature).
- **Preference accuracy**: the reward-margin sign against the reference values,
  ``(log pi(c) - log pi_0(c)) - (log pi(r) - log pi_0(r)) > 0`` -- what MPO optimises --
  and the per-token log-prob average ``log pi(c)/|c| > log pi(r)/|r|``. Raw log-prob sums
  mostly measure response length (the shorter response wins), so they are not reported as
  accuracy. The policy's values come from the reference tool's forward
  (:func:`megatron_mpo.reference.precompute`): any TP / PP / DP layout, the run's
  ``max_length``, tiling and template.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from megatron_mpo.data.samples import PairBuilder, SampleError
from megatron_mpo.generation.engines.base import Engine, SamplingSettings
from megatron_mpo.generation.prompts import build_prompt, reasoning_question
from megatron_mpo.generation.questions import Question
from megatron_mpo.generation.scoring import extract_final_answer, score_answer


def judged_answer(text: str, prompt_style: str) -> Optional[str]:
    """The answer a response gives: after ``Final answer:`` / ``Answer:``; with plain
    (short-answer) prompts a response without such a line is the answer itself."""
    found = extract_final_answer(text)
    if found is None and prompt_style == "plain" and text.strip():
        return text.strip().rstrip(".")
    return found


def _correct(text: str, q: Question, prompt_style: str) -> bool:
    answer = judged_answer(text, prompt_style)
    return answer is not None and score_answer(answer, q.answer, q.mode, q.choices).correct


def answer_accuracy(engine: Engine, builder: PairBuilder, questions: Sequence[Question], *,
                    prompt_style: str = "reasoning", k: int = 0, settings: Optional[SamplingSettings] = None,
                    max_new_tokens: int = 1024, examples: int = 3) -> dict:
    """Per-dataset counts of greedy (and pass@k) answers; questions without an answer are ignored."""
    settings = settings or SamplingSettings(n=max(k, 1), max_new_tokens=max_new_tokens)
    greedy = SamplingSettings(n=1, temperature=0.0, max_new_tokens=settings.max_new_tokens, seed=settings.seed)
    per: Dict[str, Counter] = defaultdict(Counter)
    shown: Dict[str, List[dict]] = defaultdict(list)
    prompts, asked = [], []
    for q in questions:
        if q.answer is None:
            continue
        text = q.question if prompt_style == "plain" else reasoning_question(q.question, len(q.images))
        try:
            prompts.append(build_prompt(builder, q.key, text or q.question, q.image_bytes(), q.max_dynamic_patch))
            asked.append(q)
        except SampleError as exc:
            per[q.dataset][f"skipped_{exc.reason}"] += 1
        except OSError:
            per[q.dataset]["skipped_missing_image"] += 1
    for q, (c,) in zip(asked, engine.generate(prompts, greedy) if prompts else []):
        ok = _correct(c.text, q, prompt_style)
        per[q.dataset]["questions"] += 1
        per[q.dataset]["greedy_correct"] += ok
        if len(shown[q.dataset]) < examples:
            shown[q.dataset].append({"question": q.question, "answer": q.answer, "generated": c.text, "correct": ok})
    if k > 0:
        for q, samples in zip(asked, engine.generate(prompts, replace(settings, n=k)) if prompts else []):
            right = [_correct(c.text, q, prompt_style) for c in samples]
            per[q.dataset][f"pass@{k}_correct"] += any(right)
            per[q.dataset]["sampled_correct"] += sum(right)
    return {name: {**dict(c), "examples": shown[name]} for name, c in per.items()}


def summarize_answers(per_rank: Sequence[dict], k: int = 0) -> dict:
    """Merge per-rank counts and turn them into accuracies, per dataset and overall."""
    merged: Dict[str, Counter] = defaultdict(Counter)
    examples: Dict[str, list] = defaultdict(list)
    for part in per_rank:
        for name, counts in part.items():
            examples[name] += counts.get("examples", [])
            merged[name].update({key: v for key, v in counts.items() if key != "examples"})
    total: Counter = Counter()
    out = {}
    for name, c in sorted(merged.items()):
        total.update(c)
        out[name] = _rates(c, k) | {"examples": examples[name][:3]}
    return {"datasets": out, "overall": _rates(total, k)}


def _rates(c: Counter, k: int) -> dict:
    n = c.get("questions", 0)
    out = {"questions": n, "greedy_accuracy": c.get("greedy_correct", 0) / n if n else None}
    if k > 0:  # pass@k, and the mean accuracy of single samples (pass@1 estimated from k)
        out[f"pass@{k}"] = c.get(f"pass@{k}_correct", 0) / n if n else None
        out["sampled_accuracy"] = c.get("sampled_correct", 0) / (n * k) if n else None
    skipped = {key[len("skipped_"):]: v for key, v in c.items() if key.startswith("skipped_")}
    if skipped:
        out["skipped"] = skipped
    return out


def preference_accuracy(policy_dir: str, reference_dir: str) -> dict:
    """Reward-margin and per-token accuracy of the policy's sidecars against the reference's.

    The two sets must share shards and every setting but the checkpoint (same tokenizer,
    template, max_length, tiling): a pair is compared only when both computed it.
    """
    from megatron_mpo.data.refs import complete_fingerprint, load_sidecar
    from megatron_mpo.errors import UserError

    policy_files = sorted(Path(policy_dir).glob("*.ref.json"))
    if not policy_files:
        raise UserError(f"no policy log-probs in {policy_dir}")
    margins: List[float] = []
    token_wins = pairs = 0
    for path in policy_files:
        ref_path = Path(reference_dir) / path.name
        if not ref_path.is_file():
            raise UserError(f"no reference values for {path.name} in {reference_dir}: run "
                            "megatron-mpo reference with the initial model on these shards")
        policy, ref = load_sidecar(str(path)), load_sidecar(str(ref_path))
        fp_p = {k: v for k, v in complete_fingerprint(policy["fingerprint"]).items() if k != "checkpoint"}
        fp_r = {k: v for k, v in complete_fingerprint(ref["fingerprint"]).items() if k != "checkpoint"}
        if fp_p != fp_r:
            diff = sorted(k for k in set(fp_p) | set(fp_r) if fp_p.get(k) != fp_r.get(k))
            raise UserError(f"{ref_path} was computed with other settings ({', '.join(diff)} differ); "
                            "evaluate with the reference run's template, max_length and tiling")
        for key, (pc, pr, nc, nr) in policy["logps"].items():
            if key not in ref["logps"]:
                continue
            rc, rr = ref["logps"][key][:2]
            margins.append((pc - rc) - (pr - rr))
            token_wins += pc / max(nc, 1) > pr / max(nr, 1)
            pairs += 1
    if not pairs:
        raise UserError(f"the policy and reference sidecars share no pair ({policy_dir}, {reference_dir})")
    return {
        "pairs": pairs,
        "reward_accuracy": sum(m > 0 for m in margins) / pairs,
        "mean_logp_margin": sum(margins) / pairs,  # reward margin / beta
        "per_token_logp_accuracy": token_wins / pairs,
    }


def write_json(path: str, data: dict) -> None:
    from megatron_mpo.fileio import write_atomic

    write_atomic(path, json.dumps(data, indent=1, ensure_ascii=False))
