"""What stands in front of the routes: the guard (authentication and body size, before anything is parsed, so an
unauthenticated or oversized upload is refused unread) and the multipart form that is whole or refused (a body cut
before its closing boundary is a 400, never a job run with options silently dropped)."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import aclosing
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from server.service.schemas import error_response

log = logging.getLogger(__name__)


MIB = 2**20
FORM_SLACK_BYTES = 64 * 1024
"""Room for the multipart framing and the options part on top of the image size limit."""
MAX_FIELD_BYTES = MIB
"""Largest form part that is not a file (the ``options`` JSON): Starlette's own limit, named here so the error can
say it."""
REFUSED_BODY_DRAIN_BYTES = MIB
"""A request refused before its body is read (a wrong token) has a body of at most this size read and discarded, so
the connection stays usable; a larger one is not read at all: the answer goes out with ``Connection: close``."""
# -- the multipart form: whole or refused ------------------------------------------------------------------------------


class _WholeFormParser(MultiPartParser):
    """Starlette's multipart parser, refusing a body that ends before its closing boundary.

    python-multipart stops at the end of the data without complaint wherever it is, and Starlette then returns the
    parts finished so far: a body cut short inside ``options`` would become a job at the default options. A form
    counts only when the parser reached the closing ``--boundary--``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ended = False

    def on_end(self) -> None:
        self.ended = True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        try:
            super().on_part_data(data, start, end)
        except MultiPartException:  # Starlette's text names neither the part nor what it is for
            raise MultiPartException(
                f"the form part {self._current_part.field_name!r} is over {self.max_part_size // 1024} KiB; a part "
                "other than the image file may hold at most that much (options is a small JSON object)") from None

    async def parse(self) -> FormData:
        form = await super().parse()
        if not self.ended:
            await form.close()
            raise MultiPartException(
                "the multipart body ends before its closing boundary (--<boundary>--): the upload was cut short, so "
                "none of its parts is used; send the whole form again")
        return form


class _WholeFormRequest(Request):
    """A request whose multipart form is parsed by :class:`_WholeFormParser` (other bodies as Starlette does)."""

    def form(self, *, max_files: int | float = 1000, max_fields: int | float = 1000,  # type: ignore[override]
             max_part_size: int = MAX_FIELD_BYTES) -> Awaitable[FormData]:
        return self._whole_form(max_files, max_fields, max_part_size)

    async def _whole_form(self, max_files: int | float, max_fields: int | float, max_part_size: int) -> FormData:
        if self._form is not None:
            return self._form
        content_type, _ = parse_options_header(self.headers.get("Content-Type"))
        if content_type != b"multipart/form-data":
            return await super().form(max_files=max_files, max_fields=max_fields, max_part_size=max_part_size)
        try:
            async with aclosing(self.stream()) as stream:
                self._form = await _WholeFormParser(self.headers, stream, max_files=max_files, max_fields=max_fields,
                                                    max_part_size=max_part_size).parse()
        except MultiPartException as e:  # raised as HTTPException so that FastAPI passes it on unchanged
            raise StarletteHTTPException(status_code=400, detail=e.message) from None
        return self._form


class WholeFormRoute(APIRoute):
    """An API route whose handler sees a :class:`_WholeFormRequest`."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def whole_form_handler(request: Request) -> Response:
            return await handler(_WholeFormRequest(request.scope, request.receive))

        return whole_form_handler


# -- the guard: authentication and body size, before anything is parsed ---------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: bearer token on ``/v1`` (except ``/v1/health``), a cap on the request body size, whole bodies
    read before any answer, and the last line of defence against bugs.

    The token is compared in constant time. A request with a wrong token, or whose Content-Length is over the cap,
    is answered before its body is read: the body is never asked for, so uvicorn sends no ``100 Continue`` and a
    client that waits for one (curl, for any upload over 1 KiB) sends nothing; such a connection is closed after the
    answer. A client that sends its body anyway with a wrong token has a body of up to
    :data:`REFUSED_BODY_DRAIN_BYTES` read and discarded (the connection stays open); a larger one is not read at
    all, and the answer goes out with ``Connection: close``. A body sent without a length (chunked) is counted as it
    streams and refused when it crosses the cap.

    When the app answers before it has read the whole body (a form refused part-way through, an options part over
    its limit), the rest of the body (at most the cap) is read before the answer goes out: a connection that closes
    after the answer (``Connection: close`` from the client) would otherwise close with bytes unread, and the
    client's TCP would see a reset instead of the answer.

    A client that goes away in the middle of its request is logged as one line. An exception that escapes the app
    (a bug) is answered here with a 500 ``internal`` that names only its type, because Starlette's own last-resort
    handler re-raises it and uvicorn then drops the connection.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], token: str, max_body: int) -> None:
        self.app = app
        self.token = token.encode()
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path.startswith("/v1/") and path != "/v1/health" and not self._authorised(scope):
            await self._refuse(scope, receive, send, error_response(
                "unauthorized", "missing or wrong bearer token",
                fix="send the header 'Authorization: Bearer <token>' with the token of ONE2345_TOKEN or of the "
                    "token file named in the server's ready line"), drain=REFUSED_BODY_DRAIN_BYTES)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body:
            await self._refuse(scope, receive, send, self._too_large())
            return

        received = 0
        body_done = not _has_body(scope)
        exceeded = False
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded, body_done
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect: nothing more will come
                body_done = True
                return message
            received += len(message.get("body", b""))
            body_done = not message.get("more_body", False)
            if received > self.max_body:
                exceeded = True
                raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if exceeded:
                # Whatever the app answers to a body cut short (a parse error, usually) is replaced by the 413.
                if message["type"] == "http.response.start" and not response_started:
                    response_started = True
                    await _closing(self._too_large())(scope, receive, send)
                return
            if message["type"] == "http.response.start" and not response_started:
                response_started = True
                if not body_done and not await _drain(receive, self.max_body - received):
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            if not response_started:
                await _closing(self._too_large())(scope, receive, send)
        except ClientDisconnect:
            log.info("client %s went away in the middle of %s %s (%d bytes of its body received)",
                     _client(scope), scope.get("method"), path[:200], received)
        except Exception as e:
            log.exception("unhandled error in %s %s", scope.get("method"), path[:200])
            if response_started:
                raise  # half a response is out: only closing the connection can tell the client
            response_started = True
            await error_response("internal", f"an unexpected {type(e).__name__} in the server; the request was "
                                             "not completed", fix="see the server's log (stderr); please report "
                                                                  "it")(scope, receive, send)

    def _authorised(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, given = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)
        return False

    def _too_large(self) -> JSONResponse:
        limit = (self.max_body - FORM_SLACK_BYTES) / MIB
        return error_response("too_large", f"the request body is larger than the upload limit of {limit:g} MiB",
                              fix="downscale or recompress the image, or start the server with a larger "
                                  "--max-upload-mb")

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, response: Response,
                      drain: int | None = None) -> None:
        """Answer without asking for the body. A client waiting for ``100 Continue`` never sent it, so the
        connection cannot carry another request: it is closed after the answer (cleanly, as nothing is left unread).
        With ``drain``, a body sent anyway is read and discarded first when it is at most ``drain`` bytes; a larger
        one is left unread and the connection closed after the answer."""
        if (b"expect", b"100-continue") in [(name, value.lower()) for name, value in scope["headers"]]:
            response.headers["connection"] = "close"
        elif drain is not None and _has_body(scope):
            declared = _content_length(scope)
            if (declared is not None and declared > drain) or not await _drain(receive, drain):
                response.headers["connection"] = "close"
        await response(scope, receive, send)


async def _drain(receive: Receive, limit: int) -> bool:
    """Read and discard the rest of a request body; False when more than ``limit`` bytes of it remain (the rest is
    left unread) or the client went away."""
    read = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return False
        read += len(message.get("body", b""))
        if read > limit:
            return False
        if not message.get("more_body", False):
            return True


def _closing(response: Response) -> Response:
    response.headers["connection"] = "close"
    return response


def _has_body(scope: Scope) -> bool:
    """Whether the request declares a body: a Content-Length over 0 or a Transfer-Encoding (chunked)."""
    return any(name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"0", b""))
               for name, value in scope["headers"])


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
