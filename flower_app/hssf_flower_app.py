"""Entry points of the Flower App: the ServerApp and ClientApp of :mod:`fed.flower.deploy` (assigned
here by name: ``flwr run`` checks the components statically)."""
from fed.flower import deploy as _deploy

server_app = _deploy.server_app
client_app = _deploy.client_app
