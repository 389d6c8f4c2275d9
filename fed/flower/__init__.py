"""The federation on Flower (flwr 1.42, Message API): client steps travel as Flower Messages.

- :mod:`fed.flower.codec`: how a step's call, keyword arguments and payload become a ``RecordDict``
  (and back), losslessly.
- :mod:`fed.flower.site`: the ClientApp side: a site builds (or restores) its party from the run's
  settings and its own entry, runs ``fed.core.calls.call`` and replies; its state lives on its own disk.
- :mod:`fed.flower.engine`: :class:`~fed.flower.engine.FlowerHost`, the client host
  (:class:`fed.core.hosts.ClientHost`) whose clients are Flower nodes on a Grid, and
  :class:`~fed.flower.engine.SimulationHost`, the nodes of a simulation (Ray backend); the runner and the
  server party stay here. :mod:`fed.flower.deploy`: the host of a deployment and its launcher.

Nothing else in the project imports Flower; ``fed.core.runner.make_runner(..., engine="flower-sim")``
picks this engine. Importing this package switches off everything of Flower and Ray that would
reach the network: Flower's telemetry, its update check and runtime dependency installation (the
last two are only used by Flower's command-line services, i.e. a later deployment), and Ray's usage
statistics. They must be set before ``flwr`` or ``ray`` is imported; Ray's processes inherit them.
"""
import os

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

try:
    import flwr  # noqa: F401,E402
    import ray  # noqa: F401,E402
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"the Flower engine needs Flower 1.42 with its simulation backend ({e}): "
                      f"pip install -r requirements-flower.txt") from e
