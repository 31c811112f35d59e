"""Stochastic depth (drop path) on the InternViT layers, as InternVL trains with it.

InternVL (``modeling_intern_vit.py``): layer ``i`` of ``L`` drops each branch with rate
``linspace(0, drop_path_rate, L)[i]``, per sample (image tile), after the layer scale and
before the residual add, the kept samples scaled by ``1 / (1 - rate)`` (timm's DropPath);
off in eval. Drops are observed here from the outside, with hooks on a layer's norms and
branches: a dropped tile leaves the residual bit for bit unchanged, a kept one adds its
branch scaled by ``1 / keep``. TP1 vs TP2 (and DP ranks against their own TP1 run) are
checked in the multi-rank launch of tests/test_model.py.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from megatron_mpo.errors import UserError

RATE = 0.4
LAYERS = 5  # per-layer rates 0, 0.1, 0.2, 0.3, 0.4


def _config(layers: int = LAYERS):
    from megatron_mpo.models.presets import get_preset

    config = get_preset("tiny")
    return dataclasses.replace(config, vision=dataclasses.replace(config.vision, num_layers=layers))


def _model(rate: float = 0.0, recompute=None, like=None):
    from megatron_mpo.models.internvl import build_model

    kwargs = {} if rate is None else {"drop_path_rate": rate}
    model = build_model(_config(), recompute=recompute, **kwargs)
    if like is not None:
        model.load_state_dict(like.state_dict())
    return model


def _pixels(tiles: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(tiles, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def _stream_state() -> torch.Tensor:
    from megatron.core import tensor_parallel

    from megatron_mpo.models import drop_path

    return tensor_parallel.get_cuda_rng_tracker().get_states()[drop_path.RNG_NAME].clone()


def test_rate_zero_and_eval_mode_never_drop(world):
    """Rate 0 in training is the model without drop path, bit for bit, and draws nothing;
    a model with drop path in eval mode (reference tool, held-out evaluation) is the same
    model again."""
    from megatron_mpo.models import drop_path

    drop_path.seed_rng(3, data_rank=0)
    plain = _model(rate=None)  # the builder's default
    pixels = _pixels(6)
    before = _stream_state()
    with torch.no_grad():
        expected = plain.eval().vision_model(pixels)
        zero = _model(0.0, like=plain)
        assert all(layer.drop_path_rate == 0.0 for layer in zero.vision_model.decoder.layers)
        assert torch.equal(zero.train().vision_model(pixels), expected)
        dropping = _model(RATE, like=plain).eval()
        assert torch.equal(dropping.vision_model(pixels), expected)
    assert torch.equal(_stream_state(), before)  # nothing drawn
    with torch.no_grad():  # ... while the same model in training does drop
        assert not torch.equal(dropping.train().vision_model(pixels), expected)
    assert not torch.equal(_stream_state(), before)


def _observe(model, pixels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per vision layer, which tiles had their attention / MLP branch dropped ([T] bools each),
    read from the layer's input, branch outputs and residual sums; asserts every other tile
    kept its branch scaled by 1 / keep."""
    layers = model.vision_model.decoder.layers
    seen: dict = {i: {} for i in range(len(layers))}
    hooks = []
    for i, layer in enumerate(layers):
        def pre(name, store):
            return lambda module, args: store.__setitem__(name, args[0].detach())

        def post(name, store):
            return lambda module, args, out: store.__setitem__(name, out)

        hooks += [
            layer.input_layernorm.register_forward_pre_hook(pre("x", seen[i])),
            layer.self_attention.register_forward_hook(post("attn", seen[i])),
            layer.pre_mlp_layernorm.register_forward_pre_hook(pre("h1", seen[i])),
            layer.mlp.register_forward_hook(post("mlp", seen[i])),
            layer.register_forward_hook(post("h2", seen[i])),
        ]
    with torch.no_grad():
        model.vision_model(pixels)
    for hook in hooks:
        hook.remove()
    out = []
    for i, layer in enumerate(layers):
        s, keep = seen[i], 1.0 - layer.drop_path_rate
        masks = []
        for residual, branch, total, scale in ((s["x"], s["attn"], s["h1"], layer.ls1),
                                               (s["h1"], s["mlp"], s["h2"][0], layer.ls2)):
            added = (branch[0] + branch[1]) * scale  # [S, T, C]: tiles are the batch dimension
            dropped = (total == residual).all(dim=0).all(dim=-1)
            assert (added != 0).any(dim=0).any(dim=-1).all()  # a dropped tile is told apart
            kept = ~dropped
            torch.testing.assert_close(total[:, kept], residual[:, kept] + added[:, kept] / keep,
                                       rtol=1e-5, atol=1e-6)
            masks.append(dropped)
        out.append(tuple(masks))
    return out


def test_drop_rate_per_layer_matches_internvl(world):
    """Layer i drops whole tiles at InternVL's linspace rate, each branch on its own draw.

    2000 tiles per layer: the observed share of a layer with rate p has standard deviation
    sqrt(p (1 - p) / 2000) <= 0.011; the bound is 4.5 of them, so a correct implementation
    fails one of the 12 checks for about 1 seed in 10^4 (binomial tails; the run is seeded,
    so it is the same every time). A wrong schedule (the top rate everywhere, reversed, one
    mask for both branches, per token instead of per tile) misses some check by 9 standard
    deviations or more, or fails the exact dropped / kept test of a tile."""
    from megatron_mpo.models import drop_path

    model = _model(RATE).train()
    expected = [x.item() for x in torch.linspace(0, RATE, LAYERS)]  # InternVL's dpr
    assert [layer.drop_path_rate for layer in model.vision_model.decoder.layers] == expected
    drop_path.seed_rng(11, data_rank=0)
    tiles, rounds = 500, 4
    counts = torch.zeros(LAYERS, 3)  # attention dropped, MLP dropped, both
    for r in range(rounds):
        for i, (attn, mlp) in enumerate(_observe(model, _pixels(tiles, seed=r))):
            counts[i] += torch.tensor([attn.sum(), mlp.sum(), (attn & mlp).sum()], dtype=torch.float)
    n = tiles * rounds
    assert counts[0].sum() == 0  # rate 0: never
    for i, p in enumerate(expected[1:], start=1):
        for observed, rate in ((counts[i, 0], p), (counts[i, 1], p), (counts[i, 2], p * p)):
            bound = 4.5 * math.sqrt(rate * (1 - rate) / n)
            assert abs(observed.item() / n - rate) <= bound, (i, observed.item() / n, rate)


def test_masks_replay_with_the_seed_and_differ_across_data_parallel_ranks(world, caplog):
    """... and drawing them logs nothing (on the CPU megatron-core's tracker would warn that
    the CPU generator moved inside its fork, once per mask)."""
    from megatron_mpo.models import drop_path

    model = _model(RATE).train()
    pixels = _pixels(64)
    runs = {}
    for name, data_rank in (("dp0", 0), ("dp0 again", 0), ("dp1", 1)):
        drop_path.seed_rng(5, data_rank=data_rank)
        runs[name] = [torch.stack(m) for m in _observe(model, pixels)]
    assert all(torch.equal(a, b) for a, b in zip(runs["dp0"], runs["dp0 again"]))
    assert not [r for r in caplog.records if r.name.startswith("megatron.core.tensor_parallel")]
    assert not all(torch.equal(a, b) for a, b in zip(runs["dp0"], runs["dp1"]))


def test_recompute_replays_the_same_masks(world):
    """With model.recompute=full the backward re-runs each vision layer: it must draw the
    masks of the forward again (megatron-core's checkpoint restores the RNG tracker), or
    the gradients would belong to another network."""
    from megatron_mpo.models import drop_path

    plain = _model(RATE).train()
    recomputed = _model(RATE, recompute="full", like=plain).train()
    pixels = _pixels(16)
    results = []
    for model in (plain, recomputed):
        calls = []
        model.vision_model.decoder.layers[-1].register_forward_hook(lambda *a: calls.append(1))
        drop_path.seed_rng(9, data_rank=0)
        model.zero_grad(set_to_none=True)
        out = model.vision_model(pixels)
        (out.float() ** 2).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.vision_model.named_parameters()}
        results.append((out.detach(), grads, len(calls), _stream_state()))
    (out_a, grads_a, calls_a, state_a), (out_b, grads_b, calls_b, state_b) = results
    assert (calls_a, calls_b) == (1, 2)  # the second model did recompute
    assert torch.equal(out_a, out_b) and torch.equal(state_a, state_b)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_parallel_initialize_seeds_the_stream(world):
    from megatron.core import tensor_parallel

    from megatron_mpo.models import drop_path

    assert drop_path.RNG_NAME in tensor_parallel.get_cuda_rng_tracker().get_states()


def test_rate_setting_is_checked_and_reaches_the_model(world):
    from megatron_mpo import parallel
    from megatron_mpo.config import load_config, read_config
    from megatron_mpo.models.internvl import build_model
    from megatron_mpo.training import model_setup

    base = ["model.preset=tiny", "data.shards=s", "data.ref_logps=r", "train.steps=1"]
    assert load_config(None, base).model.drop_path_rate == 0.0
    for bad in ("1.0", "-0.1", "1.5"):
        with pytest.raises(UserError, match=rf"^model\.drop_path_rate must be in \[0, 1\), got {re.escape(bad)}$"):
            read_config(None, base + [f"model.drop_path_rate={bad}"]).validate()
    with pytest.raises(UserError, match=r"drop_path_rate must be in \[0, 1\)"):
        build_model(_config(), drop_path_rate=1.0)
    cfg = load_config(None, base + ["model.drop_path_rate=0.2"])
    (chunk,) = model_setup.build_model_chunks(cfg, _config(), parallel.current_layout())
    rates = [layer.drop_path_rate for layer in chunk.vision_model.decoder.layers]
    assert rates == [x.item() for x in torch.linspace(0, 0.2, LAYERS)]
    # The LLM's layers never drop.
    assert not any(hasattr(layer, "drop_path_rate") for layer in chunk.language_model.decoder.layers)


def test_restoring_an_rng_state_saved_without_the_stream_keeps_it(world):
    """A checkpoint written before drop path existed has no such tracker state; restoring
    it must not remove the stream (the first vision forward would fail)."""
    from megatron.core import tensor_parallel

    from megatron_mpo.models import drop_path
    from megatron_mpo.training.rng_state import capture_rng_state, restore_rng_state

    state = capture_rng_state()
    del state["tracker"][drop_path.RNG_NAME]
    restore_rng_state(state)
    assert drop_path.RNG_NAME in tensor_parallel.get_cuda_rng_tracker().get_states()
