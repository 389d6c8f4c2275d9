"""What a client may send back, and the check of every reply before anything uses it.

Each step declares its reply where it is defined: ``@step(reply=...)`` (a :class:`Spec`, or a function of
the method instance returning one, for replies that depend on its settings); a step that declares
nothing must reply ``None``. The runner's party calls (round start and end, evaluation, checkpoint
weights...) have theirs in :data:`PARTY_REPLIES`. The runner checks every client's reply against its
step's declaration as it arrives (:meth:`fed.core.runner.Runner._calls`), on every engine: a reply with
other keys, another dtype or shape, a non-finite value, more elements than the step can produce or a value
outside its range (grades, probabilities) is that client's failure for the round (``train.fault_tolerance``
and ``train.min_sites`` decide what follows) and reaches no model. A Flower host also refuses a reply
whose wire size exceeds what its declaration allows before decoding it (:meth:`Checker.max_bytes`).

The vocabulary::

    Nothing()                               # None
    Tensor("n<=P C h<=S w<=S", "float")     # dims: P public images, C classes, S image size; a lower-case
                                            # name binds on first use (``n<=P``: at most P) and must agree
                                            # wherever it appears again in the same reply
    Tensor("n", torch.float32, lo=0, hi=1)  # a range for every element
    Number(int, lo=0)                       # a Python number
    Fields(logits=..., grade=...)           # a dict with exactly these keys (``optional={...}`` may be absent)
    Maybe(spec)                             # None or spec
    OneOf(spec, spec)                       # the first that fits
    State()                                 # a state dict of the client's own architecture (keys, shapes, dtypes)
    Prefixed(student=State(), proj=...)     # flat ``prefix.key`` dicts, each part checked as its spec
    Rows()                                  # evaluation rows: this client's images, scores in [0, 1]
"""
from __future__ import annotations

import functools
import math
import re
from typing import Callable, Dict, List, Optional

import torch

#: the number of classes every model predicts (``networks.build_model``'s default: background, foreground)
CLASSES = 2
#: the widest dimension a declaration may leave free without a bound (feature widths, head resolutions)
FREE_MAX = 4096
#: a Flower reply may exceed its declared size by this much (record names, dtypes, shapes, metadata: a
#: ResNet-34 state of 124 MB in 1.2k entries carries about 75 kB of them), plus WIRE_SHARE of it
WIRE_SLACK = 256 * 1024
WIRE_SHARE = 0.02
#: evaluation row keys besides the scores
ROW_KEYS = {"group", "name"}
SCORES = ("dice", "iou", "precision", "recall")


class ReplyError(ValueError):
    """A reply that does not fit its step's declaration."""


class Context:
    """What a declaration is checked against: the run's sizes, the client and the step's arguments."""

    def __init__(self, P: int, S: int, name: str = "", arch: str = "", kw: Optional[dict] = None,
                 max_rows: Optional[int] = None):
        self.dims = {"P": P, "S": S, "C": CLASSES}
        self.name, self.arch, self.kw, self.max_rows = name, arch, kw or {}, max_rows
        self.bound: Dict[str, int] = {}


class Spec:
    def check(self, value, ctx: Context, path: str) -> None:
        raise NotImplementedError

    def max_bytes(self, ctx: Context) -> int:
        raise NotImplementedError


def _where(path: str) -> str:
    return path or "the reply"


class Nothing(Spec):
    def check(self, value, ctx, path=""):
        if value is not None:
            raise ReplyError(f"{_where(path)} must be None, got {type(value).__name__}")

    def max_bytes(self, ctx):
        return 0


_KINDS = {"float": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
          "int": (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64), "bool": (torch.bool,)}
_DIM = re.compile(r"^(?:(\d+)|([A-Z])|([a-z_]\w*)(?:<=(\d+|[A-Z]))?)$")


class Tensor(Spec):
    """A tensor of the declared dims (a space-separated string: numbers, the run's sizes ``P S C``,
    lower-case names bound within the reply, optionally ``name<=bound``), dtype (a torch dtype, a tuple
    of them or ``"float"``/``"int"``/``"bool"``) and element range ``[lo, hi]``; floating values finite."""

    def __init__(self, dims: str, dtype="float", lo: Optional[float] = None, hi: Optional[float] = None):
        self.dims = dims.split()
        for d in self.dims:
            if not _DIM.match(d):
                raise ValueError(f"bad dim {d!r} in {dims!r}")
        self.dtypes = _KINDS[dtype] if isinstance(dtype, str) else (dtype if isinstance(dtype, tuple) else (dtype,))
        self.lo, self.hi = lo, hi

    def _bound(self, d: str, ctx: Context) -> int:
        num, size, name, cap = _DIM.match(d).groups()
        if num:
            return int(num)
        if size:
            return ctx.dims[size]
        if name in ctx.bound:
            return ctx.bound[name]
        return (int(cap) if cap.isdigit() else ctx.dims[cap]) if cap else FREE_MAX

    def check(self, value, ctx, path=""):
        w = _where(path)
        if not torch.is_tensor(value):
            raise ReplyError(f"{w} must be a tensor, got {type(value).__name__}")
        if value.dtype not in self.dtypes:
            raise ReplyError(f"{w} has dtype {value.dtype}, expected {' or '.join(map(str, self.dtypes))}")
        if value.dim() != len(self.dims):
            raise ReplyError(f"{w} has shape {tuple(value.shape)}, expected {len(self.dims)} dims ({' '.join(self.dims)})")
        for i, (d, got) in enumerate(zip(self.dims, value.shape)):
            num, size, name, _ = _DIM.match(d).groups()
            if num or size:
                if got != self._bound(d, ctx):
                    raise ReplyError(f"{w} has shape {tuple(value.shape)}: dim {i} ({d}) must be {self._bound(d, ctx)}")
            elif name in ctx.bound:
                if got != ctx.bound[name]:
                    raise ReplyError(f"{w} has shape {tuple(value.shape)}: dim {i} ({name}) must be {ctx.bound[name]} "
                                     f"as elsewhere in the reply")
            elif got > self._bound(d, ctx):
                raise ReplyError(f"{w} has shape {tuple(value.shape)}: dim {i} ({d}) exceeds {self._bound(d, ctx)}")
            else:
                ctx.bound[name] = got
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
            raise ReplyError(f"{w} holds {int((~torch.isfinite(value)).sum())} non-finite value(s)")
        if value.numel() and (self.lo is not None or self.hi is not None):
            v = value.float() if value.dtype == torch.bool else value
            lo, hi = float(v.min()), float(v.max())
            if (self.lo is not None and lo < self.lo) or (self.hi is not None and hi > self.hi):
                raise ReplyError(f"{w} ranges over [{lo:g}, {hi:g}], outside [{self.lo}, {self.hi}]")

    def max_bytes(self, ctx):
        n = 1
        for d in self.dims:
            b = self._bound(d, ctx)
            name = _DIM.match(d).group(3)
            if name:  # its other uses in the reply are at most this
                ctx.bound.setdefault(name, b)
            n *= b
        return n * max(torch.empty((), dtype=t).element_size() for t in self.dtypes)


class Number(Spec):
    """A Python number (``int``: an int) in ``[lo, hi]``; finite unless ``nan`` (then NaN, "none", is allowed)."""

    def __init__(self, kind=float, lo: Optional[float] = None, hi: Optional[float] = None, nan: bool = False):
        self.kind, self.lo, self.hi, self.nan = kind, lo, hi, nan

    def check(self, value, ctx, path=""):
        w = _where(path)
        ok = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok):
            raise ReplyError(f"{w} must be {'an int' if self.kind is int else 'a number'}, got {type(value).__name__}")
        if self.nan and math.isnan(value):
            return
        if not math.isfinite(value):
            raise ReplyError(f"{w} is not finite ({value})")
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise ReplyError(f"{w} is {value}, outside [{self.lo}, {self.hi}]")

    def max_bytes(self, ctx):
        return 8


class Fields(Spec):
    """A dict with exactly the declared keys (those in ``optional`` may be absent)."""

    def __init__(self, optional: Optional[Dict[str, Spec]] = None, **required: Spec):
        self.required, self.optional = required, optional or {}

    def check(self, value, ctx, path=""):
        w = _where(path)
        if not isinstance(value, dict):
            raise ReplyError(f"{w} must be a dict, got {type(value).__name__}")
        missing = [k for k in self.required if k not in value]
        extra = [k for k in value if k not in self.required and k not in self.optional]
        if missing or extra:
            raise ReplyError(f"{w} has keys {sorted(map(str, value))}: " + "; ".join(
                ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])))
        for k, v in value.items():
            (self.required.get(k) or self.optional[k]).check(v, ctx, f"{path}[{k!r}]" if path else f"[{k!r}]")

    def max_bytes(self, ctx):
        return sum(s.max_bytes(ctx) for s in (*self.required.values(), *self.optional.values()))


class Maybe(Spec):
    def __init__(self, spec: Spec):
        self.spec = spec

    def check(self, value, ctx, path=""):
        if value is not None:
            self.spec.check(value, ctx, path)

    def max_bytes(self, ctx):
        return self.spec.max_bytes(ctx)


class OneOf(Spec):
    def __init__(self, *specs: Spec):
        self.specs = specs

    def check(self, value, ctx, path=""):
        errors = []
        for s in self.specs:
            saved = dict(ctx.bound)
            try:
                return s.check(value, ctx, path)
            except ReplyError as e:
                ctx.bound = saved
                errors.append(str(e))
        raise ReplyError(" / ".join(errors))

    def max_bytes(self, ctx):
        return max(s.max_bytes(ctx) for s in self.specs)


class State(Spec):
    """A state dict of a model: exactly the keys, shapes and dtypes of ``of`` (an architecture name;
    default: the client's own), only its parameters with ``params_only``; floating values finite."""

    def __init__(self, of: Optional[Callable[[Context], Dict[str, tuple]]] = None, params_only: bool = False):
        self.of, self.params_only = of, params_only

    def reference(self, ctx) -> Dict[str, tuple]:
        ref = self.of(ctx) if self.of is not None else state_shapes(ctx.arch)
        return {k: v for k, v in ref.items() if v[2] or not self.params_only}

    def check(self, value, ctx, path=""):
        w = _where(path)
        if not isinstance(value, dict):
            raise ReplyError(f"{w} must be a state dict, got {type(value).__name__}")
        ref = self.reference(ctx)
        if set(value) != set(ref):
            missing, extra = sorted(set(ref) - set(value)), sorted(map(str, set(value) - set(ref)))
            raise ReplyError(f"{w} is not a state of {ctx.arch!r}: " + "; ".join(
                ([f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}"] if missing else [])
                + ([f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}"] if extra else [])))
        for k, (shape, dtype, _) in ref.items():
            v = value[k]
            if not torch.is_tensor(v) or tuple(v.shape) != shape or v.dtype != dtype:
                got = f"{tuple(v.shape)} {v.dtype}" if torch.is_tensor(v) else type(v).__name__
                raise ReplyError(f"{w}[{k!r}] is {got}, expected {shape} {dtype}")
        floats = [k for k in ref if value[k].is_floating_point() and value[k].numel()]
        if floats:  # one device sync for the whole state; the first bad entry named
            finite = torch.stack([torch.isfinite(value[k]).all() for k in floats])
            if not bool(finite.all()):
                raise ReplyError(f"{w}[{floats[int((~finite).nonzero()[0])]!r}] holds non-finite values")

    def max_bytes(self, ctx):
        return sum(math.prod(s) * torch.empty((), dtype=d).element_size() for s, d, _ in self.reference(ctx).values())


class Prefixed(Spec):
    """A flat dict of ``prefix.key`` entries: each prefix's part checked as its spec (those in
    ``optional`` may be absent) and ``scalars`` keys (no dot) as theirs."""

    def __init__(self, optional: Optional[Dict[str, Spec]] = None, scalars: Optional[Dict[str, Spec]] = None,
                 **required: Spec):
        self.required, self.optional, self.scalars = required, optional or {}, scalars or {}

    def check(self, value, ctx, path=""):
        w = _where(path)
        if not isinstance(value, dict):
            raise ReplyError(f"{w} must be a dict, got {type(value).__name__}")
        parts: Dict[str, dict] = {}
        for k, v in value.items():
            if isinstance(k, str) and k in self.scalars:
                self.scalars[k].check(v, ctx, f"{path}[{k!r}]")
                continue
            head, dot, rest = k.partition(".") if isinstance(k, str) else ("", "", "")
            if not dot or (head not in self.required and head not in self.optional):
                raise ReplyError(f"{w} has an unexpected key {k!r}")
            parts.setdefault(head, {})[rest] = v
        missing = [p for p in self.required if p not in parts]
        if missing:
            raise ReplyError(f"{w} lacks the part(s) {missing}")
        for head, part in parts.items():
            (self.required.get(head) or self.optional[head]).check(part, ctx, f"{path}{head}.")

    def max_bytes(self, ctx):
        return sum(s.max_bytes(ctx) for s in (*self.required.values(), *self.optional.values(),
                                              *self.scalars.values()))


class Rows(Spec):
    """Per-image evaluation rows of this client (``group`` is its name): at most ``max_rows``, scores
    finite in [0, 1], ``hd95`` None or finite and non-negative."""

    def __init__(self, per_row: int = 512):
        self.per_row = per_row

    def check(self, value, ctx, path=""):
        w = _where(path)
        if not isinstance(value, list):
            raise ReplyError(f"{w} must be a list of rows, got {type(value).__name__}")
        limit = ctx.max_rows
        if limit is not None and len(value) > limit:
            raise ReplyError(f"{w} has {len(value)} rows, more than the site's {limit} images")
        for i, row in enumerate(value):
            if not isinstance(row, dict) or row.get("group") != ctx.name or not isinstance(row.get("name"), str):
                raise ReplyError(f"{w}[{i}] is not a row of {ctx.name} ({str(row)[:80]})")
            extra = set(row) - ROW_KEYS - set(SCORES) - {"hd95"}
            if extra:
                raise ReplyError(f"{w}[{i}] has unexpected keys {sorted(extra)}")
            for k in SCORES:
                v = row.get(k)
                if v is not None and (not isinstance(v, (int, float)) or not 0 <= v <= 1):
                    raise ReplyError(f"{w}[{i}][{k!r}] is {v!r}, outside [0, 1]")
            hd = row.get("hd95")
            if hd is not None and (not isinstance(hd, (int, float)) or not math.isfinite(hd) or hd < 0):
                raise ReplyError(f"{w}[{i}]['hd95'] is {hd!r}, not a finite distance")

    def max_bytes(self, ctx):
        return (ctx.max_rows or 100_000) * self.per_row


class Losses(Spec):
    """What a party logs of its round: ``{"loss": {term: number}, "lr": number}`` (a loss may be NaN:
    it is reported, not used)."""

    def check(self, value, ctx, path=""):
        Fields(loss=_AnyDict(), lr=Number()).check(value, ctx, path)
        for k, v in value["loss"].items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ReplyError(f"{_where(path)}['loss'] has {k!r}: {v!r}, not a named number")

    def max_bytes(self, ctx):
        return 64 * 1024


class _AnyDict(Spec):
    def check(self, value, ctx, path=""):
        if not isinstance(value, dict) or len(value) > 256:
            raise ReplyError(f"{_where(path)} must be a dict of at most 256 entries")

    def max_bytes(self, ctx):
        return 64 * 1024


#: the replies of the runner's party calls (:data:`fed.core.method.PARTY_CALLS`)
PARTY_REPLIES: Dict[str, Spec] = {
    "begin_round": Nothing(), "rollback": Nothing(), "save_state": Nothing(), "load_state": Nothing(),
    "end_round": Losses(), "weights": State(), "evaluate": Rows(), "test_weights": Rows(),
    "keep_weights": Nothing(), "kept_weights": State(),
}


def module_shapes(build: Callable[[], "torch.nn.Module"]) -> Dict[str, tuple]:
    """``{key: (shape, dtype, is_parameter)}`` of the state of the module ``build()`` makes, built on the
    meta device (no memory, no draw from any random generator)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        module = build()
    params = {k for k, _ in module.named_parameters()}
    return {k: (tuple(v.shape), v.dtype, k in params) for k, v in module.state_dict().items()}


@functools.lru_cache(maxsize=None)
def state_shapes(arch: str) -> Dict[str, tuple]:
    """The state of ``networks.build_model(arch)`` (:func:`module_shapes`), built once per architecture."""
    import networks

    return module_shapes(lambda: networks.build_model(arch))


class Checker:
    """The runner's check of its clients' replies (one per run; the reference states cached per arch)."""

    #: the file list each evaluation split scores
    SPLITS = {"val": "val_list", "test": "test_list"}

    def __init__(self, method, P: int, S: int, archs: Dict[str, str], file_counts: Dict[str, Dict[str, int]]):
        self.method, self.P, self.S, self.archs, self.file_counts = method, P, S, archs, file_counts

    def spec(self, step: str) -> Spec:
        if step in PARTY_REPLIES:
            return PARTY_REPLIES[step]
        info = type(self.method).steps.get(step)
        if info is None:
            raise KeyError(f"{step!r} is not a step of {type(self.method).__name__}")
        spec = info.get("reply")
        if spec is None:
            return Nothing()
        return spec if isinstance(spec, Spec) else spec(self.method)

    def context(self, name: str, step: str, kw: dict) -> Context:
        split = "test" if step == "test_weights" else kw.get("split") if step == "evaluate" else None
        rows = self.file_counts.get(name, {}).get(self.SPLITS.get(split, ""))
        return Context(self.P, self.S, name, self.archs.get(name, ""), kw, max_rows=rows)

    def check(self, name: str, step: str, reply, kw: dict) -> Optional[str]:
        """None if ``reply`` (``name``'s reply to ``step``) fits the step's declaration, else what is wrong."""
        try:
            self.spec(step).check(reply, self.context(name, step, kw), "")
        except ReplyError as e:
            return str(e)
        return None

    def max_bytes(self, name: str, step: str, kw: dict) -> int:
        """The most bytes ``step``'s reply can carry on the wire: its declared data, plus :data:`WIRE_SHARE`
        of it and :data:`WIRE_SLACK` for the encoding."""
        n = self.spec(step).max_bytes(self.context(name, step, kw))
        return int(n * (1 + WIRE_SHARE)) + WIRE_SLACK
