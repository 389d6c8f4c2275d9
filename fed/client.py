"""Participants of the simulation: a model with its optimizer, cosine schedule and AMP state.

:class:`Party` is what the server and the clients have in common; :class:`Client` adds its local
loaders. Methods (``fed/hssf.py``...) only talk to parties through ``forward``, ``step`` and the
loaders, which keeps the message interface narrow: what crosses between server and clients is
predictions on the public batches (or, for FedAvg methods, state dicts).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

from utils.device import Amp


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


class Party:
    def __init__(self, name: str, arch: str, model: nn.Module, train_cfg, amp: Amp, period: int):
        self.name, self.arch, self.amp = name, arch, amp
        self.model = model.to(amp.device)
        if amp.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, train_cfg.optimizer, train_cfg.lr, train_cfg.weight_decay)
        self.scheduler = LambdaLR(self.optimizer, cosine_factor(period, train_cfg.lr_final_factor))
        self.scaler = torch.amp.GradScaler(amp.device.type, enabled=amp.needs_scaler)

    def forward(self, x: torch.Tensor, need_fp: bool = False) -> dict:
        with self.amp.autocast():
            out = self.model(x, need_fp=need_fp)
        if not self.amp.enabled:
            return out
        f = lambda t: t.float()  # losses in fp32
        mask = tuple(map(f, out["mask"])) if isinstance(out["mask"], tuple) else f(out["mask"])
        return {"mask": mask, "confidence": f(out["confidence"])}

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


class Client(Party):
    """Client ``index`` at ``site``: its model and its local loaders (``None`` where a split is empty)."""

    def __init__(self, index: int, site: str, arch: str, model: nn.Module, train_cfg, amp: Amp,
                 period: int, loaders: dict):
        super().__init__(f"client{index}", arch, model, train_cfg, amp, period)
        self.index, self.site = index, site
        self.labeled: Optional[torch.utils.data.DataLoader] = loaders.get("labeled")
        self.unlabeled: Optional[torch.utils.data.DataLoader] = loaders.get("unlabeled")
        self.val = loaders.get("val")
        self.test = loaders.get("test")
