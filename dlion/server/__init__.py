"""The dedicated parameter server: its messages, the worker's client, and the server loop."""

from dlion.server.client import Roles, ServerClient, ServerLink, split_server
from dlion.server.protocol import FORMAT, MAGIC, Hello, header_error
from dlion.server.ps import ParameterServer, WorkerLost

__all__ = [
    "FORMAT",
    "MAGIC",
    "Hello",
    "ParameterServer",
    "Roles",
    "ServerClient",
    "ServerLink",
    "WorkerLost",
    "header_error",
    "split_server",
]
