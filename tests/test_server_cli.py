"""``dagster-octoai serve`` and the server in a child process."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dagster_octoai.server import FaultConfig, LocalOctoAIServer, ServerConfig
from dagster_octoai.server.cli import main

pytestmark = pytest.mark.timeout(120)

CLI = [sys.executable, "-m", "dagster_octoai.server.cli"]


def test_print_config_applies_options_and_hides_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "serve",
            "--print-config",
            "--token",
            "s3cret-token",
            "--replicas",
            "3",
            "--latency-per-image-s",
            "0.25",
            "--rate-limit-requests",
            "10",
            "--banned-words",
            "teapot, kettle",
            "--safety-trigger-word",
            "none",
            "--fault-error-500",
            "0.1",
            "--fault-on-async-routes",
            "--fault-seed",
            "9",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "s3cret-token" not in out
    config = json.loads(out)
    assert config["token_set"] is True
    assert config["replicas"] == 3
    assert config["latency_per_image_s"] == 0.25
    assert config["rate_limit_requests"] == 10
    assert config["banned_words"] == ["teapot", "kettle"]
    assert config["safety_trigger_word"] is None
    assert config["faults"]["error_500"] == 0.1
    assert config["faults"]["on_async_routes"] is True
    assert config["faults"]["seed"] == 9


def test_every_config_field_is_an_option() -> None:
    help_text = subprocess.run(
        [*CLI, "serve", "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    for name in ServerConfig.model_fields:
        if name != "faults":
            assert "--" + name.replace("_", "-") in help_text
    for name in FaultConfig.model_fields:
        assert "--fault-" + name.replace("_", "-") in help_text


def test_config_file_and_bad_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "server.json"
    path.write_text(json.dumps({"replicas": 2, "faults": {"error_503": 0.5}}))
    assert main(["serve", "--config", str(path), "--fault-seed", "4", "--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert (config["replicas"], config["faults"]["error_503"], config["faults"]["seed"]) == (
        2,
        0.5,
        4,
    )

    assert main(["serve", "--replicas", "0", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "replicas" in err and "greater than or equal to 1" in err

    assert main(["serve", "--fault-error-500", "0.7", "--fault-error-503", "0.7"]) == 2
    assert "at most 1" in capsys.readouterr().err


def test_serve_runs_in_the_foreground_until_sigterm() -> None:
    env = {**os.environ, "OCTOAI_TOKEN": "cli-token"}
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", "0", "--replicas", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stderr is not None
        ready, _, _ = select.select([proc.stderr], [], [], 30)
        assert ready, "no startup line within 30 s"
        line = proc.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, line
        url = match.group(0)
        assert "cli-token" not in line
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthcheck").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.post(
            f"{url}/generate/sd",
            json={"prompt": "x", "seed": 1},
            headers={"Authorization": "Bearer cli-token"},
            timeout=30,
        )
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()


def test_process_mode_server(tmp_path: Path) -> None:
    config = ServerConfig(token="proc-token", replicas=2, faults=FaultConfig(seed=3))
    server = LocalOctoAIServer(config, mode="process")
    with server as srv:
        assert srv._proc is not None
        pid = srv._proc.pid
        # The token travels in the environment, never on the command line.
        assert "proc-token" not in Path(f"/proc/{pid}/cmdline").read_text()
        r = httpx.post(
            f"{srv.url}/generate/sd",
            json={"prompt": "x", "num_images": 2, "seed": 1},
            headers={"Authorization": "Bearer proc-token"},
            timeout=30,
        )
        assert r.status_code == 200
        assert srv.stats()["paid_generations"] == 2
        srv.configure(faults={"error_503": 1.0})
        r = httpx.post(
            f"{srv.url}/generate/sd",
            json={"prompt": "x"},
            headers={"Authorization": "Bearer proc-token"},
        )
        assert r.status_code == 503
        srv.reset_stats()
        assert srv.stats()["paid_generations"] == 0
        proc = srv._proc
    assert proc.poll() is not None  # stopped with the context
    assert not server.running


def test_server_repr_and_stopped_errors() -> None:
    server = LocalOctoAIServer(ServerConfig(token="hidden-token"))
    assert "hidden-token" not in repr(server)
    assert "hidden-token" not in repr(server.config)
    with pytest.raises(RuntimeError, match="not running"):
        server.stats()
    with pytest.raises(ValueError, match="mode"):
        LocalOctoAIServer(mode="fork")  # type: ignore[arg-type]
    # A mistyped token is not echoed in the validation error.
    with pytest.raises(ValueError, match="forbidden_tokens") as caught:
        ServerConfig(forbidden_tokens="hidden-token")  # type: ignore[arg-type]
    assert "hidden-token" not in str(caught.value)


def test_the_startup_wait_fits_the_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The diffusers backend loads its base models before it answers: minutes for real SDXL
    # weights, where the placeholder answers in well under a second.
    assert LocalOctoAIServer(ServerConfig()).startup_timeout_s == 30
    diffusers = ServerConfig(backend="diffusers", models=str(tmp_path))
    assert LocalOctoAIServer(diffusers).startup_timeout_s == 900
    assert LocalOctoAIServer(diffusers, startup_timeout_s=60).startup_timeout_s == 60
    with pytest.raises(ValueError, match=r"startup_timeout_s: 0 must be > 0"):
        LocalOctoAIServer(startup_timeout_s=0)
    # A server that does not answer in time is stopped, and the error says what to raise.
    # Its child really starts; its health checks are made to say "not yet" (a real check
    # waits for a child that is still importing, and may outlast a short timeout).
    monkeypatch.setattr(LocalOctoAIServer, "_not_healthy", lambda self: "still loading")
    late = LocalOctoAIServer(ServerConfig(), mode="process", startup_timeout_s=0.5)
    with pytest.raises(TimeoutError, match=r"within 0.5 s \(still loading\).*startup_timeout_s="):
        late.start()
    assert not late.running
    with pytest.raises(ConnectionRefusedError):  # the child is gone, its port closed
        socket.create_connection(("127.0.0.1", late.port), timeout=5).close()


def test_serve_speaks_https_with_a_certificate(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path, ca_path = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_pem.write_to_path(str(key_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    ca.cert_pem.write_to_path(str(ca_path))
    trusted = ssl.create_default_context(cafile=str(ca_path))
    env = {**os.environ, "OCTOAI_TOKEN": "tls-token-5e"}
    proc = subprocess.Popen(
        [
            *CLI,
            "serve",
            "--port",
            "0",
            "--ssl-certfile",
            str(cert_path),
            "--ssl-keyfile",
            str(key_path),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stderr is not None
        ready, _, _ = select.select([proc.stderr], [], [], 30)
        assert ready, "no startup line within 30 s"
        line = proc.stderr.readline()
        match = re.search(r"https://127\.0\.0\.1:(\d+)", line)
        assert match, line
        url = match.group(0)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthcheck", verify=trusted).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.post(
            f"{url}/generate/sd",
            json={"prompt": "x", "seed": 1},
            headers={"Authorization": "Bearer tls-token-5e"},
            verify=trusted,
            timeout=30,
        )
        assert r.status_code == 200
        with pytest.raises(httpx.TransportError):  # plain HTTP is not served there
            httpx.get(url.replace("https", "http") + "/healthcheck", timeout=5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()


def test_the_banner_says_the_engines_and_replicas_the_backend_has() -> None:
    import types

    from dagster_octoai.api.models import Engine
    from dagster_octoai.server.app import create_app
    from dagster_octoai.server.cli import _describe
    from dagster_octoai.server.config import ServerConfig

    config = ServerConfig(replicas=4, public=True)
    placeholder = create_app(config).state.octoai.backend
    banner = _describe(config, "http://h", placeholder)
    every = ",".join(e.value for e in Engine)  # the placeholder draws for every engine
    assert f"generate/{{{every}}}" in banner and "ssd" in every and "flux-dev" in every
    assert "replicas: 4;" in banner
    # A diffusers backend with one device and SD 1.5 models only (its engines, replicas).
    diffusers = types.SimpleNamespace(engines=("sd", "controlnet-sd15"), replicas=1)
    banner = _describe(config, "http://h", diffusers)
    assert "generate/{sd,controlnet-sd15}" in banner and "replicas: 1;" in banner
