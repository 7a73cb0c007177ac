"""The Fleet gateway: the only door from the devices' network to the SuperLink.

Flower 1.42's ``flower-superlink`` serves three HTTPS APIs on ONE port: the
Fleet API (``/v1/fleet/``, SuperNodes), the Control API (``/v1/control/``:
``flwr run``, ``flwr supernode register``) and the Runtime API
(``/v1/runtime/``, its own ServerApps). Its ``--fleet-api-address`` and
``--control-api-address`` options are deprecated no-ops, and the open-source
Control API authenticates nobody (OIDC account auth needs Flower Enterprise),
so whoever reaches that port with ``ca.crt`` may register node keys and run
code on every node. The recipe therefore binds the SuperLink to loopback and
puts this gateway on the devices' network: it terminates TLS with the
SuperLink's certificate and forwards ``POST /v1/fleet/<call>`` (and
``GET /health``) to the SuperLink over TLS; every other request gets a 404
and one log line, and never reaches the SuperLink.

SuperNode authentication is untouched: a node signs each Fleet request in its
headers (not in the TLS handshake), and headers and body pass unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

LOG = logging.getLogger("fl_app.fleet_gateway")
# Exactly one path segment of lowercase words after the prefix (Flower's Fleet calls are
# /v1/fleet/pull-messages etc.): nothing like /v1/fleet/../control/... can slip through,
# since an HTTP client would normalise it to another API's path.
FLEET_PATH = re.compile(r"/v1/fleet/[a-z]+(-[a-z]+)*")
HEALTH_PATH = "/health"
# Headers of one connection only (RFC 9110 7.6.1), and Host, which names the gateway.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
# Seconds to connect to the SuperLink. Reading has no limit here: the SuperNode's own
# timeout decides how long a Fleet call may take, as it would without the gateway.
CONNECT_TIMEOUT = 10.0


def allowed(method: str, path: str) -> bool:
    """Whether the gateway forwards ``method path``: a Fleet call, or the health check."""
    if method == "POST":
        return FLEET_PATH.fullmatch(path) is not None
    return method in ("GET", "HEAD") and path == HEALTH_PATH


def fleet_gateway_app(superlink: str, ca_cert: str | os.PathLike) -> Starlette:
    """The gateway as an ASGI app that forwards Fleet calls to ``superlink``.

    Parameters
    ----------
    superlink : str
        The SuperLink's ``HOST:PORT`` (loopback, on the same machine).
    ca_cert : str or os.PathLike
        The CA certificate that signed the SuperLink's certificate.

    Returns
    -------
    Starlette
        The app; serve it over TLS (`serve`).
    """

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        verify = ssl.create_default_context(cafile=str(ca_cert))
        timeout = httpx.Timeout(None, connect=CONNECT_TIMEOUT)
        async with httpx.AsyncClient(
            base_url=f"https://{superlink}", verify=verify, timeout=timeout
        ) as client:
            app.state.client = client
            yield

    async def forward(request: Request) -> Response:
        path = request.url.path
        client_host = request.client.host if request.client else "?"
        if not allowed(request.method, path):
            LOG.warning(
                "refused %s %s from %s: not the Fleet API", request.method, path, client_host
            )
            return JSONResponse(
                {
                    "detail": f"{request.method} {path} is not served here: this address"
                    " serves only the Fleet API (POST /v1/fleet/...); the Control API is"
                    " reachable only on the SuperLink's host"
                },
                status_code=404,
            )
        client: httpx.AsyncClient = request.app.state.client
        query = f"?{request.url.query}" if request.url.query else ""
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        upstream = client.build_request(
            request.method, path + query, headers=headers, content=request.stream()
        )
        try:
            reply = await client.send(upstream, stream=True)
        except httpx.TransportError as err:
            # 502 is what a SuperNode retries (flwr.supercore.retry.http_retry), as it
            # retries a refused connection while its SuperLink restarts.
            LOG.warning("the SuperLink at %s did not answer %s: %r", superlink, path, err)
            return PlainTextResponse(f"the SuperLink did not answer: {err!r}", status_code=502)
        reply_headers = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(
            reply.aiter_raw(),
            status_code=reply.status_code,
            headers=reply_headers,
            background=BackgroundTask(reply.aclose),
        )

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def serve(
    superlink: str,
    ca_cert: str | os.PathLike,
    certfile: str | os.PathLike,
    keyfile: str | os.PathLike,
    host: str,
    port: int,
    parent_pid: int | None = None,
) -> None:
    """Serve the gateway over TLS on ``host:port`` until interrupted (or its parent exits).

    Parameters
    ----------
    superlink, ca_cert
        See `fleet_gateway_app`.
    certfile, keyfile : str or os.PathLike
        The TLS certificate and key it presents (the SuperLink's: the names a
        SuperNode checks are the same).
    host, port : str, int
        Where devices reach it.
    parent_pid : int, optional
        Exit once this process has ended (the SuperLink it was started beside).
    """
    import uvicorn  # deferred: only the gateway's own process serves

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per forwarded call
    app = fleet_gateway_app(superlink, ca_cert)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_certfile=str(certfile),
        ssl_keyfile=str(keyfile),
        access_log=False,  # every node polls every few seconds; refusals are logged
        log_level="info",
    )
    server = uvicorn.Server(config)

    async def run() -> None:
        watch = asyncio.create_task(_exit_with(parent_pid, server)) if parent_pid else None
        await server.serve()
        if watch is not None:
            watch.cancel()

    asyncio.run(run())


async def _exit_with(parent_pid: int, server: Any) -> None:
    while os.getppid() == parent_pid:
        await asyncio.sleep(1)
    LOG.warning("its SuperLink (PID %d) has ended: stopping", parent_pid)
    server.should_exit = True
