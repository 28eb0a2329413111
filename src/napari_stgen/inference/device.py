"""Compute device selection: cuda > mps > cpu (torch imported lazily)."""

from __future__ import annotations

from napari_stgen.errors import StgenError

_VALID = ("auto", "cpu", "cuda", "mps")


def select_device(preference: str = "auto") -> str:
    """Resolve ``preference`` ('auto'|'cpu'|'cuda'|'mps'|'cuda:N') to an available device.

    'auto' picks cuda, then mps, then cpu. Asking for an unavailable accelerator raises
    :class:`StgenError` naming it.
    """
    import torch

    pref = (preference or "auto").lower()
    if pref.split(":")[0] not in _VALID:
        raise StgenError(f"unknown device {preference!r}: use one of {', '.join(_VALID)}")
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if pref == "auto":
        return "cuda" if cuda else ("mps" if mps else "cpu")
    if pref.startswith("cuda") and not cuda:
        raise StgenError(f"device {preference!r} requested but CUDA is not available")
    if pref == "mps" and not mps:
        raise StgenError("device 'mps' requested but Apple MPS is not available")
    return pref


def describe_device(device: str) -> str:
    """Human-readable label, e.g. 'cuda (NVIDIA H100)' or 'cpu (2 threads)'."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    if str(device) == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)
