"""Compute device selection (cuda > mps > cpu) and the CPU thread policy (torch lazily).

Thread policy: inference uses ``usable cores − 1`` torch threads (at least 1), leaving a
core to the GUI (Qt, vispy, slide decoding); :func:`set_threads` applies it or an explicit
count (widgets' "CPU threads" box, ``stgen predict --threads``).
"""

from __future__ import annotations

import os
import platform

from napari_stgen.errors import StgenError

_VALID = ("auto", "cpu", "cuda", "mps")


def pick_device(device: str = "auto") -> str:
    """``auto`` → cuda if available, else mps, else cpu; otherwise the name as given."""
    import torch

    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise StgenError(f"device {device!r} requested but CUDA is not available")
        return device
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def select_device(preference: str = "auto") -> str:
    """Resolve ``preference`` ('auto'|'cpu'|'cuda'|'mps'|'cuda:N') to an available device.

    'auto' picks cuda, then mps, then cpu (the GenST predictor's own rule); asking for an
    unknown or unavailable device raises :class:`StgenError` naming it.
    """
    pref = (preference or "auto").lower()
    if pref.split(":")[0] not in _VALID:
        raise StgenError(f"unknown device {preference!r}: use one of {', '.join(_VALID)}")
    dev = pick_device(pref)
    if dev == "mps":
        import torch

        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise StgenError("device 'mps' requested but Apple MPS is not available")
    return dev


def describe_device(device: str) -> str:
    """Human-readable label, e.g. 'cuda (NVIDIA H100)' or 'cpu (2 threads)'."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    if str(device) == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """The policy's torch thread count: usable cores − 1, at least 1."""
    return max(1, usable_cores() - 1)


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` (None or < 1: the policy default).

    Call it in the thread that runs inference (torch applies the count per calling thread
    for OpenMP). Returns the count set.
    """
    import torch

    n = int(threads) if threads is not None and int(threads) >= 1 else default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def safe_cpu_training() -> bool:
    """Turn off oneDNN (mkldnn) convolutions before training on the CPU; returns whether
    they are off. torch 2.13's oneDNN convolution backward corrupts the heap on some CPUs
    (seen on AMD EPYC: "double free or corruption" in ``mkldnn_convolution_backward_weights``
    with the tests' tiny GenST). ``STGEN_ONEDNN=1`` keeps them on."""
    import torch

    off = os.environ.get("STGEN_ONEDNN", "") != "1"
    if off:
        torch.backends.mkldnn.enabled = False
    return off


def cpu_kernel_info() -> dict:
    """What decides a CPU training's floating-point results: the CPU model and the vector
    instruction set torch's kernels dispatch to (``ATEN_CPU_CAPABILITY`` overrides it; MKL's
    ``MKL_CBWR`` pins its code path). Two CPUs with different entries (e.g. AVX512 vs AVX2)
    round differently, so the same seed trains a slightly different model."""
    import torch

    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            rows = (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
            model = next(rows, "")
    except OSError:
        pass
    info = {"cpu": model or platform.processor() or platform.machine()}
    info["torch_cpu_capability"] = str(torch.backends.cpu.get_cpu_capability())
    if os.environ.get("MKL_CBWR"):
        info["mkl_cbwr"] = os.environ["MKL_CBWR"]
    return info
