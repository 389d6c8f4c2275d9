"""ELN: Error Localization Network, on FedAvg (BASELINES.md section 4).

Phases mapped to rounds: ``train.warmup_rounds`` supervised rounds, then ``eln.eln_rounds`` rounds in
which the ELN and two auxiliary decoders are trained on D_p, then the semi-supervised (SSL) phase.
Every round: the clients train locally from the global model they hold (H1 protocol, as lssl: a
supervised pass on D_p with the harness loss, :func:`fed.common.hssf_local.supervised_pass`, in every phase; SSL
terms on their unlabeled data in the SSL phase), then send their weights, the server averages them
uniformly (:func:`fed.methods.lssl.fedavg`) and sends the average back, and the clients load it (round 0 starts
with one such exchange of the initial weights). The average after the round's local training is the
model evaluated and checkpointed for the round.

``eln.mapping: server`` (default, BASELINES' recommendation): the server trains the ELN and the aux
decoders on D_p with the global model (:meth:`ELN.train_eln`), once per ELN round, after that round's
aggregation, and sends the ELN (frozen from then on) with the average to each client that does not have
it yet and trains in the SSL phase next (a client says so in its weight reply: ``need_eln``; normally
once, at the end of the last ELN round; a client that sat that round out asks again and skips its
unlabeled passes until it has the ELN). ``eln.mapping: clients``: every client trains its own ELN and
aux decoders on D_p after its supervised pass, and they are averaged with the model at the end of every
ELN round (the aux decoders not after the last one), so that all clients use the averaged ELN.

The ELN network (:class:`ELNet`) takes ``[image, entropy of softmax(p), logits p]`` (3 + 1 + 2 channels)
through an **input adapter** (a 1x1 convolution to 3 channels) into the registry architecture
``eln.arch`` (default resnet34; a DeepLabV3+ with one output class): its ``mask`` output is the logit
of "this pixel's prediction is right" (its SA branch is unused). The adapter keeps every registry
architecture usable unchanged (and its pretrained first layer when ``models.pretrained`` is set).
The aux decoders are fresh copies of the segmentation model's decoder head (``model.classifier``) on
the main model's detached encoder features; aux ``i``'s CE counts only while it is ``>= c_i`` times the
main CE (:func:`aux_gate`, ``eln.aux_factors`` (20, 50)); the ELN loss is a BCE against
``1[argmax pred == gt]`` with the negatives re-weighted by #pos/#neg (:func:`eln_loss`), summed over the
main and both aux predictions (all without gradient). The main model is in eval mode while it predicts
for the ELN; the ELN and aux decoders train in fp32 with their own AdamW (``train.lr``, ``train.weight_decay``).

SSL phase, on each client: the EMA teacher (momentum ``eln.ema``, 0.995, updated after each unlabeled
step; parameters and float buffers) starts as the global model the first SSL round starts from; teacher
(and the projection heads) are FedAvg'd with the student at the end of every SSL round. With
``eln.reset_student`` (official) the student is reset to the teacher at the start of every local
epoch. Pseudo-labels: the teacher's (eval mode) argmax on the weak view, kept where ``sigmoid(ELN) >
eln.threshold`` (the official ``round(sigmoid) = 1`` at 0.5; others ignored); loss ``CE(x_u) +
CE(x_aug) + contrast(x_u) + contrast(x_aug)`` (weights 1, as the official ``train.py``), with the
colour-augmented view ``x_aug``: ColorJitter(0.4, 0.4, 0.4, 0.1) + RandomGrayscale(0.2) per image
(:func:`colour_augment`). The pixel
contrastive loss (:func:`pixel_contrastive`, ``eln.contrastive``; the official ``utils/losses.py``):
the teacher's projections of ``x_u`` (head 256 -> 256 -> 128 on the decoder feature, the input of the
decoder's classifier; no gradient) are the anchors, the student's projections of the view the
positives and negatives; on ``eln.crops`` random ``eln.crop_size``-square crops of the feature map
(stride 4), each at one location for the whole batch (:func:`crop_boxes`), temperature
``eln.temperature``; positives = kept pixels of the same pseudo-class, negatives = kept pixels of the
others. The evaluated model is the global student each client received at the end of the round.
"""
from __future__ import annotations

import copy
import functools
from typing import Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import networks
from networks.segmodel import upsample
from utils.rng import generator, seed_torch

from utils.config import Key, non_negative, positive, unit_interval
from fed.common import diag
from fed.core.registry import register
from fed.core.method import PerClient, step
from fed.core.replies import Number, Prefixed, State, module_shapes
from fed.common.epochs import local_epochs
from fed.common.weights import clone_state, ema_update, fedavg
from fed.methods.lssl import LSSL
from utils.losses import IGNORE, masked_ce


# --- the pieces of ELN, as pure functions ---------------------------------------------------------

def eln_input(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``[image, entropy of softmax(logits), logits]`` along channels: (B, 3 + 1 + C, H, W)."""
    logits = logits.float()
    entropy = -(F.softmax(logits, 1) * F.log_softmax(logits, 1)).sum(1, keepdim=True)
    return torch.cat([x.float(), entropy, logits], dim=1)


def eln_target(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``1[argmax pred == y]`` as (B,1,H,W) float; ``y`` (B,H,W) class indices."""
    return (pred.argmax(1) == y).unsqueeze(1).float()


def eln_loss(eln_logit: torch.Tensor, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits of the ELN against :func:`eln_target`; the loss of negative pixels is multiplied by
    ``#pos / #neg`` over the batch; mean over all pixels."""
    t = eln_target(pred, y)
    bce = F.binary_cross_entropy_with_logits(eln_logit.float(), t, reduction="none")
    n_pos = t.sum()
    ratio = n_pos / (t.numel() - n_pos).clamp(min=1)
    return torch.where(t > 0, bce, bce * ratio).mean()


def aux_gate(aux_losses: Sequence[float], main_loss: float, factors: Sequence[float]) -> List[bool]:
    """Aux decoder ``i`` is trained (its CE counts) only where ``aux_losses[i] >= factors[i] * main_loss``."""
    return [a >= c * main_loss for a, c in zip(aux_losses, factors)]


def eln_pseudo_label(teacher_logits: torch.Tensor, eln_logit: torch.Tensor, threshold: float) -> torch.Tensor:
    """Teacher argmax where ``sigmoid(ELN) > threshold`` (at 0.5 the official ``round(sigmoid(ELN)) == 1``:
    torch rounds 0.5 to 0), ``IGNORE`` elsewhere: (B,H,W)."""
    keep = torch.sigmoid(eln_logit.float()[:, 0]) > threshold
    pred = teacher_logits.argmax(1)
    return torch.where(keep, pred, torch.full_like(pred, IGNORE))


def pixel_contrastive(anchor: torch.Tensor, other: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """ELN's pixel contrast on one crop: ``anchor`` (N,D) embeddings (the teacher's), ``other`` (N,D) those
    the loss moves (the student's), ``labels`` (N,) pseudo-classes (``IGNORE`` pixels left out); both
    L2-normalised. With ``s_ij = exp(anchor_i . other_j / T)``, for each class ``c`` present (``n_c``
    pixels): ``P_c = sum s_ij`` over anchors and candidates of class ``c``, ``Q_c = sum s_ij`` over anchors
    of ``c`` and candidates of other classes (each sum at least 1e-8); the loss is the mean over classes
    of ``-log(P_c / (P_c + Q_c)) / n_c`` (0 if no pixel is kept)."""
    valid = labels != IGNORE
    if not bool(valid.any()):
        return other.sum() * 0.0
    a = F.normalize(anchor[valid].float(), dim=1, eps=1e-8)
    o = F.normalize(other[valid].float(), dim=1, eps=1e-8)
    y = labels[valid]
    sim = torch.exp(a @ o.t() / temperature)
    losses = []
    for c in torch.unique(y):
        mine = y == c
        rows = sim[mine]
        pos, neg = rows[:, mine].sum().clamp(min=1e-8), rows[:, ~mine].sum().clamp(min=1e-8)
        losses.append(-torch.log(pos / (pos + neg)) / mine.sum())
    return torch.stack(losses).mean()


def crop_boxes(n: int, h: int, w: int, size: int, gen: torch.Generator) -> List[tuple]:
    """``n`` random crops ``(top, left, side)`` of at most ``size`` px square of an (h, w) map, each at one
    location for every image of the batch (as the official RandomCrop4 crops the batch)."""
    s = min(size, h, w)
    top = torch.randint(h - s + 1, (n,), generator=gen).tolist()
    left = torch.randint(w - s + 1, (n,), generator=gen).tolist()
    return [(top[i], left[i], s) for i in range(n)]


def colour_augment(x: torch.Tensor) -> torch.Tensor:
    """ColorJitter(0.4, 0.4, 0.4, 0.1) + RandomGrayscale(0.2), per image, on inputs normalised to
    [-1, 1]; draws from torch's default generator (seeded per batch by ``Party.batches``)."""
    from torchvision import transforms as T

    aug = T.Compose([T.ColorJitter(0.4, 0.4, 0.4, 0.1), T.RandomGrayscale(0.2)])
    img = ((x.float() + 1) / 2).clamp(0, 1)
    return (torch.stack([aug(i) for i in img]) * 2 - 1).to(x.dtype)


# --- the networks -----------------------------------------------------------------------------------

class ELNet(nn.Module):
    """The error-localisation network: input adapter (1x1 conv, 3 + 1 + C -> 3) + registry ``arch`` with one
    output class; ``forward(x, logits)`` -> (B,1,H,W) logit of "the prediction is right here"."""

    def __init__(self, arch: str, num_classes: int = 2, pretrained=None):
        super().__init__()
        self.adapter = nn.Conv2d(3 + 1 + num_classes, 3, 1)
        self.net = networks.build_model(arch, num_classes=1, pretrained=pretrained)

    def forward(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self.net(self.adapter(eln_input(x, logits)))["mask"]


def projection_head(width: int, hidden: int = 256, out: int = 128) -> nn.Module:
    return nn.Sequential(nn.Conv2d(width, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, out, 1))


def decoder_classifier(model: nn.Module) -> nn.Module:
    """The decoder's final classifier (its input is the decoder feature the projection head reads)."""
    head = getattr(model, "classifier", None)
    inner = getattr(head, "classifier", None)
    if inner is None:
        raise ValueError(f"eln.contrastive needs a DeepLabV3+-style model (model.classifier.classifier); "
                         f"{getattr(model, 'arch', type(model).__name__)!r} has none: set eln.contrastive false")
    return inner


def forward_with_feature(forward, model: nn.Module, x: torch.Tensor):
    """``forward(x)`` plus the decoder feature (the input of :func:`decoder_classifier`)."""
    box = {}
    hook = decoder_classifier(model).register_forward_pre_hook(lambda m, inp: box.__setitem__("f", inp[0]))
    try:
        out = forward(x)
    finally:
        hook.remove()
    return out, box["f"]


@functools.lru_cache(maxsize=None)
def _shapes(part: str, arch: str, eln_arch: str, aux: int) -> Dict[str, tuple]:
    """The state a client of ``arch`` sends of its ``part`` (proj, proj_t, eln, aux), built on the meta device."""
    if part in ("proj", "proj_t"):
        return module_shapes(lambda: projection_head(decoder_classifier(networks.build_model(arch))[0].in_channels))
    if part == "eln":
        return module_shapes(lambda: ELNet(eln_arch, pretrained=None))
    return module_shapes(lambda: nn.ModuleList([networks.build_model(arch).classifier for _ in range(aux)]))


def _send_weights_reply(m) -> Prefixed:
    """What ``send_weights`` may carry: the student always; the teacher (and the projection heads, with
    ``eln.contrastive``), the ELN and its aux decoders where the stage sends them; ``need_eln``."""
    c = m.cfg.eln
    part = lambda p: State(of=lambda ctx: _shapes(p, ctx.arch, c.arch, len(c.aux_factors)))  # noqa: E731
    return Prefixed(student=State(), optional={"teacher": State(), **{p: part(p) for p in ("proj", "proj_t", "eln", "aux")}},
                    scalars={"need_eln": Number(int, lo=1, hi=1)})


def _prefixed(prefix: str, sd: dict) -> dict:
    return {f"{prefix}.{k}": v for k, v in clone_state(sd).items()}


def _part(flat: dict, prefix: str) -> dict:
    p = prefix + "."
    return {k[len(p):]: v for k, v in flat.items() if k.startswith(p)}


# --- the method -------------------------------------------------------------------------------------

@register
class ELN(LSSL):
    name = "eln"
    #: this method's settings, the ``eln.*`` section of the configuration (docs/configuration.md)
    options = {
        "eln_rounds": Key(10, int, "ELN: rounds of ELN and aux-decoder training on D_p after the warm-up, before "
                          "the SSL phase (BASELINES: about 10).", check=non_negative),
        "eln_epochs": Key(1, int, "ELN: passes over D_p per ELN round by whoever trains the ELN.", check=positive),
        "arch": Key("resnet34", str, "ELN: registry architecture of the error-localisation network (one output "
                    "class), behind a 1x1-conv input adapter from [image, entropy, logits] (6 channels) to 3."),
        "mapping": Key("server", str, "ELN: `server` trains the ELN and aux decoders at the server on D_p and "
                       "sends the frozen ELN once; `clients`: every client trains them on D_p and they are "
                       "FedAvg'd with the model.", choices=["server", "clients"]),
        "aux_factors": Key([20.0, 50.0], list, "ELN: aux decoder i's CE counts only while >= c_i x main CE "
                           "(two decoders: two factors).",
                           check=lambda v: None if len(v) == 2 and all(isinstance(x, (int, float)) and
                                                                       not isinstance(x, bool) and x >= 0
                                                                       for x in v)
                           else "must be two numbers >= 0 (one per auxiliary decoder)"),
        "threshold": Key(0.5, float, "ELN: pseudo-labels kept where sigmoid(ELN) > this (0.5: the official round(sigmoid) = 1).", check=unit_interval),
        "ema": Key(0.995, float, "ELN: EMA teacher momentum.", check=unit_interval),
        "reset_student": Key(True, bool, "ELN: reset the student to the teacher at the start of every local "
                             "epoch of the SSL phase (official); false: keep the received student."),
        "contrastive": Key(True, bool, "ELN: pixel contrastive loss between student and teacher projections."),
        "crops": Key(8, int, "ELN: random crops of the feature map per batch for the contrastive loss.", check=positive),
        "crop_size": Key(32, int, "ELN: crop side (feature-map pixels, capped at the map size).", check=positive),
        "temperature": Key(0.5, float, "ELN: contrastive temperature.", check=positive),
    }
    shared_model = True
    sends = {"up": "model weights; in the SSL phase also the EMA teacher and, with eln.contrastive, the "
                   "student's and teacher's projection heads; eln.mapping clients: the ELN and aux decoders "
                   "after each ELN round (the aux decoders not after the last); need_eln (a number) from the "
                   "last ELN round on (mapping server)",
             "down": "the average of what was sent; mapping server: the frozen ELN's weights to a client that "
                     "asked (once)"}

    def stage(self, rnd: int) -> str:
        w = self.cfg.train.warmup_rounds
        return "warm" if rnd < w else "eln" if rnd < w + self.cfg.eln.eln_rounds else "ssl"

    def trains_eln(self, party) -> bool:
        return (party.name == "server") == (self.cfg.eln.mapping == "server")

    # --- state kept on the parties -------------------------------------------------------------
    def setup(self, party) -> None:
        super().setup(party)
        c, t = self.cfg.eln, self.cfg.train
        seed_torch(self.cfg.seed, "init", "eln")  # one initialisation for every party
        party.extra["eln"] = ELNet(c.arch, pretrained=self.cfg.models.pretrained).to(party.amp.device)
        if self.trains_eln(party):
            seed_torch(self.cfg.seed, "init", "aux")
            aux = nn.ModuleList([networks.build_model(party.arch).classifier for _ in c.aux_factors])
            party.extra["aux"] = aux.to(party.amp.device)
            party.extra["eln_opt"] = torch.optim.AdamW(party.extra["eln"].parameters(), lr=t.lr,
                                                       weight_decay=t.weight_decay)
            party.extra["aux_opt"] = torch.optim.AdamW(aux.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        if party.name == "server":
            return
        party.extra["teacher"] = copy.deepcopy(party.model)
        party.extra["has_teacher"] = False
        party.extra["has_eln"] = False
        if c.contrastive:
            width = decoder_classifier(party.model)[0].in_channels
            seed_torch(self.cfg.seed, "init", "proj")
            party.extra["proj"] = projection_head(width).to(party.amp.device)
            party.extra["proj_t"] = copy.deepcopy(party.extra["proj"])
            party.extra["proj_opt"] = torch.optim.AdamW(party.extra["proj"].parameters(), lr=t.lr,
                                                        weight_decay=t.weight_decay)

    # --- the round ------------------------------------------------------------------------------
    def run_round(self, r, rnd: int) -> None:
        stage = self.stage(rnd)
        if rnd == 0:  # one starting model for every client: the average of the initial weights
            self.exchange(r, rnd, "start", stage)
        with r.phase("local"):
            r.clients(self.local, rnd=rnd, stage=stage)
        self.exchange(r, rnd, stage, self.stage(rnd + 1))

    def exchange(self, r, rnd: int, stage: str, next_stage: str) -> None:
        """After a round of ``stage`` (``"start"``: before round 0's local training): the clients' weights
        up, their average down (with the frozen ELN to a client that needs it for ``next_stage``); in an
        ELN round (mapping server) the server first trains the ELN with the new global model."""
        with r.phase("aggregation"):
            replies: Dict[int, dict] = r.clients(self.send_weights, rnd=rnd, stage=stage, next_stage=next_stage)
            avg = r.server(self.aggregate, [{k: v for k, v in reply.items() if k != "need_eln"}
                                            for reply in replies.values()])  # client order: exact
        if stage == "eln" and self.cfg.eln.mapping == "server":
            with r.phase("eln"):
                r.server(self.train_eln, rnd=rnd)
        need = [k for k, reply in replies.items() if reply.get("need_eln")]
        msg = avg
        if need:
            eln = r.server(self.eln_weights)
            msg = PerClient({k: {**avg, **eln} if k in need else avg for k in replies})
        with r.phase("aggregation"):
            r.clients(self.receive, msg, rnd=rnd)

    @step(read_only=True, reply=_send_weights_reply)
    def send_weights(self, client, msg, rnd: int, stage: str, next_stage: str) -> dict:
        x, c = client.extra, self.cfg.eln
        out = _prefixed("student", client.model.state_dict())
        if stage == "ssl" and x["has_teacher"]:
            out.update(_prefixed("teacher", x["teacher"].state_dict()))
            if c.contrastive:
                out.update(_prefixed("proj", x["proj"].state_dict()))
                out.update(_prefixed("proj_t", x["proj_t"].state_dict()))
        if c.mapping == "clients" and stage == "eln":  # trained this round: averaged for every client
            out.update(_prefixed("eln", x["eln"].state_dict()))
            if next_stage == "eln":  # the aux decoders only serve the ELN's training
                out.update(_prefixed("aux", x["aux"].state_dict()))
        if next_stage == "ssl" and c.mapping == "server" and not x["has_eln"]:
            out["need_eln"] = 1
        return out

    @step
    def aggregate(self, server, weights: List[dict]) -> dict:
        avg = fedavg(weights)
        server.model.load_state_dict(_part(avg, "student"))
        if any(k.startswith("eln.") for k in avg):
            server.extra["eln"].load_state_dict(_part(avg, "eln"))
        return avg

    @step
    def eln_weights(self, server, msg) -> dict:
        return _prefixed("eln", server.extra["eln"].state_dict())

    @step
    def train_eln(self, party, msg=None, rnd: int = 0) -> None:
        """ELN and aux decoders on D_p with ``party.model``'s predictions (the model itself is not trained)."""
        c = self.cfg.eln
        model, eln, aux = party.model, party.extra["eln"], party.extra["aux"]
        model.eval()
        eln.train()
        aux.train()
        for e in range(c.eln_epochs):
            for _, x, y in party.batches("public", rnd, "eln", e):
                y = y[:, 0].long()
                size = x.shape[-2:]
                with torch.no_grad():
                    feats = model.backbone(x.float())
                    main = upsample(model.classifier(feats)[0], size).float()
                    main_ce = F.cross_entropy(main, y)
                aux_logits = [upsample(a(feats)[0], size).float() for a in aux]
                aux_ce = [F.cross_entropy(a, y) for a in aux_logits]
                gates = aux_gate([a.item() for a in aux_ce], main_ce.item(), c.aux_factors)
                if any(gates):
                    party.extra["aux_opt"].zero_grad(set_to_none=True)
                    sum(a for a, g in zip(aux_ce, gates) if g).backward()
                    party.extra["aux_opt"].step()
                preds = [main] + [a.detach() for a in aux_logits]
                loss_eln = sum(eln_loss(eln(x, p), p, y) for p in preds)
                party.extra["eln_opt"].zero_grad(set_to_none=True)
                loss_eln.backward()
                party.extra["eln_opt"].step()
                party.log.add(eln_bce=loss_eln, eln_main_ce=main_ce,
                              **{f"eln_aux{i}_ce": a for i, a in enumerate(aux_ce)},
                              **{f"eln_aux{i}_on": float(g) for i, g in enumerate(gates)})

    @step
    def receive(self, client, avg: dict, rnd: int) -> None:
        """The global model (the client's model and its copy), and whatever else was averaged or sent."""
        x, c = client.extra, self.cfg.eln
        client.model.load_state_dict(_part(avg, "student"))
        x["global"].load_state_dict(_part(avg, "student"))
        if any(k.startswith("eln.") for k in avg):
            x["eln"].load_state_dict(_part(avg, "eln"))
            x["has_eln"] = True
        if any(k.startswith("aux.") for k in avg):
            x["aux"].load_state_dict(_part(avg, "aux"))
        if any(k.startswith("teacher.") for k in avg):
            x["teacher"].load_state_dict(_part(avg, "teacher"))
            if c.contrastive:
                x["proj"].load_state_dict(_part(avg, "proj"))
                x["proj_t"].load_state_dict(_part(avg, "proj_t"))

    @step
    def local(self, client, msg, rnd: int, stage: str) -> None:
        x, c = client.extra, self.cfg.eln
        if stage != "ssl":
            local_epochs(client, rnd, self.cfg.train.local_epochs, self.cfg.hssf, labeled="public")
            if stage == "eln" and c.mapping == "clients":
                self.train_eln(client, rnd=rnd)
            return
        if not x["has_teacher"]:  # the teacher copies the (global) student at the end of the warm-up
            x["teacher"].load_state_dict(client.model.state_dict())
            if c.contrastive:
                x["proj_t"].load_state_dict(x["proj"].state_dict())
            x["has_teacher"] = True

        def reset(e):
            if c.reset_student:
                client.model.load_state_dict(x["teacher"].state_dict())
                if c.contrastive:
                    x["proj"].load_state_dict(x["proj_t"].state_dict())

        # no ELN: the client sat out the round that delivered it (it asks again)
        ssl = self._ssl_pass if x["has_eln"] or c.mapping == "clients" else None
        local_epochs(client, rnd, self.cfg.train.local_epochs, self.cfg.hssf, labeled="public", unlabeled=ssl,
                     before=reset)

    def _ssl_pass(self, client, rnd: int, e: int) -> None:
        x, c = client.extra, self.cfg.eln
        teacher, eln = x["teacher"], x["eln"]
        teacher.eval()
        eln.eval()
        client.model.train()
        for b, w, _ in client.batches("unlabeled", rnd, "eln_ssl", e):
            with torch.no_grad(), client.amp.autocast():
                if c.contrastive:
                    t_out, t_feat = forward_with_feature(teacher, teacher, w)
                else:
                    t_out = teacher(w)
                t_logits = t_out["mask"].float()
                pseudo = eln_pseudo_label(t_logits, eln(w, t_logits), c.threshold)
            aug = colour_augment(w)
            if c.contrastive:
                (out_w, s_feat), (out_a, a_feat) = (forward_with_feature(client.forward, client.model, v) for v in (w, aug))
            else:
                out_w, out_a = client.forward(w), client.forward(aug)
            ce_u = masked_ce(out_w["mask"], pseudo, over="kept")
            ce_aug = masked_ce(out_a["mask"], pseudo, over="kept")
            terms = {"eln_ce_u": ce_u, "eln_ce_aug": ce_aug}
            if c.contrastive:
                gen = lambda: generator(self.cfg.seed, rnd, client.name, "crops", e, b)  # noqa: E731 - the same crops for both views
                terms["eln_contrast"] = self._contrast(client, s_feat, t_feat, pseudo, gen())
                terms["eln_contrast_aug"] = self._contrast(client, a_feat, t_feat, pseudo, gen())
            loss = sum(terms.values())
            client.step(loss, also=[x["proj_opt"]] if "proj_opt" in x else [])
            ema_update(teacher, client.model, c.ema, buffers="ema")
            if c.contrastive:
                ema_update(x["proj_t"], x["proj"], c.ema, buffers="ema")
            client.log.add(**terms, eln_kept=(pseudo != IGNORE).float().mean())
            diag.log(client, diag.pseudo_labels, t_logits.argmax(1), pred=out_w["mask"].argmax(1),
                     pix_kept=pseudo != IGNORE)  # labels: the teacher's argmax, kept where the ELN trusts it

    def _contrast(self, client, s_feat, t_feat, pseudo, gen: torch.Generator) -> torch.Tensor:
        """:func:`pixel_contrastive` of the student's projections (of ``s_feat``) against the teacher's
        anchors (of ``t_feat``) on ``eln.crops`` crops of the whole batch, averaged."""
        c = self.cfg.eln
        x = client.extra
        z_s = x["proj"](s_feat.float())
        with torch.no_grad():
            z_t = x["proj_t"](t_feat.float())
        h, w = z_s.shape[-2:]
        labels = F.interpolate(pseudo[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        flat = lambda z, t, l, s: z[:, :, t:t + s, l:l + s].permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # noqa: E731
        losses = [pixel_contrastive(flat(z_t, t, l, s), flat(z_s, t, l, s), labels[:, t:t + s, l:l + s].reshape(-1),
                                    c.temperature)
                  for t, l, s in crop_boxes(c.crops, h, w, c.crop_size, gen)]
        return torch.stack(losses).mean()
