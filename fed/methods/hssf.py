"""HSSF: Regularity Condensation, Regularity Fusion and local semi-supervised learning (SPEC section 4).

Knowledge crosses between heterogeneous models only as predictions on the public set D_p. One round:

1. **Condensation** (clients -> server), per pass ``e`` over D_p: every client predicts the pass's
   noisy, augmented public batches (it rebuilds them itself from their key) and sends its logits and
   grades (pixel accuracy); the server folds the replies, in any order, into one teacher per sample
   (:func:`fold_teacher`) and trains on D_p, distilling (KL) from the teacher where its grade beats
   the server's own RPG-corrected grade (:func:`teacher_mask`).
2. **Fusion** (server -> clients), per pass ``e``: the server sends its logits and RPG-corrected
   grades on the pass's public batches; every client trains on D_p and distils from the server where
   the server's grade beats its own pixel accuracy (:func:`fusion_mask`).
3. **Local learning**: :mod:`fed.common.hssf_local` (unlabeled data only after the warm-up rounds).

Messages go pass by pass, so at most one pass of predictions is held at a time. During warm-up
``kl_theta`` is 0 and unlabeled training is off; the predictions that would only feed a zero-weighted
KL term are then neither computed nor sent.

What crosses can be reduced (``hssf.*`` settings; the public images themselves never cross: every site
holds D_p and rebuilds each pass's batches from their key):

- ``grades_first`` (exact): Condensation asks for grades first, folds them into each sample's teacher,
  then asks each client only for the logits of the samples it teaches whose grade passes
  ``sample_threshold`` (the others can never be used, :func:`teacher_mask`). Clients recompute those
  batches (eval mode, same keyed inputs: the same logits).
- ``logits_at: head`` (exact up to rounding): logits at the head's own resolution (stride 4 for the
  DeepLabV3+ family), upsampled by the receiver with the model's own :func:`~networks.segmodel.upsample`.
- ``logits_dtype: float16`` (lossy): logits sent in half precision, used in fp32.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from networks.segmodel import upsample
from utils.losses import confidence_loss, kl_loss, structure_loss

from utils.config import Key, non_negative, positive, unit_interval
from fed.common import diag
from fed.core.registry import register
from fed.core.method import Method, PerClient, step
from fed.core.replies import Fields, OneOf, Tensor
from fed.common.labels import one_hot, pixel_accuracy
from fed.common.hssf_local import rpg_correct
from fed.common.epochs import local_epochs
from fed.common.hssf_local import unlabeled_pass


# --- the decisions of HSSF, as pure functions ---------------------------------------------------

def running_pick(g0: torch.Tensor, grades: torch.Tensor, threshold: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The official Condensation pick, literally: start from the server (index -1, grade ``g0``);
    for each client k in order take it where ``grades[k] > grade`` (strict), then reset picked grades
    ``<= threshold`` to 0. Returns the picked index (B,) and grade (B,); the KL mask is ``grade > g0``.
    """
    index, grade = torch.full_like(g0, -1, dtype=torch.long), g0.clone()
    for k, s in enumerate(grades):
        better = s > grade
        index = torch.where(better, torch.full_like(index, k), index)
        grade = torch.where(better, s, grade)
        grade = torch.where(grade > threshold, grade, torch.zeros_like(grade))
    return index, grade


def fold_teacher(acc: Optional[dict], k: int, reply: dict) -> dict:
    """Fold one client's Condensation reply ``{"grade": (N,), "logits": (N,2,H,W)}`` (``logits`` absent
    under ``grades_first``) into the best so far: the highest grade wins, ties go to the lower client
    index. Order-free: any arrival order of the replies gives the same result (the first argmax over
    clients in index order)."""
    g = reply["grade"]
    if acc is None:
        acc = {"grade": g.clone(), "index": torch.full_like(g, k, dtype=torch.long)}
        if "logits" in reply:
            acc["logits"] = reply["logits"].clone()
        return acc
    better = (g > acc["grade"]) | ((g == acc["grade"]) & (k < acc["index"]))
    acc["grade"] = torch.where(better, g, acc["grade"])
    acc["index"] = torch.where(better, torch.full_like(acc["index"], k), acc["index"])
    if "logits" in acc:
        acc["logits"][better] = reply["logits"][better]
    return acc


def teacher_requests(best: dict, threshold: float) -> PerClient:
    """Grades first: the rows whose logits each client must send, ``{k: rows (long)}``: the samples it
    teaches (it has their highest grade) whose grade passes ``threshold``. No other teacher logits can
    be used (:func:`teacher_mask` needs ``grade > threshold``)."""
    usable = best["grade"] > threshold
    return PerClient({int(k): torch.nonzero(usable & (best["index"] == k)).flatten()
                      for k in best["index"].unique()})


def place_teacher_rows(best: dict, asks: PerClient):
    """A fold for the replies to :func:`teacher_requests` (``{"logits"}`` of the asked rows, in their
    order) into one ``{"grade", "index", "logits"}`` teacher. Rows nobody delivered (a client failed)
    keep no teacher."""
    def fold(acc: Optional[dict], k: int, reply: dict) -> dict:
        if acc is None:
            acc = {"grade": best["grade"].clone(), "index": best["index"], "logits": None,
                   "got": torch.zeros_like(best["grade"], dtype=torch.bool)}
        rows, logits = asks.get(k), reply["logits"]
        if rows is not None and rows.numel():
            if acc["logits"] is None:
                acc["logits"] = logits.new_zeros((len(acc["grade"]),) + tuple(logits.shape[1:]))
            acc["logits"][rows] = logits
            acc["got"][rows] = True
        return acc
    return fold


def finish_teacher(acc: Optional[dict]) -> Optional[dict]:
    """Rows without delivered logits can not teach (grade -1: never passes the threshold)."""
    if acc is None:
        return None
    acc["grade"] = torch.where(acc.pop("got"), acc["grade"], torch.full_like(acc["grade"], -1.0))
    return acc


def teacher_mask(best: torch.Tensor, g0: torch.Tensor, threshold: float) -> torch.Tensor:
    """Where the Condensation teacher is used: its grade ``best`` (the highest client grade) passes the
    ``threshold`` and beats the server's RPG-corrected grade ``g0``. Equal to :func:`running_pick`'s
    ``grade > g0``, with the teacher the first client of highest grade (tested)."""
    return (best > threshold) & (best > g0)


def received(logits: torch.Tensor, size) -> torch.Tensor:
    """Logits as they arrived (any dtype, head or input resolution) -> fp32 at the input ``size``."""
    return upsample(logits.float(), size)


def fusion_mask(g0: torch.Tensor, client_acc: torch.Tensor) -> torch.Tensor:
    """Fusion distils from the server where its RPG-corrected grade beats the client's accuracy."""
    return g0 > client_acc


# --- the method -------------------------------------------------------------------------------------

def _sent(m) -> torch.dtype:
    """The dtype in which the clients send their logits (``hssf.logits_dtype``)."""
    return getattr(torch, m.cfg.hssf.logits_dtype)


def _logits(m, rows: str) -> Tensor:
    """The logits a client sends: ``rows`` public images, at the input's size, or at the head's own
    (``hssf.logits_at: head``: at most the input's)."""
    size = "S S" if m.cfg.hssf.logits_at == "input" else "h<=S w<=S"
    return Tensor(f"{rows} C {size}", _sent(m))


@register
class HSSF(Method):
    name = "hssf"
    #: this method's settings, the ``hssf.*`` section of the configuration (docs/configuration.md)
    options = {
        "confide_theta": Key(4.0, float, "Weight of the Self-Assessment loss. Every method's supervised pass (the shared harness, `fed/common/hssf_local.py` `supervised_pass`) uses it too: `seg + confide_theta * SA`.",
                          check=non_negative),
        "kl_theta": Key(10.0, float, "Weight of the KL terms of Condensation and Fusion.", check=non_negative),
        "unlabel_theta": Key(1.0, float, "Weight of the unlabeled loss of HSSF's local step (also the local step of `lssl`, `local` and of the heterogeneous baselines with `baselines.local_step: hssf`; the same holds for the local-step keys below).", check=non_negative),
        "temperature": Key(2.0, float, "KL temperature.", check=positive),
        "rpg_threshold": Key(0.3, float, "RPG: flip predictions where SA confidence is below this "
                             "(official `unlabel_threshold`).", check=unit_interval),
        "sample_threshold": Key(0.75, float, "Sample gate on mean confidence / grade (official "
                                "`unlabel_thres`).", check=unit_interval),
        "feature_perturbation": Key(True, bool, "Feature-perturbation consistency in the local step."),
        "rpg": Key(True, bool, "Reliable Pseudo-label Generation in the local step (flip + sample gate); "
                   "off = plain pseudo-labels, no gate (whatever `hssf.rpg_flip` and `hssf.sample_gate`)."),
        "rpg_flip": Key(True, bool, "RPG's flip (with `hssf.rpg`): the local step's pseudo-label is flipped "
                        "where the higher SA confidence is below `rpg_threshold`; off = no flip (ablation)."),
        "sample_gate": Key(True, bool, "RPG's sample gate (with `hssf.rpg`): the local step keeps images whose "
                           "mean SA confidence exceeds `sample_threshold`; off = every image (ablation)."),
        "grades_first": Key(False, bool, "Exchange reduction (exact): Condensation collects grades first, "
                            "then only the logits the server can use (each sample's best client, where its "
                            "grade passes `sample_threshold`); clients recompute those batches."),
        "logits_at": Key("input", str, "Exchange reduction (exact up to rounding): `head` sends logits at "
                         "the decoder head's resolution (stride 4 for DeepLabV3+), upsampled by the "
                         "receiver; `input`: at the input size.", choices=["input", "head"]),
        "logits_dtype": Key("float32", str, "Exchange reduction (lossy): `float16` sends logits in half "
                            "precision (used in fp32).", choices=["float32", "float16"]),
    }
    sends = {"up": "per pass of Condensation: logits (N,2,H,W) and pixel-accuracy grades (N,) on the "
                   "public batches",
             "down": "per pass of Fusion: the server's logits (N,2,H,W) and RPG-corrected grades (N,) "
                     "on the public batches"}

    def run_round(self, r, rnd: int) -> None:
        t = self.cfg.train
        warm = self.warm(rnd)
        h = self.cfg.hssf
        kl_theta = 0.0 if warm else h.kl_theta
        with r.phase("condensation"):
            for e in range(t.condensation_epochs):
                teacher = None
                if kl_theta > 0 and h.grades_first:
                    best = r.clients(self.grade_public, rnd=rnd, phase="condensation", epoch=e, reduce=fold_teacher)
                    if best is not None:
                        asks = teacher_requests(best, h.sample_threshold)
                        teacher = finish_teacher(r.clients(self.teacher_logits, asks, rnd=rnd, epoch=e,
                                                           reduce=place_teacher_rows(best, asks)))
                elif kl_theta > 0:
                    teacher = r.clients(self.predict_public, rnd=rnd, phase="condensation", epoch=e, reduce=fold_teacher)
                r.server(self.condense, teacher, rnd=rnd, epoch=e, kl_theta=kl_theta)
        with r.phase("fusion"):
            for e in range(t.fusion_epochs):
                guide = r.server(self.predict_public, rnd=rnd, phase="fusion", epoch=e) if kl_theta > 0 else None
                r.clients(self.fuse, guide, rnd=rnd, epoch=e, kl_theta=kl_theta)
        with r.phase("local"):
            r.clients(self.local, rnd=rnd, warm=warm)

    # --- steps ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _public_outputs(self, party, rnd: int, phase: str, epoch: int, rows: Optional[torch.Tensor] = None):
        """``(rows, logits as sent, grades)`` per batch of one public pass, eval mode; with ``rows``
        only those rows (batches without one are not computed). A client's grade is its pixel accuracy;
        the server's is the accuracy of its RPG-corrected prediction."""
        h = self.cfg.hssf
        party.model.eval()
        for b, x, y in party.public_batches(rnd, phase, epoch):
            lo, n = b * x.shape[0], x.shape[0]
            pick = None if rows is None else rows[(rows >= lo) & (rows < lo + n)] - lo
            if pick is not None and not pick.numel():
                continue
            out = party.forward(x, native=h.logits_at == "head")
            p = out["mask"]
            pred = (rpg_correct(p, out["confidence"], h.rpg_threshold) if party.name == "server"
                    else p.argmax(1))
            sent = (out["mask_native"] if h.logits_at == "head" else p).to(getattr(torch, h.logits_dtype))
            grade = pixel_accuracy(pred, y)
            if pick is None:
                yield torch.arange(lo, lo + n), sent, grade
            else:
                yield pick + lo, sent[pick], grade[pick]

    @step(read_only=True, reply=lambda m: Fields(logits=_logits(m, "n<=P"), grade=Tensor("n", "float", lo=0, hi=1)))
    def predict_public(self, party, msg, rnd: int, phase: str, epoch: int) -> dict:
        """Logits and grade of every sample of one public pass."""
        _, logits, grades = zip(*self._public_outputs(party, rnd, phase, epoch))
        return {"logits": torch.cat(logits), "grade": torch.cat(grades)}

    @step(read_only=True, reply=Fields(grade=Tensor("n<=P", "float", lo=0, hi=1)))
    def grade_public(self, party, msg, rnd: int, phase: str, epoch: int) -> dict:
        """Grades first: only the grade of every sample of one public pass."""
        return {"grade": torch.cat([g for _, _, g in self._public_outputs(party, rnd, phase, epoch)])}

    @step(read_only=True, reply=lambda m: Fields(logits=OneOf(_logits(m, "r<=P"), Tensor("0", _sent(m)))))
    def teacher_logits(self, party, rows: Optional[torch.Tensor], rnd: int, epoch: int) -> dict:
        """Grades first: the logits of the Condensation pass's ``rows`` (ascending) that the server
        asked for, in that order."""
        got = list(self._public_outputs(party, rnd, "condensation", epoch, rows=rows)) if rows is not None else []
        if not got:
            return {"logits": torch.zeros((0,), dtype=getattr(torch, self.cfg.hssf.logits_dtype))}
        return {"logits": torch.cat([logits for _, logits, _ in got])}

    @step
    def condense(self, server, teacher: Optional[dict], rnd: int, epoch: int, kl_theta: float) -> None:
        """One pass of Regularity Condensation on the server; then its scheduler steps."""
        h = self.cfg.hssf
        server.model.train()
        for b, x, y in server.public_batches(rnd, "condensation", epoch):
            target = one_hot(y)
            out = server.forward(x)
            p_g, c_g = out["mask"], out["confidence"]
            sa = confidence_loss(p_g.detach(), c_g, target)
            seg = structure_loss(p_g, target)
            loss = h.confide_theta * sa + seg
            terms = {"cond_seg": seg, "cond_sa": sa}
            if kl_theta > 0:
                g0 = pixel_accuracy(rpg_correct(p_g.detach(), c_g.detach(), h.rpg_threshold), y)
                rows = slice(b * x.shape[0], (b + 1) * x.shape[0])
                if teacher is None or teacher["logits"] is None:  # every client failed, or no usable teacher
                    mask, picked = torch.zeros_like(g0, dtype=torch.bool), p_g.detach()
                else:
                    mask = teacher_mask(teacher["grade"][rows], g0, h.sample_threshold)
                    sent = received(teacher["logits"][rows], x.shape[-2:])
                    picked = torch.where(mask[:, None, None, None], sent, p_g.detach())
                kl = kl_loss(p_g, picked, mask, h.temperature)
                loss = loss + kl_theta * kl
                terms.update(cond_kl=kl, cond_taken=mask.float().mean())
            server.step(loss)
            server.log.add(**terms)
            diag.log(server, diag.sa_calibration, p_g, c_g, y)
        server.scheduler.step()

    @step
    def fuse(self, client, guide: Optional[dict], rnd: int, epoch: int, kl_theta: float) -> None:
        """One pass of Regularity Fusion on a client."""
        h = self.cfg.hssf
        client.model.train()
        for b, x, y in client.public_batches(rnd, "fusion", epoch):
            target = one_hot(y)
            out = client.forward(x)
            p_k = out["mask"]
            sa = confidence_loss(p_k, out["confidence"], target)
            seg = structure_loss(p_k, target)
            loss = h.confide_theta * sa + seg
            terms = {"fus_seg": seg, "fus_sa": sa}
            if kl_theta > 0:
                rows = slice(b * x.shape[0], (b + 1) * x.shape[0])
                mask = fusion_mask(guide["grade"][rows], pixel_accuracy(p_k.detach().argmax(1), y))
                kl = kl_loss(p_k, received(guide["logits"][rows], x.shape[-2:]), mask, h.temperature)
                loss = loss + kl_theta * kl
                terms.update(fus_kl=kl, fus_taken=mask.float().mean())
            client.step(loss)
            client.log.add(**terms)
            diag.log(client, diag.sa_calibration, p_k, out["confidence"], y)

    @step
    def local(self, client, msg, rnd: int, warm: bool) -> None:
        """HSSF's local step: per local epoch the supervised pass on the client's own labeled files (none
        in the paper's setting), then (after the warm-up) the unlabeled pass of :mod:`fed.common.hssf_local`."""
        h = self.cfg.hssf
        local_epochs(client, rnd, self.cfg.train.local_epochs, h, labeled="labeled",
                     unlabeled=None if warm else functools.partial(unlabeled_pass, h=h))
