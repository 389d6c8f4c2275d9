"""Atomic file writes: a temporary file in the same folder, fsync, then rename.

A crash at any moment leaves either the old file or the new one, never a truncated one. The new file
is readable and writable by its owner only (``tempfile.mkstemp`` makes it 0600, and the rename keeps
that): the deployment's private keys are written this way too.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def _atomic_write(path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj, path) -> Path:
    return _atomic_write(path, lambda f: torch.save(obj, f))


def append_line(path, line: str) -> None:
    """Append one line and fsync (for JSONL logs)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def snapshot(obj):
    """A copy of ``obj`` whose tensors are detached CPU clones (safe to write while training goes on)."""
    if torch.is_tensor(obj):
        t = obj.detach()
        return t.to("cpu", copy=True) if t.device.type != "cpu" else t.clone()
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class BackgroundWriter:
    """Writes ``torch.save`` files atomically on one background thread, in submission order.

    ``save(obj, path)`` snapshots ``obj`` first, so training may continue (and change the tensors) at
    once. A failed write is re-raised by the next ``save`` or by ``wait``. ``wait()`` blocks until every
    submitted file is on disk; call it before exiting.
    """

    def __init__(self):
        import queue
        import threading

        self._q: "queue.Queue" = queue.Queue()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            item = self._q.get()
            try:
                if item is not None:
                    atomic_torch_save(*item)
            except BaseException as e:  # reported to the training thread
                self._error = e
            finally:
                self._q.task_done()

    def _raise(self):
        if self._error is not None:
            e, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint failed: {e}") from e

    def save(self, obj, path) -> None:
        self._raise()
        self._q.put((snapshot(obj), Path(path)))

    def wait(self) -> None:
        self._q.join()
        self._raise()
