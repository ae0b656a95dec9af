"""oneDNN convolutions for XLA:CPU, as XLA FFI calls (the training step's fast path on CPUs).

XLA:CPU runs the CIFAR networks' 3×3 convolutions in Eigen (its YNNPACK path refuses layers of
16 channels), at about half the speed of oneDNN's kernels on a 2-core AVX-512 CPU; a ResNet-D
depth-18 training step is ~1.5× faster with these (benchmarks/RESULTS.md, "oneDNN against XLA's
convolutions").

:func:`conv_valid` is the "VALID" cross-correlation of ``x`` [N,H,W,Ci] with ``kernel``
[kh,kw,Ci,Co] at a given stride, in the dtypes :func:`supports` (float32; bfloat16 with AVX-512),
differentiable in reverse mode (a ``custom_vjp`` over oneDNN's backward-data and
backward-weights passes). It has no forward-mode or batching rule, so it and
:func:`stabnet.fast.conv.onednn` (the form of ``A_K x`` built on it) serve the training step
only, on single-device CPUs (:func:`stabnet.fast.select`, ``runtime.conv_impl``); analysis code
keeps XLA's convolutions.

The library is compiled on first use from ``csrc/onednn_conv.cc`` against the installed jaxlib's
FFI headers and the ``onednn-cpu-gomp`` wheels (the ``cpu`` extra, ``pip install -e ".[cpu]"``;
Linux x86-64) with the C++ compiler ``$CXX`` (default ``g++``), into ``$STABNET_CACHE`` (default
``~/.cache/stabnet``), once per source, jaxlib and oneDNN version, where the training step asks
for it (one CPU device). Nothing is compiled off CPUs, nor where the extra is missing:
:func:`available` is then ``False``, :func:`unavailable_reason` says why, and the training step
runs XLA's convolutions; ``STABNET_ONEDNN=0`` turns the path off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).with_name("csrc") / "onednn_conv.cc"
_TARGETS = {
    "forward": "StabnetConvForward",
    "backward_data": "StabnetConvBackwardData",
    "backward_weights": "StabnetConvBackwardWeights",
}
_FLAGS = ["-O2", "-std=c++17", "-shared", "-fPIC", "-w"]


class Unavailable(RuntimeError):
    """oneDNN convolutions cannot be used here; the message says why and what to do."""


def _prefixes() -> list[pathlib.Path]:
    """Where pip puts a wheel's ``data`` files (``lib/``, ``include/``): the environment, then
    the user's site."""
    found = [sysconfig.get_paths()["data"], sys.prefix]
    user = sysconfig.get_paths("posix_user")["data"] if os.name == "posix" else None
    return [pathlib.Path(p) for p in dict.fromkeys(p for p in [*found, user] if p)]


def _find_onednn() -> tuple[pathlib.Path, pathlib.Path]:
    """``(include dir, lib dir)`` of an installed oneDNN with OpenMP threading."""
    for prefix in _prefixes():
        include, lib = prefix / "include", prefix / "lib"
        if (include / "oneapi/dnnl/dnnl.hpp").is_file() and (lib / "libdnnl.so").exists():
            return include, lib
    raise Unavailable(
        'oneDNN is not installed; pip install -e ".[cpu]" (the wheels onednn-cpu-gomp and '
        "onednn-devel-cpu-gomp, x86-64 Linux)"
    )


def _build() -> pathlib.Path:
    """Path of the compiled library, building it into the cache if needed."""
    if os.environ.get("STABNET_ONEDNN", "1") == "0":
        raise Unavailable("turned off by STABNET_ONEDNN=0")
    if sys.platform != "linux":
        raise Unavailable(f"built on Linux only, not {sys.platform}")
    include, lib = _find_onednn()
    compiler = os.environ.get("CXX", "g++")
    cxx = shutil.which(compiler)
    if cxx is None:
        raise Unavailable(f"no C++ compiler {compiler!r}; install g++ or set CXX")
    key = [
        SOURCE.read_bytes(),
        (include / "oneapi/dnnl/dnnl_version.h").read_bytes(),
        importlib.metadata.version("jaxlib").encode(),
        " ".join([cxx, *_FLAGS]).encode(),
    ]
    digest = hashlib.sha256(b"\0".join(key)).hexdigest()[:16]
    cache = pathlib.Path(os.environ.get("STABNET_CACHE", "~/.cache/stabnet")).expanduser()
    target = cache / f"libstabnet_onednn-{digest}.so"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)  # built aside, then renamed: atomic
    os.close(fd)
    command = [
        cxx,
        *_FLAGS,
        f"-I{jax.ffi.include_dir()}",
        f"-I{include}",
        str(SOURCE),
        f"-L{lib}",
        "-ldnnl",
        f"-Wl,-rpath,{lib}",
        "-o",
        tmp,
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            first = next((ln for ln in done.stderr.splitlines() if "error" in ln), done.stderr)
            raise Unavailable(f"compiling {SOURCE.name} failed: {first.strip()[:300]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _single_threaded_blas() -> None:
    """Limits OpenBLAS to one thread. jaxlib's CPU eigensolvers (ResNet-S's exact norms) call
    LAPACK through SciPy's OpenBLAS, whose idle threads spin after each call and take the cores
    from oneDNN's OpenMP team: traced, s_depth11's convolutions ran 49 ms a step longer with the
    constraints than without, and 16 ms shorter with OpenBLAS on one thread
    (benchmarks/RESULTS.md, "OpenBLAS on one thread"). The solves are of matrices of at most
    64×64."""
    import scipy.linalg  # noqa: F401  (loads the OpenBLAS that jaxlib's LAPACK kernels use)
    import threadpoolctl

    threadpoolctl.threadpool_limits(1, user_api="blas")


@functools.cache
def _library() -> ctypes.CDLL | str:
    """Builds, loads and registers the FFI targets once: the library, or why it cannot."""
    try:
        library = ctypes.CDLL(str(_build()))
        for name in _TARGETS.values():
            capsule = jax.ffi.pycapsule(getattr(library, name))
            jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    except (Unavailable, OSError, AttributeError) as e:
        return str(e)
    _single_threaded_blas()
    return library


def _load() -> str | None:
    """``None`` where the library loaded, else why not."""
    library = _library()
    return library if isinstance(library, str) else None


def available() -> bool:
    """Whether :func:`conv_valid` can run here (builds the library on the first call)."""
    return _load() is None


def unavailable_reason() -> str:
    """Why :func:`available` is ``False`` (empty when it is ``True``)."""
    return _load() or ""


def supports(dtype: Any) -> bool:
    """Whether :func:`conv_valid` runs in ``dtype`` here: float32 where the library loaded,
    bfloat16 where oneDNN also finds AVX-512 (native bfloat16 products with AVX512-BF16 or AMX)."""
    if not available():
        return False
    if dtype == jnp.float32:
        return True
    return dtype == jnp.bfloat16 and bool(_library().StabnetBf16Supported())


def _call(target: str, shape: tuple[int, ...], stride: int, *args: jax.Array) -> jax.Array:
    result = jax.ShapeDtypeStruct(shape, args[0].dtype)
    return jax.ffi.ffi_call(_TARGETS[target], result)(*args, stride=np.int64(stride))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_valid(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """The "VALID" cross-correlation ``y[n,i,j,o] = Σ_{a,b,c} x[n,s·i+a,s·j+b,c] K[a,b,c,o]`` of
    ``x`` [N,H,W,Ci] with ``kernel`` [kh,kw,Ci,Co] at stride ``s``:
    ``[N, (H−kh)//s + 1, (W−kw)//s + 1, Co]``, in the dtype of both (float32, or bfloat16 with
    float32 accumulation). The linear map ``A_K`` of docs/mathematics.md §1 once ``x`` is padded
    (:func:`stabnet.fast.conv.onednn`)."""
    if not available():
        raise Unavailable(f"oneDNN convolutions are unavailable: {unavailable_reason()}")
    if x.dtype != kernel.dtype or x.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(f"conv_valid: x and kernel must both be float32 or bfloat16, not "
                        f"{x.dtype} and {kernel.dtype}")  # fmt: skip
    if not supports(x.dtype):
        raise Unavailable("oneDNN's bfloat16 convolutions need AVX-512 on this CPU")
    n, h, w, _ = x.shape
    kh, kw, _, co = kernel.shape
    return _call("forward", (n, (h - kh) // stride + 1, (w - kw) // stride + 1, co), stride,
                 x, kernel)  # fmt: skip


def _conv_valid_fwd(x, kernel, stride):
    return conv_valid(x, kernel, stride), (x, kernel)


def _conv_valid_bwd(stride, residuals, dy):
    x, kernel = residuals
    dx = _call("backward_data", x.shape, stride, dy, kernel)
    dkernel = _call("backward_weights", kernel.shape, stride, x, dy)
    return dx, dkernel


conv_valid.defvjp(_conv_valid_fwd, _conv_valid_bwd)
