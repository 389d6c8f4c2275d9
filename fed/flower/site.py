"""The ClientApp side: one site (a client of the federation) answering the server's Flower Messages.

A site is a folder, its disk, and a declaration of who it is: its ``site`` (its name in the run's
``data.clients``), its ``arch`` and its ``data-root`` (its images in ``<data-root>/<dataset>/<site>/`` and
the public set, which every site holds, in ``<data-root>/<dataset>/<public>/``). A deployed node gives all
four in its node config (``--node-config "site-dir='/srv/hssf' site='Kvasir' arch='resnet34'
data-root='/data'"`` or a ``.toml`` file of these keys); a simulated node (partition id ``k``) reads them
from ``<sites_root>/client{k}/node.json``, which the simulation writes from the run's config.

The run's first two messages to a node: ``hello`` (a query: the node answers its ``site`` and ``arch``,
from which the server knows which client it is and checks the architecture against the run's config),
then ``setup`` with the run's settings, the client's name and index and the client's part of the split
(file names of its own lists and of the public set). The site resolves those names in its own data root,
verifies its files (``data.verify``, where the server has not already) and answers with its number of
files per split, or with an error listing every problem. Nothing about the site's data is read by the
server. The folder then holds:

``node.json`` (simulation only)
    the node's declaration, as above.
``split.json``, ``entry.json``
    the client's part of the split, and the resolved files: ``name``, ``index``, ``site``, ``arch``, its
    file lists ``data`` (labeled_train/unlabeled_train/val_list/test_list) and the public set
    ``public``, as ``[image, mask or null, name]`` items, which every process serving the site reads.
``run.json``
    the run's settings, key, device, torch threads and persistence, from the run's setup message.
``state/<name>.r<round>.pt``
    the party's full training state (model, optimizer, schedule, scaler) at the run's save points
    (the ``save_state`` message after every round); the site keeps the last two rounds (the server
    commits a round only once every party has written it) and ``load_state`` reads them on a resume.
``live.pt``
    with persistence ``"message"`` only: after every ``train`` message, the party's state *within*
    the round: training state, loss log, the method's extra models (``lssl``'s global copy) and the
    rollback snapshot, with the version it belongs to.

A process keeps the parties it served in memory (:data:`_SITES`). Each message names the version
of the site's state it expects (the number of ``train`` messages the site has been sent in this run,
so version 0 is the party as built from the config, which any process can rebuild). A process whose
copy is at that version answers from memory; otherwise it rebuilds the party and, if the version is
not 0, loads ``live.pt``; if that holds another version it refuses with an error naming both (with
persistence ``"save_state"`` a site must be served by one process between save points).
"""
from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import Dict, Optional

import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from datasets.dataset import SegDataset
from utils.device import Amp, resolve_device
from utils.io import atomic_torch_save, atomic_write_text

from .codec import decode_kw, decode_payload, encode_payload

SITE_DIR_KEY = "site-dir"       # node config key of a deployed site's folder
#: what a deployed node declares in its node config besides its folder
NODE_KEYS = {"site": "its site name in the run's data.clients", "arch": "its architecture",
             "data-root": "the folder holding <dataset>/<site>/ and <dataset>/<public>/"}
PARTITION_KEY = "partition-id"  # set by the simulation for every node
NODE, SPLIT, ENTRY, RUN, LIVE, STATE = "node.json", "split.json", "entry.json", "run.json", "live.pt", "state"
KEPT = "kept"  # <site>/kept: the checkpoint weights the site keeps until the end of the run (keep_weights)
HELLO = "hello"                 # the run's first message to every node: who are you (site, arch)?
SETUP = "setup"                 # then: settings, device, threads, persistence, the client's name and split
TRACE = "\n--- traceback ---\n"  # separates an error reply's reason from the site's traceback


def items_from_json(rows) -> list:
    return [(Path(i), Path(m) if m is not None else None, n) for i, m, n in rows]


def items_to_json(items) -> list:
    return [[str(i), str(m) if m is not None else None, n] for i, m, n in items]


def write_node(folder: Path, site: str, arch: str, data_root) -> None:
    """A simulated node's declaration (``node.json``): what a deployed node's node config says."""
    atomic_write_text(Path(folder) / NODE, json.dumps({"site": site, "arch": arch,
                                                       "data-root": str(Path(data_root).resolve())}))


def _as_config(d):
    from utils.config import Config

    return Config({k: _as_config(v) if isinstance(v, dict) else v for k, v in d.items()})


class Site:
    """What one process holds of one site: its party, the method, and the state version it is at."""

    def __init__(self, folder: Path, info: dict):
        from fed.core.registry import METHODS
        from fed.core.party import make_party

        self.folder, self.run, self.persist = folder, info["run"], info["persist"]
        self.threads = int(info["threads"])
        torch.set_num_threads(self.threads)
        entry = json.loads((folder / ENTRY).read_text())
        cfg = _as_config(info["settings"])
        cfg.device = info["device"]
        self.device = resolve_device(info["device"])
        amp = Amp.for_device(self.device, cfg.train.amp, cfg.train.channels_last)
        self.method = METHODS[cfg.method](cfg)
        public = SegDataset(items_from_json(entry["public"]), cfg.data.size, "labeled", cache=cfg.data.cache).preload()
        data = {k: items_from_json(v) for k, v in entry["data"].items()}
        self.party = make_party(cfg, amp, entry["name"], entry["arch"], data, public, index=entry["index"],
                                site=entry["site"])
        self.entry = {k: entry[k] for k in ("name", "index", "site", "arch")}
        self.version = 0
        self.restored = False  # whether the last message found this party only on the site's disk

    # --- the state within a round, for a process that serves the site's next message ----------------
    def live_state(self) -> dict:
        p = self.party
        return {"run": self.run, "version": self.version, "party": p.state_dict(), "round": p.round_state()}

    def write_live(self) -> None:
        atomic_torch_save(self.live_state(), self.folder / LIVE)

    def restore_live(self, state: dict) -> None:
        p = self.party
        p.load_state_dict(state["party"])
        p.load_round_state(state["round"])
        self.version = state["version"]

    def prune_states(self, keep=lambda r: True) -> None:
        from fed.core.party import round_of

        for f in (self.folder / STATE).glob(f"{self.party.name}.r*.pt"):
            if not keep(round_of(f)):
                f.unlink()


class SiteNotSetUp(RuntimeError):
    """A message reached a site that holds nothing of the run (a node started again after it was lost):
    the server counts it lost and sets it up again at the next round (:meth:`fed.flower.engine.FlowerHost.recover`)."""


class SiteStateLost(SiteNotSetUp):
    """The site's state within the round is gone (its long-lived process ended, and with persistence
    ``save_state`` nothing of the round is on its disk): counted lost, it rejoins at the next round from
    its last saved state."""


#: how an error reply (:func:`error_reason`) of a site that must be counted lost begins
LOST_ERRORS = tuple(f"{c.__name__}: " for c in (SiteNotSetUp, SiteStateLost))

#: whether this process serves a site's messages for the whole run (:mod:`fed.flower.sited`): the server
#: then keeps the site's state within a round in that process's memory only (persistence ``save_state``)
KEEPS_PARTY = False

#: this process's sites, by folder
_SITES: Dict[str, Site] = {}


def site_folder(nc, sites_root: Optional[str]) -> Path:
    """The node config's (``nc``) ``site-dir`` (a deployment), else ``<sites_root>/client{partition-id}``."""
    if SITE_DIR_KEY in nc:
        return Path(str(nc[SITE_DIR_KEY]))
    if sites_root is None or PARTITION_KEY not in nc:
        raise RuntimeError(f"this node has no site folder: set the node config key {SITE_DIR_KEY!r}")
    return Path(sites_root) / f"client{int(nc[PARTITION_KEY])}"


def node_declaration(nc, folder: Path) -> dict:
    """``{"site", "arch", "data-root"}`` of this node: its node config ``nc`` (a deployment) or ``node.json``."""
    if SITE_DIR_KEY not in nc and (folder / NODE).exists():
        return json.loads((folder / NODE).read_text())
    missing = [k for k in NODE_KEYS if not str(nc.get(k, ""))]
    if missing:
        raise RuntimeError(
            f"this node's config lacks {', '.join(repr(k) for k in missing)} ("
            + "; ".join(f"{k}: {NODE_KEYS[k]}" for k in missing) + "). A deployed site declares who it is, e.g. "
            "python -m fed.flower.supernode ... --node-config \"site-dir='/srv/hssf' site='Kvasir' arch='resnet34' data-root='/data'\"")
    return {k: str(nc[k]) for k in NODE_KEYS}


def resolve_files(folder: Path, node: dict, call) -> dict:
    """The setup message's split part resolved in the node's own data root (and verified): the site's
    ``entry.json``. Raises :class:`datasets.federation.DataError` listing every problem."""
    from datasets.federation import load_federation

    cfg = _as_config(json.loads(call["settings"]))
    site = node["site"]
    atomic_write_text(folder / SPLIT, call["split"])
    cfg.data.root, cfg.data.split, cfg.data.synthetic = node["data-root"], str(folder / SPLIT), None
    if bool(call["verify"]):
        from datasets.verify import verify_or_raise

        files = verify_or_raise(cfg, progress=False, clients=[site])
    else:
        files = load_federation(cfg, clients=[site])
    data = files.clients[list(cfg.data.clients).index(site)]
    entry = {"name": call["name"], "index": int(call["index"]), "site": site, "arch": node["arch"],
             "data": {k: items_to_json(v) for k, v in data.items()}, "public": items_to_json(files.public)}
    atomic_write_text(folder / ENTRY, json.dumps(entry))
    return entry


def _setup(folder: Path, node: dict, call) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    for f in (ENTRY, RUN, LIVE):  # nothing of an earlier run is used until this one's setup succeeds
        (folder / f).unlink(missing_ok=True)
    _SITES.pop(str(folder), None)
    entry = resolve_files(folder, node, call)
    info = {"run": call["run"], "settings": json.loads(call["settings"]), "device": call["device"],
            "threads": int(call["threads"]), "persist": call["persist"]}
    atomic_write_text(folder / RUN, json.dumps(info))
    site = Site(folder, info)
    _SITES[str(folder)] = site
    return {**site.entry, "files": {k: len(v) for k, v in entry["data"].items()}}


def _site(folder: Path, run: str, version: int) -> Site:
    """The site's party at ``version``: from this process's memory, else rebuilt (and restored)."""
    site = _SITES.get(str(folder))
    if site is None or site.run != run or (version == 0 and site.version != 0):
        info = json.loads((folder / RUN).read_text()) if (folder / RUN).exists() else {}
        if info.get("run") != run:
            raise SiteNotSetUp(f"{folder}: this site was not set up for run {run} (no setup message reached it: "
                               f"it was started after the run began, or restarted)")
        site = Site(folder, info)
        _SITES[str(folder)] = site
    if site.version == version:
        return site
    live = folder / LIVE
    if live.exists():
        state = torch.load(live, map_location="cpu", weights_only=True)
        if state["run"] == run and state["version"] == version:
            site.restore_live(state)
            site.restored = True
            return site
        on_disk = f"{live} holds version {state['version']}"
    else:
        on_disk = f"{live} does not exist"
    raise SiteStateLost(
        f"{site.party.name}: the message expects the site's state at version {version}; this process holds "
        f"version {site.version} and {on_disk} (persistence {site.persist!r}: with 'save_state' a site must be "
        f"served by one process between the run's save points)")


def serve(message: Message, context: Context, sites_root: Optional[str] = None) -> Message:
    """Answer one message: run its step on this node's party and reply, or reply with an error
    (``Type: message``, then :data:`TRACE` and the traceback)."""
    try:
        out = answer(message.content, message.metadata.message_type, context.node_config, sites_root)
        return Message(out, reply_to=message)
    except Exception as e:  # noqa: BLE001 - reported to the server, which decides
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=error_reason(e)), reply_to=message)


def error_reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}{TRACE}{traceback.format_exc()}"


def answer(content: RecordDict, message_type: str, node_config, sites_root: Optional[str] = None) -> RecordDict:
    """The reply's content to a message's ``content`` (of Flower type ``message_type``) at the node of
    ``node_config``; raises what the step raised. (:func:`serve` in a ``flwr-clientapp`` process, or a
    site's long-lived process, :mod:`fed.flower.sited`, which keeps the party loaded between messages.)"""
    from fed.core.calls import call as call_step, to_device

    call = content["call"]
    step = call["step"]
    folder = site_folder(node_config, sites_root)
    restored = False
    if step == HELLO:
        node = node_declaration(node_config, folder)
        reply = {"site": node["site"], "arch": node["arch"], "keeps": KEEPS_PARTY}
    elif step == SETUP:
        reply = _setup(folder, node_declaration(node_config, folder), call)
    else:
        version = int(call["version"])
        site = _site(folder, call["run"], version)
        restored, site.restored = site.restored, False
        torch.set_num_threads(site.threads)
        kw = decode_kw(content)
        if step in ("save_state", "load_state"):  # the site's own disk, whatever the server's folder is
            kw["folder"] = folder / STATE
        elif step in ("keep_weights", "kept_weights"):  # the site's checkpoints, until the server asks for them
            kw["folder"] = folder / KEPT
        if step == "test_weights":  # test overlays show the site's images: they stay on its disk
            kw["overlay_dir"] = folder / "test_overlays"
        msg = to_device(decode_payload(content), site.device)
        mutating = message_type.split(".")[0] == "train"
        try:
            reply = call_step(site.method, site.party, step, msg, kw)
        finally:
            if mutating:
                site.version = version + 1
                if site.persist == "message":
                    site.write_live()
        if step == "save_state":  # keep this round and the one before (the last committed)
            site.prune_states(lambda r: r >= kw["rnd"] - 1)
        elif step == "load_state":  # rounds after the committed one were never committed
            site.prune_states(lambda r: r <= kw["rnd"])
        reply = to_device(reply, "cpu")
    # who served it: the process, and whether it had to read the site's state from disk
    out = RecordDict({"call": ConfigRecord({"step": step, "pid": os.getpid(), "restored": restored})})
    encode_payload(reply, out)
    return out


def make_client_app(sites_root: Optional[str] = None) -> ClientApp:
    """The ClientApp: ``train`` messages change the site's state, ``query`` messages only read it.

    ``sites_root``: the simulation's folder of site folders (a deployed node names its own folder in
    its node config instead). The handlers only call :func:`serve`, a function of this importable
    module, so that every message served by a process finds that process's :data:`_SITES`.
    """
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return serve(message, context, sites_root)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return serve(message, context, sites_root)

    return app
