"""Checkpoints of a fused Adam (Transformer Engine's / apex's) that has not stepped yet.

With TE or apex installed megatron-core uses their FusedAdam, which builds its per-parameter
state (``exp_avg``, ``exp_avg_sq``) inside ``step()`` and keeps the step count in the param
groups. A run whose every step so far was skipped (non-finite) or that is preempted before
its first step saves such an optimizer. Neither library runs on this CPU machine, so a
stand-in with the same lazy state takes their place inside megatron-core (the flags
megatron-core set at import say "TE present"). Each save format must round-trip, and the
loaded optimizer must take the same first step as one that never went through a checkpoint.
"""

from __future__ import annotations

import pytest
import torch

from megatron_mpo.config import PrecisionSection, TrainSection


class LazyFusedAdam(torch.optim.Optimizer):
    """Transformer Engine's FusedAdam (2.10) as megatron-core sees it: Adam(W) whose state is
    created on first use in ``step()`` (zeros for both moments, for every parameter of a
    non-empty group, with or without a gradient) and whose step count is ``group["step"]``
    (absent until the first step), not per-parameter state."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
                 adam_w_mode=True, weight_decay=0.0, **unused):
        super().__init__(params, dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                                      weight_decay=weight_decay))
        self.adam_w_mode = adam_w_mode

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if not group["params"]:
                continue
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            correction1 = 1 - beta1 ** group["step"] if group["bias_correction"] else 1.0
            correction2 = 1 - beta2 ** group["step"] if group["bias_correction"] else 1.0
            for p in group["params"]:
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = (state["exp_avg"] / correction1) / ((state["exp_avg_sq"] / correction2).sqrt() + group["eps"])
                if self.adam_w_mode:
                    update = update + group["weight_decay"] * p
                p.add_(update, alpha=-group["lr"])


@pytest.fixture
def fused_adam(monkeypatch):
    """megatron-core builds LazyFusedAdam and follows its TE-optimizer code paths."""
    import megatron.core.optimizer as mcore_optimizer
    from megatron.core.optimizer import distrib_optimizer

    monkeypatch.setattr(mcore_optimizer, "Adam", LazyFusedAdam)
    monkeypatch.setattr(mcore_optimizer, "USING_PYTORCH_OPTIMIZER", False)
    monkeypatch.setattr(distrib_optimizer, "Adam", LazyFusedAdam)
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)
    monkeypatch.setattr(distrib_optimizer, "USING_TE_OPTIMIZER", True)


def _build(seed: int, speed=None):
    """The tiny preset in DDP with the distributed optimizer, as the trainer builds them
    (``speed``: its PerfSettings, e.g. overlap with small buckets)."""
    from megatron_mpo import parallel
    from megatron_mpo.models.internvl import build_model
    from megatron_mpo.models.presets import get_preset
    from megatron_mpo.training.optim import build_optimizer, wrap_data_parallel

    parallel.initialize(1, 1, seed=seed, device="cpu")
    chunks = wrap_data_parallel([build_model(get_preset("tiny"), spec="local")], PrecisionSection(), speed)
    optimizer = build_optimizer(chunks, TrainSection(steps=1, lr=1e-2, weight_decay=0.05), PrecisionSection())
    return chunks, optimizer


def _inner(optimizer) -> LazyFusedAdam:
    (sub,) = getattr(optimizer, "chained_optimizers", [optimizer])
    assert type(sub.optimizer) is LazyFusedAdam, "megatron-core did not build the stand-in"
    return sub.optimizer


def _step(chunks, optimizer, seed: int) -> None:
    """One update from fixed gradients (the same on every call with the same seed)."""
    gen = torch.Generator().manual_seed(seed)
    for chunk in chunks:
        chunk.zero_grad_buffer()
        for buffer in chunk.buffers:
            buffer.grad_data.copy_(torch.randn(buffer.grad_data.shape, generator=gen) * 1e-2)
        chunk.finish_grad_sync()
    ok, _norm, _ = optimizer.step()
    assert ok


def _state(chunks, optimizer) -> dict:
    weights = {n: p.detach().clone() for n, p in chunks[0].module.named_parameters()}
    inner = _inner(optimizer)
    moments = [(k, v.clone()) for p in (q for g in inner.param_groups for q in g["params"])
               for k, v in sorted(inner.state[p].items())]
    return {"weights": weights, "moments": moments, "steps": [g.get("step") for g in inner.param_groups]}


def _assert_same(a: dict, b: dict) -> None:
    assert a["steps"] == b["steps"]
    assert a["weights"].keys() == b["weights"].keys()
    for name, value in b["weights"].items():
        assert torch.equal(a["weights"][name], value), name
    assert len(a["moments"]) == len(b["moments"]) > 0
    for (key_a, x), (key_b, y) in zip(a["moments"], b["moments"]):
        assert key_a == key_b and torch.equal(x, y), key_a


@pytest.mark.parametrize("optimizer_format", ["reshardable", "dp_reshardable"])
def test_a_fused_adam_saved_before_its_first_step_resumes(world, fused_adam, tmp_path, optimizer_format):
    """Saved at step 0 (nothing stepped yet) and at step 1: either resumes into the run that
    never saved, as does the run that saved."""
    from megatron_mpo.training.checkpoint import CheckpointManager

    straight_chunks, straight_opt = _build(seed=3)
    assert len(_inner(straight_opt).state) == 0  # lazy: nothing before the first step
    for seed in (11, 12):
        _step(straight_chunks, straight_opt, seed)
    straight = _state(straight_chunks, straight_opt)
    assert straight["steps"] == [2] * len(straight["steps"])

    chunks, optimizer = _build(seed=3)
    manager = CheckpointManager(tmp_path / "run", optimizer_format=optimizer_format)
    at_0 = manager.save(0, chunks, optimizer, {"step": 0}, {})
    _step(chunks, optimizer, 11)
    at_1 = manager.save(1, chunks, optimizer, {"step": 1}, {})
    _step(chunks, optimizer, 12)
    _assert_same(_state(chunks, optimizer), straight)

    for saved, remaining in ((at_0, (11, 12)), (at_1, (12,))):
        resumed_chunks, resumed_opt = _build(seed=4)  # other weights: the load must replace them
        manager.load(saved, resumed_chunks, resumed_opt)
        for seed in remaining:
            _step(resumed_chunks, resumed_opt, seed)
        _assert_same(_state(resumed_chunks, resumed_opt), straight)
