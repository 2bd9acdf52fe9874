"""Build script: the Python package plus the optional native extension ``vfm._C``.

* ``pip install --no-build-isolation -e .`` builds the C++ CPU kernels (OpenMP) against the
  installed torch.
* CUDA sources (``csrc/cuda/*.cu``) are compiled only when the installed torch has CUDA and
  ``CUDA_HOME`` points at a toolkit. ``VFM_CUDA_ARCH_LIST`` (default ``8.0;9.0``) picks the
  architectures.
* ``VFM_BUILD_EXT=0`` skips native code entirely; a failed native build prints a warning and
  installs the pure-Python package (``vfm doctor`` then says the extension is missing).
"""

import glob
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _native_extensions():
    if os.environ.get("VFM_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("vfm: torch is not installed, building without the native extension", file=sys.stderr)
        return [], {}

    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not cpp_sources:
        return [], {}
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]
    link_flags = ["-fopenmp"]
    define_macros = []
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and bool(cuda_home)
    if use_cuda:
        archs = os.environ.get("VFM_CUDA_ARCH_LIST", "8.0;9.0")
        gencode = []
        for arch in archs.replace(",", ";").split(";"):
            arch = arch.strip()
            if arch:
                num = arch.replace(".", "")
                gencode += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        define_macros.append(("VFM_WITH_CUDA", "1"))
        # "sm_80+sm_90": one shell- and preprocessor-safe token, reported by vfm._C.build_info()
        define_macros.append(("VFM_CUDA_ARCHS", "+".join("sm_" + g.split("code=sm_")[1] for g in gencode[1::2])))
        ext = cpp_extension.CUDAExtension(
            name="vfm._C",
            # csrc/cuda/*.cpp: the thin TORCH_CHECK bindings of the .cu launchers (CUDA builds only)
            sources=cpp_sources + sorted(glob.glob("csrc/cuda/*.cpp")) + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={
                "cxx": cxx_flags,
                # no --use_fast_math: the kernels pick their fast intrinsics (ex2.approx) explicitly
                # and keep IEEE log / division / denormals everywhere else (.ci/check_cuda_compile.sh
                # compiles with these same flags)
                "nvcc": ["-O3", "-std=c++17", "-lineinfo"] + gencode,
            },
            extra_link_args=link_flags,
        )
    else:
        ext = cpp_extension.CppExtension(
            name="vfm._C",
            sources=cpp_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [ext], {"build_ext": _optional_build_ext(cpp_extension.BuildExtension)}


def _optional_build_ext(base):
    class OptionalBuildExt(base):
        """Builds the extension, but a failure never breaks the install."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                self._warn(exc)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                self._warn(exc)

        @staticmethod
        def _warn(exc):
            print(
                f"vfm: WARNING: the native extension vfm._C failed to build ({exc}); "
                "installing the pure-Python package. `vfm doctor` reports what is missing.",
                file=sys.stderr,
            )

    return OptionalBuildExt


ext_modules, cmdclass = _native_extensions()

setup(
    # every subpackage of vfm/, plus kernels/ installed as vfm.kernels
    packages=["vfm"] + ["vfm." + p for p in find_packages("vfm")] + ["vfm.kernels"],
    package_dir={"vfm.kernels": "kernels"},
    package_data={"vfm.demo": ["*.yaml"]},  # the rule files of `vfm demo` (its data come from the domain extra)
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
