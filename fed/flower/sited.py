"""A site's long-lived process: keeps the site's party (models, optimizer, data) loaded between the
messages of a run.

A Flower SuperNode starts a fresh ``flwr-clientapp`` process for every message. Left to itself, each of
those processes imports this project and rebuilds the site's party from its disk (seconds per message,
whatever the step). With this process running beside the SuperNode, the ClientApp of the deployment
(``flower_app/hssf_site_app.py``, which imports only Flower) hands every message to it instead, over a
local socket, and returns its reply::

    python -m fed.flower.sited --site-dir /srv/hssf      # beside: flower-supernode ... --node-config "site-dir='/srv/hssf' ..."

The process answers with :func:`fed.flower.site.answer`, exactly what the ClientApp would have run
itself. It writes ``<site-dir>/sited.json`` (its socket's address and pid) and ``<site-dir>/sited.key``
(a fresh random key, readable by the site's user only: a peer must prove it holds it,
``multiprocessing.connection``'s HMAC challenge). Where the process is not running (never started, or
gone), the ClientApp serves the message itself as before: slower, with the same result (the site's state
within a round is on its disk after every ``train`` message). ``python -m fed.flower.deploy`` starts one
for every site.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from multiprocessing.connection import Listener
from pathlib import Path

from utils import timeline
from utils.io import atomic_write_bytes

INFO, KEY = "sited.json", "sited.key"


def serve_forever(folder: Path, ready=None) -> None:
    """Serve the site of ``folder`` until SIGTERM/SIGINT."""
    from flwr.common.serde import ProtoRecordDict, recorddict_from_proto, recorddict_to_proto

    from . import site
    from .site import answer, error_reason

    site.KEEPS_PARTY = True  # this process serves the site for the whole run

    folder.mkdir(parents=True, exist_ok=True)
    key = os.urandom(32)
    sockdir = Path(tempfile.mkdtemp(prefix="hssf-site-"))  # short: a socket's path is limited to ~100 bytes
    address = str(sockdir / "s")
    listener = Listener(address, family="AF_UNIX", authkey=key)
    atomic_write_bytes(folder / KEY, key)
    atomic_write_bytes(folder / INFO, json.dumps({"address": address, "pid": os.getpid()}).encode())

    def stop(*_):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the exit's own clean-up runs undisturbed
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"site process {os.getpid()} serving {folder} at {address}", flush=True)
    if ready is not None:
        ready()
    try:
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError) as e:  # a peer without the key, or one that went away
                print(f"refused a connection: {type(e).__name__}: {e}", flush=True)
                continue
            with conn:
                try:
                    req = conn.recv()
                except (OSError, EOFError):
                    continue
                t0, step = time.time(), "?"
                try:
                    content = recorddict_from_proto(ProtoRecordDict.FromString(req["content"]))
                    step = str(content["call"]["step"]) if "call" in content else "?"
                    out = answer(content, req["type"], req["node_config"])
                    reply = ("ok", recorddict_to_proto(out).SerializeToString())
                except Exception as e:  # noqa: BLE001 - the server decides
                    reply = ("error", error_reason(e))
                # one line per message: when it came, what it asked, how long the site worked on it
                print(f"{time.strftime('%H:%M:%S', time.localtime(t0))}.{int(t0 % 1 * 1000):03d} {step}: "
                      f"{reply[0]} in {time.time() - t0:.2f} s", flush=True)
                timeline.mark(who="site", step=step, start=t0, end=time.time())
                try:
                    conn.send(reply)
                except (OSError, EOFError):
                    print("the ClientApp went away before the reply", flush=True)
    finally:
        listener.close()
        for f in (INFO, KEY):
            (folder / f).unlink(missing_ok=True)
        shutil.rmtree(sockdir, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Keep a Flower site's party loaded between messages (run it beside "
                                             "the site's flower-supernode, with the same site-dir).")
    ap.add_argument("--site-dir", required=True, help="the site's folder: its node config's site-dir")
    a = ap.parse_args(argv)
    serve_forever(Path(a.site_dir).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
