"""Checkpoints: official naming, safe loading, clear errors.

Model weights are plain state dicts, named as the official code does: ``{arch}_{k}_best.pth`` (client k,
0-based), ``{arch}_{k}_last.pth``, ``global_{arch}_best.pth``. Every load uses
``torch.load(..., weights_only=True)``: a file holding anything but tensors and plain containers is
refused, and no code in it runs.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

from .io import atomic_torch_save

# the official models carry an unused ImageNet classification layer: ``backbone.fc`` (ResNets),
# ``backbone.last_linear`` (Xception); the project's models leave it out
IGNORED_PREFIXES = ("backbone.fc.", "backbone.last_linear.")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and what is wrong."""


def client_ckpt_name(arch: str, k: int, which: str = "best") -> str:
    return f"{arch}_{k}_{which}.pth"


def global_ckpt_name(arch: str, which: str = "best") -> str:
    return f"global_{arch}_{which}.pth"


def save_weights(model: torch.nn.Module, path, writer=None) -> Path:
    """Atomically save ``model``'s state dict (CPU tensors); on ``writer``'s thread if given."""
    if writer is not None:
        writer.save(model.state_dict(), path)
        return Path(path)
    return atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)


def safe_load(path, what: str = "checkpoint"):
    """``torch.load(path, map_location='cpu', weights_only=True)`` with readable errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{path}: refused to load: the file holds Python objects other than tensors and plain "
            f"containers, which could run code when unpickled (weights_only=True). Only load files "
            f"from sources you trust; re-save them as a plain state_dict. ({first})") from None
    except (EOFError, zipfile.BadZipFile, RuntimeError, ValueError, OSError) as e:
        raise CheckpointError(
            f"{path}: cannot read the {what}: the file is truncated or corrupt "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def extract_state_dict(obj, path) -> Dict[str, torch.Tensor]:
    """A plain state dict from what was loaded: unwraps ``{'state_dict': ...}``/``{'model': ...}`` and
    the ``module.`` prefix of DataParallel."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_weights(model: torch.nn.Module, path, arch: Optional[str] = None,
                 guess: Optional[Callable[[Dict[str, torch.Tensor]], Tuple[str, float]]] = None) -> None:
    """Load a weights file into ``model`` strictly (except ``backbone.fc.*``, which is dropped).

    A mismatch raises :class:`CheckpointError` naming the expected architecture, the first
    missing/unexpected/mis-shaped keys and, with ``guess`` (``networks.guess_arch``: state dict ->
    (architecture, match)), the architecture the file's keys look like.
    """
    sd = extract_state_dict(safe_load(path, "weights file"), path)
    sd = {k: v for k, v in sd.items() if not k.startswith(IGNORED_PREFIXES)}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shape:
        arch = arch or getattr(model, "arch", type(model).__name__)
        looks, score = guess(sd) if guess is not None else (arch, 1.0)
        parts = [f"{path}: weights do not fit architecture {arch!r}"]
        if looks != arch:
            parts.append(f"the file's keys look like {looks!r} ({score:.0%} of keys and shapes match)")
        if missing:
            parts.append(f"{len(missing)} missing key(s), first: {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), first: {', '.join(unexpected[:5])}")
        if shape:
            parts.append(f"{len(shape)} shape mismatch(es), first: {'; '.join(shape[:3])}")
        raise CheckpointError("; ".join(parts))
    model.load_state_dict(sd, strict=True)
