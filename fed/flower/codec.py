"""A step's message as a Flower ``RecordDict``, and back, losslessly.

A message of the protocol is ``(step, keyword arguments, payload)`` (:mod:`fed.core.runner`). On Flower it
is a ``RecordDict`` of up to four records:

``"call"`` (ConfigRecord)
    ``step`` (str), ``run`` (the run's key), ``version`` (the site's state version the step expects,
    :mod:`fed.flower.site`); on a setup message also the run's settings.
``"kw"`` (ConfigRecord)
    the keyword arguments, each under its own name: ``bool``/``int``/``float``/``str`` as themselves; a
    ``Path`` as its string, named in ``call["kw-paths"]``; ``None`` left out and named in
    ``call["kw-none"]``. Anything else is refused (a keyword argument is a small setting, never data).
``"arrays"`` (ArrayRecord)
    every tensor of the payload, flat: one ``Array`` per tensor, keyed by its path in the payload
    (``"logits"``, ``"weights/conv.weight"`` for a dict of dicts). Dtypes that NumPy holds travel as
    Flower's own ``numpy.ndarray`` arrays (``np.save`` bytes: dtype, shape and every bit kept); the
    others (``bfloat16``...) as their raw bytes, ``stype`` ``"torch.raw"``, ``dtype`` the torch
    dtype's name. A flat dict of tensors (a state dict) therefore has exactly its own keys.
``"payload"`` (ConfigRecord)
    ``tree``: the payload's structure as JSON, each tensor replaced by ``{"$t": key}`` (a NumPy array
    by ``{"$n": key}``), tuples as ``{"$tuple": [...]}``; numbers, strings, booleans, ``None``, lists
    and dicts with string keys as themselves (floats round-trip exactly, NaN and infinities included).

Nothing is pickled: a message cannot carry code. :func:`content_bytes` is Flower's own accounting of
a message's content (``count_bytes`` of each record: array bytes, keys and config values).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

RAW = "torch.raw"  # stype of an Array holding a tensor's raw bytes (dtypes NumPy lacks)
_DTYPES = {str(d): d for d in (torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.uint8,
                               torch.int8, torch.int16, torch.int32, torch.int64, torch.bool,
                               torch.complex64, torch.complex128)}
_DTYPES.update({str(getattr(torch, n)): getattr(torch, n) for n in
                ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)})


# --- tensors <-> Flower Arrays -------------------------------------------------------------------

def tensor_to_array(t: torch.Tensor) -> Array:
    t = t.detach().cpu().resolve_conj().resolve_neg()
    try:
        a = t.numpy()
    except TypeError:  # no NumPy dtype (bfloat16, float8...): the raw bytes
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return Array(dtype=str(t.dtype), shape=tuple(t.shape), stype=RAW, data=data)
    return Array.from_numpy_ndarray(a)


def array_to_tensor(a: Array) -> torch.Tensor:
    if a.stype == RAW:
        dtype = _DTYPES[a.dtype]
        flat = torch.frombuffer(bytearray(a.data), dtype=torch.uint8) if a.data else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(a.shape)
    arr = a.numpy()
    if not (arr.flags.c_contiguous and arr.flags.writeable):  # saved in Fortran order: the same values, C order
        arr = arr.copy(order="C")
    return torch.from_numpy(arr)


# --- payloads -------------------------------------------------------------------------------------

def _key(path: Tuple[str, ...], arrays: ArrayRecord) -> str:
    key = "/".join(path) or "$"
    while key in arrays:  # a path that repeats (a "/" inside a name): keep it unique
        key += "'"
    return key


def _skeleton(obj, path: Tuple[str, ...], arrays: ArrayRecord):
    if torch.is_tensor(obj):
        key = _key(path, arrays)
        arrays[key] = tensor_to_array(obj)
        return {"$t": key}
    if isinstance(obj, np.ndarray):
        key = _key(path, arrays)
        arrays[key] = Array.from_numpy_ndarray(obj)
        return {"$n": key}
    if isinstance(obj, np.generic):  # a NumPy scalar: its Python value (the same number)
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj if type(obj) in (type(None), bool, int, float, str) else \
            float(obj) if isinstance(obj, float) else int(obj) if isinstance(obj, int) else str(obj)
    if isinstance(obj, tuple):
        return {"$tuple": [_skeleton(v, path + (str(i),), arrays) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_skeleton(v, path + (str(i),), arrays) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"a message's dict keys must be strings (at {'/'.join(path) or 'top level'})")
        out = {k: _skeleton(v, path + (k,), arrays) for k, v in obj.items()}
        return {"$dict": out} if any(k.startswith("$") for k in obj) else out
    raise TypeError(f"cannot send a {type(obj).__name__} in a message (at {'/'.join(path) or 'top level'}): "
                    f"tensors, NumPy arrays, numbers, strings, None, lists, tuples and dicts only")


def _rebuild(node, arrays: ArrayRecord):
    if isinstance(node, list):
        return [_rebuild(v, arrays) for v in node]
    if isinstance(node, dict):
        if len(node) == 1:
            (k, v), = node.items()
            if k == "$t":
                return array_to_tensor(arrays[v])
            if k == "$n":
                return arrays[v].numpy()
            if k == "$tuple":
                return tuple(_rebuild(x, arrays) for x in v)
            if k == "$dict":
                return {kk: _rebuild(vv, arrays) for kk, vv in v.items()}
        return {k: _rebuild(v, arrays) for k, v in node.items()}
    return node


def encode_payload(obj, content: RecordDict) -> None:
    """Put ``obj`` (a payload: tensors, possibly nested dicts of them, small plain data) in ``content``
    as ``"payload"`` (structure) and ``"arrays"`` (tensors); nothing for ``None``."""
    if obj is None:
        return
    arrays = ArrayRecord()
    tree = _skeleton(obj, (), arrays)
    content["payload"] = ConfigRecord({"tree": json.dumps(tree, allow_nan=True)})
    if len(arrays):
        content["arrays"] = arrays


def decode_payload(content: RecordDict):
    if "payload" not in content:
        return None
    arrays = content["arrays"] if "arrays" in content else ArrayRecord()
    return _rebuild(json.loads(content["payload"]["tree"]), arrays)


# --- keyword arguments ------------------------------------------------------------------------------

def encode_kw(kw: Dict[str, Any], call: ConfigRecord) -> Optional[ConfigRecord]:
    """The keyword arguments as a ConfigRecord (``None`` when there are none); ``Path`` and ``None``
    values are named in ``call``."""
    rec, paths, nones = ConfigRecord(), [], []
    for k, v in kw.items():
        if v is None:
            nones.append(k)
        elif isinstance(v, Path):
            rec[k] = str(v)
            paths.append(k)
        elif type(v) in (bool, int, float, str):
            rec[k] = v
        else:
            raise TypeError(f"keyword argument {k}={v!r}: a step's keyword arguments are bool, int, float, str, "
                            f"Path or None (data goes in the message's payload)")
    if paths:
        call["kw-paths"] = paths
    if nones:
        call["kw-none"] = nones
    return rec if len(rec) else None


def decode_kw(content: RecordDict) -> Dict[str, Any]:
    call = content["call"]
    kw = dict(content["kw"]) if "kw" in content else {}
    for k in call.get("kw-paths", []):
        kw[k] = Path(kw[k])
    for k in call.get("kw-none", []):
        kw[k] = None
    return kw


def content_bytes(content: RecordDict) -> int:
    """Flower's own size of a message's content: the sum of its records' ``count_bytes()``."""
    return sum(rec.count_bytes() for rec in content.values())
