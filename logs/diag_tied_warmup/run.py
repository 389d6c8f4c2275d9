"""Diagnostic (not part of the method): the keyed protocol with the OLD, tied augmentation draws (every
child of the Compose seeded alike, the bug fixed in 0341153), on the lite federation, warm-up rounds only.
Run from the repository root: PYTHONPATH=. python logs/diag_tied_warmup/run.py (stopped after round 10)."""
import sys
import albumentations as A
import torch
import datasets.transforms as T
T.IndependentCompose.set_random_seed = A.Compose.set_random_seed  # every child gets the same seed (old bug)
torch.set_num_threads(1)
from fed import load_config
from fed.run import train
L = "data/lite"
cfg = load_config("configs/polyp_lite_hssf.yaml", [f"data.root={L}", f"data.split={L}/splits/polyp_lite_seed42_0.6-0.2-0.2.json",
                  "train.rounds=16", "train.warmup_rounds=16", "output.dir=runs/diag_tied", "data.verify=false"])
train(cfg, progress=False, overwrite=True)
