"""The mixed-precision path of Party (used on CUDA), exercised with CPU bf16 autocast."""
import torch

import networks
from fed.core.party import Party
from fed.common.labels import one_hot
from utils.config import load_config
from utils.device import Amp
from utils.losses import confidence_loss, structure_loss


def test_autocast_party_returns_fp32_and_trains():
    cfg = load_config()
    amp = Amp(torch.device("cpu"), enabled=True, dtype=torch.bfloat16)
    torch.manual_seed(0)
    party = Party("p", "tiny", networks.build_model("tiny"), cfg, amp, loaders={})
    x = torch.randn(2, 3, 32, 32)
    y = one_hot((torch.rand(2, 32, 32) > 0.7).long())
    out = party.forward(x, need_fp=True)
    assert all(t.dtype == torch.float32 for t in out["mask"]) and out["confidence"].dtype == torch.float32
    before = [p.detach().clone() for p in party.model.parameters()]
    out = party.forward(x)
    loss = structure_loss(out["mask"], y) + confidence_loss(out["mask"].detach(), out["confidence"], y)
    party.step(loss)
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, party.model.parameters()))
    assert party.scaler.is_enabled() is False  # bf16 needs no loss scaling


def test_amp_settings_per_device():
    cpu = Amp.for_device(torch.device("cpu"), amp=True)
    assert not cpu.enabled and not cpu.channels_last  # CPU runs fp32, default memory format
    if torch.cuda.is_available():
        gpu = Amp.for_device(torch.device("cuda"), amp=True)
        assert gpu.enabled and gpu.dtype in (torch.bfloat16, torch.float16)


def test_scoring_runs_in_fp32_even_with_amp():
    """Validation and test scores are computed without autocast, as the official code (AMP is for
    training only)."""
    from fed.core.evaluate import score_model
    from utils.metrics import ScoreBook

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x, need_fp=False):
            seen.append((torch.is_autocast_enabled("cpu"), x.dtype))
            return {"mask": torch.stack([-x[:, 0], x[:, 0]], 1), "confidence": x[:, :1]}

    amp = Amp(torch.device("cpu"), enabled=True, dtype=torch.bfloat16)
    loader = [(torch.randn(2, 3, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float(), ["a", "b"])]
    book = score_model(Probe(), loader, amp, ScoreBook(), "g")
    assert seen == [(False, torch.float32)] and len(book.rows) == 2
