"""The local OctoAI-compatible server: OctoAI's image API on this machine, no GPU needed.

For development, demos and tests. It speaks the wire contract of the hosted service
(sync and async generation, polling, bearer auth, FastAPI-style 422s, the policy 400),
renders deterministic pictures without model weights, and behaves like a real service
when asked to: per-image latency, replicas that queue, result expiry, rate limits and
reproducible fault injection. Needs the ``server`` extra (Starlette and uvicorn).

Examples:
    >>> from dagster_octoai.server import LocalOctoAIServer, ServerConfig
    >>> with LocalOctoAIServer(ServerConfig(token="t0k", replicas=2)) as srv:
    ...     srv.url.startswith("http://127.0.0.1:")
    True
"""

from .app import create_app as create_app
from .config import FaultConfig as FaultConfig, ServerConfig as ServerConfig
from .runner import LocalOctoAIServer as LocalOctoAIServer

__all__ = ["FaultConfig", "LocalOctoAIServer", "ServerConfig", "create_app"]
