"""The server: its own model (any architecture) and the labeled public set D_p."""
from __future__ import annotations

import torch.nn as nn

from utils.device import Amp

from .client import Party


class Server(Party):
    def __init__(self, arch: str, model: nn.Module, train_cfg, amp: Amp, period: int, public_loader):
        super().__init__("server", arch, model, train_cfg, amp, period)
        self.public = public_loader
