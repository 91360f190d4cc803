"""setup.py — installs MaskMentor's flat modules and builds the fused masking op (csrc/).

    pip install -r requirements.txt
    pip install --no-build-isolation -e .

`--no-build-isolation` lets the build see the torch already installed: the extensions
must be compiled against that exact torch, so torch is deliberately not a build
requirement that pip would install into a throw-away environment.

Two extensions, both optional at run time (masking.py falls back to its pure-PyTorch
reference when they are missing):
  maskmentor_C     csrc/mask_gather.cpp       schema + CPU kernels; always built.
  maskmentor_cuda  csrc/mask_gather_cuda.cu   CUDA kernels; built only when nvcc is found
                                              (CUDA_HOME, CUDA_PATH or /usr/local/cuda)
                                              and torch is a CUDA build. Set
                                              MASKMENTOR_BUILD_CUDA=0 to skip it.
"""
import os
import sys

from setuptools import setup


def log(msg: str) -> None:
    print(f"maskmentor setup: {msg}", file=sys.stderr, flush=True)


def find_cuda_home():
    """A CUDA toolkit directory that really contains bin/nvcc, or None.

    torch's own guess prefers `which nvcc`, whose grandparent directory is wrong when
    nvcc is a wrapper script (e.g. /usr/local/bin/nvcc -> CUDA_HOME=/usr/local), so we
    decide here and export CUDA_HOME before torch.utils.cpp_extension reads it.
    """
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.isfile(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return None


cuda_home = find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402  (after CUDA_HOME is settled)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# at::parallel_for only runs in parallel when the extension itself is compiled with
# OpenMP (torch's ATen/ParallelOpenMP.h is guarded by _OPENMP), and CppExtension does not
# add -fopenmp. Linking with -fopenmp records libgomp.so.1, the same soname as the
# libgomp torch loads, so the extension shares torch's thread pool rather than starting
# a second one.
CXX_FLAGS = ["-O3", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]


def cuda_extension_or_reason():
    """(the CUDA extension, None) or (None, why it is not built)."""
    if os.environ.get("MASKMENTOR_BUILD_CUDA", "1") == "0":
        return None, "MASKMENTOR_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is not a CUDA build"
    if cuda_home is None:
        return None, "no nvcc found (set CUDA_HOME to a CUDA toolkit)"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # Without a visible GPU torch would compile for every architecture it knows
        # (slow); Hopper (H100/H200) plus PTX, which newer GPUs JIT-compile, is enough here.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"
        log("no GPU visible and TORCH_CUDA_ARCH_LIST unset: using TORCH_CUDA_ARCH_LIST=9.0+PTX")
    include_dirs = []
    if not os.path.isfile(os.path.join(cuda_home, "include", "cuda_runtime_api.h")):
        # A toolkit with nvcc but without the runtime headers: use those of the CUDA
        # runtime wheel that a CUDA build of torch installs (nvidia/cu13/include).
        wheel_include = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)),
                                     "nvidia", f"cu{torch.version.cuda.split('.')[0]}", "include")
        if os.path.isdir(wheel_include):
            include_dirs.append(wheel_include)
    ext = CUDAExtension(
        "maskmentor_cuda",
        ["csrc/mask_gather_cuda.cu"],
        include_dirs=include_dirs,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return ext, None


def extensions():
    ext_modules = [CppExtension("maskmentor_C", ["csrc/mask_gather.cpp"],
                                extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=LINK_FLAGS)]
    cuda_ext, why_not = cuda_extension_or_reason()
    if cuda_ext is not None:
        ext_modules.append(cuda_ext)
        log(f"building maskmentor_C (CPU) and maskmentor_cuda (CUDA {torch.version.cuda}, "
            f"CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPUs')})")
    else:
        log(f"building maskmentor_C (CPU) only; not maskmentor_cuda: {why_not}")
    return ext_modules


# The project is flat: one module per top-level file. setuptools accepts names whose file
# does not exist yet (it only warns), and an editable install maps each name to its path,
# so a module that lands later is importable without reinstalling.
MODULES = ["masking", "model", "sttp", "data", "train", "finetune", "evaluate"]

setup(
    name="maskmentor",
    version="0.1.0",
    description="MaskMentor: RGB-D semantic segmentation pre-training with a MultiMAE-style ViT",
    python_requires=">=3.9",
    py_modules=MODULES,
    # The runtime part of requirements.txt; keep the two in step.
    install_requires=["torch>=2.4", "numpy", "pillow", "tqdm", "h5py", "scipy"],
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
)
