"""A TCP proxy in front of a real Redis that loses replies: a real fault, not a mock.

Armed with `lose(marker, times)`, it forwards each of the next `times` requests that carry
`marker` to Redis, waits for Redis's reply (so the command ran), runs `then()` if given (what
another client does meanwhile), and cuts both connections without relaying that reply. To the
client that is a network cut or a Redis restart after the command ran; redis-py's Retry then
sends the command again on a new connection. A NOSCRIPT reply (an EVALSHA Redis did not run) is
relayed and does not count.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from tests.helpers.services import free_port

REPLY_TIMEOUT_S = 10.0


class ReplyLosingProxy:
    def __init__(self, redis_port: int) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.redis_port = redis_port
        self.cuts = 0
        self.errors: list[BaseException] = []  # raised by then() or a silent Redis: tests check
        self._lock = threading.Lock()
        self._marker = b""
        self._left = 0
        self._then: Callable[[], None] | None = None
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def lose(self, marker: bytes, times: int = 1, then: Callable[[], None] | None = None) -> None:
        """Lose the replies to the next `times` requests carrying marker (see the module doc)."""
        with self._lock:
            self._marker, self._left, self._then = marker, times, then

    def _take(self, data: bytes) -> bool:
        with self._lock:
            if self._left > 0 and self._marker in data:
                self._left -= 1
                return True
            return False

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.redis_port))
            link = _Link(client, upstream)
            threading.Thread(target=self._up, args=(link,), daemon=True).start()
            threading.Thread(target=self._down, args=(link,), daemon=True).start()

    def _up(self, link: _Link) -> None:
        try:
            while data := link.client.recv(65536):
                cut = self._take(data)
                if cut:
                    link.replied.clear()
                    link.swallow.set()  # before Redis can answer
                link.upstream.sendall(data)
                if not cut:
                    continue
                if not link.replied.wait(REPLY_TIMEOUT_S):
                    raise TimeoutError(f"Redis did not answer within {REPLY_TIMEOUT_S} s")
                if link.reply.startswith(b"-NOSCRIPT"):  # it did not run: lose the next one
                    with self._lock:
                        self._left += 1
                    link.swallow.clear()
                    link.client.sendall(link.reply)
                    continue
                if self._then is not None:
                    self._then()
                self.cuts += 1
                break
        except OSError:
            pass
        except Exception as exc:  # noqa: BLE001 - handed to the test
            self.errors.append(exc)
        finally:
            link.close()

    def _down(self, link: _Link) -> None:
        try:
            while data := link.upstream.recv(65536):
                if link.swallow.is_set():
                    link.reply = data
                    link.replied.set()
                else:
                    link.client.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._listener.close()


class _Link:
    """One client connection and its own connection to Redis."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client, self.upstream = client, upstream
        self.swallow = threading.Event()  # hold Redis's replies back from the client
        self.replied = threading.Event()
        self.reply = b""

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            sock.close()
