"""The ``dagster-octoai`` command. Imports no Dagster, so it starts fast.

``dagster-octoai serve`` runs the OctoAI-compatible server in the foreground;
``dagster-octoai serve --backend diffusers --models DIR [--device ...] [--dtype ...]``
serves Stable Diffusion models from a model directory, and ``dagster-octoai
tiny-models DIR`` writes one with tiny random weights.
Every :class:`~dagster_octoai.server.ServerConfig` field is an option, made from the
model itself so that none can be forgotten: ``--latency-per-image-s 0.5``,
``--replicas 2``, ``--rate-limit-requests 10``, ``--fault-error-500 0.1``,
``--banned-words a,b``, ``--no-fault-on-async-routes`` ... (see ``serve --help``).
Tokens are best given in the environment (``OCTOAI_TOKEN``, ``OCTOAI_ADMIN_TOKEN``) or a
config file, never on a command line that other users of the machine can read.

``dagster-octoai serve-ray`` deploys the same API on a Ray Serve cluster (the ``ray``
extra): see :mod:`dagster_octoai.server.ray_serve`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, SecretStr, ValidationError

if TYPE_CHECKING:
    from .ray_config import RayEndpointConfig

__all__ = ["main"]

_NONE_WORDS = ("none", "null", "")


def _parser_for(annotation: Any) -> tuple[Callable[[str], Any] | None, bool]:
    """(value parser, is_bool) for a field annotation; ``None`` parser for nested models."""
    args = typing.get_args(annotation)
    optional = (
        typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args
    )
    inner = next((a for a in args if a is not type(None)), annotation) if optional else annotation
    if inner is SecretStr:
        # A token is taken as typed: an empty one is refused by the model, never read as
        # "no token" (which once meant "accept any token").
        return str, False
    if inner is bool:
        return None, True
    if isinstance(inner, type) and issubclass(inner, BaseModel):
        return None, False
    if typing.get_origin(inner) is tuple:
        return (lambda text: tuple(w.strip() for w in text.split(",") if w.strip())), False
    if typing.get_origin(inner) is typing.Literal:
        # The model says what is allowed (its error names the choices); here it is text.
        inner = str
    base: Callable[[str], Any] = str if inner is SecretStr else inner

    def parse(text: str) -> Any:
        if optional and text.strip().lower() in _NONE_WORDS:
            return None
        return base(text)

    return parse, False


def _add_model_options(
    group: argparse._ArgumentGroup, model: type[BaseModel], prefix: str, skip: Sequence[str] = ()
) -> None:
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        parse, is_bool = _parser_for(field.annotation)
        flag = "--" + (prefix + name).replace("_", "-")
        default = field.get_default(call_default_factory=False)
        help_text = f"{field.description or ''} (default: {_show(default)})"
        dest = prefix.replace("-", "_") + name
        if is_bool:
            group.add_argument(
                flag,
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        elif parse is not None:
            is_list = typing.get_origin(field.annotation) is tuple
            group.add_argument(
                flag,
                dest=dest,
                type=parse,
                # A list option takes commas and repeats: --device cuda:0 --device cuda:1.
                action="extend" if is_list else "store",
                default=argparse.SUPPRESS,
                metavar="LIST" if is_list else name.upper(),
                help=help_text.replace("%", "%%"),
            )


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def _build_parser() -> argparse.ArgumentParser:
    from .config import ServerConfig

    parser = argparse.ArgumentParser(
        prog="dagster-octoai", description="dagster-octoai command-line tools."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_serve(commands)
    _add_tiny_models(commands)
    _add_serve_ray(commands, ServerConfig)
    return parser


def _add_serve(commands: Any) -> None:
    from .config import FaultConfig, ServerConfig

    serve = commands.add_parser(
        "serve",
        help="run the local OctoAI-compatible image server",
        description=(
            "Run the OctoAI-compatible image server in the foreground. It is private: the "
            "token comes from the OCTOAI_TOKEN environment variable, the config file or "
            "--token (seen by other users in the process list), and without one it does not "
            "start unless --public. The /_local control routes are off unless "
            "--control-routes, with the admin token from OCTOAI_ADMIN_TOKEN."
        ),
    )
    _add_listen_options(serve)
    _add_tls_options(serve)
    service = serve.add_argument_group("service behaviour (ServerConfig)")
    _add_model_options(service, ServerConfig, "", skip=("faults",))
    faults = serve.add_argument_group("fault injection (FaultConfig)")
    _add_model_options(faults, FaultConfig, "fault-")


def _add_listen_options(serve: argparse.ArgumentParser) -> None:
    where = serve.add_argument_group("where to listen")
    where.add_argument("--host", default="127.0.0.1", help="interface (default: 127.0.0.1)")
    where.add_argument(
        "--port", type=int, default=8000, help="port, 0 = any free one (default: 8000)"
    )
    where.add_argument(
        "--fd", type=int, default=None, help="serve on this inherited listening socket"
    )
    where.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn's log level (default: info)",
    )
    where.add_argument(
        "--access-log",
        action="store_true",
        help="log every request (method, path, status; paths hold no tokens)",
    )
    where.add_argument(
        "--config",
        type=Path,
        default=None,
        help="a JSON file of ServerConfig fields; options given here override it",
    )
    where.add_argument(
        "--print-config",
        action="store_true",
        help="print the resulting configuration (tokens left out) and exit",
    )


def _add_tls_options(serve: argparse.ArgumentParser) -> None:
    tls = serve.add_argument_group("HTTPS (or terminate TLS at a reverse proxy: docs/endpoint.md)")
    tls.add_argument("--ssl-certfile", default=None, help="the certificate chain (PEM)")
    tls.add_argument("--ssl-keyfile", default=None, help="its private key (PEM)")
    tls.add_argument(
        "--ssl-keyfile-password-env",
        default=None,
        metavar="VAR",
        help="the environment variable holding the key's password, if it has one",
    )
    tls.add_argument(
        "--forwarded-allow-ips",
        default=None,
        metavar="IPS",
        help="proxies whose X-Forwarded-For/-Proto are trusted (default: 127.0.0.1)",
    )


def _add_tiny_models(commands: Any) -> None:
    tiny = commands.add_parser(
        "tiny-models",
        help="write a tiny random-weight model directory for the diffusers backend",
        description=(
            "Write a model directory for 'serve --backend diffusers --models DIR': SDXL, "
            "SD 1.5, the SDXL refiner, ControlNets, LoRAs, textual inversions and VAEs with "
            "tiny random weights, built offline from configs (no download). Its images are "
            "noise; the layout is the one real weights use. Needs the diffusion extra."
        ),
    )
    tiny.add_argument("directory", type=Path, metavar="DIR", help="where to write (empty or new)")
    tiny.add_argument(
        "--scale",
        choices=["tiny", "full"],
        default="tiny",
        help="tiny (a few MB, seconds per image on a CPU; default) or full (the real SDXL "
        "and SD 1.5 architectures, random fp16 weights, ~10 GB, for GPU benchmarks)",
    )
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")


def _add_serve_ray(commands: Any, server_config: type[BaseModel]) -> None:
    from .ray_config import RayEndpointConfig

    ray = commands.add_parser(
        "serve-ray",
        help="deploy the OctoAI-compatible API on Ray Serve (the ray extra)",
        description=(
            "Deploy the same API on a Ray Serve cluster: one generator replica per GPU (a CPU "
            "slot on CPU), scaling between --min-replicas and --max-replicas, idle replicas "
            "removed after --idle-timeout-s (0 replicas: scale to zero), sync requests beyond "
            "the replicas queued up to --max-queued-requests per frontend, then 429. Tokens "
            "as for 'serve' (OCTOAI_TOKEN, OCTOAI_ADMIN_TOKEN). Runs until Ctrl-C or SIGTERM, "
            "then removes the application (--detach leaves it running)."
        ),
    )
    cluster = ray.add_argument_group("the Ray cluster")
    cluster.add_argument(
        "--address",
        default=None,
        help="a running cluster ('auto', or ray://host:10001 / GCS host:port); "
        "default: start a local one",
    )
    cluster.add_argument(
        "--allow-ray-without-token-auth",
        action="store_true",
        help="connect to a --address cluster that has no Ray token authentication "
        "(anyone who reaches such a cluster runs code on it; see docs/deploying.md)",
    )
    cluster.add_argument(
        "--ray-dashboard",
        action="store_true",
        help="a local cluster's Ray dashboard, on 127.0.0.1 (default: off)",
    )
    cluster.add_argument("--num-cpus", type=int, default=None, help="a local cluster's CPUs")
    cluster.add_argument("--num-gpus", type=int, default=None, help="a local cluster's GPUs")
    cluster.add_argument("--host", default="127.0.0.1", help="the HTTP proxy's interface")
    cluster.add_argument("--port", type=int, default=8000, help="the HTTP proxy's port")
    cluster.add_argument("--app-name", default="octoai", help="the Serve application's name")
    cluster.add_argument("--route-prefix", default="/", help="where the API is mounted")
    cluster.add_argument(
        "--detach", action="store_true", help="deploy and exit, leaving the application running"
    )
    cluster.add_argument(
        "--config", type=Path, default=None, help="a JSON file of ServerConfig fields"
    )
    cluster.add_argument("--ssl-certfile", default=None, help="HTTPS at the proxy: certificate")
    cluster.add_argument("--ssl-keyfile", default=None, help="HTTPS at the proxy: private key")
    scaling = ray.add_argument_group("scaling (RayEndpointConfig)")
    _add_model_options(scaling, RayEndpointConfig, "", skip=("server",))
    service = ray.add_argument_group("service behaviour (ServerConfig)")
    # Replicas and their queue are Ray Serve's here (the scaling options above).
    _add_model_options(
        service,
        server_config,
        "",
        skip=("faults", "replicas", "max_queued_requests", "queue_retry_after_s"),
    )


def _load_config(args: argparse.Namespace, *, default_store: bool = True) -> Any:
    from .config import FaultConfig, ServerConfig
    from .runner import CONFIG_ENV

    base: dict[str, Any] = {}
    if args.config is not None:
        base = json.loads(args.config.read_text())
    elif os.environ.get(CONFIG_ENV):
        base = json.loads(os.environ[CONFIG_ENV])
    # The environment's tokens fill in what the file leaves out; options override both.
    for env, name in (("OCTOAI_TOKEN", "token"), ("OCTOAI_ADMIN_TOKEN", "admin_token")):
        if env in os.environ and name not in base and CONFIG_ENV not in os.environ:
            base[name] = os.environ[env]
    values = vars(args)
    changes: dict[str, Any] = {n: values[n] for n in ServerConfig.model_fields if n in values}
    fault_changes = {
        n: values["fault_" + n] for n in FaultConfig.model_fields if "fault_" + n in values
    }
    if fault_changes:
        changes["faults"] = fault_changes
    config = ServerConfig.model_validate(base).updated(changes)
    # An operator's server keeps its async jobs on disk unless told where else (or
    # '--state-dir none': in memory); a harness's child process is told everything.
    named = {"state_dir", "jobs_url"} & (set(base) | set(changes))
    if default_store and not named and CONFIG_ENV not in os.environ:
        config = config.updated({"state_dir": str(default_state_dir())})
    return config


def default_state_dir() -> Path:
    """Where ``dagster-octoai serve`` keeps async jobs by default.

    ``$DAGSTER_OCTOAI_STATE_DIR``, else ``$XDG_STATE_HOME/dagster-octoai/jobs``, else
    ``~/.local/state/dagster-octoai/jobs``.
    """
    if explicit := os.environ.get("DAGSTER_OCTOAI_STATE_DIR"):
        return Path(explicit)
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "dagster-octoai" / "jobs"


def _serve_ray(args: argparse.Namespace) -> int:
    # Ray installs its own C-level SIGTERM handler in the driver, which aborts the process
    # after our cleanup, and starts threads (some when imported) that would take the signal.
    # Connected to a running cluster, the signals are blocked first, before anything imports
    # Ray, so that they reach no thread's handler: the main thread takes them with sigwait.
    # A local cluster's processes would inherit a blocked mask (and outlive ray.shutdown),
    # so there a Python handler waits instead, and the process leaves with os._exit once
    # everything is cleaned up.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    if args.address is None:
        code = _serve_ray_blocked(args, None)
        if "ray" in sys.modules:  # a cluster was started (and is stopped by now)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        return _serve_ray_blocked(args, stop_signals)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)


def _serve_ray_blocked(args: argparse.Namespace, stop_signals: set[signal.Signals] | None) -> int:
    endpoint = _ray_endpoint(args)
    if endpoint is None or not _ray_address_allowed(args):
        return 2
    try:
        import ray

        from .ray_serve import deploy, start_local_cluster, start_serve
    except ImportError as exc:
        print(
            f"dagster-octoai serve-ray: needs the ray extra ({exc.name} is missing): "
            "pip install 'dagster-octoai[server,ray]'",
            file=sys.stderr,
        )
        return 2
    local = args.address is None
    token = None
    try:
        if local:
            token = start_local_cluster(
                num_cpus=args.num_cpus, num_gpus=args.num_gpus, dashboard=args.ray_dashboard
            )
        else:
            ray.init(address=args.address, configure_logging=False)
        http: dict[str, Any] = {"host": args.host, "port": args.port}
        if args.ssl_certfile is not None:
            http.update(ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
        start_serve(http)
        deploy(endpoint, name=args.app_name, route_prefix=args.route_prefix)
        scheme = "https" if args.ssl_certfile else "http"
        prefix = args.route_prefix.rstrip("/")
        url = f"{scheme}://{args.host}:{args.port}{prefix}"
        print(_describe(endpoint.server, url), file=sys.stderr, flush=True)
        print(
            f"  on Ray Serve: replicas {endpoint.min_replicas}..{endpoint.max_replicas}, idle "
            f"timeout {endpoint.idle_timeout_s:g} s, queue {endpoint.max_queued_requests} "
            f"per frontend ({endpoint.frontend_replicas})",
            file=sys.stderr,
            flush=True,
        )
        if not args.detach:
            _wait_then_stop(args, stop_signals, local=local)
    finally:
        # Disconnect this driver cleanly (Ray's core worker aborts at exit otherwise).
        ray.shutdown()
        if token is not None:
            token.remove()
    return 0


def _ray_endpoint(args: argparse.Namespace) -> RayEndpointConfig | None:
    """The Ray endpoint's configuration from the command line, or ``None`` (said why)."""
    from .ray_config import RayEndpointConfig

    try:
        server = _load_config(args, default_store=False)
        values = vars(args)
        fields = {n: values[n] for n in RayEndpointConfig.model_fields if n in values}
        endpoint = RayEndpointConfig(server=server, **fields)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            loc = ".".join(str(p) for p in err["loc"]) or "config"
            print(f"dagster-octoai serve-ray: {loc}: {err['msg']}", file=sys.stderr)
        return None
    except (OSError, json.JSONDecodeError) as exc:
        print(f"dagster-octoai serve-ray: cannot read the configuration: {exc}", file=sys.stderr)
        return None
    if (problem := server.startup_problem()) is not None:
        print(f"dagster-octoai serve-ray: {problem}", file=sys.stderr)
        return None
    return endpoint


def _ray_address_allowed(args: argparse.Namespace) -> bool:
    """Whether ``--address`` names a cluster this command may join (said why not)."""
    if args.address is None:
        return True
    from .ray_security import LOOPBACK_ENV, is_loopback_address, token_auth_problem

    if is_loopback_address(args.address):
        # A loopback cluster's address is its node address: Ray must not swap it for
        # the host's network address (set before Ray is imported).
        os.environ.update(LOOPBACK_ENV)

    if (problem := token_auth_problem(os.environ)) is not None:
        if not args.allow_ray_without_token_auth:
            print(f"dagster-octoai serve-ray: refused: {problem}", file=sys.stderr)
            return False
        print(
            "dagster-octoai serve-ray: WARNING: connecting to a Ray cluster WITHOUT "
            "token authentication (--allow-ray-without-token-auth): anyone who reaches "
            "it can run code on it",
            file=sys.stderr,
            flush=True,
        )
    return True


def _wait_then_stop(
    args: argparse.Namespace, stop_signals: set[signal.Signals] | None, *, local: bool
) -> None:
    """Wait for a stop signal, then delete the application (and stop Serve if local)."""
    from ray import serve as ray_serve

    if stop_signals is not None:
        signal.sigwait(stop_signals)
    else:
        signal.signal(signal.SIGTERM, _exit_cleanly)
        with contextlib.suppress(KeyboardInterrupt, SystemExit):
            while True:
                signal.pause()
    # Serve lets each replica finish what it is doing first (up to the graceful
    # shutdown timeout): say what the stop waits on.
    print(
        f"dagster-octoai serve-ray: stopping: deleting application {args.app_name!r}",
        file=sys.stderr,
        flush=True,
    )
    ray_serve.delete(args.app_name)
    if local:
        print("dagster-octoai serve-ray: stopping Serve", file=sys.stderr, flush=True)
        ray_serve.shutdown()  # type: ignore[no-untyped-call]
    print("dagster-octoai serve-ray: stopped", file=sys.stderr, flush=True)


def _describe(config: Any, url: str, backend: Any = None) -> str:
    """The start-up banner: what the server answers, with what a loaded backend says of
    itself (its engines, one replica per device) over the configuration's defaults."""
    tokens = len(config.api_tokens())
    from ..api.models import Engine

    engines = [Engine(e).value for e in getattr(backend, "engines", None) or Engine]
    replicas = getattr(backend, "replicas", None) or config.replicas
    if config.public:
        auth = "public: any bearer token"
    else:
        auth = f"private: {tokens} token{'s' if tokens != 1 else ''}"
    lines = [
        f"dagster-octoai OctoAI-compatible server on {url}",
        f"  generate: POST {url}/generate/{{{','.join(engines)}}}",
        f"  auth: {auth}; replicas: {replicas}; "
        f"latency: {config.latency_per_image_s:g} s/image; results kept {config.result_ttl_s:g} s",
        f"  OpenAPI: {url}/openapi.json"
        + (f"; playground: {url}/playground" if config.playground else ""),
        "  control routes: "
        + (f"on, admin token only (GET {url}/_local/stats)" if config.control_routes else "off"),
        f"  backend: {config.backend}",
        "  async jobs: "
        + (
            config.jobs_url
            or (f"directory {config.state_dir}" if config.state_dir else "in memory (lost on exit)")
        ),
    ]
    if config.faults.total or config.faults.job_failure:
        lines.append(f"  faults: {config.faults.model_dump(exclude_defaults=True)}")
    return "\n".join(lines)


def _serve(args: argparse.Namespace) -> int:
    try:
        config = _load_config(args)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            loc = ".".join(str(p) for p in err["loc"]) or "config"
            print(f"dagster-octoai serve: {loc}: {err['msg']}", file=sys.stderr)
        return 2
    except (OSError, json.JSONDecodeError) as exc:
        print(f"dagster-octoai serve: cannot read the configuration: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config.public_dict(), indent=2))
        return 0
    if (problem := config.startup_problem()) is not None:
        print(f"dagster-octoai serve: {problem}", file=sys.stderr)
        return 2
    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        print("dagster-octoai serve: --ssl-certfile and --ssl-keyfile go together", file=sys.stderr)
        return 2

    import socket

    from ..api.errors import StorageError
    from .app import create_app
    from .backends import BackendError
    from .runner import TLSFiles, _url, bind_socket, serve

    tls = (
        TLSFiles(args.ssl_certfile, args.ssl_keyfile, args.ssl_keyfile_password_env)
        if args.ssl_certfile is not None
        else None
    )

    try:
        # Loaded before listening: a wrong model directory or device fails here, clearly.
        app = create_app(config)
    except (BackendError, StorageError) as exc:
        print(f"dagster-octoai serve: {exc}", file=sys.stderr)
        return 2

    if args.fd is not None:
        sock = socket.socket(fileno=args.fd)
    else:
        try:
            sock = bind_socket(args.host, args.port)
        except OSError as exc:
            print(
                f"dagster-octoai serve: cannot listen on {args.host}:{args.port}: {exc}",
                file=sys.stderr,
            )
            return 2
    host, port = sock.getsockname()[:2]
    if args.log_level in ("info", "debug", "trace"):
        url = _url(host, port)
        if tls is not None:
            url = "https" + url[len("http") :]
        print(_describe(config, url, app.state.octoai.backend), file=sys.stderr, flush=True)
        for line in _backend_lines(app.state.octoai.backend.describe()):
            print(f"    {line}", file=sys.stderr, flush=True)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal to
    # the previous handler: make that a clean exit rather than a traceback or a kill.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    with contextlib.suppress(KeyboardInterrupt):
        serve(
            config,
            sock,
            log_level=args.log_level,
            app=app,
            tls=tls,
            forwarded_allow_ips=args.forwarded_allow_ips,
            access_log=args.access_log,
        )
    return 0


def _tiny_models(args: argparse.Namespace) -> int:
    import time

    try:
        from .backends.diffusers.tiny import write_models
    except ImportError as exc:
        print(
            f"dagster-octoai tiny-models: needs the diffusion extra ({exc.name} is missing): "
            "pip install 'dagster-octoai[server,diffusion]'",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    try:
        root = write_models(args.directory, scale=args.scale, seed=args.seed)
    except FileExistsError as exc:
        print(f"dagster-octoai tiny-models: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.scale} random-weight models to {root} in "
        f"{time.perf_counter() - started:.1f} s (their images are noise)\n"
        f"serve them: dagster-octoai serve --backend diffusers --models {root}"
    )
    return 0


def _backend_lines(description: dict[str, Any]) -> list[str]:
    return [
        f"{key}: {value if isinstance(value, str) else json.dumps(value)}"
        for key, value in description.items()
        if key != "backend"
    ]


def _exit_cleanly(signum: int, frame: types.FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dagster-octoai`` with ``argv`` (default: the process's arguments)."""
    args = _build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "serve-ray":
        return _serve_ray(args)
    if args.command == "tiny-models":
        return _tiny_models(args)
    return 2  # argparse refuses unknown commands before this


if __name__ == "__main__":
    sys.exit(main())
