"""The native bit packer vfm_C::pack_bits against the pure-torch pack_allowed_bits path."""

import pytest
import torch

from vfm.ops import kce_reference
from vfm.ops.kce_cpp import cpp_available
from vfm.ops.kce_reference import pack_allowed_bits, unpack_allowed_bits


def _has_pack_bits() -> bool:
    if not cpp_available()[0]:
        return False
    try:
        torch.ops.vfm_C.pack_bits  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


needs_cpp = pytest.mark.skipif(not _has_pack_bits(), reason="vfm._C with vfm_C::pack_bits is not built")


def _torch_pack(mask: torch.Tensor) -> torch.Tensor:
    """The pure-torch path of pack_allowed_bits (the native packer switched off)."""
    saved = kce_reference.torch.compiler.is_compiling
    kce_reference.torch.compiler.is_compiling = lambda: True  # the native path is skipped while tracing
    try:
        return pack_allowed_bits(mask)
    finally:
        kce_reference.torch.compiler.is_compiling = saved


def _naive_pack(mask: torch.Tensor) -> torch.Tensor:
    groups, vocab = mask.shape
    words = (vocab + 31) // 32
    out = torch.zeros(groups, words, dtype=torch.int64)
    for v in range(vocab):
        out[:, v // 32] |= mask[:, v].long() << (v % 32)
    out = torch.where(out >= 2**31, out - 2**32, out)
    return out.to(torch.int32)


SHAPES = [(1, 1), (3, 5), (4, 8), (2, 31), (5, 32), (3, 33), (2, 64), (7, 100), (3, 4099), (0, 17), (4, 0)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_torch_path_matches_naive(shape, density):
    torch.manual_seed(0)
    mask = torch.rand(shape) < density
    packed = _torch_pack(mask)
    assert packed.dtype == torch.int32 and packed.shape == (shape[0], (shape[1] + 31) // 32)
    assert torch.equal(packed, _naive_pack(mask))
    if shape[0] > 0:  # unpack_allowed_bits needs at least one group
        assert torch.equal(unpack_allowed_bits(packed, shape[1]), mask)


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES + [(1, 70001), (64, 4099)])
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_native_matches_torch(shape, density):
    torch.manual_seed(1)
    mask = torch.rand(shape) < density
    native = torch.ops.vfm_C.pack_bits(mask)
    assert native.dtype == torch.int32 and native.shape == (shape[0], (shape[1] + 31) // 32)
    assert torch.equal(native, _torch_pack(mask))
    assert torch.equal(pack_allowed_bits(mask), native)
    if shape[0] > 0:
        assert torch.equal(unpack_allowed_bits(native, shape[1]), mask)


def test_dispatch_asks_for_native_only_for_contiguous_cpu_bool(monkeypatch):
    import vfm.ops.kce_cpp as kce_cpp

    calls = []
    real = kce_cpp.cpp_available

    def spy():
        calls.append(1)
        return real()

    monkeypatch.setattr(kce_cpp, "cpp_available", spy)
    mask = torch.rand(3, 33) < 0.5
    expected = _naive_pack(mask)
    assert torch.equal(pack_allowed_bits(mask), expected)
    assert len(calls) == 1
    assert torch.equal(pack_allowed_bits(mask.t().contiguous().t()), expected)  # non-contiguous
    assert len(calls) == 1
    monkeypatch.setattr(kce_cpp, "cpp_available", lambda: (False, "switched off"))
    assert torch.equal(pack_allowed_bits(mask), expected)  # the torch fallback


@pytest.mark.parametrize("vocab", [5, 33, 4099, 64])
def test_non_contiguous_falls_back(vocab):
    torch.manual_seed(2)
    base = torch.rand(vocab, 6) < 0.5
    mask = base.t()  # (6, vocab), stride(1) != 1
    assert not mask.is_contiguous()
    packed = pack_allowed_bits(mask)
    assert torch.equal(packed, _naive_pack(mask.contiguous()))
    assert torch.equal(unpack_allowed_bits(packed, vocab), mask)
    rows = (torch.rand(8, vocab) < 0.5)[::2]  # strided rows, contiguous last dimension
    assert torch.equal(pack_allowed_bits(rows), _naive_pack(rows.contiguous()))
    offset = (torch.rand(3, vocab + 1) < 0.5)[:, 1:]  # unaligned start
    assert torch.equal(pack_allowed_bits(offset), _naive_pack(offset.contiguous()))


@needs_cpp
def test_native_rejects_bad_input():
    with pytest.raises(RuntimeError):
        torch.ops.vfm_C.pack_bits(torch.zeros(3, 5, dtype=torch.uint8))
    with pytest.raises(RuntimeError):
        torch.ops.vfm_C.pack_bits(torch.zeros(5, dtype=torch.bool))


def test_round_trip_all_bits_of_last_word():
    mask = torch.ones(2, 32, dtype=torch.bool)
    packed = pack_allowed_bits(mask)
    assert packed.tolist() == [[-1], [-1]]
    assert torch.equal(unpack_allowed_bits(packed, 32), mask)
