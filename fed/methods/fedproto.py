"""FedProto (``../shared/BASELINES.md`` section 9): only class prototypes of the decoder feature cross.

The embedding is the decoder's penultimate feature map, the input of the head's classifier
(``party.forward(x, features=True)["feature"]``, (B, D, h, w): the 256-d stride-4 ``last_conv1`` output
of the DeepLabV3+ family). One round:

1. **Aggregation** (after the warm-up): every client uploads its local prototypes, one per class: the
   masked average pooling of its features over the pixels of that class (:func:`masked_prototypes`),
   accumulated (sum and count) over the *last local epoch* of its previous round, during training (not
   recomputed): ground truth on D_p, the confident pseudo-labels on its own pixels, labels brought to
   the feature resolution by nearest neighbour. The server takes, per class, the unweighted mean over
   the clients that saw the class (``fedproto.weighting: counts``: weighted by pixel counts, the paper's
   |D_i,k| weighting) and sends the global prototypes back (:func:`aggregate_prototypes`).
2. **Local step**: :func:`fed.common.baseline_local.hetero_local` (BASELINES section 12) with FedProto's
   regulariser ``fedproto.ld * MSE(feature, C_label)`` per pixel (:func:`proto_mse`) on D_p and the
   confident local pixels; a pixel whose class has no global prototype contributes 0 but counts in
   the mean (the official code's own-embedding trick). ``fedproto.level: batch``: the cheaper variant,
   the batch's masked-average prototype per class against the global one (:func:`batch_proto_mse`).

During warm-up nothing crosses and there is no regulariser; the prototypes are still accumulated, so the
first round after it already has global prototypes. Inference uses each client's own classifier.

Feature widths: when every client's feature has the same width D (HSSF's clients share the DeepLabV3+
head: 256), prototypes are D-dimensional. When they differ (``tiny`` 32, ``unet`` 32, DeepLabV3+ 256,
smp decoders...), ``fedproto.projection: auto`` maps the feature of each client whose width is not
``fedproto.dim`` through a fixed random 1x1 projection to ``fedproto.dim`` (Gaussian, std 1/sqrt(D),
keyed by the seed and the width: clients of one width share it), made in :meth:`FedProto.setup`. It is
*not* trained: a trainable projection would let the MSE collapse it (projection -> 0 makes prototypes
and features 0). ``projection: off`` refuses such a federation with a config error.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

import networks
from networks.segmodel import feature_channels
from utils.rng import generator

from utils.config import Key, non_negative, positive
from fed.core.registry import register
from fed.core.method import Method, step
from fed.core.replies import Fields, Maybe, Tensor
from fed.common.labels import one_hot
from fed.common.baseline_local import hetero_local

NUM_CLASSES = 2


# --- FedProto's pieces, as pure functions -----------------------------------------------------------

def to_feature_grid(labels: torch.Tensor, valid: torch.Tensor, size) -> Tuple[torch.Tensor, torch.Tensor]:
    """Labels (B,H,W) and valid pixels (B,H,W) at the feature resolution ``size``, by nearest neighbour."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long(), valid.bool()
    near = lambda t: F.interpolate(t[:, None].float(), size=tuple(size), mode="nearest")[:, 0]
    return near(labels).long(), near(valid) > 0.5


def masked_prototypes(feat: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                      num_classes: int = NUM_CLASSES) -> Tuple[torch.Tensor, torch.Tensor]:
    """Masked average pooling, as sums: per class, the sum of the features (C, D) over its valid
    pixels and their count (C,). ``feat`` (B,D,h,w); ``labels``/``valid`` (B,H,W), brought to (h,w)."""
    lab, val = to_feature_grid(labels, valid, feat.shape[-2:])
    member = one_hot(lab, num_classes) * val[:, None].to(torch.float32)  # (B,C,h,w)
    sums = torch.einsum("bchw,bdhw->cd", member, feat.float())
    return sums, member.sum(dim=(0, 2, 3))


def proto_mse(feat: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, protos: torch.Tensor,
              present: torch.Tensor) -> torch.Tensor:
    """Per-pixel MSE between the feature and the global prototype of the pixel's label:
    ``sum over valid pixels whose class has a prototype of ||f - C_y||^2 / (#valid pixels * D)``;
    pixels whose class has none add 0 (still counted). 0 without valid pixels."""
    lab, val = to_feature_grid(labels, valid, feat.shape[-2:])
    target = protos.to(feat)[lab].permute(0, 3, 1, 2)  # (B,D,h,w)
    use = (val & present.to(lab.device)[lab]).to(feat.dtype)
    sq = ((feat - target) ** 2).sum(dim=1) * use
    return sq.sum() / (val.sum().clamp(min=1) * feat.shape[1])


def batch_proto_mse(feat: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, protos: torch.Tensor,
                    present: torch.Tensor) -> torch.Tensor:
    """The batch-level variant: per class present in the batch's valid pixels, its masked-average
    prototype against the global one; ``sum ||p_c - C_c||^2 / (#classes in the batch * D)``, classes
    without a global prototype adding 0. 0 without valid pixels."""
    sums, counts = masked_prototypes(feat, labels, valid, len(protos))
    here = counts > 0
    local = sums[here] / counts[here, None]
    sq = ((local - protos.to(local)[here]) ** 2).sum(dim=1) * present.to(here.device)[here].to(local.dtype)
    return sq.sum() / (here.sum().clamp(min=1) * feat.shape[1])


def aggregate_prototypes(uploads: List[dict], weighting: str = "uniform") -> Optional[dict]:
    """The server's fold, in the given (client) order: per class, the mean over the clients that saw it
    of their prototypes, unweighted (``uniform``: each upload ``{"proto": (C,D), "present": (C,) bool}``)
    or weighted by their pixel counts (``counts``: ``{"proto", "count": (C,)}``). Returns ``{"proto":
    (C,D) float32, "present": (C,) bool}``, or None without uploads."""
    if not uploads:
        return None
    num = torch.zeros_like(uploads[0]["proto"], dtype=torch.float64)
    den = torch.zeros(num.shape[0], dtype=torch.float64)
    for u in uploads:
        w = u["count"].double() if weighting == "counts" else u["present"].double()
        num += w[:, None] * u["proto"].double()
        den += w
    present = den > 0
    return {"proto": (num / den.clamp(min=1e-12)[:, None]).float() * present[:, None],
            "present": present}


@functools.lru_cache(maxsize=None)
def feature_width(arch: str) -> int:
    """D of an architecture's ``feature`` map (built on the meta device: no weights, no random draws;
    on the CPU under a forked RNG where the meta device is refused)."""
    try:
        with torch.device("meta"):
            return feature_channels(networks.build_model(arch))
    except Exception:  # noqa: BLE001 - an architecture that can not be built on the meta device
        with torch.random.fork_rng(devices=[]):
            return feature_channels(networks.build_model(arch))


def projection(seed: int, width: int, dim: int) -> torch.Tensor:
    """The fixed 1x1 projection (dim, width) of a ``width``-channel feature: N(0, 1/width), keyed by the
    seed and the width."""
    g = generator(seed, "init", "fedproto", "projection", width, dim)
    return torch.randn(dim, width, generator=g) / width ** 0.5


# --- the method -------------------------------------------------------------------------------------

@register
class FedProto(Method):
    name = "fedproto"
    #: this method's settings, the ``fedproto.*`` section of the configuration (docs/configuration.md)
    options = {
        "ld": Key(1.0, float, "FedProto: weight lambda of the prototype regulariser (official `--ld` 1).",
                  check=non_negative),
        "level": Key("pixel", str, "FedProto: `pixel` (per-pixel MSE between the decoder feature and the global "
                     "prototype of the pixel's label) or `batch` (the batch's masked-average prototype per "
                     "class against the global one; cheaper, not per pixel).", choices=["pixel", "batch"]),
        "weighting": Key("uniform", str, "FedProto: the server's mean of the client prototypes per class: "
                         "`uniform` (official code) or `counts` (weighted by pixel counts, as the paper; "
                         "clients then send their counts).", choices=["uniform", "counts"]),
        "projection": Key("auto", str, "FedProto, clients of different feature widths: `auto` (a fixed "
                          "random 1x1 projection to `fedproto.dim` for each client whose width differs; "
                          "not trained) or `off` (such a federation is a config error).",
                          choices=["auto", "off"]),
        "dim": Key(256, int, "FedProto: prototype width when client feature widths differ (the DeepLabV3+ "
                   "decoder's 256).", check=positive),
    }
    sends = {"up": "per round: the client's prototype per class (2, D) float32 of its last local epoch and "
                   "which classes it saw (2,) bool (fedproto.weighting: counts: pixel counts (2,) int64)",
             "down": "the global prototypes (2, D) float32 and which classes have one (2,) bool"}
    #: uploading reads the kept prototypes only: Flower "query" messages

    @classmethod
    def check_config(cls, cfg) -> List[str]:
        widths = {}
        for a in cfg.models.clients:
            try:
                widths[a] = feature_width(a)
            except Exception:  # noqa: BLE001 - an unknown architecture: reported when the model is built
                continue
        if len(set(widths.values())) > 1 and cfg.fedproto.projection == "off":
            return [f"method fedproto compares features across clients, but their widths differ "
                    f"({', '.join(f'{a}: {w}' for a, w in sorted(widths.items()))}) and fedproto.projection "
                    f"is off: use clients of one feature width, or fedproto.projection: auto (a fixed 1x1 "
                    f"projection to fedproto.dim = {cfg.fedproto.dim})"]
        return []

    def setup(self, party) -> None:
        if party.name == "server":
            return
        p = self.cfg.fedproto
        own = feature_channels(party.model)
        if len({feature_width(a) for a in self.cfg.models.clients}) > 1 and own != p.dim:
            party.extra["fedproto_projection"] = projection(self.cfg.seed, own, p.dim).to(party.amp.device)
        party.extra.update(fedproto_sum=None, fedproto_count=None, fedproto_epoch=-1)

    def run_round(self, r, rnd: int) -> None:
        warm, glob = self.warm(rnd), None
        if not warm:
            with r.phase("aggregation"):
                uploads = r.clients(self.upload, rnd=rnd)
                glob = r.server(self.aggregate, [u for u in uploads.values() if u is not None])
        with r.phase("local"):
            r.clients(self.local, glob, rnd=rnd, warm=warm)

    # --- steps ------------------------------------------------------------------------------------
    @step(read_only=True, reply=lambda m: Maybe(Fields(
        proto=Tensor("C d", torch.float32),
        **({"count": Tensor("C", torch.int64, lo=0)} if m.cfg.fedproto.weighting == "counts"
           else {"present": Tensor("C", torch.bool)}))))
    def upload(self, client, msg, rnd: int) -> Optional[dict]:
        """The prototypes of the client's last local epoch (None before any local epoch)."""
        sums, counts = client.extra["fedproto_sum"], client.extra["fedproto_count"]
        if sums is None:
            return None
        proto = (sums / counts.clamp(min=1)[:, None]).float().cpu()
        if self.cfg.fedproto.weighting == "counts":
            return {"proto": proto, "count": counts.round().long().cpu()}
        return {"proto": proto, "present": (counts > 0).cpu()}

    @step
    def aggregate(self, server, uploads: List[dict]) -> Optional[dict]:
        return aggregate_prototypes(uploads, self.cfg.fedproto.weighting)

    @step
    def local(self, client, glob: Optional[dict], rnd: int, warm: bool) -> None:
        client.extra.update(fedproto_sum=None, fedproto_count=None, fedproto_epoch=-1)
        hetero_local(client, rnd, self.cfg, warm, regularizer=self._regularizer(glob), forward_kw={"features": True})

    def _regularizer(self, glob: Optional[dict]):
        p = self.cfg.fedproto
        distance = batch_proto_mse if p.level == "batch" else proto_mse

        def regularizer(party, out, labels, valid):
            feat = out["feature"]
            proj = party.extra.get("fedproto_projection")
            if proj is not None:
                feat = torch.einsum("od,bdhw->bohw", proj.to(feat), feat)
            self._accumulate(party, feat.detach(), labels, valid)
            if glob is None:  # warm-up, or no client has prototypes yet
                return None
            mse = distance(feat, labels, valid, glob["proto"].to(feat.device), glob["present"])
            return p.ld * mse, {"proto": mse}
        return regularizer

    @staticmethod
    def _accumulate(party, feat, labels, valid) -> None:
        """Sum and count per class over the current local epoch (a new epoch, told by the scheduler's
        counter, which steps once per local epoch, starts them afresh): after the local step they hold
        the last epoch's."""
        sums, counts = masked_prototypes(feat, labels, valid)
        e = party.scheduler.last_epoch
        if party.extra["fedproto_epoch"] != e or party.extra["fedproto_sum"] is None:
            party.extra.update(fedproto_sum=torch.zeros_like(sums, dtype=torch.float64),
                               fedproto_count=torch.zeros_like(counts, dtype=torch.float64), fedproto_epoch=e)
        party.extra["fedproto_sum"] += sums.double()
        party.extra["fedproto_count"] += counts.double()
