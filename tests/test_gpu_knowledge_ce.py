"""GPU checks (marked ``gpu``; skipped without CUDA): every CUDA backend against the reference.

benches/gpu_check.sh runs these with VFM_TEST_GPU=1 (the real Triton compiler, not the interpreter).
"""

import pytest
import torch

import vfm
from vfm import _registry
from kce_cases import CASES, make_inputs

pytestmark = pytest.mark.gpu
OP = "knowledge_cross_entropy"


def _cuda_backends():
    if not torch.cuda.is_available():
        return []
    return [b for b in vfm.available_backends(OP, "cuda") if b != "torch"]


TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-4, 2e-3), torch.bfloat16: (2e-4, 1.6e-2)}


# every case in fp32 and bf16 at an odd vocabulary; the Llama-3 vocabulary in bf16; fp16 on a few
MATRIX = ([(c, torch.float32, 4099) for c in sorted(CASES)] + [(c, torch.bfloat16, 128256) for c in sorted(CASES)]
          + [(c, torch.float16, 70000) for c in ("ce", "kl_t2", "everything")])


@pytest.mark.parametrize("backend", _cuda_backends() or ["none"])
@pytest.mark.parametrize("case,dtype,vocab", MATRIX, ids=[f"{c}-{str(d)[6:]}-{v}" for c, d, v in MATRIX])
def test_cuda_backend_matches_reference(backend, dtype, case, vocab):
    if backend == "none":
        pytest.skip("no CUDA backend available")
    logits, target, opts = make_inputs(CASES[case], 37, vocab, dtype=dtype, seed=vocab)
    to_dev = lambda v: v.cuda() if isinstance(v, torch.Tensor) else tuple(t.cuda() for t in v)  # noqa: E731
    opts = {k: (to_dev(v) if isinstance(v, (torch.Tensor, tuple)) else v) for k, v in opts.items()}
    results = {}
    for name in (backend, "torch"):
        x = logits.cuda().requires_grad_()
        before = _registry.CALLS[(OP, name)]
        with vfm.use_backend(name):
            loss = vfm.functional.knowledge_cross_entropy(x, target.cuda(), **opts)
        assert _registry.CALLS[(OP, name)] == before + 1
        loss.backward()
        results[name] = (loss.detach(), x.grad)
    rtol, gtol = TOL[dtype]
    (l1, g1), (l0, g0) = results[backend], results["torch"]
    torch.testing.assert_close(l1, l0, rtol=rtol, atol=rtol)
    scale = g0.abs().max().item() or 1.0
    torch.testing.assert_close(g1.float(), g0.float(), rtol=0, atol=gtol * scale)


@pytest.mark.parametrize("backend", _cuda_backends() or ["none"])
def test_cuda_full_shape_ce_and_inplace(backend):
    if backend == "none":
        pytest.skip("no CUDA backend available")
    n, v = 1024, 128256
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16) * 2
    target = torch.randint(0, v, (n,), device="cuda")
    target[::10] = -100
    x = logits.clone().requires_grad_()
    with vfm.use_backend(backend):
        loss = vfm.functional.knowledge_cross_entropy(x, target)
    loss.backward()
    ref = torch.nn.functional.cross_entropy(logits.float(), target)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
    y = logits.clone().requires_grad_()
    z = y * 1
    with vfm.use_backend(backend):
        loss2 = vfm.functional.knowledge_cross_entropy(z, target, inplace_backward=True)
    g = torch.autograd.grad(loss2, z)[0]
    torch.testing.assert_close(g.float(), x.grad.float(), rtol=0, atol=1e-2 * x.grad.abs().max().item())
