"""Backend selection: listing, forcing, environment variable, and never falling back silently."""

import os
import subprocess
import sys

import pytest
import torch

import vfm
from vfm import _registry

OP = "knowledge_cross_entropy"


def test_available_backends_lists_reference_and_rejects_unknown_op():
    names = vfm.available_backends(OP, "cpu")
    assert "torch" in names
    assert names.index("torch") >= 0
    with pytest.raises(ValueError, match="unknown op"):
        vfm.available_backends("no_such_op", "cpu")


def test_use_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="use_backend"):
        with vfm.use_backend("fortran"):
            pass


def test_forcing_an_unavailable_backend_raises_with_reason():
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with vfm.use_backend("cuda"):
        with pytest.raises(vfm.BackendUnavailableError, match="cuda"):
            vfm.functional.knowledge_cross_entropy(x, t)


def test_forced_triton_refuses_float64_instead_of_falling_back():
    if "triton" not in vfm.available_backends(OP, "cpu"):
        pytest.skip("triton interpreter not available")
    x, t = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    with vfm.use_backend("triton"):
        with pytest.raises(vfm.BackendUnavailableError, match="float64"):
            vfm.functional.knowledge_cross_entropy(x, t)


def test_automatic_choice_on_cpu_never_picks_the_interpreter():
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    before = dict(_registry.CALLS)
    vfm.functional.knowledge_cross_entropy(x, t)
    ran = [k for k, v in _registry.CALLS.items() if v != before.get(k, 0)]
    assert len(ran) == 1
    expected = "cpp" if "cpp" in vfm.available_backends(OP, "cpu") else "torch"
    assert ran[0] == (OP, expected)


def test_nested_use_backend_restores_outer():
    with vfm.use_backend("torch"):
        with vfm.use_backend("cpp"):
            assert vfm.forced_backend() == "cpp"
        assert vfm.forced_backend() == "torch"


def test_env_variable_forces_and_validates():
    code = ("import torch, vfm; from vfm import _registry; "
            "vfm.functional.knowledge_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1])); "
            "print(sorted(k[1] for k in _registry.CALLS))")
    env = dict(os.environ, VFM_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['torch']"
    env["VFM_BACKEND"] = "nope"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "VFM_BACKEND" in bad.stderr


def test_deterministic_flag():
    assert vfm.deterministic() is False
    try:
        assert vfm.deterministic(True) is True
        with pytest.raises(TypeError):
            vfm.deterministic("yes")
    finally:
        vfm.deterministic(False)


def test_import_without_triton_or_extension():
    code = ("import sys; sys.modules['triton'] = None; sys.modules['vfm._C'] = None; import vfm, torch; "
            "print(vfm.available_backends('knowledge_cross_entropy', 'cpu')); "
            "print(vfm.functional.knowledge_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1])).item() > 0)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == "['torch']" and "True" in out.stdout
