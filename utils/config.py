"""Experiment configuration: YAML file + ``--set key.sub=value`` overrides, validated up front.

:data:`SCHEMA` is the single source of truth: every key, its default, its type and what it means.
``python -m utils.config`` prints it as the Markdown table of docs/configuration.md. An unknown or mistyped key
is an error that lists the valid keys; so is a value of the wrong type.
"""
from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import yaml


class ConfigError(ValueError):
    """A problem with the configuration; the message names the file/key and what is wrong."""


class Key:
    """One configuration key: default, accepted type(s), optional choices, documentation."""

    def __init__(self, default, types, doc: str, choices: Optional[Iterable] = None,
                 nullable: bool = False, check=None):
        self.default, self.types, self.doc = default, types, doc
        self.choices = list(choices) if choices is not None else None
        self.nullable, self.check = nullable, check


def _pos(v):
    return None if v > 0 else "must be > 0"


def _nonneg(v):
    return None if v >= 0 else "must be >= 0"


def _unit(v):
    return None if 0 <= v <= 1 else "must be in [0, 1]"


def _str_list(v):
    return None if all(isinstance(x, str) and x for x in v) and v else "must be a non-empty list of names"


def _ratio(v):
    vals = v if isinstance(v, list) else [v]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1 for x in vals):
        return "must be a number in [0, 1] or a list of them (one per client)"
    return None


def _tvt(v):
    if len(v) != 3 or not all(isinstance(x, (int, float)) and 0 <= x <= 1 for x in v):
        return "must be three fractions [train, val, test]"
    return None if abs(sum(v) - 1) < 1e-6 else f"must sum to 1 (sums to {sum(v)})"


def _device(v):
    return None if re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) else "must be auto, cpu, cuda or cuda:N"


def _synthetic(v):
    if v is None:
        return None
    form = "must be null or {public: N, per_client: N, seed: S, size: PX} (seed and size optional)"
    if not isinstance(v, dict) or set(v) - {"public", "per_client", "seed", "size"} or \
            not {"public", "per_client"} <= set(v):
        return form
    ints = {k: isinstance(x, int) and not isinstance(x, bool) for k, x in v.items()}
    if not all(ints[k] and v[k] > 0 for k in ("public", "per_client")):
        return form + "; the counts must be integers > 0"
    if "size" in v and not (ints["size"] and v["size"] >= 8):
        return form + "; size must be an integer >= 8 (pixels)"
    if "seed" in v and not (ints["seed"] and v["seed"] >= 0):
        return form + "; seed must be an integer >= 0"
    return None


SCHEMA: Dict[str, Any] = {
    "name": Key("hssf", str, "Experiment name (used in `output.dir`)."),
    "method": Key("hssf", str, "Federated method: `hssf`, `lssl` (FedAvg + local SSL, homogeneous), "
                  "`local` (no collaboration), `public_only` (each client on the public set alone: the floor); the paper's baselines `mean_teacher`, `fixmatch`, `unimatch`, "
                  "`eln`, `semifl` (homogeneous) and `fedmd`, `ktpfl`, `feddistill`, `fedproto`, `rhfl` "
                  "(heterogeneous). See `fed/` and docs/baselines.md."),
    "seed": Key(42, int, "Seeds data splits, augmentation, noise, dropout and initialisation."),
    "device": Key("auto", str, "`auto` (CUDA if available, else CPU), `cpu`, `cuda`, `cuda:N`.",
                  check=_device),
    "data": {
        "root": Key("data", str, "Folder holding `<dataset>/<site>/{image,mask}/`. Relative paths are "
                    "relative to the working directory."),
        "dataset": Key("polyp", str, "Dataset folder name under `root` (`polyp`, `isic`, ...)."),
        "public": Key("CVC-ColonDB", str, "Site of the server's labeled public set D_p."),
        "clients": Key(["CVC-ClinicDB", "EndoTect-ETIS", "CVC-300", "Kvasir"], list,
                       "Client sites, in order (client k = entry k).", check=_str_list),
        "split": Key(None, str, "Split JSON (official format). `null`: `<root>/splits/<official name>`, "
                     "generated with `seed` if it does not exist.", nullable=True),
        "labeled_ratio": Key(0.0, (float, list), "Fraction of each client's train files that are "
                             "labeled (one number or one per client). Used when generating a split.",
                             check=_ratio),
        "train_val_test": Key([0.8, 0.1, 0.1], list, "Per-client split fractions (generation only).",
                              check=_tvt),
        "size": Key(384, int, "Images are resized to size x size.", check=_pos),
        "batch_size": Key(4, int, "Batch size of every loader (>= 2: BatchNorm in training).",
                          check=lambda v: None if v >= 2 else "must be >= 2 (BatchNorm needs 2 samples)"),
        "num_workers": Key(2, int, "DataLoader worker processes (0 = load in the main process).",
                           check=_nonneg),
        "shuffle": Key(False, bool, "Shuffle training loaders. The official code does not (faithful "
                       "default: false)."),
        "augment_seeding": Key("free", str, "Per-sample augmentation seeds of the training loaders. "
                               "`free`: a fresh keyed seed per sample and pass. `official`: the official "
                               "code's quirk (it re-seeds its generators before each view with a seed drawn "
                               "from 42 values): each sample's seed is one of 42, drawn per sample and pass, "
                               "so its geometric draw (shared by its weak and strong views and mask), "
                               "RandAugment draw and cutout are one of 42. The data order is the same in both; "
                               "public-set noise is unaffected. Both are offered; the default is decided by a "
                               "measurement reported in docs/reproducing.md (\"Differences from the official code\").",
                               choices=["free", "official"]),
        "cache": Key(True, bool, "Keep resized images in memory (read each file once)."),
        "verify": Key(True, bool, "Check every file of the run before training (`python -m "
                      "datasets.verify`): corrupt images, missing or non-binary masks, size mismatches, "
                      "split leakage...; all problems are reported at once and nothing runs."),
        "eval_drop_last": Key(True, bool, "During training, val/test loaders drop the last partial "
                              "batch, as the official code (test.py always scores every image)."),
        "public_noise": Key(0.1, float, "Std of the Gaussian noise (clamped to +-2 std) added to public "
                            "batches in Condensation/Fusion and to strong views; 0 disables.",
                            check=_nonneg),
        "synthetic": Key(None, dict, "`null`, or `{public: N, per_client: N, seed: S, size: PX}`: "
                         "generate synthetic sites under `root/dataset` on first use (demo, tests), once, "
                         "at their native size `size` (default 64; `seed` default 0); any `data.size` "
                         "then resizes them. A folder made with other counts, seed or size is an error.",
                         nullable=True, check=_synthetic),
    },
    "models": {
        "server": Key("resnet101", str, "Server architecture (`python -m networks --list`)."),
        "clients": Key(["resnet18", "resnet18", "resnet34", "resnet34"], list,
                       "One architecture per client.", check=_str_list),
        "pretrained": Key(None, str, "`null` (from scratch, as the paper) or `imagenet`: encoder "
                          "weights from the local torch/timm cache (never downloaded at run time; the "
                          "error names the file to place).", nullable=True, choices=["imagenet"]),
    },
    "train": {
        "rounds": Key(200, int, "Communication rounds.", check=_pos),
        "warmup_rounds": Key(20, int, "Rounds of supervised warm-up (no KL, no unlabeled data; hssf and lssl; "
                             "official `pretrained_epoch`).", check=_nonneg),
        "condensation_epochs": Key(4, int, "Passes over D_p in Regularity Condensation per round.",
                                   check=_nonneg),
        "fusion_epochs": Key(4, int, "Passes over D_p in Regularity Fusion per round.", check=_nonneg),
        "local_epochs": Key(1, int, "Local semi-supervised epochs per round.", check=_nonneg),
        "optimizer": Key("adamw", str, "`adamw`, `adam` or `sgd` (momentum 0.9).",
                         choices=["adamw", "adam", "sgd"]),
        "lr": Key(1e-4, float, "Initial learning rate (server and clients).", check=_pos),
        "weight_decay": Key(0.02, float, "Weight decay.", check=_nonneg),
        "lr_final_factor": Key(0.01, float, "Cosine schedule floor (official `lrf`).", check=_unit),
        "amp": Key(False, bool, "Opt-in mixed precision (off: fp32, as the official code). On CUDA it "
                   "runs forward passes under bf16 autocast (fp16 + loss scaling where bf16 is "
                   "unsupported), so the outputs exchanged and the grades/thresholds computed from them "
                   "are bf16-rounded (fp16 in that fallback); ignored on CPU."),
        "channels_last": Key(True, bool, "channels_last memory format on CUDA; ignored on CPU."),
        "fault_tolerance": Key("stop", str, "`stop`: an exception stops the run (the state of the last "
                               "completed round is kept). `skip_client`: an exception inside one client's "
                               "work is logged with its traceback, that client sits the round out (its "
                               "model and optimizer go back to the round's start) and the round completes.",
                               choices=["stop", "skip_client"]),
        "client_workers": Key(0, int, "0: every party in this process, clients one after another. N > 0: "
                              "the clients live in N worker processes (client k in worker k mod N; one "
                              "per GPU where several are present) and the clients of a phase run "
                              "concurrently. Randomness is keyed, so results are the same (bit-identical on "
                              "CPU with the same threads per process).", check=_nonneg),
        "worker_threads": Key(0, int, "torch threads of each client worker process (0: this process's "
                              "threads divided by `client_workers`).", check=_nonneg),
        "site_timeout_s": Key(0.0, float, "Flower engines: seconds a site has to answer one message (a step, "
                              "an evaluation, its state writing). A site that does not answer in time, or "
                              "whose node Flower reports unavailable, is lost: logged, left out of the rest "
                              "of the run (listed under `skipped` in every later round) while at least "
                              "`train.min_sites` sites remain; otherwise the run stops, its last completed "
                              "round kept for `--resume`. 0: wait for ever.", check=_nonneg),
        "min_sites": Key(0, int, "Flower engines: the fewest sites a run goes on with after losing sites "
                         "(see `train.site_timeout_s`); 0: all of them (a lost site stops the run).",
                         check=_nonneg),
    },
    "hssf": {
        "confide_theta": Key(4.0, float, "Weight of the Self-Assessment loss.", check=_nonneg),
        "kl_theta": Key(10.0, float, "Weight of the KL terms of Condensation and Fusion.", check=_nonneg),
        "unlabel_theta": Key(1.0, float, "Weight of the unlabeled loss.", check=_nonneg),
        "temperature": Key(2.0, float, "KL temperature.", check=_pos),
        "rpg_threshold": Key(0.3, float, "RPG: flip predictions where SA confidence is below this "
                             "(official `unlabel_threshold`).", check=_unit),
        "sample_threshold": Key(0.75, float, "Sample gate on mean confidence / grade (official "
                                "`unlabel_thres`).", check=_unit),
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
    },
    "baselines": {
        "local_step": Key("fixmatch", str, "Heterogeneous baselines' local step on unlabeled data "
                          "(BASELINES.md section 12): `fixmatch` (pixel pseudo-labels from the weak view, "
                          "confidence >= `baselines.tau`, CE on the strong view) or `hssf` (HSSF's local step).",
                          choices=["fixmatch", "hssf"]),
        "tau": Key(0.95, float, "Confidence threshold of the `fixmatch` local step.", check=_unit),
        "unlabeled_weight": Key(1.0, float, "Weight of the local pseudo-label loss.", check=_nonneg),
    },
    "eln": {
        "eln_rounds": Key(10, int, "ELN: rounds of ELN and aux-decoder training on D_p after the warm-up, before "
                          "the SSL phase (BASELINES: about 10).", check=_nonneg),
        "eln_epochs": Key(1, int, "ELN: passes over D_p per ELN round by whoever trains the ELN.", check=_pos),
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
        "threshold": Key(0.5, float, "ELN: pseudo-labels kept where sigmoid(ELN) > this (0.5: the official round(sigmoid) = 1).", check=_unit),
        "ema": Key(0.995, float, "ELN: EMA teacher momentum.", check=_unit),
        "reset_student": Key(True, bool, "ELN: reset the student to the teacher at the start of every local "
                             "epoch of the SSL phase (official); false: keep the received student."),
        "contrastive": Key(True, bool, "ELN: pixel contrastive loss between student and teacher projections."),
        "crops": Key(8, int, "ELN: random crops of the feature map per batch for the contrastive loss.", check=_pos),
        "crop_size": Key(32, int, "ELN: crop side (feature-map pixels, capped at the map size).", check=_pos),
        "temperature": Key(0.5, float, "ELN: contrastive temperature.", check=_pos),
    },
    "semifl": {
        "local_epochs": Key(5, int, "SemiFL: local epochs per round on fix and mix batches (official `local_epoch` 5).",
                            check=_pos),
        "server_epochs": Key(5, int, "SemiFL: server fine-tuning passes over D_p per round (official 5).",
                             check=_nonneg),
        "tau": Key(0.95, float, "SemiFL: pixel confidence threshold of the fix set (`fix@0.95`).", check=_unit),
        "mix_alpha": Key(0.75, float, "SemiFL: mixup `lam ~ Beta(alpha, alpha)`, one draw per batch.", check=_pos),
        "clip": Key(1.0, float, "SemiFL: gradient-norm clipping of the clients' training and the server's fine-tuning (0: none).", check=_nonneg),
        "server_lr": Key(1.0, float, "SemiFL: lr of the server SGD step that applies the client average.",
                         check=_pos),
        "server_momentum": Key(0.5, float, "SemiFL: momentum of that step (official `gm`).", check=_unit),
        "sbn": Key(True, bool, "SemiFL: recompute BatchNorm statistics (one cumulative pass) before each "
                   "broadcast, on D_p at the server (official `sbn=1` also uses client data, which the "
                   "server does not have); false: keep the running statistics."),
    },
    "mean_teacher": {
        "ema_decay": Key(0.99, float, "Mean Teacher: EMA decay of the teacher, `alpha = min(1 - 1/(step+1), "
                         "ema_decay)` (SSL4MIS 0.99; the paper's later phase and HSSF's ModelEMA: 0.999).",
                         check=_unit),
        "consistency": Key(0.1, float, "Mean Teacher: maximum consistency weight (SSL4MIS `consistency`).",
                           check=_nonneg),
        "ramp_length": Key(200.0, float, "Mean Teacher: sigmoid ramp-up `w = consistency * exp(-5 (1 - "
                           "min(t / ramp_length, 1))^2)` with `t = floor(step / ramp_div)` (SSL4MIS 200).",
                           check=_pos),
        "ramp_div": Key(150, int, "Mean Teacher: unlabeled steps per ramp unit `t` (SSL4MIS 150: the ramp "
                        "ends after 30000 steps, its whole run). A step is one of the client's unlabeled "
                        "batches (the counter lives with the client across rounds; the warm-up takes no "
                        "unlabeled steps); to end the ramp after N steps set `ramp_div = N / ramp_length`; 0: "
                        "each client's own number of unlabeled steps in the run (the ramp ends with the run).",
                        check=_nonneg),
        "zero_steps": Key(1000, int, "Mean Teacher: the consistency weight is 0 for the client's first "
                          "`zero_steps` unlabeled steps (SSL4MIS 1000 iterations; scale with `ramp_div`). "
                          "The teacher still follows the student; no optimizer step is taken.",
                          check=_nonneg),
        "noise_std": Key(0.1, float, "Mean Teacher: std of the Gaussian noise on the teacher's input, "
                         "clamped to +-2 std (SSL4MIS 0.1, clamp 0.2).", check=_nonneg),
        "teacher": Key("fedavg", str, "Mean Teacher in FL: `fedavg` (after the warm-up clients send the "
                       "teacher's parameters too; both averaged; the teacher's BN buffers are the student's) or `reset` "
                       "(teacher := the global model at the start of every round; student weights only).",
                       choices=["fedavg", "reset"]),
    },
    "fixmatch": {
        "threshold": Key(0.95, float, "FixMatch: pixel confidence threshold of the weak view's pseudo-labels.",
                         check=_unit),
        "unlabeled_weight": Key(1.0, float, "FixMatch: weight `lambda_u` of the unlabeled loss relative to "
                                "the supervised pass's loss (weight 1).", check=_nonneg),
        "strong": Key("unimatch", str, "FixMatch's strong view: `unimatch` (built from the weak view: colour "
                      "jitter, grayscale, blur as UniMatch's FixMatch) or `randaugment` (the loaders' strong "
                      "view: the weak view + RandAugmentMC(2, 10) + noise, as HSSF's local step).",
                      choices=["unimatch", "randaugment"]),
        "cutmix": Key(True, bool, "FixMatch: CutMix on the strong view (p 0.5, 2-40% of the image) with the "
                      "mixing image's pseudo-labels inside the box, as UniMatch's FixMatch."),
    },
    "unimatch": {
        "threshold": Key(0.95, float, "UniMatch: pixel confidence threshold of the weak view's pseudo-labels.",
                         check=_unit),
    },
    "fedmd": {
        "digest_epochs": Key(1, int, "FedMD: Digest passes over the round's public pass (L1 regression to the "
                             "consensus; FedMD_clean `N_logits_matching_round`).", check=_nonneg),
        "average": Key("logits", str, "FedMD: what the consensus averages: `logits` (raw logits, the original) "
                       "or `probs` (softmax probabilities: less scale-sensitive across architectures; the digest "
                       "then regresses the softmax).", choices=["logits", "probs"]),
        "logits_dtype": Key("float32", str, "FedMD exchange reduction (lossy): `float16` sends the public "
                            "logits and the consensus in half precision (averaged in fp32).",
                            choices=["float32", "float16"]),
    },
    "ktpfl": {
        "temperature": Key(10.0, float, "KT-pFL: temperature T of the soft predictions softmax(logits/T) and "
                           "of the distillation (code `Temp`).", check=_pos),
        "rho": Key(0.7, float, "KT-pFL: weight of the penalty MSE(c_n, 1/K) in the update of the "
                   "knowledge-coefficient matrix (code `penalty_ratio`).", check=_nonneg),
        "distill_epochs": Key(1, int, "KT-pFL: distillation passes over the round's public pass (code "
                              "`N_logits_matching_round`).", check=_nonneg),
        "local_ramp": Key(0, int, "KT-pFL: 0 = `train.local_epochs` local epochs every round (the shared "
                          "harness); N > 0 = the code's ramp: min(j + 1, N) local epochs in the j-th round "
                          "after the warm-up (code: N = 10; up to N times the local cost).", check=_nonneg),
        "soft_dtype": Key("float32", str, "KT-pFL exchange reduction (lossy): `float16` sends the soft "
                          "predictions and the personalised targets in half precision.",
                          choices=["float32", "float16"]),
    },
    "feddistill": {
        "weight": Key(1.0, float, "FedDistill: weight lambda of the regulariser toward the global per-label "
                      "logits (PFLlib `lamda`).", check=_nonneg),
        "loss": Key("mse", str, "FedDistill regulariser: `mse` (PFLlib: MSE(logit, global logit of its label)) "
                    "or `kl` (FedGen: KL(softmax(global logit) || softmax(logit))).", choices=["mse", "kl"]),
        "leave_one_out": Key(False, bool, "FedDistill: client k's teacher excludes its own logits, "
                             "(M F - F_k) / (M - 1) (Jeong et al.); false: the mean of all clients (PFLlib)."),
    },
    "fedproto": {
        "ld": Key(1.0, float, "FedProto: weight lambda of the prototype regulariser (official `--ld` 1).",
                  check=_nonneg),
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
                   "decoder's 256).", check=_pos),
    },
    "rhfl": {
        "sce_alpha": Key(0.1, float, "RHFL: weight of CE in the symmetric CE of the local step and CCR.",
                         check=_nonneg),
        "sce_beta": Key(1.0, float, "RHFL: weight of reverse CE (`-sum p log clamp(onehot, 1e-4, 1)`).",
                        check=_nonneg),
        "ccr": Key(True, bool, "RHFL: Client Confidence Re-weighting of the collaborative KL terms; off: "
                   "every weight 1/(K-1)."),
        "ccr_beta": Key(0.5, float, "RHFL: CCR `F_k = 1/(K-1) + beta Q_k / sum Q` (official 0.5).",
                        check=_nonneg),
        "collab_epochs": Key(1, int, "RHFL: passes over D_p of collaborative learning per round.",
                             check=_nonneg),
        "collab_optimizer": Key("fresh", str, "RHFL: each collaborative step uses a `fresh` Adam (as the "
                                "official code: a new one per step, so a sign-like first step) or the "
                                "client's own optimizer (`party`: AdamW with its state and schedule).",
                                choices=["fresh", "party"]),
        "collab_lr": Key(None, float, "RHFL: learning rate of the fresh Adam; null: the client's current "
                         "(scheduled) learning rate (the official code uses its one lr for both).",
                         nullable=True, check=_pos),
    },
    "output": {
        "dir": Key("runs/{name}", str, "Run directory; `{name}` is replaced by `name`."),
    },
}


class Config(dict):
    """A dict with attribute access (``cfg.data.size``)."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            raise AttributeError(k) from None

    def __setattr__(self, k, v):
        self[k] = v

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else copy.deepcopy(v) for k, v in self.items()}

    def settings(self) -> dict:
        """:meth:`to_dict` without the loader's private keys (``_source``...): what a run's YAML holds."""
        return {k: v for k, v in self.to_dict().items() if not k.startswith("_")}


def defaults(schema=SCHEMA) -> Config:
    return Config({k: defaults(v) if isinstance(v, dict) else copy.deepcopy(v.default)
                   for k, v in schema.items()})


def _unknown(key: str, valid: List[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], [v.split(".")[-1] for v in valid], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}.{hint} Valid keys: {', '.join(valid)}")


def _merge(base: Config, new: dict, schema: dict, prefix: str, where: str, errors: List[str]) -> None:
    if not isinstance(new, dict):
        errors.append(f"{where}: {prefix or 'top level'} must be a mapping, got {type(new).__name__}")
        return
    for k, v in new.items():
        full = f"{prefix}{k}"
        if k not in schema:
            errors.append(str(_unknown(full, [f"{prefix}{x}" for x in schema], where)))
        elif isinstance(schema[k], dict):
            _merge(base[k], v, schema[k], full + ".", where, errors)
        else:
            base[k] = v


def _typecheck(cfg: Config, schema: dict, prefix: str, errors: List[str]) -> None:
    for k, spec in schema.items():
        full, v = f"{prefix}{k}", cfg[k]
        if isinstance(spec, dict):
            _typecheck(v, spec, full + ".", errors)
            continue
        if v is None:
            if not spec.nullable:
                errors.append(f"{full}: must not be null")
            continue
        types = spec.types if isinstance(spec.types, tuple) else (spec.types,)
        if float in types and isinstance(v, int) and not isinstance(v, bool):
            v = cfg[k] = float(v)
        if float in types and isinstance(v, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                v = cfg[k] = float(v)
            except ValueError:
                pass
        ok = any(isinstance(v, t) and not (isinstance(v, bool) and t in (int, float)) for t in types)
        if not ok:
            names = " or ".join(t.__name__ for t in types)
            errors.append(f"{full}: expected {names}, got {type(v).__name__} {v!r}")
            continue
        if spec.choices is not None and v not in spec.choices:
            errors.append(f"{full}: {v!r} is not one of {', '.join(map(str, spec.choices))}")
        msg = spec.check(v) if spec.check else None
        if msg:
            errors.append(f"{full}: {msg} (got {v!r})")


def _cross_checks(cfg: Config, errors: List[str]) -> None:
    d, m, t = cfg.data, cfg.models, cfg.train
    if isinstance(d.clients, list) and isinstance(m.clients, list) and len(d.clients) != len(m.clients):
        errors.append(f"models.clients has {len(m.clients)} entries but data.clients has "
                      f"{len(d.clients)}: give one architecture per client")
    if isinstance(d.labeled_ratio, list) and isinstance(d.clients, list) and \
            len(d.labeled_ratio) != len(d.clients):
        errors.append(f"data.labeled_ratio has {len(d.labeled_ratio)} entries for {len(d.clients)} clients")
    if isinstance(d.clients, list) and d.public in d.clients:
        errors.append(f"data.public {d.public!r} is also a client site")
    if isinstance(d.clients, list) and len(set(d.clients)) != len(d.clients):
        errors.append("data.clients lists a site twice")
    if isinstance(t.warmup_rounds, int) and isinstance(t.rounds, int) and t.warmup_rounds > t.rounds:
        errors.append(f"train.warmup_rounds ({t.warmup_rounds}) > train.rounds ({t.rounds})")


def parse_override(s: str):
    if "=" not in s:
        raise ConfigError(f"--set {s!r}: expected key.sub=value")
    key, val = s.split("=", 1)
    try:
        value = yaml.safe_load(val) if val != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {s!r}: cannot parse the value ({e})") from None
    node: dict = {}
    cur = node
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return node


def load_config(path=None, overrides: Iterable[str] = (), extra: Optional[dict] = None,
                check: Optional[Callable[[Config], List[str]]] = None) -> Config:
    """Defaults <- YAML file <- ``extra`` dict <- ``--set`` overrides; then validated.

    ``check(cfg)`` adds problems of its own once the schema is satisfied (``fed.load_config`` passes
    the method registry's check). Raises :class:`ConfigError` listing every problem found.
    """
    cfg = defaults()
    errors: List[str] = []
    if path is not None:
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
        _merge(cfg, data, SCHEMA, "", str(p), errors)
    if extra:
        _merge(cfg, extra, SCHEMA, "", "settings", errors)
    for s in overrides:
        _merge(cfg, parse_override(s), SCHEMA, "", f"--set {s}", errors)
    if not errors:
        _typecheck(cfg, SCHEMA, "", errors)
    if not errors:
        _cross_checks(cfg, errors)
    if not errors and check is not None:
        errors.extend(check(cfg))
    if errors:
        src = f" in {path}" if path else ""
        raise ConfigError(f"{len(errors)} configuration problem(s){src}:\n  - " + "\n  - ".join(errors))
    cfg.output.dir = cfg.output.dir.replace("{name}", cfg.name)
    cfg["_source"] = str(path) if path else None
    return cfg


def labeled_ratios(cfg: Config) -> List[float]:
    r = cfg.data.labeled_ratio
    return [float(x) for x in r] if isinstance(r, list) else [float(r)] * len(cfg.data.clients)


def schema_markdown(schema=SCHEMA, prefix: str = "") -> str:
    rows = []
    for k, spec in schema.items():
        if isinstance(spec, dict):
            rows.append(schema_markdown(spec, f"{prefix}{k}."))
        else:
            rows.append(f"| `{prefix}{k}` | `{yaml.safe_dump(spec.default, default_flow_style=True).strip().removesuffix('...').strip()}` | {spec.doc} |")
    text = "\n".join(rows)
    return ("| key | default | meaning |\n|---|---|---|\n" + text) if not prefix else text


if __name__ == "__main__":
    print(schema_markdown())
