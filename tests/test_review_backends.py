"""Review of what a user meets when installing and selecting backends: vfm without its native
extension or without triton (each in a fresh interpreter), ``vfm doctor`` with a bad
``VFM_BACKEND``, and ``vfm bench``'s argument checks.

References are independent: plain torch formulas and an unaccelerated PEFT model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vfm import cli
from vfm.bench import main as bench_main

# Runs in a fresh interpreter after the prelude (which hides vfm._C or triton); prints OK lines.
_OPS_SCRIPT = textwrap.dedent(
    """
    import copy, torch, torch.nn as nn, torch.nn.functional as F
    import vfm, vfm.functional as VF
    from vfm._registry import CALLS
    torch.manual_seed(0)
    tol = dict(atol=1e-5, rtol=1e-5)
    # knowledge CE vs plain cross_entropy (value and gradient)
    z = torch.randn(7, 11, requires_grad=True); t = torch.randint(0, 11, (7,)); t[2] = -100
    loss = VF.knowledge_cross_entropy(z, t); (g,) = torch.autograd.grad(loss, z)
    z2 = z.detach().requires_grad_(); ref = F.cross_entropy(z2, t); (g2,) = torch.autograd.grad(ref, z2)
    assert torch.allclose(loss, ref, **tol) and torch.allclose(g, g2, **tol)
    # fused linear + CE vs linear then cross_entropy
    h = torch.randn(6, 5); w = torch.randn(9, 5); t6 = torch.randint(0, 9, (6,))
    assert torch.allclose(VF.fused_linear_knowledge_cross_entropy(h, w, t6), F.cross_entropy(h @ w.T, t6), **tol)
    # lora_linear vs x W^T + b + s (x A^T) B^T, and the gradient of A
    x = torch.randn(5, 8); W = torch.randn(6, 8); b = torch.randn(6)
    A = torch.randn(3, 8, requires_grad=True); B = torch.randn(6, 3)
    y = VF.lora_linear(x, W, b, A, B, 0.5); (gA,) = torch.autograd.grad(y.square().sum(), A)
    A2 = A.detach().requires_grad_(); y2 = x @ W.T + b + 0.5 * (x @ A2.T) @ B.T
    (gA2,) = torch.autograd.grad(y2.square().sum(), A2)
    assert torch.allclose(y, y2, **tol) and torch.allclose(gA, gA2, atol=1e-4, rtol=1e-5)
    # a tiny PEFT model: vfm.peft.accelerate gives PEFT's outputs and gradients
    from peft import LoraConfig, get_peft_model
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    ref_m = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"],
                                                           init_lora_weights=False))
    acc_m = copy.deepcopy(ref_m); rep = vfm.peft.accelerate(acc_m)
    xin = torch.randn(5, 8)
    CALLS.clear()
    out = acc_m(xin); out.square().sum().backward(); ref_m(xin).square().sum().backward()
    assert CALLS, "accelerate did not route through vfm"
    assert torch.allclose(out, ref_m(xin), **tol)
    for (n1, p1), (n2, p2) in zip(acc_m.named_parameters(), ref_m.named_parameters()):
        if p1.requires_grad:
            assert torch.allclose(p1.grad, p2.grad, atol=1e-4, rtol=1e-4), n1
    print("BACKENDS", sorted({backend for _, backend in CALLS}))
    print("OK ops")
    """
)


def _run(prelude: str, body: str, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.pop("VFM_BACKEND", None)
    e.update(env)
    return subprocess.run([sys.executable, "-c", prelude + "\n" + body], capture_output=True, text=True,
                          env=e, timeout=240)


NO_EXT = "import sys; sys.modules['vfm._C'] = None"
NO_TRITON = "import sys; sys.modules['triton'] = None"


def test_without_the_extension_every_op_runs_on_torch_and_cpp_explains_why():
    body = _OPS_SCRIPT + textwrap.dedent(
        """
        assert vfm.available_backends(device="cpu") == ["torch"], vfm.available_backends(device="cpu")
        try:
            with vfm.use_backend("cpp"):
                VF.knowledge_cross_entropy(z, t)
        except vfm.BackendUnavailableError as exc:
            assert "vfm._C" in str(exc), exc
        else:
            raise AssertionError("forced cpp ran without the extension")
        from vfm.cli import main
        assert main(["doctor"]) == 0
        """
    )
    r = _run(NO_EXT, body, TRITON_INTERPRET="0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK ops" in r.stdout and "BACKENDS ['torch']" in r.stdout, r.stdout[-2000:]
    assert "extension vfm._C: not loaded (the native extension vfm._C failed to import" in r.stdout


def test_vfm_backend_cpp_without_the_extension_raises_naming_why():
    body = ("import torch, vfm\n"
            "try:\n"
            "    vfm.functional.lora_linear(torch.randn(2, 3), torch.randn(4, 3), None, torch.randn(1, 3),"
            " torch.randn(4, 1), 1.0)\n"
            "except vfm.BackendUnavailableError as exc:\n"
            "    print('RAISED', exc)\n")
    r = _run(NO_EXT, body, VFM_BACKEND="cpp")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RAISED backend 'cpp' was forced for lora_linear" in r.stdout and "vfm._C" in r.stdout, r.stdout


def test_without_triton_ops_run_and_triton_is_not_listed_even_under_the_interpreter():
    body = _OPS_SCRIPT + textwrap.dedent(
        """
        assert "triton" not in vfm.available_backends(device="cpu"), vfm.available_backends(device="cpu")
        try:
            with vfm.use_backend("triton"):
                VF.knowledge_cross_entropy(z, t)
        except vfm.BackendUnavailableError as exc:
            assert "triton is not installed" in str(exc), exc
        else:
            raise AssertionError("forced triton ran without triton")
        assert "triton" not in sys.modules or sys.modules["triton"] is None
        """
    )
    r = _run(NO_TRITON, body, TRITON_INTERPRET="1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK ops" in r.stdout, r.stdout[-2000:]


@pytest.mark.parametrize("value", ["CPP", "cpu"])
def test_doctor_with_a_misspelt_vfm_backend_reports_it_and_exits_0(monkeypatch, capsys, value):
    # Before the fix the last line of doctor raised BackendUnavailableError (a traceback, exit 1).
    monkeypatch.setenv("VFM_BACKEND", value)
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"VFM_BACKEND={value!r} is not a backend" in out
    assert "op knowledge_cross_entropy:" in out  # the rest of the report is still there


def test_doctor_names_the_forced_backend(monkeypatch, capsys):
    monkeypatch.setenv("VFM_BACKEND", "torch")
    assert cli.main(["doctor"]) == 0
    assert "forced backend: torch" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["--providers", "vfm[cpu]"], "--providers: unknown ['vfm[cpu]']; available on cpu:"),
    (["--rows", "0"], "--rows must be a positive integer, got 0"),
    (["--vocab", "-5"], "--vocab must be a positive integer, got -5"),
    (["--repeat", "0"], "--repeat must be a positive integer, got 0"),
    (["--device", "cuda:0"], "--device must be cpu or cuda"),
])
def test_bench_rejects_bad_arguments_before_measuring(capsys, argv, needle):
    # Before the fix a misspelt provider printed an empty table and --rows 0 silently meant 2048.
    with pytest.raises(SystemExit) as info:
        bench_main(["--no-memory", "--cases", "ce"] + argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert needle in captured.err, captured.err
    assert "| case |" not in captured.out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_bench_device_cuda_without_cuda_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        bench_main(["--device", "cuda"])
    assert "no CUDA device is available" in capsys.readouterr().err


def test_bench_known_provider_runs_at_the_smallest_size(capsys):
    assert bench_main(["--rows", "4", "--vocab", "8", "--repeat", "1", "--cases", "ce", "--no-memory",
                       "--providers", "torch eager"]) == 0
    out = capsys.readouterr().out
    assert "| CE | torch eager |" in out


def test_use_backend_is_per_asyncio_task_and_restores_after_exceptions():
    # Before the fix the forced backend was one stack per thread: a task inside
    # `with use_backend("torch")` saw another task's "cpp" across an await, and the exits popped
    # each other's entries.
    import asyncio
    import threading

    import vfm

    seen = {}

    async def task(name, delay):
        with vfm.use_backend(name):
            await asyncio.sleep(delay)
            seen[name, "mid"] = vfm.forced_backend()
            await asyncio.sleep(delay)
            seen[name, "end"] = vfm.forced_backend()
        seen[name, "after"] = vfm.forced_backend()

    async def both():
        await asyncio.gather(task("torch", 0.01), task("cpp", 0.015))

    asyncio.run(both())
    assert seen == {("torch", "mid"): "torch", ("torch", "end"): "torch", ("torch", "after"): None,
                    ("cpp", "mid"): "cpp", ("cpp", "end"): "cpp", ("cpp", "after"): None}
    with vfm.use_backend("cpp"):
        with pytest.raises(KeyError):
            with vfm.use_backend("torch"):
                assert vfm.forced_backend() == "torch"
                raise KeyError("x")
        assert vfm.forced_backend() == "cpp"
        other = []
        thread = threading.Thread(target=lambda: other.append(vfm.forced_backend()))
        thread.start()
        thread.join()
        assert other == [None]  # documented: the setting belongs to the calling thread
    assert vfm.forced_backend() is None


def test_use_backend_inside_torch_compile_is_honoured():
    # Before the fix dynamo traced the thread-local stack's push/pop as deferred side effects, so
    # the custom op ran with nothing forced: the cpp kernels ran inside `use_backend("torch")`.
    import vfm
    from vfm._registry import CALLS

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x, w, a, b = (torch.randn(*s, generator=g) for s in ((5, 8), (6, 8), (3, 8), (6, 3)))

    def fn(x):
        with vfm.use_backend("torch"):
            return vfm.functional.lora_linear(x, w, None, a, b, 0.5)

    CALLS.clear()
    y = torch.compile(fn, backend="eager")(x)
    torch.testing.assert_close(y, x @ w.T + 0.5 * (x @ a.T) @ b.T, rtol=1e-5, atol=1e-5)
    assert CALLS[("lora_linear", "torch")] == 1 and CALLS[("lora_linear", "cpp")] == 0, dict(CALLS)


def _lora_family_calls():
    import torch

    import vfm.functional as VF

    torch.manual_seed(0)
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    a = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    m = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_()
    e = torch.randn(2, 1, dtype=torch.float64, requires_grad=True)
    sa = torch.randn(2, 2, 8, dtype=torch.float64, requires_grad=True)
    sb = torch.randn(2, 5, 2, dtype=torch.float64, requires_grad=True)
    return {
        "lora_linear": lambda: VF.lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.2, seed=3),
        "dora_linear": lambda: VF.dora_linear(x, w, b, a, bb, m, 0.5),
        "adalora_linear": lambda: VF.adalora_linear(x, w, b, a, e, bb, 0.5, 2.0),
        "lora_linear_multi": lambda: VF.lora_linear_multi(x, w, b, sa, sb, [1.0, 0.5], torch.tensor([0, 1, -1, 0, 1, 1])),
    }


@pytest.mark.parametrize("where", ["after the with block", "on another thread"])
def test_backward_runs_the_backend_the_forward_was_forced_to(where):
    # the LoRA family's backward picked its backend again at backward time: a forward under
    # use_backend("torch") had its backward run on cpp (and on CUDA autograd's device threads never
    # see the forced backend at all)
    import threading

    import vfm
    from vfm import _registry

    if "cpp" not in vfm.available_backends("lora_linear", "cpu"):
        pytest.skip("needs the cpp backend as the automatic choice")
    for op, call in _lora_family_calls().items():
        _registry.CALLS.clear()
        with vfm.use_backend("torch"):
            y = call()
        if where == "after the with block":
            y.sum().backward()
        else:
            t = threading.Thread(target=lambda: y.sum().backward())
            t.start()
            t.join()
        assert dict(_registry.CALLS) == {(op, "torch"): 2}, (op, dict(_registry.CALLS))


def test_custom_op_backward_runs_the_backend_the_forward_was_forced_to():
    # the same through the registered custom op (the path torch.compile and tracing take)
    import torch

    import vfm
    from vfm import _registry

    if "cpp" not in vfm.available_backends("lora_linear", "cpu"):
        pytest.skip("needs the cpp backend as the automatic choice")
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 8, dtype=torch.float64)
    a = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(3)
    _registry.CALLS.clear()
    with vfm.use_backend("torch"):
        y, _ = torch.ops.vfm.lora_linear(x, w, None, a, b, 0.5, 0.2, seed)
    y.sum().backward()
    assert dict(_registry.CALLS) == {("lora_linear", "torch"): 2}
    grads = [t.grad.clone() for t in (x, a, b)]
    for t in (x, a, b):
        t.grad = None
    _registry.CALLS.clear()
    y, _ = torch.ops.vfm.lora_linear(x, w, None, a, b, 0.5, 0.2, seed)  # nothing forced: cpp both ways
    y.sum().backward()
    assert dict(_registry.CALLS) == {("lora_linear", "cpp"): 2}
    for t, g in zip((x, a, b), grads):
        torch.testing.assert_close(t.grad, g)


@pytest.mark.gpu
def test_deterministic_mode_makes_the_filtered_weight_gradient_bitwise_repeatable():
    # the gradient filter's scattered row updates used index_add_ (atomics) on CUDA in either mode
    import torch

    import vfm
    from vfm.ops.flce_filter import scatter_add_rows

    torch.manual_seed(0)
    idx = torch.randint(0, 7, (20000,), device="cuda")
    values = torch.randn(20000, 64, device="cuda")
    was = vfm.deterministic()
    try:
        vfm.deterministic(True)
        runs = []
        for _ in range(3):
            acc = torch.zeros(7, 64, device="cuda")
            scatter_add_rows(acc, idx, values)
            runs.append(acc)
    finally:
        vfm.deterministic(was)
    want = torch.zeros(7, 64, dtype=torch.float64).index_add_(0, idx.cpu(), values.double().cpu())
    torch.testing.assert_close(runs[0].double().cpu(), want, rtol=1e-5, atol=1e-4)
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_triton_that_fails_to_import_is_not_an_available_backend(tmp_path):
    # find_spec alone listed a broken triton as available: a forced triton raised a bare ImportError,
    # and on CUDA the automatic choice (triton) would have failed on every call
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("raise ImportError('broken build')\n")
    body = textwrap.dedent(
        """
        import torch, vfm
        assert vfm.available_backends(device="cpu") == ["cpp", "torch"] or "cpp" not in \\
            vfm.available_backends(device="cpu"), vfm.available_backends(device="cpu")
        assert "triton" not in vfm.available_backends(device="cpu")
        try:
            with vfm.use_backend("triton"):
                vfm.functional.knowledge_cross_entropy(torch.randn(3, 5), torch.tensor([1, 2, 3]))
        except vfm.BackendUnavailableError as err:
            assert "failed to import" in str(err) and "broken build" in str(err), err
            print("OK triton")
        """
    )
    proc = _run("", body, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                TRITON_INTERPRET="1")
    assert "OK triton" in proc.stdout, proc.stdout + proc.stderr


def test_cli_version(capsys):
    from vfm import __version__
    from vfm.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"vfm {__version__}"
