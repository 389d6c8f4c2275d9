"""Experiment configuration: YAML file + ``--set key.sub=value`` overrides, validated up front.

:data:`SCHEMA` is the single source of truth: every key, its default, its type and what it means.
Each method declares its own section where it is defined (``options`` on its class, added here by
:func:`add_section` when the method registers); ``python -m fed`` prints the whole schema as the Markdown
table of docs/configuration.md. An unknown or mistyped key is an error that lists the valid keys; so is
a value of the wrong type.
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


def positive(v):
    return None if v > 0 else "must be > 0"


def non_negative(v):
    return None if v >= 0 else "must be >= 0"


def unit_interval(v):
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
    "method": Key("hssf", str, "Federated method: the name of a registered method (`fed/methods/`, one file "
                  "each; listed in docs/configuration.md \"Methods\" and docs/baselines.md)."),
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
        "size": Key(384, int, "Images are resized to size x size.", check=positive),
        "batch_size": Key(4, int, "Batch size of every loader (>= 2: BatchNorm in training).",
                          check=lambda v: None if v >= 2 else "must be >= 2 (BatchNorm needs 2 samples)"),
        "num_workers": Key(2, int, "DataLoader worker processes (0 = load in the main process).",
                           check=non_negative),
        "shuffle": Key(False, bool, "Shuffle training loaders. The official code does not (faithful "
                       "default: false)."),
        "augment_seeding": Key("official", str, "Per-sample augmentation seeds of the training loaders. "
                               "`official` (default, as the official code, which re-seeds its generators "
                               "before each view with a seed drawn from 42 values): each sample's seed is one "
                               "of 42, drawn per sample and pass, so its geometric draw (shared by its weak and "
                               "strong views and mask), RandAugment draw and cutout are one of 42. `free`: a "
                               "fresh keyed seed per sample and pass (the default before 2026-12-07). The data "
                               "order is the same in both; public-set noise is unaffected. The study measured "
                               "free no better (HSSF) or worse (local) than official over 3 seeds: "
                               "docs/reproducing.md.",
                               choices=["free", "official"]),
        "cache": Key(True, bool, "Keep resized images in memory (read each file once)."),
        "verify": Key(True, bool, "Check every file of the run before training (`python -m "
                      "datasets.verify`): corrupt images, missing or non-binary masks, size mismatches, "
                      "split leakage...; all problems are reported at once and nothing runs."),
        "eval_drop_last": Key(True, bool, "During training, val/test loaders drop the last partial "
                              "batch, as the official code (test.py always scores every image)."),
        "public_noise": Key(0.1, float, "Std of the Gaussian noise (clamped to +-2 std) added to public "
                            "batches in Condensation/Fusion and to strong views; 0 disables.",
                            check=non_negative),
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
        "rounds": Key(200, int, "Communication rounds.", check=positive),
        "warmup_rounds": Key(20, int, "Rounds of supervised warm-up (no KL, no unlabeled data; hssf and lssl; "
                             "official `pretrained_epoch`).", check=non_negative),
        "condensation_epochs": Key(4, int, "Passes over D_p in Regularity Condensation per round.",
                                   check=non_negative),
        "fusion_epochs": Key(4, int, "Passes over D_p in Regularity Fusion per round.", check=non_negative),
        "local_epochs": Key(1, int, "Local semi-supervised epochs per round.", check=non_negative),
        "optimizer": Key("adamw", str, "`adamw`, `adam` or `sgd` (momentum 0.9).",
                         choices=["adamw", "adam", "sgd"]),
        "lr": Key(1e-4, float, "Initial learning rate (server and clients).", check=positive),
        "weight_decay": Key(0.02, float, "Weight decay.", check=non_negative),
        "lr_final_factor": Key(0.01, float, "Cosine schedule floor (official `lrf`).", check=unit_interval),
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
                              "CPU with the same threads per process).", check=non_negative),
        "worker_threads": Key(0, int, "torch threads of each client worker process (0: this process's "
                              "threads divided by `client_workers`).", check=non_negative),
        "site_timeout_s": Key(0.0, float, "Flower engines: seconds a site has to answer one message (a step, "
                              "an evaluation, its state writing). A site that does not answer in time, or "
                              "whose node Flower reports unavailable, is lost: logged, left out of the rest "
                              "of the run (listed under `skipped` in every later round) while at least "
                              "`train.min_sites` sites remain; otherwise the run stops, its last completed "
                              "round kept for `--resume`. 0: wait for ever.", check=non_negative),
        "min_sites": Key(0, int, "Flower engines: the fewest sites a run goes on with after losing sites "
                         "(see `train.site_timeout_s`); 0: all of them (a lost site stops the run).",
                         check=non_negative),
        "rejoin_wait_s": Key(0.0, float, "Flower engines: before a round, how long the server waits for lost "
                             "sites to be back (their node on the grid again) before it starts the round "
                             "without them; 0: it looks once. A site that restarts after a failure then "
                             "takes part from the next round on, however fast the rounds are.",
                             check=non_negative),
    },
    "output": {
        "dir": Key("runs/{name}", str, "Run directory; `{name}` is replaced by `name`."),
    },
}
#: the sections above; the others are added by :func:`add_section` (each method's own settings)
GENERAL = tuple(SCHEMA)


def add_section(name: str, keys: Dict[str, Key]) -> Dict[str, Key]:
    """Add the settings section ``name`` (a method's options, declared where the method is) to
    :data:`SCHEMA`; returns ``keys``. The same section added twice must be the same object. Sections
    are kept in a fixed order (the general ones, ``hssf``, ``baselines``, then by name, ``output`` last),
    whatever the order of the imports that add them."""
    if not isinstance(keys, dict) or not all(isinstance(k, Key) for k in keys.values()):
        raise TypeError(f"section {name!r}: expected a dict of Key")
    if name in SCHEMA:
        if SCHEMA[name] is not keys:
            raise ValueError(f"configuration section {name!r} is defined twice")
        return keys
    SCHEMA[name] = keys
    rank = {"hssf": 0, "baselines": 1}
    order = [k for k in GENERAL if k != "output"] + sorted(
        (k for k in SCHEMA if k not in GENERAL), key=lambda k: (rank.get(k, 2), k)) + ["output"]
    items = {k: SCHEMA[k] for k in order}
    SCHEMA.clear()
    SCHEMA.update(items)
    return keys


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
                check: Optional[Callable[[Config], List[str]]] = None, general_only: bool = False) -> Config:
    """Defaults <- YAML file <- ``extra`` dict <- ``--set`` overrides; then validated.

    The schema is :data:`SCHEMA` with the sections methods add (``fed.load_config`` loads them all).
    ``check(cfg)`` adds problems of its own once the schema is satisfied (``fed.load_config`` passes
    the method registry's check). ``general_only``: only the general sections (:data:`GENERAL`) are read
    and checked; the others are left out (a data tool that needs no method's settings). Raises
    :class:`ConfigError` listing every problem found.
    """
    schema = {k: SCHEMA[k] for k in GENERAL} if general_only else SCHEMA
    cfg = defaults(schema)
    errors: List[str] = []

    def merge(new, where):
        if general_only and isinstance(new, dict):
            new = {k: v for k, v in new.items() if k in GENERAL}
        _merge(cfg, new, schema, "", where, errors)

    if path is not None:
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
        merge(data, str(p))
    if extra:
        merge(extra, "settings")
    for s in overrides:
        merge(parse_override(s), f"--set {s}")
    if not errors:
        _typecheck(cfg, schema, "", errors)
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

