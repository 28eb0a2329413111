"""Compute device selection: cuda > mps > cpu (torch imported lazily)."""

from __future__ import annotations

from napari_stgen.errors import StgenError

_VALID = ("auto", "cpu", "cuda", "mps")


def select_device(preference: str = "auto") -> str:
    """Resolve ``preference`` ('auto'|'cpu'|'cuda'|'mps'|'cuda:N') to an available device.

    'auto' picks cuda, then mps, then cpu (the GenST predictor's own rule); asking for an
    unknown or unavailable device raises :class:`StgenError` naming it.
    """
    from napari_stgen.inference.predictor import pick_device

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
