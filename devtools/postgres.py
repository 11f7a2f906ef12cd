"""A private PostgreSQL cluster for tests: ``initdb`` in a temp dir, loopback only.

Dagster's production instances keep runs, events and schedules in PostgreSQL
(``dagster-postgres``); the tests that check the sensor and the IO managers against
such an instance start one with :class:`PostgresCluster`. It finds the PostgreSQL
binaries (``pg_ctl`` on ``PATH``, else ``/usr/lib/postgresql/<version>/bin``) and, when
none are installed and it runs as root on a Debian-like machine, installs the
``postgresql`` package with ``apt-get`` first, as a fresh CI machine needs.

PostgreSQL refuses to run as root: as root, the cluster runs as the ``postgres`` OS
user (``runuser -u postgres --``) in a temp dir handed over to it. The server
listens on 127.0.0.1 on a free port, with its unix socket in the temp dir, trusts
local connections (a throwaway test cluster, never exposed) and skips ``fsync``.
:meth:`PostgresCluster.stop` stops it immediately and SIGKILLs the postmaster by its
pid if it is still alive.

Examples:
    >>> with PostgresCluster() as pg:  # doctest: +SKIP
    ...     url = pg.create_database("dagster")
    ...     url.startswith("postgresql+psycopg2://postgres@127.0.0.1:")
    True
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from dagster_octoai._process import (
    PortClash,
    StartStopContext,
    kill_pid,
    log_tail,
    start_retrying_port_clash,
)

__all__ = ["PostgresCluster", "PostgresUnavailable", "find_pg_bin"]

_SUPERUSER = "postgres"
_OS_USER = "postgres"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL is not installed here and could not be installed (the message says why)."""


def _bin_dir_of(path: str) -> Path:
    return Path(os.path.realpath(path)).parent


def find_pg_bin() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or None.

    ``$PG_BIN`` first, then ``pg_ctl`` on ``PATH``, then the newest
    ``/usr/lib/postgresql/<version>/bin`` (Debian installs them off ``PATH``).
    """
    candidates: list[Path] = []
    if os.environ.get("PG_BIN"):
        candidates.append(Path(os.environ["PG_BIN"]))
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(_bin_dir_of(on_path))
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = sorted(
            (p for p in debian.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
        )
        candidates += [v / "bin" for v in reversed(versions)]
    for directory in candidates:
        if all(os.access(directory / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return directory
    return None


def _install_with_apt(timeout_s: float) -> None:
    """``apt-get install postgresql`` as root, non-interactive; raises PostgresUnavailable."""
    if os.geteuid() != 0:
        raise PostgresUnavailable(
            "PostgreSQL binaries (initdb, pg_ctl, postgres) are not installed and this process "
            "is not root, so it cannot install them; install the 'postgresql' package or set "
            "PG_BIN to the directory holding them"
        )
    if shutil.which("apt-get") is None:
        raise PostgresUnavailable(
            "PostgreSQL binaries are not installed and there is no apt-get to install them; "
            "install PostgreSQL or set PG_BIN to the directory holding initdb and pg_ctl"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"],
    ):
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        if done.returncode != 0:
            raise PostgresUnavailable(
                f"'{' '.join(cmd)}' failed with exit code {done.returncode}: "
                f"{(done.stderr or done.stdout)[-1500:]}"
            )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PostgresCluster(StartStopContext):
    """A throwaway PostgreSQL server: its own data dir, a free loopback port, trust auth.

    Args:
        install: Install PostgreSQL with apt-get when it is missing (root only).
        startup_timeout: Seconds to wait for the server to accept connections.
        install_timeout: Seconds each apt-get step may take.

    Attributes:
        port: The TCP port on 127.0.0.1 (after :meth:`start`).
        workdir: The temp dir holding the data dir, the socket and the server log.
    """

    def __init__(
        self,
        *,
        install: bool = True,
        startup_timeout: float = 60.0,
        install_timeout: float = 600.0,
    ) -> None:
        self.install = install
        self.startup_timeout = startup_timeout
        self.install_timeout = install_timeout
        self.port = 0
        self.workdir: Path | None = None
        self._bin: Path | None = None
        self._pid: int | None = None

    def __repr__(self) -> str:
        state = f"port={self.port}, pid={self._pid}" if self._pid else "stopped"
        return f"PostgresCluster({state})"

    # ---- lifecycle ------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while running."""
        return self._pid

    @property
    def log_path(self) -> Path | None:
        return self.workdir / "postgres.log" if self.workdir else None

    def start(self) -> PostgresCluster:
        """Find (or install) PostgreSQL, ``initdb`` a cluster and start it.

        Raises:
            PostgresUnavailable: no binaries, and they could not be installed.
            RuntimeError: the server did not start (the end of its log is in the message).
        """
        self._bin = find_pg_bin()
        if self._bin is None:
            if not self.install:
                raise PostgresUnavailable("PostgreSQL binaries not found and install=False")
            _install_with_apt(self.install_timeout)
            self._bin = find_pg_bin()
            if self._bin is None:
                raise PostgresUnavailable("apt-get installed 'postgresql' but no pg_ctl was found")
        # A port taken between picking and binding fails the start: try new ports.
        try:
            start_retrying_port_clash(self._start_once, self.stop, what="PostgreSQL")
        except BaseException:
            self.stop()  # no half-made cluster or temp dir left behind
            raise
        return self

    def _start_once(self) -> None:
        assert self._bin is not None
        self.workdir = Path(tempfile.mkdtemp(prefix="dagster-octoai-pg-"))
        data = self.workdir / "data"
        if os.geteuid() == 0:
            # The postgres user must own the cluster; the temp dir is 0700 root otherwise.
            try:
                user = pwd.getpwnam(_OS_USER)
            except KeyError:
                raise PostgresUnavailable(
                    f"PostgreSQL refuses to run as root and there is no {_OS_USER!r} OS user "
                    "to run it as; create one (the 'postgresql' package does) or run as non-root"
                ) from None
            os.chown(self.workdir, user.pw_uid, user.pw_gid)
        self._run(
            [
                str(self._bin / "initdb"),
                "-D",
                str(data),
                "-U",
                _SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
                "--no-instructions",
            ],
            timeout=120,
        )
        self.port = _free_port()
        options = " ".join(
            [
                f"-p {self.port}",
                f"-k {self.workdir}",
                "-c listen_addresses=127.0.0.1",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
            ]
        )
        log = self.workdir / "postgres.log"
        started = self._run(
            [
                str(self._bin / "pg_ctl"),
                "start",
                "-D",
                str(data),
                "-l",
                str(log),
                "-o",
                options,
                "-w",
                "-t",
                str(int(self.startup_timeout)),
            ],
            timeout=self.startup_timeout + 10,
            check=False,
        )
        self._pid = self._read_pid(data)
        if started.returncode != 0:
            tail = log_tail(self.log_path)
            if "could not bind" in tail or "already in use" in tail:
                raise PortClash(tail)
            raise RuntimeError(f"pg_ctl start failed ({started.returncode}):\n{tail}")

    def stop(self) -> None:
        """Stop the server at once (``pg_ctl stop -m immediate``, then SIGKILL) and delete it."""
        workdir, self.workdir = self.workdir, None
        pid, self._pid = self._pid, None
        if workdir is not None and self._bin is not None and (workdir / "data").exists():
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self._run(
                    [
                        str(self._bin / "pg_ctl"),
                        "stop",
                        "-D",
                        str(workdir / "data"),
                        "-m",
                        "immediate",
                        "-w",
                        "-t",
                        "10",
                    ],
                    timeout=20,
                    check=False,
                )
        if pid is not None:
            # pg_ctl stop -m immediate may leave the postmaster running.
            kill_pid(pid, wait_s=5.0)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    # ---- databases ----------------------------------------------------------------------------

    def dsn(self, database: str = "postgres") -> str:
        """The libpq connection string (``postgresql://...``) of a database, for psycopg2."""
        if not self.port:
            raise RuntimeError("the cluster is not running; call start() first")
        return f"postgresql://{_SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of a database, naming psycopg2 (what dagster-postgres installs).

        SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3, which Dagster does not need.
        """
        return self.dsn(database).replace("postgresql://", "postgresql+psycopg2://", 1)

    def create_database(self, name: str) -> str:
        """Create a database and return its SQLAlchemy URL (see :meth:`url`).

        Raises:
            ValueError: ``name`` is not a plain lower-case identifier.
        """
        if not (name.replace("_", "").isalnum() and name.islower() and name[0].isalpha()):
            raise ValueError(
                f"name: {name!r} is not allowed; use lower-case letters, digits and '_', "
                "starting with a letter"
            )
        import psycopg2  # type: ignore[import-untyped]

        conn = psycopg2.connect(self.dsn())
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    # ---- helpers --------------------------------------------------------------------------------

    def _run(
        self, argv: Sequence[str], *, timeout: float, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd = list(argv)
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", _OS_USER, "--", *cmd]
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            # pg_ctl's postmaster must not get the test runner's Ctrl-C.
            start_new_session=True,
            cwd=self.workdir,
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{Path(argv[0]).name} failed ({done.returncode}): {(done.stderr or done.stdout)[-2000:]}"
            )
        return done

    @staticmethod
    def _read_pid(data: Path) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((data / "postmaster.pid").read_text().splitlines()[0])
        return None
