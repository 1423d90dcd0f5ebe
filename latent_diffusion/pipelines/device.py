"""The device a model runs on, checked before anything is loaded onto it."""
from __future__ import annotations

import torch

_HINT = "use cpu, cuda, cuda:N or mps"


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device; ValueError naming it when it is not a device or this machine lacks it."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {str(device)!r}; {_HINT}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            built = "has no GPU it can use" if torch.backends.cuda.is_built() else "was built without CUDA"
            raise ValueError(f"device {str(device)!r}: this PyTorch {torch.__version__} {built}; use --device cpu")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {str(device)!r}: there {'is' if count == 1 else 'are'} {count} CUDA "
                             f"device{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: Apple's Metal (MPS) is not available here; use --device cpu")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        backend = getattr(torch, resolved.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise ValueError(f"device {str(device)!r} is not available here; {_HINT}")
    return resolved
