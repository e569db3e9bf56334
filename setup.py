"""Builds bitfast._C: C++ (OpenMP) CPU kernels always, CUDA kernels whenever a CUDA toolkit and a CUDA build of
torch are present (GPU or not). BITFAST_NO_CUDA=1 skips CUDA. The Triton kernels in kernels/ install as
bitfast.kernels."""
import glob
import os

from setuptools import find_packages, setup

# torch guesses CUDA_HOME from the nvcc on PATH; a /usr/local/bin/nvcc shim would make that /usr/local.
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME at import)

os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
os.environ.setdefault("MAX_JOBS", "2")


def cuda_build_reason():
    """None if the CUDA sources should be compiled, else why not."""
    import torch

    if os.environ.get("BITFAST_NO_CUDA", "0") == "1":
        return "BITFAST_NO_CUDA=1"
    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (install it and set CUDA_HOME)"
    return None


def extension():
    sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/*_cpu.cpp"))
    cxx = ["-O3", "-fopenmp"]  # torch picks the C++ standard (C++20 for torch >= 2.13)
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    reason = cuda_build_reason()
    if reason is None:
        # ATen/cuda/CUDAContext.h (bindings.cpp) includes cusparse.h etc., which pip's torch ships under
        # site-packages/nvidia/*/include rather than in the toolkit.
        import torch

        site = os.path.dirname(os.path.dirname(torch.__file__))
        nvidia_includes = sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
        print("bitfast: building CUDA kernels for TORCH_CUDA_ARCH_LIST=" + os.environ["TORCH_CUDA_ARCH_LIST"])
        return cpp_extension.CUDAExtension(
            "bitfast._C",
            sources + sorted(glob.glob("csrc/*.cu")),
            include_dirs=nvidia_includes,
            define_macros=[("BITFAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    print(f"bitfast: skipping CUDA kernels ({reason})")
    return cpp_extension.CppExtension(
        "bitfast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
    )


setup(
    packages=find_packages(include=["bitfast", "bitfast.*"]) + ["bitfast.kernels"],
    package_dir={"bitfast.kernels": "kernels"},
    package_data={"bitfast.datasets": ["*.npz", "*.md", "LICENSE*"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
