"""A real ``bentoml serve`` on this machine: start it on a free port, wait until ready, stop it.

Used by the serving tests and by ``benchmarks.serving``. The server runs in its own process
group; its workers (circus starts each in a session of its own) are found as its descendants,
so stopping it ends exactly what was started, even when a SIGKILL is needed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from serving.build import serve_command


@dataclass
class LocalServer:
    """A running ``bentoml serve`` subprocess and the file its output goes to."""

    url: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(target: str, env: dict[str, str], log: Path, cwd: Path | None = None) -> LocalServer:
    """Start ``bentoml serve target`` on a free port of 127.0.0.1, its output to ``log``.

    Args:
        target: a Bento tag, or a service import path such as ``serving.service:Matcher``
            (which then needs ``cwd`` to be the repository root).
        cwd: the server's working directory (default: the log's folder).
    """
    port = free_port()
    with log.open("wb") as handle:
        # No --host: the service binds 127.0.0.1 by its own default, which every test server so checks.
        process = subprocess.Popen(
            serve_command(target, port),
            cwd=cwd or log.parent,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return LocalServer(f"http://127.0.0.1:{port}", process, log)


def wait_ready(server: LocalServer, timeout: float = 120.0, path: str = "/readyz") -> bool:
    """Poll ``path`` (BentoML's ``/readyz``; another server's health route) until 200; False when the
    process exits or the time runs out."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            if httpx.get(f"{server.url}{path}", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    return False


def descendants(root: int) -> set[int]:
    """The process ids of every living descendant of ``root`` (children, their children...), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The parent is the second field after the command name, which may hold spaces.
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):  # ended meanwhile
                continue
    tree, found = {root}, True
    while found:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        found = bool(children)
    return tree - {root}


def stop_server(server: LocalServer) -> None:
    """SIGTERM the server's process group; if it has not gone in 20 s, SIGKILL it and its workers."""
    if server.process.poll() is None:
        workers = descendants(server.process.pid)
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            for pid in workers | descendants(server.process.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=10)


@contextmanager
def running(
    target: str, env: dict[str, str], log: Path, cwd: Path | None = None, timeout: float = 120.0
) -> Iterator[LocalServer]:
    """A started and ready server for the ``with`` block, stopped after it (see :func:`start_server`).

    Raises:
        RuntimeError: the server exited or was not ready within ``timeout``; the message ends
            with its output.
    """
    server = start_server(target, env, log, cwd)
    try:
        if not wait_ready(server, timeout):
            raise RuntimeError(f"bentoml serve {target} did not become ready:\n{server.output()[-5000:]}")
        yield server
    finally:
        stop_server(server)
