"""What every fake shares: the recorded request, free ports, JSON helpers and the threaded aiohttp server."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass
class ToolCall:
    name: str
    arguments: dict


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]  # keys lower-cased so assertions don't depend on client casing
    body: dict | None


Responder = Callable[[str, dict], "str | ToolCall"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_WORD_RE = re.compile(r"\s*\S+")


def _pieces(text: str) -> list[str]:
    # Each piece keeps its leading whitespace, so "".join(pieces) == text and
    # truncation/streaming never alter the spacing the responder chose.
    pieces = _WORD_RE.findall(text)
    if pieces:
        tail = len(text) - len(text.rstrip())
        if tail:
            pieces[-1] += text[-tail:]
    return pieces


def _words(text: Any) -> int:
    return len(text.split()) if isinstance(text, str) else 0


def _hex(n: int = 24) -> str:
    return uuid.uuid4().hex[:n]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------------------------------------------------------- token counting




def _json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_dumps(obj).encode(), status=status, content_type="application/json", headers=headers)


def _fmt_num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


# ---------------------------------------------------------------- threaded aiohttp server


class _ThreadedServer:
    """An aiohttp app in a daemon thread with its own loop, so it coexists with TestClient/uvicorn threads."""

    _name = "fake-server"

    def __init__(self, port: int = 0) -> None:
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    def _make_app(self) -> web.Application:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def start(self):
        if self._thread is not None:
            return self
        ready = threading.Event()
        errors: list[BaseException] = []

        async def setup() -> None:
            # handler_cancellation: a client that gave up (timeout tests) cancels
            # its stalled handler instead of leaving it sleeping until shutdown.
            runner = web.AppRunner(self._make_app(), access_log=None, handler_cancellation=True,
                                   shutdown_timeout=0.25)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", self._port, reuse_address=True)
            await site.start()
            self._runner = runner
            self._port = runner.addresses[0][1]

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                loop.run_until_complete(setup())
            except BaseException as exc:  # surface bind errors in the caller's thread
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                try:
                    if self._runner is not None:
                        loop.run_until_complete(self._runner.cleanup())
                finally:
                    loop.close()

        self._thread = threading.Thread(target=run, name=f"{self._name}:{self._port}", daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            self._thread.join()
            self._thread = None
            raise errors[0]
        return self

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._thread = None
        self._loop = None
        self._runner = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
