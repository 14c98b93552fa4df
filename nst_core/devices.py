"""Which device to run on, and how to set it up for speed."""

from __future__ import annotations

import contextlib
import os

import torch

from .errors import DeviceError


def pick_device(name: str = "auto") -> torch.device:
    """auto → CUDA, then Apple MPS, then CPU; a named device that is absent is a DeviceError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name}: CUDA is not available on this machine (use --device cpu or auto)")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return dev
    if name == "mps":
        if not _mps_available():
            raise DeviceError("device mps: Apple MPS is not available on this machine (use --device cpu or auto)")
        return torch.device("mps")
    return torch.device("cpu")


TF32_ENV = "NST_TF32"  # "0": the network in full float32 on CUDA too (for comparison)


def tf32_by_env() -> bool:
    return os.environ.get(TF32_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def configure(device: torch.device, tf32: bool | None = None) -> None:
    """TF32 (unless `tf32` is False, or by default $NST_TF32=0: full float32) and cuDNN autotuning
    on CUDA; on the CPU as many threads as this process may use."""
    if tf32 is None:
        tf32 = tf32_by_env()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True
    elif device.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if cores and torch.get_num_threads() != cores:
            torch.set_num_threads(cores)


def memory_format(device: torch.device) -> torch.memory_format:
    """channels-last on CUDA (faster convolutions with cuDNN), contiguous elsewhere."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def autocast(device: torch.device, precision: str, cache_enabled: bool = True):
    """Reduced precision for the network's forward pass; only on CUDA, where it keeps the result.

    Inside a captured CUDA graph pass ``cache_enabled=False`` (autocast's weight-cast cache must
    not hold tensors of the capture)."""
    if device.type != "cuda" or precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=getattr(torch, precision), cache_enabled=cache_enabled)


@contextlib.contextmanager
def exact_float32():
    """Full float32 matrix products inside (no TF32), for the losses and the optimiser.

    TF32 suits the network's convolutions; a Gram matrix close to its target, or the inner products
    of L-BFGS's curvature pairs, would lose digits that the optimisation needs. The switch is
    read when each product is launched (so a CUDA graph captured inside records float32 kernels)
    and is process-wide while the block runs."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


# How PyTorch's allocators word a failed allocation: CUDA ("CUDA out of memory"), MPS, and the CPU
# ("DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes", "not enough memory").
_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def stable_name(device: torch.device) -> str:
    """The device as a name that stays the same: cuda → cuda:N (the current device)."""
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is a failed allocation, on a GPU or in host memory."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return any(w in text for w in _OOM_WORDS)


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
