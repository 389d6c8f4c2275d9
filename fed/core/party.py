"""A party of the federation (the server or a client): everything it owns, and nothing else.

A :class:`Party` holds its model, optimizer, cosine schedule, AMP scaler, its loaders and its loss log.
Its random draws come from keyed streams (:mod:`utils.rng`): a loader pass is keyed by
``(seed, round, stream, phase, epoch)`` and, before batch ``b``, torch's generators (dropout, feature
perturbation) are seeded with ``(seed, round, party, phase, epoch, b)``. Nothing of another party is
reachable from here: methods move data between parties only as messages (see :mod:`fed.core.runner`).

Every party holds the public labeled set: the server trains on it in Condensation, the clients in
Fusion (and as labeled data in ``lssl``/``local``); a client rebuilds the server's noisy, augmented
public batches itself from their key (stream ``"public"``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

import networks
from datasets.dataset import SegDataset, collate_names
from datasets.sampler import KeyedSampler
from utils.device import Amp
from utils.io import atomic_torch_save, snapshot
from utils.metrics import ScoreBook
from utils.rng import clamped_noise, seed_torch

from fed.core.method import LossLog
from fed.core.evaluate import score_model
from fed.core.registry import METHODS

PUBLIC = "public"  # the stream of the public batches that every party rebuilds identically


def cosine_factor(period: int, floor: float):
    """Official schedule: ``((1 + cos(pi x / period)) / 2) * (1 - floor) + floor``."""
    return lambda x: ((1 + math.cos(x * math.pi / period)) / 2) * (1 - floor) + floor


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True}  # one kernel for all parameters: ~4x faster steps on CPU and GPU
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fused)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **fused)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def build_loader(dataset: SegDataset, data_cfg, device: torch.device) -> DataLoader:
    """Training datasets get a :class:`KeyedSampler` (drop_last); eval datasets a plain ordered pass."""
    train = dataset.mode != "eval"
    drop_last = train or (data_cfg.eval_drop_last and len(dataset) >= data_cfg.batch_size)
    sampler = KeyedSampler(len(dataset), shuffle=data_cfg.shuffle,
                           augment_seeding=data_cfg.augment_seeding) if train else None
    return DataLoader(dataset, batch_size=data_cfg.batch_size, sampler=sampler, shuffle=False,
                      drop_last=drop_last, num_workers=data_cfg.num_workers, collate_fn=collate_names,
                      pin_memory=device.type == "cuda")


class Party:
    """``name``: ``"server"`` or ``"client{k}"``; ``loaders``: name -> DataLoader (``public``,
    ``labeled``, ``unlabeled``, ``val``, ``test``; absent or None where a split is empty)."""

    def __init__(self, name: str, arch: str, model: nn.Module, cfg, amp: Amp,
                 loaders: Dict[str, Optional[DataLoader]], index: Optional[int] = None, site: str = ""):
        t = cfg.train
        self.name, self.arch, self.amp, self.index, self.site = name, arch, amp, index, site
        self.seed, self.noise_std = cfg.seed, cfg.data.public_noise
        self.model = model.to(amp.device)
        if amp.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, t.optimizer, t.lr, t.weight_decay)
        period = t.rounds * max(1, t.condensation_epochs)
        self.scheduler = LambdaLR(self.optimizer, cosine_factor(period, t.lr_final_factor))
        self.scaler = torch.amp.GradScaler(amp.device.type, enabled=amp.needs_scaler)
        self.loaders = {k: v for k, v in loaders.items() if v is not None}
        self.log = LossLog()
        #: what a method keeps on this party between rounds (a teacher model, a prototype, a matrix):
        #: modules/optimizers made by ``Method.setup`` (restored by ``load_state_dict``), or tensors and
        #: plain values (replaced). Saved with the party's state (resume, Flower sites).
        self.extra: Dict[str, object] = {}
        self._round_start = None

    # --- computing ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, need_fp: bool = False, native: bool = False, features: bool = False) -> dict:
        """The model's outputs (:class:`networks.segmodel.SegModel`); ``features``: also the decoder feature."""
        flags = {k: True for k, v in (("native", native), ("features", features)) if v}
        with self.amp.autocast():
            out = self.model(x, need_fp=need_fp, **flags)
        if not self.amp.enabled:
            return out
        f = lambda t: t.float()  # losses in fp32
        return {k: tuple(map(f, v)) if isinstance(v, tuple) else f(v) for k, v in out.items()}

    def step(self, loss: torch.Tensor, clip: float = 0.0, also=()) -> None:
        """One optimizer step on ``loss``; ``clip > 0``: the model gradient's norm clipped to it first.
        ``also``: more optimizers (a method's own modules, e.g. ELN's projection head) stepped with the
        model's, on the same scaled loss."""
        optimizers = [self.optimizer, *also]
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        for o in optimizers:
            self.scaler.step(o)
        self.scaler.update()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def has(self, which: str) -> bool:
        return which in self.loaders

    def batches(self, which: str, rnd: int, phase: str, epoch: int, stream: Optional[str] = None,
                noisy: Optional[int] = None, shuffle: Optional[bool] = None) -> Iterator[tuple]:
        """One keyed pass over loader ``which``: yields ``(b, first, second)`` on the device
        (labeled: image, mask; unlabeled: weak, strong).

        The batches are keyed by ``(seed, rnd, stream or self.name, phase, epoch)``; ``noisy``: index
        (0 or 1) of the tensor that gets ``data.public_noise`` noise, keyed by the same plus ``b``;
        ``shuffle``: the pass's order is a keyed permutation (True) or the loader's (None: ``data.shuffle``).
        Before each batch torch's generators are seeded from ``(seed, rnd, self.name, phase, epoch, b)``.
        """
        loader = self.loaders[which]
        stream = stream or self.name
        loader.sampler.set_key(self.seed, rnd, stream, phase, epoch, shuffle=shuffle)
        for b, (first, second, _) in enumerate(loader):
            pair = [first, second]
            if noisy is not None and self.noise_std > 0:
                pair[noisy] = pair[noisy] + clamped_noise(pair[noisy].shape, self.noise_std,
                                                          self.seed, rnd, stream, phase, epoch, b, "noise")
            seed_torch(self.seed, rnd, self.name, phase, epoch, b)
            yield b, self.amp.to_device(pair[0]), self.amp.to_device(pair[1])

    def public_batches(self, rnd: int, phase: str, epoch: int):
        """The shared noisy public batches of a Condensation/Fusion pass: ``(b, x, y (B,H,W) long)``."""
        for b, x, y in self.batches("public", rnd, phase, epoch, stream=PUBLIC, noisy=0):
            yield b, x, y[:, 0].long()

    # --- what the runner asks of every party ------------------------------------------------------
    def begin_round(self, keep: bool = False) -> None:
        """Fresh loss log; ``keep``: remember the state to :meth:`rollback` to (``skip_client``)."""
        self.log = LossLog()
        self._round_start = snapshot(self.state_dict()) if keep else None

    def rollback(self) -> None:
        if self._round_start is not None:
            self.load_state_dict(self._round_start)
        self.log = LossLog()

    def end_round(self) -> dict:
        """What the run logs of this party's round: mean loss terms and the learning rate."""
        return {"loss": self.log.means(), "lr": self.lr}

    def evaluate(self, model: nn.Module, split: str) -> list:
        """Per-image scores of ``model`` on this party's ``split`` loader (rows of a ScoreBook)."""
        book = ScoreBook()
        if split in self.loaders:
            score_model(model, self.loaders[split], self.amp, book, self.name)
        return book.rows

    def test_weights(self, weights: dict, arch: str, overlay_dir=None, overlays: int = 0) -> list:
        """The final test, where the data lives: ``weights`` (of architecture ``arch``: this party's own,
        or the global model's) scored on this party's test split with batch 1 and HD95 (fp32); the
        per-image rows. Overlays (images!) are written here, into ``overlay_dir``."""
        import networks

        book = ScoreBook()
        if "test" not in self.loaders:
            return book.rows
        model = networks.build_model(arch)
        model.load_state_dict(weights)
        loader = DataLoader(self.loaders["test"].dataset, batch_size=1, shuffle=False, num_workers=0,
                            collate_fn=collate_names)
        score_model(model.to(self.amp.device), loader, self.amp, book, self.name, with_hd95=True,
                    overlay_dir=Path(overlay_dir) if overlay_dir and overlays else None, overlays=overlays)
        return book.rows

    def weights(self) -> dict:
        """This party's model weights (CPU tensors): what a checkpoint file holds."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def state_dict(self) -> dict:
        """Model, optimizer, schedule, scaler and the method's :attr:`extra` state (modules as state dicts)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "extra": {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in self.extra.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        saved = state.get("extra", {})
        for k in [k for k in self.extra if k not in saved and not hasattr(self.extra[k], "state_dict")]:
            del self.extra[k]  # plain values that did not exist yet at that point
        for k, v in saved.items():
            if hasattr(self.extra.get(k), "state_dict"):  # modules and optimizers the method set up
                self.extra[k].load_state_dict(v)
            else:
                self.extra[k] = v

    def round_state(self) -> dict:
        """What the party holds within a round beyond :meth:`state_dict`: its loss log and the snapshot a
        rollback returns to (a Flower site carries them to the process that serves its next message)."""
        return {"log": self.log.state_dict(), "round_start": self._round_start}

    def load_round_state(self, state: dict) -> None:
        self.log.load_state_dict(state["log"])
        self._round_start = state["round_start"]

    def state_path(self, folder, rnd: int) -> Path:
        return Path(folder) / f"{self.name}.r{rnd}.pt"

    def save_state(self, folder, rnd: int) -> None:
        """Write this party's full training state for round ``rnd`` atomically, from the live tensors
        (no copy: nothing may train while it is written)."""
        atomic_torch_save(self.state_dict(), self.state_path(folder, rnd))

    def kept_path(self, folder, rnd: int) -> Path:
        """``<folder>/<name>.kept.r<round>.pt`` (:func:`round_of` reads the round back)."""
        return Path(folder) / f"{self.name}.kept.r{rnd}.pt"

    def keep_weights(self, folder, rnd: int) -> None:
        """Keep this party's model weights of round ``rnd`` in ``folder`` (a checkpoint that stays where the
        party lives until :meth:`kept_weights` is asked for it), and the one kept before it: the server's
        last committed choice is one of the two. Weights kept at later rounds (never committed: a round
        done again after a resume, or another run's) go."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        atomic_torch_save(self.weights(), self.kept_path(folder, rnd))
        kept = sorted((round_of(f), f) for f in Path(folder).glob(f"{self.name}.kept.r*.pt"))
        earlier = [f for r, f in kept if r < rnd]
        for f in [f for r, f in kept if r > rnd] + earlier[:-1]:
            f.unlink()

    def kept_weights(self, folder, rnd: int) -> dict:
        """The weights kept at round ``rnd`` (:meth:`keep_weights`)."""
        from utils.checkpoint import safe_load

        return safe_load(self.kept_path(folder, rnd), f"weights {self.name} kept at round {rnd}")

    def load_state(self, folder, rnd: int) -> None:
        from utils.checkpoint import safe_load

        self.load_state_dict(safe_load(self.state_path(folder, rnd), f"training state of {self.name}"))


def round_of(path: Path) -> int:
    """The round of a party's state or kept-weights file (:meth:`Party.state_path`, :meth:`Party.kept_path`)."""
    return int(Path(path).name.rsplit(".r", 1)[1].split(".")[0])


def make_party(cfg, amp: Amp, name: str, arch: str, items: Dict[str, list], public: SegDataset,
               index: Optional[int] = None, site: str = "") -> Party:
    """Build one party: its model (initialised from the key ``(seed, "init", name)``), loaders, optimizer."""
    d = cfg.data
    loaders = {"public": build_loader(public, d, amp.device)}
    modes = {"labeled_train": ("labeled", "labeled"), "unlabeled_train": ("unlabeled", "unlabeled"),
             "val_list": ("val", "eval"), "test_list": ("test", "eval")}
    for key, (which, mode) in modes.items():
        if items.get(key):
            loaders[which] = build_loader(SegDataset(items[key], d.size, mode, cache=d.cache).preload(), d, amp.device)
    seed_torch(cfg.seed, "init", name)
    model = networks.build_model(arch, pretrained=cfg.models.pretrained)
    party = Party(name, arch, model, cfg, amp, loaders, index=index, site=site)
    METHODS[cfg.method](cfg).setup(party)
    return party
