"""Mean Teacher federated by FedAvg on the LSSL protocol (``../shared/BASELINES.md`` §1 and §0).

Every round is :class:`fed.methods.lssl.LSSL`'s: every client runs ``train.local_epochs`` of [supervised pass
on D_p, then (after ``train.warmup_rounds``) the unlabeled pass below] from the global model it holds,
then the clients send their weights, the server averages every entry uniformly and every client loads
the average (round 0 starts with one such exchange of the initial weights). The global student after
the round's local training (that average) is evaluated and checkpointed. Only the unlabeled pass and
the teacher are Mean Teacher's (SSL4MIS ``train_mean_teacher_2D.py`` for the constants):

* **consistency** (:func:`consistency_loss`): mean over pixels and classes of
  ``(softmax(student(x)) - softmax(teacher(x + xi)))^2``; ``x`` the weak view, ``xi ~ N(0, 0.1)``
  clamped to +-0.2 (keyed: :func:`utils.rng.clamped_noise`); the teacher runs without gradient in
  training mode (as SSL4MIS's EMA model, which is never switched to eval mode: its dropout is on);
* **weight** (:func:`consistency_weight`): ``w = 0.1 * exp(-5 (1 - min(t / 200, 1))^2)`` with
  ``t = step // 150``, and 0 for the first 1000 steps (``mean_teacher.consistency``, ``ramp_length``,
  ``ramp_div``, ``zero_steps``). A *step* is one unlabeled batch of this client; its counter
  (``party.extra["mt_step"]``) runs across rounds (never reset; the warm-up rounds take no steps).
  SSL4MIS's iteration is one labeled + unlabeled batch; here its supervised half is the D_p pass before,
  so a client counts its unlabeled batches. SSL4MIS ramps over its whole run (30000 iterations =
  200 x 150); a client with ``n`` unlabeled batches per round makes ``n * local_epochs * (rounds -
  warmup_rounds)`` steps (polyp, batch 4, 180 rounds after the warm-up: ~48-160 per round, 9k-29k in
  all, so the default ramp ends at ~8% (CVC-300) to ~99% (Kvasir) of its full weight): set
  ``ramp_div`` to that over ``ramp_length`` (and ``zero_steps`` to 1/30 of it) to keep the ramp's shape
  over the run; ``ramp_div: 0`` does the former for each client from its own number of batches
  (:func:`run_ramp_div`). While the weight is 0 no optimizer step is taken (AdamW's momentum would
  otherwise move the weights on a zero loss);
* **teacher** (:func:`ema_update`): after every unlabeled step, EMA of the student's parameters with
  ``alpha = min(1 - 1/(step + 1), mean_teacher.ema_decay)`` (0.99; 0.999 the alternative), BatchNorm
  buffers copied from the student (as kekmodel's ModelEMA). At a client's first step ``alpha = 0``: the
  teacher becomes the student.

**FL mapping** (``mean_teacher.teacher``): ``fedavg`` (default) also sends the teacher's *parameters*
up and receives their average: the teacher's buffers are not sent, they are the student's (copied after
every EMA update, and from the received global student at load). In the warm-up rounds the teacher is
unused and not sent (it is set to the global student; so is it in round 0's initial exchange): the
first round after the warm-up starts from a teacher equal to the global student. The averaged teacher
is loaded with the averaged student at the end of a round, for the next round's local training.
``reset``: only student weights cross; each client's teacher is set to the global student it receives
at the end of every round (the start of the next).
"""
from __future__ import annotations

import copy
import math
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.rng import clamped_noise

from utils.config import Key, non_negative, positive, unit_interval
from fed.common import diag
from fed.core.registry import register
from fed.core.method import step
from fed.core.replies import Fields, State
from fed.common.weights import clone_state, ema_update, fedavg
from fed.methods.lssl import LSSL


# --- Mean Teacher's pieces, as pure functions ------------------------------------------------------

def ema_alpha(step: int, decay: float) -> float:
    """EMA decay at ``step`` (0-based): ``min(1 - 1/(step + 1), decay)``."""
    return min(1 - 1 / (step + 1), decay)


def sigmoid_rampup(t: float, length: float) -> float:
    """``exp(-5 (1 - p)^2)`` with ``p = clip(t / length, 0, 1)`` (1 when ``length`` is 0)."""
    if length == 0:
        return 1.0
    p = min(max(t / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - p) ** 2)


def consistency_weight(step: int, consistency: float, ramp_length: float, ramp_div: float,
                       zero_steps: int) -> float:
    """``consistency * sigmoid_rampup(floor(step / ramp_div), ramp_length)``; 0 for ``step < zero_steps``."""
    if step < zero_steps:
        return 0.0
    return consistency * sigmoid_rampup(math.floor(step / ramp_div), ramp_length)


def run_ramp_div(batches: int, local_epochs: int, rounds: int, warmup_rounds: int, ramp_length: float) -> float:
    """``ramp_div`` that ends the ramp at a client's last unlabeled step (``mean_teacher.ramp_div: 0``):
    its ``batches * local_epochs * (rounds - warmup_rounds)`` steps over ``ramp_length``."""
    return max(batches * local_epochs * (rounds - warmup_rounds), 1) / ramp_length


def consistency_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over (B, C, H, W) of ``(softmax(student) - softmax(teacher))^2`` (softmax over classes)."""
    return ((F.softmax(student_logits, dim=1) - F.softmax(teacher_logits, dim=1)) ** 2).mean()


@register
class MeanTeacher(LSSL):
    name = "mean_teacher"
    #: this method's settings, the ``mean_teacher.*`` section of the configuration (docs/configuration.md)
    options = {
        "ema_decay": Key(0.99, float, "Mean Teacher: EMA decay of the teacher, `alpha = min(1 - 1/(step+1), "
                         "ema_decay)` (SSL4MIS 0.99; the paper's later phase and HSSF's ModelEMA: 0.999).",
                         check=unit_interval),
        "consistency": Key(0.1, float, "Mean Teacher: maximum consistency weight (SSL4MIS `consistency`).",
                           check=non_negative),
        "ramp_length": Key(200.0, float, "Mean Teacher: sigmoid ramp-up `w = consistency * exp(-5 (1 - "
                           "min(t / ramp_length, 1))^2)` with `t = floor(step / ramp_div)` (SSL4MIS 200).",
                           check=positive),
        "ramp_div": Key(150, int, "Mean Teacher: unlabeled steps per ramp unit `t` (SSL4MIS 150: the ramp "
                        "ends after 30000 steps, its whole run). A step is one of the client's unlabeled "
                        "batches (the counter lives with the client across rounds; the warm-up takes no "
                        "unlabeled steps); to end the ramp after N steps set `ramp_div = N / ramp_length`; 0: "
                        "each client's own number of unlabeled steps in the run (the ramp ends with the run).",
                        check=non_negative),
        "zero_steps": Key(1000, int, "Mean Teacher: the consistency weight is 0 for the client's first "
                          "`zero_steps` unlabeled steps (SSL4MIS 1000 iterations; scale with `ramp_div`). "
                          "The teacher still follows the student; no optimizer step is taken.",
                          check=non_negative),
        "noise_std": Key(0.1, float, "Mean Teacher: std of the Gaussian noise on the teacher's input, "
                         "clamped to +-2 std (SSL4MIS 0.1, clamp 0.2).", check=non_negative),
        "teacher": Key("fedavg", str, "Mean Teacher in FL: `fedavg` (after the warm-up clients send the "
                       "teacher's parameters too; both averaged; the teacher's BN buffers are the student's) or `reset` "
                       "(teacher := the global model at the start of every round; student weights only).",
                       choices=["fedavg", "reset"]),
    }
    sends = {"up": "student weights (every state-dict entry); with mean_teacher.teacher fedavg, after the "
                   "warm-up, also the teacher's parameters",
             "down": "the averaged student weights (and, with fedavg, the averaged teacher parameters)"}

    def _teacher_fedavg(self) -> bool:
        return self.cfg.mean_teacher.teacher == "fedavg"

    def setup(self, party) -> None:
        super().setup(party)
        if party.name != "server":
            teacher = copy.deepcopy(party.model)
            teacher.requires_grad_(False)
            party.extra["teacher"] = teacher
            party.extra["mt_step"] = 0  # this client's unlabeled steps so far (the ramp's and EMA's clock)

    @step(read_only=True, reply=lambda m: Fields(student=State(), optional={"teacher": State(params_only=True)})
          if m._teacher_fedavg() else State())
    def send_weights(self, client, msg, rnd: int, start: bool = False) -> dict:
        student = super().send_weights(client, msg, rnd)
        if not self._teacher_fedavg():
            return student
        if start or self.warm(rnd):  # no unlabeled step yet / this round: the teacher becomes the student
            return {"student": student}
        teacher = clone_state(dict(client.extra["teacher"].named_parameters()))
        return {"student": student, "teacher": teacher}

    @step
    def aggregate(self, server, weights: List[dict]) -> dict:
        if not self._teacher_fedavg():
            return super().aggregate(server, weights)
        avg = {"student": super().aggregate(server, [w["student"] for w in weights])}
        if "teacher" in weights[0]:
            avg["teacher"] = fedavg([w["teacher"] for w in weights])
        return avg

    @step
    def receive(self, client, avg: dict, rnd: int) -> None:
        teacher = client.extra["teacher"]
        if self._teacher_fedavg():
            student = avg["student"]
            # averaged parameters and the student's buffers (warm-up: the student itself)
            teacher.load_state_dict({**student, **avg.get("teacher", {})})
        else:
            student = avg
            teacher.load_state_dict(student)  # reset: teacher := the global model
        super().receive(client, student, rnd)

    def unlabeled_pass(self, client, rnd: int, epoch: int) -> None:
        m, teacher, phase = self.cfg.mean_teacher, client.extra["teacher"], "local_unlabeled"
        client.model.train()
        teacher.train()
        t = self.cfg.train
        div = m.ramp_div or run_ramp_div(len(client.loaders["unlabeled"]), t.local_epochs, t.rounds,
                                         t.warmup_rounds, m.ramp_length)
        for b, w, _ in client.batches("unlabeled", rnd, phase, epoch):
            step = client.extra["mt_step"]
            xi = clamped_noise(w.shape, m.noise_std, client.seed, rnd, client.name, phase, epoch, b, "teacher")
            with torch.no_grad(), client.amp.autocast():
                teacher_logits = teacher(w + xi.to(w.device, w.dtype))["mask"].float()
            weight = consistency_weight(step, m.consistency, m.ramp_length, div, m.zero_steps)
            with torch.set_grad_enabled(weight > 0):
                student_logits = client.forward(w)["mask"]
                cons = consistency_loss(student_logits, teacher_logits)
            if weight > 0:
                client.step(weight * cons)
            ema_update(teacher, client.model, ema_alpha(step, m.ema_decay), buffers="copy")
            client.extra["mt_step"] = step + 1
            client.log.add(unl_cons=cons, unl_cons_weight=weight)
            # soft targets: the teacher's argmax as the pseudo-labels; no mask
            diag.log(client, diag.pseudo_labels, teacher_logits.argmax(1), pred=student_logits.argmax(1))
