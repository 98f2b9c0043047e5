"""A real uvicorn server on 127.0.0.1 (random free port) in a thread, for the serve tests."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


class LiveServer:
    def __init__(self, app):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()

    @property
    def table(self):
        return self.app.state.table

    def engine(self, name: str | None = None):
        bases = self.table.bases
        return (bases[name] if name else next(iter(bases.values()))).engine

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until no engine has a running or waiting sequence."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if all(
                not s.engine.running and not s.engine.waiting for s in self.table.bases.values()
            ):
                return
            time.sleep(0.02)
        raise AssertionError("engine still busy")
