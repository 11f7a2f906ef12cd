"""The Ray cluster closed to the network: loopback only, token authentication on.

A Ray cluster runs whatever code a client that reaches its GCS submits: anyone who can
connect to it can run code on it. So a local cluster that ``serve-ray`` starts

- binds every Ray port (GCS, raylet, object manager, dashboard agent, runtime-env agent,
  every worker's port) to the loopback interface. Ray has no bind-address option: its
  gRPC servers listen on the *node address*, and Ray turns a loopback node address into
  the host's network address unless single-machine mode is on
  (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which has no other effect on Linux);
- runs with Ray's token authentication (``RAY_AUTH_MODE=token``) and a token generated
  for this cluster, written to a file only this user can read (0600, in a 0700 folder).
  Ray's processes are given the file's *path* (``RAY_AUTH_TOKEN_PATH``): the token itself
  is in no command line, no process environment and no log line.

Connecting to a running cluster, ``serve-ray`` insists on token authentication
(``RAY_AUTH_MODE=token`` and a token) unless the operator says
``--allow-ray-without-token-auth``.

Ray is imported inside the functions (a caller that never starts a cluster needs no Ray).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "AUTH_MODE_ENV",
    "LOOPBACK_ENV",
    "TOKEN_ENV",
    "TOKEN_PATH_ENV",
    "ClusterToken",
    "bind_serve_replicas_to_the_node_address",
    "closed_cluster_environment",
    "is_loopback_address",
    "token_auth_problem",
]

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
# Ray's single-machine mode: the node address (and so every listener) is the loopback one.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
ALLOW_FLAG = "--allow-ray-without-token-auth"


@dataclass(frozen=True)
class ClusterToken:
    """A generated Ray token in a private file; :meth:`remove` deletes it."""

    folder: Path

    @property
    def path(self) -> Path:
        return self.folder / "auth_token"

    @classmethod
    def generate(cls) -> ClusterToken:
        folder = Path(tempfile.mkdtemp(prefix="dagster-octoai-ray-"))  # 0700
        token = cls(folder)
        fd = os.open(token.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_hex(32))
        return token

    def env(self) -> dict[str, str]:
        """What another driver on this machine needs to connect (a path, not the token)."""
        return {**LOOPBACK_ENV, AUTH_MODE_ENV: "token", TOKEN_PATH_ENV: str(self.path)}

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def closed_cluster_environment(token: ClusterToken | None) -> Iterator[None]:
    """The environment a new local cluster starts in: loopback, token authentication.

    Ray's processes inherit the driver's environment when they start; this process's
    environment is put back afterwards. The driver's own view of Ray's settings (read
    when Ray was imported) is refreshed too, so that it sends the token and picks the
    loopback node address.
    """
    import ray._private.ray_constants as ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    changes = dict(LOOPBACK_ENV)
    if token is not None:
        changes.update(token.env())
    names = [*changes, TOKEN_ENV]
    saved = {name: os.environ.get(name) for name in names}
    was_cluster = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(changes)
    if token is not None:
        # A token in the environment would win over the file, and be inherited by every
        # process of the cluster.
        os.environ.pop(TOKEN_ENV, None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = was_cluster
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def is_loopback_address(address: str) -> bool:
    """Whether a cluster address (``host:port``, ``ray://host:port``) is on this machine only.

    Examples:
        >>> is_loopback_address("127.0.0.1:6379"), is_loopback_address("10.0.0.5:6379")
        (True, False)
    """
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_auth_problem(environ: dict[str, str] | os._Environ[str]) -> str | None:
    """Why connecting to a running cluster with this environment is not authenticated."""
    mode = environ.get(AUTH_MODE_ENV, "").strip().lower()
    if mode != "token":
        return (
            f"{AUTH_MODE_ENV} is {mode or 'unset'}: a Ray cluster without token "
            "authentication runs code for anyone who can reach it. Start the cluster with "
            f"{AUTH_MODE_ENV}=token on every node, set {AUTH_MODE_ENV}=token and "
            f"{TOKEN_PATH_ENV} (or {TOKEN_ENV}) here, or pass {ALLOW_FLAG} to connect anyway "
            "(docs/deploying.md)"
        )
    if not environ.get(TOKEN_ENV) and not environ.get(TOKEN_PATH_ENV):
        default = Path.home() / ".ray" / "auth_token"
        if not default.is_file():
            return (
                f"{AUTH_MODE_ENV}=token but no token: set {TOKEN_PATH_ENV} to the cluster's "
                f"token file (or {TOKEN_ENV}, or write ~/.ray/auth_token)"
            )
    return None


def bind_serve_replicas_to_the_node_address() -> None:
    """Serve replicas' inter-deployment gRPC server on the node address, not every interface.

    Ray Serve 2.60 starts that server on ``[::]:0`` in every replica (no option changes
    it): on a loopback cluster it would be the one port open to the network. Each of this
    package's deployments calls this in its constructor, before that server starts, so the
    address is rewritten to the node's own (loopback on a local cluster, the
    private address on a multi-node one). A Serve without that function is left as it is.
    """
    import ray
    from ray.serve._private import replica

    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "_binds_node_address", False):
        return

    def add_port(server: object, address: str) -> int:
        if address.startswith("[::]:"):
            host = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
            host = f"[{host}]" if ":" in host else host
            address = f"{host}:{address.rsplit(':', 1)[1]}"
        port: int = original(server, address)
        return port

    add_port._binds_node_address = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port  # type: ignore[attr-defined]
