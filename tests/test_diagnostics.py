"""RPG's two switches (``hssf.rpg_flip``, ``hssf.sample_gate``) and the ``diag_*`` terms (:mod:`fed.common.diag`):
by hand on constructed tensors, then in tiny runs (present, in [0, 1], and without any effect on the
weights: a run with the diagnostics off is bit-identical to the reference run)."""
import math

import pytest
import torch

from conftest import run_checkpoints, run_tiny
from fed.common import diag
from fed.common.hssf_local import pseudo_label, pseudo_label_parts

pytestmark = pytest.mark.usefixtures("one_thread")

T = torch.tensor

# --- pseudo_label: the four combinations of flip and gate, by hand ------------------------------------
# 2 images of 1x4 pixels; the weak view says class 1 everywhere, the strong view class 0 everywhere.
P_W = torch.stack([torch.zeros(2, 1, 4), torch.ones(2, 1, 4)], 1)   # (2, 2, 1, 4)
P_S = torch.stack([torch.ones(2, 1, 4), torch.zeros(2, 1, 4)], 1)
CONF_W = T([[[0.9, 0.5, 0.2, 0.1]], [[0.95, 0.9, 0.9, 0.2]]])
CONF_S = T([[[0.8, 0.5, 0.25, 0.05]], [[0.1, 0.95, 0.1, 0.1]]])
# more confident view (ties: weak): image 0: w, w (tie), s, w -> 1 1 0 1; image 1: w, s, w, w -> 1 0 1 1
PLAIN = [[[1, 1, 0, 1]], [[1, 0, 1, 1]]]
# max confidences: image 0: 0.9 0.5 0.25 0.1 (pixels 2, 3 < 0.3 flip), mean 0.4375;
#                  image 1: 0.95 0.95 0.9 0.2 (pixel 3 flips), mean 0.75
FLIPPED = [[[1, 1, 1, 0]], [[1, 0, 1, 0]]]
GATE = [False, True]  # mean > 0.6


@pytest.mark.parametrize("flip,gate,labels,kept", [
    (True, True, FLIPPED, GATE),
    (True, False, FLIPPED, None),
    (False, True, PLAIN, GATE),
    (False, False, PLAIN, None),
])
def test_pseudo_label_flip_and_gate_one_at_a_time_by_hand(flip, gate, labels, kept):
    pseudo, g = pseudo_label(P_W, P_S, CONF_W, CONF_S, True, 0.3, 0.6, flip=flip, gate=gate)
    assert pseudo.tolist() == labels
    assert (g is None) if kept is None else g.tolist() == kept
    # hssf.rpg off: neither part, whatever the two switches say
    pseudo, g = pseudo_label(P_W, P_S, CONF_W, CONF_S, False, 0.3, 0.6, flip=flip, gate=gate)
    assert pseudo.tolist() == PLAIN and g is None


def test_pseudo_label_defaults_are_full_rpg_and_parts_say_what_flipped():
    pseudo, g = pseudo_label(P_W, P_S, CONF_W, CONF_S, True, 0.3, 0.6)
    assert pseudo.tolist() == FLIPPED and g.tolist() == GATE
    pseudo, g, flipped, conf = pseudo_label_parts(P_W, P_S, CONF_W, CONF_S, True, 0.3, 0.6)
    assert flipped.tolist() == [[[False, False, True, True]], [[False, False, False, True]]]
    assert torch.equal(conf, torch.maximum(CONF_W, CONF_S))
    assert pseudo_label_parts(P_W, P_S, CONF_W, CONF_S, True, 0.3, 0.6, flip=False)[2] is None


def test_config_has_both_switches_on_by_default():
    from fed import load_config

    h = load_config(None, []).hssf
    assert h.rpg is True and h.rpg_flip is True and h.sample_gate is True


# --- the diag terms by hand -------------------------------------------------------------------------

def _close(d, expected):
    assert set(d) == set(expected)
    for k, v in expected.items():
        assert d[k].item() == pytest.approx(v, abs=1e-6), k


def test_pseudo_label_diagnostics_by_hand():
    pseudo = T(FLIPPED)                                     # 5 of 8 pixels foreground
    pred = T([[[1, 0, 0, 0]], [[0, 0, 0, -1]]])             # 1 of 8 (the ignored -1 is not foreground)
    img = T(GATE)                                           # 1 of 2 images
    pix = T([[[True, True, False, False]], [[True, False, False, False]]])
    flipped = T([[[False, False, True, True]], [[False, False, False, True]]])
    conf = torch.maximum(CONF_W, CONF_S)                    # (0.9+0.5+0.25+0.1 + 0.95+0.95+0.9+0.2) / 8
    _close(diag.pseudo_labels(pseudo, pred=pred, img_kept=img, flipped=flipped, conf=conf),
           {"diag_pl_fg": 5 / 8, "diag_pred_fg": 1 / 8, "diag_pix_kept": 4 / 8, "diag_img_kept": 0.5,
            "diag_flipped": 3 / 8, "diag_conf": 4.75 / 8})
    # pixel mask and gate together: only image 1's first pixel is kept
    _close(diag.pseudo_labels(pseudo, pix_kept=pix, img_kept=img),
           {"diag_pl_fg": 5 / 8, "diag_pix_kept": 1 / 8, "diag_img_kept": 0.5})
    # nothing masked: 1 and 1
    _close(diag.pseudo_labels(pseudo), {"diag_pl_fg": 5 / 8, "diag_pix_kept": 1.0, "diag_img_kept": 1.0})


def test_sa_calibration_by_hand():
    logits = T([[[[0.0, 2.0]], [[1.0, 0.0]]]])     # (1, 2, 1, 2): argmax 1, 0
    conf = T([[[[0.0, math.log(3.0)]]]])           # sigmoid 0.5, 0.75
    expected = {"diag_sa_conf": 0.625, "diag_sa_acc": 0.5}
    _close(diag.sa_calibration(logits, conf, T([[[1, 1]]])), expected)          # (B,H,W) indices
    _close(diag.sa_calibration(logits, conf, T([[[[1.0, 1.0]]]])), expected)    # (B,1,H,W) 0/1 mask
    _close(diag.sa_calibration(logits, conf, T([[[1, 0]]])), {**expected, "diag_sa_acc": 1.0})


def test_log_respects_the_switch_and_keeps_no_gradient(monkeypatch):
    from fed.core.method import LossLog

    class P:
        log = LossLog()

    x = torch.ones(1, 2, 2, requires_grad=True)
    diag.log(P, lambda t: {"diag_x": (t * 2).mean()}, x)
    assert P.log.means() == {"diag_x": 2.0} and not P.log._sum["diag_x"].requires_grad
    monkeypatch.setattr(diag, "ENABLED", False)
    diag.log(P, lambda t: {"diag_y": t.mean()}, x)
    assert "diag_y" not in P.log.means()


# --- in runs ----------------------------------------------------------------------------------------

LOCAL_TERMS = {"diag_pl_fg", "diag_pred_fg", "diag_pix_kept", "diag_img_kept"}
HSSF_TERMS = LOCAL_TERMS | {"diag_flipped", "diag_conf", "diag_sa_conf", "diag_sa_acc"}
CLIENTS = ("client0", "client1")


def _records(cfg):
    from utils.logger import read_metrics

    return read_metrics(cfg.output.dir)


def _in_unit(loss):
    return all(0.0 <= v <= 1.0 for k, v in loss.items() if k.startswith("diag_"))


def _without_diag(records):
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k not in ("time_s", "phase_s", "startup_s")}
        r["loss"] = {p: {k: v for k, v in t.items() if not k.startswith("diag_")} for p, t in r["loss"].items()}
        out.append(r)
    return out


def test_hssf_run_logs_diagnostics_and_they_change_no_weight(reference_run, tmp_path, monkeypatch):
    _, cfg, res = reference_run
    recs = _records(cfg)
    warm, r1 = recs[0]["loss"], recs[1]["loss"]
    assert recs[0]["warmup"] and not recs[1]["warmup"]
    for n in CLIENTS:
        assert {"diag_sa_conf", "diag_sa_acc"} <= set(warm[n]) and "diag_pl_fg" not in warm[n]
        assert HSSF_TERMS <= set(r1[n]) and _in_unit(r1[n])
    assert {k for k in r1["server"] if k.startswith("diag_")} == {"diag_sa_conf", "diag_sa_acc"}
    assert _in_unit(r1["server"])
    # the same run with no diagnostic computed: every checkpoint tensor and every other number identical
    monkeypatch.setattr(diag, "ENABLED", False)
    cfg_off, res_off = run_tiny(tmp_path, "nodiag", "train.rounds=2")
    off = _records(cfg_off)
    assert not any(k.startswith("diag_") for r in off for t in r["loss"].values() for k in t)
    a, b = run_checkpoints(cfg), run_checkpoints(cfg_off)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])
    assert _without_diag(recs) == _without_diag(off)
    assert res["test"] == res_off["test"]


def test_rpg_switches_reach_the_local_step(tmp_path):
    # ``local``: HSSF's local step from round 0; the tiny models' confidence is low: RPG flips some pixels
    # and the gate drops every image, so each switch shows alone
    runs = {name: _records(run_tiny(tmp_path, name, "method=local", "train.rounds=1", *sets)[0])[0]["loss"]
            for name, sets in {"noflip": ["hssf.rpg_flip=false"], "nogate": ["hssf.sample_gate=false"]}.items()}
    for n in CLIENTS:
        noflip, nogate = runs["noflip"][n], runs["nogate"][n]
        assert noflip["diag_flipped"] == 0.0 and noflip["diag_img_kept"] < 1.0
        assert nogate["diag_flipped"] > 0.0 and nogate["diag_img_kept"] == 1.0 == nogate["diag_pix_kept"]


@pytest.mark.parametrize("method", ["fixmatch", "unimatch", "mean_teacher", "semifl", "fedmd"])
def test_baselines_log_pseudo_label_diagnostics(tmp_path, method):
    cfg, _ = run_tiny(tmp_path, method, f"method={method}", "train.rounds=2")
    recs = _records(cfg)
    for n in CLIENTS:
        loss = recs[1]["loss"][n]
        assert LOCAL_TERMS <= set(loss) and _in_unit(loss), (n, loss)
        assert "diag_flipped" not in loss and not any(k.startswith("diag_pl") for k in recs[0]["loss"].get(n, {}))
    if method == "mean_teacher":  # soft targets, no mask
        assert all(recs[1]["loss"][n]["diag_pix_kept"] == 1.0 for n in CLIENTS)


def test_round_figure_has_a_diagnostics_row(tmp_path, monkeypatch):
    from utils import plot

    figs = []
    monkeypatch.setattr(plot, "_save", lambda fig, path: figs.append(fig) or path)
    loss = {"server": {"cond_seg": 0.5, "diag_sa_conf": 0.6, "diag_sa_acc": 0.4},
            "client0": {"unl_weak": 0.3, "diag_pl_fg": 0.2, "diag_sa_conf": 0.7, "diag_sa_acc": 0.8}}
    records = [{"round": r, "warmup": r == 0, "loss": loss, "val": {"all": {"dice": 0.5}}} for r in range(3)]
    plot.plot_curves(records, tmp_path, "t")
    axes = figs[0].axes
    assert len(axes) == 5  # (Dice, server, client0) losses, then (server, client0) diagnostics
    client = next(a for a in axes if a.get_title() == "client0 diagnostics")
    assert sorted(line.get_label() for line in client.get_lines()) == ["pl_fg", "sa_acc", "sa_conf"]
    losses = next(a for a in axes if a.get_title() == "client0 losses")
    assert [line.get_label() for line in losses.get_lines()] == ["unl_weak"]
