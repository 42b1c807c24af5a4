"""Serving base + adapter: one `python -m mlx_lm server` child process, ready when it answers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tm_assets.finetune.training import FinetuneError, _child_env, _mlx_lm_command

# -- serving -------------------------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ModelServer:
    """`python -m mlx_lm server` for one model (and adapter) on host:port, as a child process.

    `url` is the OpenAI-compatible base (`http://HOST:PORT/v1`). Requests must name the model
    UPSTREAM_MODEL ("default_model") or leave it out: mlx_lm.server treats any other name as a
    model to load (a hub id or a path), and the model path itself loads it *without* the adapter.
    The server's output goes to `log_path` (a temporary file by default). Use it as a context
    manager, or start() / stop(). The child runs in its own session, so it can outlive the caller
    when deployed: keep `pid` to stop it later.
    """

    UPSTREAM_MODEL = "default_model"

    def __init__(self, model_path: Path, adapter_path: Path | None = None, *, host: str = "127.0.0.1",
                 port: int | None = None, log_path: Path | None = None, startup_timeout_s: float = 60.0,
                 log_level: str = "WARNING", extra_args: Sequence[str] = ()):
        self.model_path = Path(model_path)
        self.adapter_path = Path(adapter_path) if adapter_path else None
        self.host = host
        self.port = port or free_port(host)
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout_s = startup_timeout_s
        # INFO logs every prefill step of every request: a deployed server's log would only grow.
        self.log_level = log_level
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen | None = None
        self.ready_seconds: float | None = None
        self._hub_cache: tempfile.TemporaryDirectory | None = None
        self._own_log = False  # a temporary log of our own goes when the server stops

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self) -> list[str]:
        args = ["server", "--model", str(self.model_path), "--host", self.host, "--port", str(self.port),
                "--log-level", self.log_level]
        if self.adapter_path:
            args += ["--adapter-path", str(self.adapter_path)]
        return _mlx_lm_command(*args, *self.extra_args)

    def start(self) -> ModelServer:
        if self.process is not None:
            raise RuntimeError("the server is already started")
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="mlx-server-", suffix=".log")
            os.close(fd)
            self.log_path, self._own_log = Path(name), True
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # /v1/models lists the Hugging Face cache and fails when there is none: give it an empty one.
        extra_env = {}
        if "HF_HUB_CACHE" not in os.environ and "HF_HOME" not in os.environ:
            self._hub_cache = tempfile.TemporaryDirectory(prefix="mlx-hub-")
            extra_env["HF_HUB_CACHE"] = self._hub_cache.name
        started = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            env=_child_env(self.model_path, extra_env))
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.ready_seconds = time.perf_counter() - started
        return self

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _wait_ready(self) -> None:
        # /health answers as soon as the HTTP server listens, while the model may still be loading in
        # the generation thread; a one-token completion proves the model is loaded and answers.
        deadline = time.monotonic() + self.startup_timeout_s
        probe = json.dumps({"model": self.UPSTREAM_MODEL, "max_tokens": 1,
                            "messages": [{"role": "user", "content": "ping"}]}).encode()
        healthy = False
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise FinetuneError(f"mlx_lm server exited ({self.process.returncode}) before it was ready",
                                    self.log_tail())
            try:
                if not healthy:
                    with urllib.request.urlopen(f"http://{self.host}:{self.port}/health", timeout=2) as r:
                        healthy = r.status == 200
                if healthy:
                    req = urllib.request.Request(self.url + "/chat/completions", data=probe,
                                                 headers={"content-type": "application/json"})
                    with urllib.request.urlopen(req, timeout=max(1.0, deadline - time.monotonic())) as r:
                        if r.status == 200:
                            return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise FinetuneError(f"mlx_lm server not ready after {self.startup_timeout_s:.0f} s",
                                    self.log_tail())
            time.sleep(0.1)

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)   # the server shuts down cleanly on KeyboardInterrupt
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._hub_cache is not None:
            self._hub_cache.cleanup()
            self._hub_cache = None
        if self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path, self._own_log = None, False

    def __enter__(self) -> ModelServer:
        return self if self.process is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
