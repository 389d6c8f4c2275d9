"""A SuperNode's ClientApp tasks served by one warm process instead of a fresh process per message.

Flower 1.42's SuperNode hands each message to its SuperExec (``flower-superexec``), which starts a new
``flwr-clientapp`` process for it: a Python start, Flower's imports (about a second here), unpacking the
FAB, loading the ClientApp, connecting, then the message. On a federation whose rounds are a dozen short
messages in a row that is most of a deployment round (``bench/deploy_exchange.py --speed``).

This module is a SuperExec for ClientApp tasks that runs each task in its own process, one after the
other, with Flower's own functions for every exchange with the SuperNode (``AcquireTask``, then
``pull_task_input``, the ClientApp, ``push_message``, ``push_task_output``, with the task's heartbeat
meanwhile, as ``flwr-clientapp`` does): the FAB is unpacked and its ClientApp loaded once per FAB.
:mod:`fed.flower.supernode` starts it in place of ``flower-superexec`` (``--warm``, the default); it takes
the arguments the SuperNode gives ``flower-superexec`` (``--insecure`` or ``--root-certificates``,
``--runtime-api-address``, ``--parent-pid``) and ends with its parent.

What a task does is unchanged: the same ClientApp (``flower_app``'s, which hands the message to the
site's process), the same message, reply and errors (an exception in the ClientApp is the reply
``Error(CLIENT_APP_RAISED_EXCEPTION)``, as in ``flwr-clientapp``). What changes is only that the ClientApps
of one site share a process, so one that corrupts the interpreter would affect the next; ours only
forwards messages.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from typing import Callable, Dict, Optional

from flwr.app import Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from utils import timeline

from .supernode import PULL_WAIT_S, quick_pulls

POLL_S = 0.05  # how often the idle process asks its SuperNode for a task (each ask is an HTTP request)


def serve_task(address: str, token: str, insecure: bool, certificates: Optional[bytes],
               load_app: Callable) -> str:
    """Run one ClientApp task (``token``) as ``flwr-clientapp`` would, in this process; its sub-status."""
    retry = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry)
    beat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = reply = context = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    times = {"took": time.time()}
    try:
        beat.start()
        message, context, run, fab = pull_task_input(client)
        times["pulled"] = time.time()
        app = load_app(run, fab)
        reply = app(message=message, context=context)
        times["answered"] = time.time()
        status, details = SubStatus.COMPLETED, ""
    except Exception as e:  # noqa: BLE001 - the reply says it, as flwr-clientapp's does
        traceback.print_exc()
        details = f"{type(e)}:<'{e}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        finally:
            retry.max_tries = 1
            push_task_output(client=client, context=context, sub_status=status, details=details)
            if beat.is_running:
                beat.stop()
            client.close()
            timeline.mark(who="warm", **times, pushed=time.time())
    return status


class AppCache:
    """The ClientApp of each FAB, unpacked and loaded once (``flwr-clientapp`` does both per message)."""

    def __init__(self):
        self.apps: Dict[str, object] = {}

    def __call__(self, run, fab):
        if fab.hash_str not in self.apps:
            install_from_fab(fab.content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            self.apps[fab.hash_str] = load(run.fab_id, run.fab_version, fab.hash_str)
        return self.apps[fab.hash_str]


def serve(address: str, insecure: bool, root_certificates_path: Optional[str] = None,
          parent_pid: Optional[int] = None, poll_s: float = POLL_S, pull_wait_s: float = PULL_WAIT_S) -> None:
    """Ask the SuperNode at ``address`` for ClientApp tasks and run each here, until the parent ends; a
    message's objects not there yet are asked for again after ``pull_wait_s`` (:func:`~fed.flower.supernode.quick_pulls`)."""
    quick_pulls(pull_wait_s)
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    certificates = validate_and_resolve_root_certificates(root_certificates_path, insecure)
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker())
    apps = AppCache()
    print(f"warm ClientApp process serving the SuperNode at {address}", flush=True)
    try:
        while True:
            try:
                got = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except Exception as e:  # noqa: BLE001 - after Flower's own retries: the SuperNode is gone
                print(f"the SuperNode at {address} does not answer ({type(e).__name__}: {e}): exiting", flush=True)
                return
            if got.HasField("task") and got.token:
                serve_task(address, got.token, insecure, certificates, apps)
            else:
                time.sleep(poll_s)
    finally:
        client.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Serve a SuperNode's ClientApp tasks in this one process "
                                             "(in place of flower-superexec).")
    ap.add_argument("--pull-wait-s", type=float, default=PULL_WAIT_S,
                    help="first wait before asking again for a message's missing objects (Flower's: 1)")
    ap.add_argument("--insecure", action="store_true")
    ap.add_argument("--root-certificates", default=None)
    ap.add_argument("--runtime-api-address", required=True)
    ap.add_argument("--parent-pid", type=int, default=None)
    ap.add_argument("--allow-runtime-dependency-installation", action="store_true",
                    help="refused: this process installs nothing")
    a = ap.parse_args(argv)
    if a.allow_runtime_dependency_installation:
        ap.error("runtime dependency installation is not supported by the warm process: run the SuperNode "
                 "without --warm (python -m fed.flower.supernode --cold)")
    serve(a.runtime_api_address, a.insecure, a.root_certificates, a.parent_pid, pull_wait_s=a.pull_wait_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
