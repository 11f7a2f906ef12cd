"""The ``dagster-octoai`` command. Imports no Dagster, so it starts fast.

``dagster-octoai serve`` runs the local OctoAI-compatible server in the foreground.
Every :class:`~dagster_octoai.server.ServerConfig` field is an option, made from the
model itself so that none can be forgotten: ``--latency-per-image-s 0.5``,
``--replicas 2``, ``--rate-limit-requests 10``, ``--fault-error-500 0.1``,
``--banned-words a,b``, ``--no-fault-on-async-routes`` ... (see ``serve --help``).
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
from typing import Any

from pydantic import BaseModel, SecretStr, ValidationError

__all__ = ["main"]

_NONE_WORDS = ("none", "null", "")


def _parser_for(annotation: Any) -> tuple[Callable[[str], Any] | None, bool]:
    """(value parser, is_bool) for a field annotation; ``None`` parser for nested models."""
    args = typing.get_args(annotation)
    optional = (
        typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args
    )
    inner = next((a for a in args if a is not type(None)), annotation) if optional else annotation
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
            metavar = "LIST" if typing.get_origin(field.annotation) is tuple else name.upper()
            group.add_argument(
                flag,
                dest=dest,
                type=parse,
                default=argparse.SUPPRESS,
                metavar=metavar,
                help=help_text.replace("%", "%%"),
            )


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def _build_parser() -> argparse.ArgumentParser:
    from .server.config import FaultConfig, ServerConfig

    parser = argparse.ArgumentParser(
        prog="dagster-octoai", description="dagster-octoai command-line tools."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the local OctoAI-compatible image server",
        description=(
            "Run the local OctoAI-compatible image server in the foreground. "
            "The token comes from --token, the config file, or the OCTOAI_TOKEN environment "
            "variable; without one, any bearer token is accepted (but one is required)."
        ),
    )
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
    service = serve.add_argument_group("service behaviour (ServerConfig)")
    _add_model_options(service, ServerConfig, "", skip=("faults",))
    faults = serve.add_argument_group("fault injection (FaultConfig)")
    _add_model_options(faults, FaultConfig, "fault-")
    return parser


def _load_config(args: argparse.Namespace) -> Any:
    from .server.config import FaultConfig, ServerConfig
    from .server.runner import CONFIG_ENV

    base: dict[str, Any] = {}
    if args.config is not None:
        base = json.loads(args.config.read_text())
    elif os.environ.get(CONFIG_ENV):
        base = json.loads(os.environ[CONFIG_ENV])
    elif os.environ.get("OCTOAI_TOKEN"):
        base = {"token": os.environ["OCTOAI_TOKEN"]}
    values = vars(args)
    changes: dict[str, Any] = {n: values[n] for n in ServerConfig.model_fields if n in values}
    fault_changes = {
        n: values["fault_" + n] for n in FaultConfig.model_fields if "fault_" + n in values
    }
    if fault_changes:
        changes["faults"] = fault_changes
    return ServerConfig.model_validate(base).updated(changes)


def _describe(config: Any, url: str) -> str:
    auth = "the configured token" if config.token is not None else "any bearer token"
    lines = [
        f"dagster-octoai local OctoAI server on {url}",
        f"  generate: POST {url}/generate/{{sdxl,sd,controlnet-sdxl,controlnet-sd15}}",
        f"  auth: {auth}; replicas: {config.replicas}; "
        f"latency: {config.latency_per_image_s:g} s/image; results kept {config.result_ttl_s:g} s",
        f"  stats: GET {url}/_local/stats; OpenAPI: {url}/openapi.json",
        f"  backend: {config.backend}; GET {url}/_local/backend says what it serves",
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

    import socket

    from .server.app import create_app
    from .server.backends import BackendError
    from .server.runner import _url, bind_socket, serve

    try:
        # Loaded before listening: a wrong model directory or device fails here, clearly.
        app = create_app(config)
    except BackendError as exc:
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
        print(_describe(config, _url(host, port)), file=sys.stderr, flush=True)
        for line in _backend_lines(app.state.octoai.backend.describe()):
            print(f"    {line}", file=sys.stderr, flush=True)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal to
    # the previous handler: make that a clean exit rather than a traceback or a kill.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    with contextlib.suppress(KeyboardInterrupt):
        serve(config, sock, log_level=args.log_level, app=app)
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
    return 2  # argparse refuses unknown commands before this


if __name__ == "__main__":
    sys.exit(main())
