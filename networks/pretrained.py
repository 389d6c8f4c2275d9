"""Optional ImageNet encoder weights, loaded from local caches only (this project never downloads).

``build_model(arch, pretrained='imagenet')`` loads ImageNet weights into the encoder; the default
``pretrained=None`` trains from scratch, as the paper. Where the weights are looked for:

* torchvision backbones (``resnet*``, ``mobilenetv2``, ``vgg``): torch hub's cache,
  ``<torch.hub.get_dir()>/checkpoints/<torchvision file name>`` (for example ``resnet18-f37072fd.pth``;
  ``torch.hub.get_dir()`` is ``$TORCH_HOME/hub``, by default ``~/.cache/torch/hub``);
* ``xception``: the same folder, file ``xception-43020ad28.pth`` (the "pretrainedmodels" ImageNet
  weights the official code uses);
* timm models (``pvt``, ``smp:*/tu-<timm model>``): the Hugging Face cache (``hf_hub_download`` with
  ``local_files_only=True``);
* segmentation-models-pytorch encoders (``smp:*/<encoder>``): the Hugging Face cache, repo
  ``smp-hub/<encoder>.imagenet`` at the revision smp pins.

When the file is not there, :class:`PretrainedWeightsNotFound` (a ``FileNotFoundError``) names the
file, the folder to put it in, and where to download it on a machine with internet access.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn

XCEPTION_FILE = "xception-43020ad28.pth"
XCEPTION_URL = "http://data.lip6.fr/cadene/pretrainedmodels/" + XCEPTION_FILE


class PretrainedWeightsNotFound(FileNotFoundError):
    """ImageNet weights were asked for but are not in the local cache; the message says where to put them."""


def check_source(pretrained) -> Optional[str]:
    """Normalise ``pretrained``: ``None``/``False`` -> None, ``True``/``'imagenet'`` -> 'imagenet'."""
    if pretrained is None or pretrained is False:
        return None
    if pretrained is True or (isinstance(pretrained, str) and pretrained.lower() == "imagenet"):
        return "imagenet"
    raise ValueError(f"pretrained must be None (train from scratch) or 'imagenet', got {pretrained!r}")


def hub_checkpoint_dir() -> Path:
    """torch hub's checkpoint folder (``$TORCH_HOME/hub/checkpoints``), where torchvision caches weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _missing_file(what: str, path: Path, url: str) -> PretrainedWeightsNotFound:
    return PretrainedWeightsNotFound(
        f"ImageNet weights for {what} not found: expected the file {path.name!r} in the folder "
        f"{str(path.parent)!r} (torch hub's cache; set TORCH_HOME to use another). Nothing is downloaded "
        f"at run time: on a machine with internet access download {url} and put it at {str(path)!r}, "
        f"or train from scratch (models.pretrained: null).")


def _load_into(module: nn.Module, sd: Dict[str, torch.Tensor], source: str) -> None:
    """Load every parameter/buffer of ``module`` from ``sd`` (extra keys, e.g. a classifier, are ignored)."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and sd[k].shape != own[k].shape]
    if missing or shape:
        raise RuntimeError(
            f"{source}: does not fit the encoder: {len(missing)} missing key(s) "
            f"(first: {', '.join(missing[:5])}); {len(shape)} shape mismatch(es) "
            f"(first: {'; '.join(shape[:3])})")
    module.load_state_dict({k: sd[k] for k in own}, strict=True)


def _load_file(path: Path) -> Dict[str, torch.Tensor]:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


def load_torchvision_weights(backbone: nn.Module, tv_name: str, pretrained="imagenet") -> None:
    """Load torchvision's ImageNet-1k (V1) weights of ``tv_name`` (e.g. ``'resnet18'``) from torch hub's cache."""
    if check_source(pretrained) is None:
        return
    from torchvision.models import get_model_weights

    url = get_model_weights(tv_name).IMAGENET1K_V1.url
    _load_hub_file(backbone, tv_name, url)


def load_xception_weights(backbone: nn.Module, pretrained="imagenet") -> None:
    """Load the "pretrainedmodels" ImageNet Xception weights (its ``fc``/``last_linear`` is ignored)."""
    if check_source(pretrained) is None:
        return
    _load_hub_file(backbone, "xception", XCEPTION_URL)


def _load_hub_file(backbone: nn.Module, what: str, url: str) -> None:
    """Load the file ``url`` names from torch hub's checkpoint folder; never downloads it."""
    path = hub_checkpoint_dir() / url.rsplit("/", 1)[-1]
    if not path.is_file():
        raise _missing_file(what, path, url)
    _load_into(backbone, _load_file(path), str(path))


def _hf_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def hf_cached_file(repo_id: str, filenames, revision: Optional[str] = None, what: str = "") -> str:
    """Path of the first of ``filenames`` of Hugging Face repo ``repo_id`` in the local HF cache.

    Never touches the network (``local_files_only=True``); raises :class:`PretrainedWeightsNotFound`.
    """
    from huggingface_hub import hf_hub_download

    for name in filenames:
        try:
            return hf_hub_download(repo_id, filename=name, revision=revision, local_files_only=True)
        except Exception:  # LocalEntryNotFoundError and friends: try the next name
            continue
    rev = f" (revision {revision})" if revision else ""
    raise PretrainedWeightsNotFound(
        f"ImageNet weights for {what or repo_id} not found: expected the file {filenames[0]!r} of the "
        f"Hugging Face repo {repo_id!r}{rev} in the local Hugging Face cache folder {_hf_cache()!r} "
        f"(set HF_HOME/HF_HUB_CACHE to use another). Nothing is downloaded at run time: on a machine "
        f"with internet access run `huggingface-cli download {repo_id}"
        f"{' --revision ' + revision if revision else ''}` and copy that machine's cache folder "
        f"(models--{repo_id.replace('/', '--')}) into {_hf_cache()!r}, or train from scratch "
        f"(models.pretrained: null).")


def timm_pretrained_overlay(model_name: str) -> dict:
    """``pretrained_cfg_overlay`` making timm load ``model_name``'s weights from the local HF cache."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None or not getattr(cfg, "hf_hub_id", None):
        raise ValueError(f"timm model {model_name!r} has no pretrained weights on the Hugging Face hub")
    path = hf_cached_file(cfg.hf_hub_id, ["model.safetensors", "pytorch_model.bin"], what=model_name)
    return dict(file=path)


def load_smp_encoder_weights(encoder: nn.Module, encoder_name: str, pretrained="imagenet") -> None:
    """Load the ImageNet weights segmentation-models-pytorch pins for ``encoder_name`` from the HF cache."""
    if check_source(pretrained) is None:
        return
    from safetensors.torch import load_file
    from segmentation_models_pytorch.encoders import encoders

    settings = encoders[encoder_name]["pretrained_settings"]
    if "imagenet" not in settings:
        raise ValueError(f"smp encoder {encoder_name!r} has no 'imagenet' weights "
                         f"(it has: {', '.join(settings)})")
    s = settings["imagenet"]
    path = hf_cached_file(s["repo_id"], ["model.safetensors"], s.get("revision"), what=encoder_name)
    _load_into(encoder, load_file(path, device="cpu"), path)
