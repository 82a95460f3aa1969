"""A tiny forward proxy on 127.0.0.1 for the egress tests: HTTP (absolute-form requests) or SOCKS5.

It counts what went through it and the credentials it was given, and passes bytes on untouched.
Runs its own event loop in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class ForwardProxy:
    kind: str = "http"  # or "socks5"
    auth: tuple[str, str] | None = None  # demanded of callers when set
    port: int = 0
    requests: list[str] = field(default_factory=list)  # "METHOD target" (http) / "host:port"
    credentials: list[str] = field(default_factory=list)  # what callers authenticated with
    refused: int = 0

    def start(self) -> ForwardProxy:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._serve, "127.0.0.1", 0)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(5)
        return self

    @property
    def url(self) -> str:
        return f"{self.kind}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.kind == "http":
                await self._http(reader, writer)
            else:
                await self._socks5(reader, writer)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # one request per loop (keep-alive from the client's side)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ")
            headers = [tuple(x.split(":", 1)) for x in lines[1:] if x]
            given = next((v.strip() for k, v in headers if k.lower() == "proxy-authorization"), "")
            if given.lower().startswith("basic "):
                self.credentials.append(base64.b64decode(given[6:]).decode())
            if (
                self.auth is not None
                and given != "Basic " + base64.b64encode(":".join(self.auth).encode()).decode()
            ):
                self.refused += 1
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
                writer.write(b"Content-Length: 0\r\nProxy-Authenticate: Basic\r\n\r\n")
                await writer.drain()
                continue
            length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
            body = await reader.readexactly(length) if length else b""
            self.requests.append(f"{method} {target}")
            url = urlsplit(target)
            path = url.path + (f"?{url.query}" if url.query else "")
            kept = [
                (k, v)
                for k, v in headers
                if k.lower() not in ("proxy-authorization", "proxy-connection", "connection")
            ]
            up_reader, up_writer = await asyncio.open_connection(url.hostname, url.port)
            out = f"{method} {path} {version}\r\n" + "".join(f"{k}:{v}\r\n" for k, v in kept)
            up_writer.write(out.encode("latin-1") + b"Connection: close\r\n\r\n" + body)
            await up_writer.drain()
            answer = await up_reader.read()  # the upstream closes after its answer
            up_writer.close()
            # one answer per connection here: tell the client so, then pass the answer on
            a_head, _, a_body = answer.partition(b"\r\n\r\n")
            a_lines = [x for x in a_head.split(b"\r\n") if not x.lower().startswith(b"connection:")]
            writer.write(b"\r\n".join(a_lines) + b"\r\nConnection: close\r\n\r\n" + a_body)
            await writer.drain()
            return

    async def _socks5(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _ver, n = await reader.readexactly(2)
        methods = await reader.readexactly(n)
        if self.auth is not None:
            if 2 not in methods:
                writer.write(b"\x05\xff")
                return
            writer.write(b"\x05\x02")
            await reader.readexactly(1)
            user = (await reader.readexactly((await reader.readexactly(1))[0])).decode()
            password = (await reader.readexactly((await reader.readexactly(1))[0])).decode()
            self.credentials.append(f"{user}:{password}")
            if (user, password) != self.auth:
                self.refused += 1
                writer.write(b"\x01\x01")
                return
            writer.write(b"\x01\x00")
        else:
            writer.write(b"\x05\x00")
        _ver, _cmd, _rsv, atyp = await reader.readexactly(4)
        if atyp == 1:
            host = ".".join(str(b) for b in await reader.readexactly(4))
        elif atyp == 3:
            host = (await reader.readexactly((await reader.readexactly(1))[0])).decode()
        else:
            raise ValueError("IPv6 not supported here")
        port = int.from_bytes(await reader.readexactly(2), "big")
        self.requests.append(f"{host}:{port}")
        up_reader, up_writer = await asyncio.open_connection(host, port)
        writer.write(b"\x05\x00\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big"))
        await writer.drain()

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError):
                dst.write_eof()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        up_writer.close()
