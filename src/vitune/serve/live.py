"""A live uvicorn server in a background thread on a free loopback port, for tests and load checks.

    with live_server(create_app(pipe, ServeConfig("tiny"))) as base_url:
        openai.OpenAI(base_url=base_url + "/v1", api_key="-")...
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def live_server(app: Any, host: str = "127.0.0.1", port: int | None = None, startup_timeout_s: float = 60.0,
                log_level: str = "warning") -> Iterator[str]:
    """Serve `app` until the block ends (lifespan included); yields its base URL."""
    import uvicorn

    port = port or free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server on {host}:{port} exited during startup")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server on {host}:{port} did not start within {startup_timeout_s} s")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
