"""Command line: ``vfm doctor`` (what is installed and why a backend is missing), ``vfm bench``."""

from __future__ import annotations

import argparse
import platform
import sys
from typing import List, Optional


def doctor() -> int:
    """Print versions, the extension's build facts and each op's backends per device."""
    import torch

    import vfm
    from vfm import _registry

    print(f"vfm {vfm.__version__}")
    print(f"python {platform.python_version()} ({platform.machine()})")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}; "
          f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except Exception as exc:  # noqa: BLE001
        print(f"triton: not available ({exc.__class__.__name__}: {exc})")
    from vfm.ops.kce_cpp import cpp_available

    ok, why = cpp_available()
    if ok:
        import vfm._C as ext

        info = ext.build_info()
        print("extension vfm._C: loaded")
        for key in sorted(info):
            print(f"  {key}: {info[key]}")
    else:
        print(f"extension vfm._C: not loaded ({why})")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ops = sorted(_registry._OPS)
    for op in ops:
        print(f"op {op}:")
        for dev in devices:
            names = _registry.available_backends(op, dev)
            auto = next((n for n in names if not (n == "triton" and dev == "cpu")), None)
            print(f"  {dev}: available {names}; runs by default: {auto}")
            for name, reason in _registry.unavailable_reasons(op, dev).items():
                print(f"    {name}: {reason}")
        if "cuda" not in devices:
            for name, reason in _registry.unavailable_reasons(op, "cuda").items():
                print(f"  cuda/{name}: {reason}")
    forced = _registry.forced_backend()
    if forced:
        print(f"forced backend: {forced}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``vfm`` command."""
    parser = argparse.ArgumentParser(prog="vfm", description="vfm: vertical-domain adaptation engine")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="versions, native extension and available backends")
    sub.add_parser("bench", help="benchmark the knowledge cross-entropy (see vfm bench --help)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "doctor":
        if rest:
            parser.error(f"doctor takes no arguments, got {rest}")
        return doctor()
    if args.command == "bench":
        from vfm.bench import main as bench_main

        return bench_main(rest)
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
