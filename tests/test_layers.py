"""The local spec's memory-lean RMSNorm and SwiGLU: same values and gradients as the
plain torch formulas, fewer bytes kept for backward, and used by the LLM layer spec."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_mpo.models.layers import RMSNorm, SwiGLUMLP, _RMSNormFunction, _SwiGLUFunction


def saved_bytes(fn, *inputs) -> int:
    """Bytes of the distinct storages autograd keeps for backward while running ``fn``."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    leaves = {t.untyped_storage().data_ptr() for t in inputs}
    return sum(n for ptr, n in seen.items() if ptr not in leaves)


def reference_rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference_swiglu(x):
    a, b = x.chunk(2, dim=-1)
    return F.silu(a) * b


def test_rms_norm_matches_torch_values_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(33, 2, 48, requires_grad=True)
    w = torch.randn(48, requires_grad=True)
    grad = torch.randn(33, 2, 48)
    ours = _RMSNormFunction.apply(x, w, 1e-6)
    ref = F.rms_norm(x, (48,), w, 1e-6)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    g_ours = torch.autograd.grad(ours, (x, w), grad)
    g_ref = torch.autograd.grad(ref, (x, w), grad)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    x64 = torch.randn(5, 3, 16, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFunction.apply(a, b, 1e-5), (x64, w64))


def test_rms_norm_bf16_reduces_in_fp32():
    torch.manual_seed(1)
    x = torch.randn(7, 64).to(torch.bfloat16)
    w = torch.randn(64).to(torch.bfloat16)
    out = _RMSNormFunction.apply(x, w, 1e-6)
    assert out.dtype == torch.bfloat16
    expected = reference_rms_norm(x.float(), w.float(), 1e-6).to(torch.bfloat16)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_swiglu_matches_unfused_values_and_gradients():
    torch.manual_seed(2)
    x = torch.randn(21, 1, 64, requires_grad=True)
    grad = torch.randn(21, 1, 32)
    ours, ref = _SwiGLUFunction.apply(x), reference_swiglu(x)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, x, grad)
    (g_ref,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-6)
    x64 = torch.randn(4, 2, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SwiGLUFunction.apply, (x64,))


def test_lean_functions_keep_fewer_bytes_for_backward():
    x = torch.randn(256, 1, 128, requires_grad=True)
    w = torch.randn(128, requires_grad=True)
    assert saved_bytes(lambda a, b: _RMSNormFunction.apply(a, b, 1e-6), x, w) < saved_bytes(
        lambda a, b: F.rms_norm(a, (128,), b, 1e-6), x, w
    )
    # The unfused SwiGLU keeps silu(a) (half the input's size) on top of the input.
    lean = saved_bytes(lambda a: _SwiGLUFunction.apply(a * 1.0), x)
    plain = saved_bytes(lambda a: reference_swiglu(a * 1.0), x)
    assert lean + x.numel() * 4 // 2 <= plain


@pytest.mark.parametrize("spec_part", ["input_layernorm", "pre_mlp_layernorm", "mlp"])
def test_local_language_spec_uses_the_lean_modules(spec_part):
    from megatron_mpo.models.specs import language_layer_spec

    layer = language_layer_spec("local")
    built = getattr(layer.submodules, spec_part)
    module = built.module if hasattr(built, "module") else built
    assert module is (SwiGLUMLP if spec_part == "mlp" else RMSNorm)
