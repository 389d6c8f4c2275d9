"""The ClientApp of the deployment: hands each message to the site's long-lived process
(:mod:`fed.flower.sited`, which keeps the site's party loaded) and returns its reply; where that process
is not running, serves the message itself (:func:`fed.flower.site.serve`).

This module imports only Flower and the standard library: a SuperNode starts a fresh process for every
message, and importing this project (torch, the models) there would cost seconds each time.
"""
import json
from multiprocessing.connection import Client
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.serde import ProtoRecordDict, recorddict_from_proto, recorddict_to_proto

SITE_DIR_KEY = "site-dir"
INFO, KEY = "sited.json", "sited.key"  # what fed.flower.sited writes in the site's folder


def _forward(message: Message, context: Context):
    """The site process's reply, or None where none is running."""
    folder = Path(str(context.node_config.get(SITE_DIR_KEY, "")))
    try:
        address = json.loads((folder / INFO).read_text())["address"]
        key = (folder / KEY).read_bytes()
        conn = Client(address, family="AF_UNIX", authkey=key)
    except (OSError, ValueError, KeyError, EOFError):
        return None
    with conn:
        conn.send({"node_config": dict(context.node_config), "type": message.metadata.message_type,
                   "content": recorddict_to_proto(message.content).SerializeToString()})
        status, payload = conn.recv()
    if status == "ok":
        return Message(recorddict_from_proto(ProtoRecordDict.FromString(payload)), reply_to=message)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=payload), reply_to=message)


def _handle(message: Message, context: Context) -> Message:
    try:
        reply = _forward(message, context)
    except (OSError, EOFError):  # the site process went away mid-message: serve it here
        reply = None
    if reply is not None:
        return reply
    from fed.flower.site import serve

    return serve(message, context)


client_app = ClientApp()


@client_app.train()
def train(message: Message, context: Context) -> Message:
    return _handle(message, context)


@client_app.query()
def query(message: Message, context: Context) -> Message:
    return _handle(message, context)
