"""The OpenAI-compatible HTTP API: a transport of the process host (serving/host.py), on its own port,
in the same process and asyncio loop as the gRPC one, over the same preprocessing, sessions and
engine loop.

    POST /v1/completions, /v1/chat/completions   JSON or server-sent events (`stream: true`)
    GET  /v1/models · /health · /metrics · /tokenizer_info
    POST /tokenize · /detokenize                  (vLLM's shapes: evaluation tools need no local tokenizer)

aiohttp, not FastAPI + uvicorn: it runs on the loop already running (an AppRunner and a TCPSite, no
second loop, and no server of its own taking over SIGTERM as uvicorn's does), it cancels a handler
whose client disconnected (so the request is aborted before the engine's next step, streaming or
not, with no polling), and every body is checked by hand into the OpenAI error envelope, never a
framework's 422.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from meshserve.models.errors import MeshserveError, RequestError
from meshserve.runtime.engine import RequestOutput
from meshserve.runtime.grammar import ConstraintError
from meshserve.runtime.request import Request
from meshserve.serving.host import listen_error
from meshserve.serving.openai import (API_DEFAULTS, APIError, Choice, Generation, Shaper, _Body, invalid,
                                     parse_chat, parse_completion)
from meshserve.serving.preprocess import Prompt
from meshserve.serving.session import Session, bearer_ok, outcome_of

if TYPE_CHECKING:
    from meshserve.serving.host import ProcessHost

log = logging.getLogger("meshserve.http")

OPEN = ("/health", "/metrics")  # paths that need no bearer token
RETRY_AFTER_S = 1
BODY_TIMEOUT = web.AppKey("body_timeout_s", float)  # seconds a request body may take to arrive


def _json(body: dict, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type="application/json", headers=headers)


def _error(e: APIError) -> web.Response:
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
    response = _json(e.body(), e.status, headers)
    if e.status in (408, 413):  # what is left of the body will not be read: the connection ends here
        response.force_close()
    return response


def _param_of(message: str) -> str | None:
    """The request field a meshserve error message names first ("top_p must be …" → "top_p")."""
    head = message.split(":", 1)[0].split(" ", 1)[0].split("[", 1)[0]
    return head if head.replace("_", "").isalpha() and head.islower() else None


def _sse(body: dict) -> bytes:
    return f"data: {json.dumps(body)}\n\n".encode()


class _Refuse(asyncio.Protocol):
    """A connection past the cap: a 503 in the envelope, then closed, before anything is read."""

    def __init__(self, cap: int):
        self.cap = cap

    def connection_made(self, transport) -> None:
        body = json.dumps(APIError(503, f"too many connections (server.http_max_connections = {self.cap}); "
                                   "retry shortly", None, "too_many_connections").body()).encode()
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                        b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        transport.close()


class _Protocol(RequestHandler):
    """aiohttp's protocol, but a request it cannot parse (a broken head, a body in an encoding it
    cannot decode, like `br`) is answered in the OpenAI envelope and logged in one line, not with a
    traceback per request."""

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, ContentEncodingError):
            reason = "its Content-Encoding cannot be decoded (send the body as is, gzip or deflate)"
        else:  # the parser's first line (the rest points at the byte)
            reason = (message or (f"{type(exc).__name__}: {exc}" if exc is not None else "")).strip()
            reason = reason.splitlines()[0] if reason else "unknown"
        log.info("HTTP request from %s not parsed (%d): %s", request.remote, status, reason)
        if request.writer.output_size > 0:  # an answer already began: the connection is broken
            raise ConnectionError("an answer was sent already, cannot send an error after it")
        text = f"the request cannot be parsed: {reason}" if status < 500 else "internal error"
        response = _error(APIError(status, text))
        response.force_close()
        return response


def _url_host(host: str) -> str:
    """A listening address as a client would write it in a URL."""
    if host in ("0.0.0.0", "::", ""):
        return "localhost"
    return f"[{host}]" if ":" in host else host


class HTTPTransport:
    def __init__(self):
        self.host: "ProcessHost | None" = None
        self.runner: web.AppRunner | None = None
        self.port: int | None = None
        self._listener: asyncio.Server | None = None
        self.started = int(time.time())

    async def start(self, host: "ProcessHost") -> None:
        self.host = host
        app = web.Application(client_max_size=host.config.max_message_bytes, middlewares=[self._errors, self._auth])
        app[BODY_TIMEOUT] = host.config.http_body_timeout_s
        app.add_routes([web.post("/v1/completions", self.completions), web.post("/v1/chat/completions", self.chat),
                        web.get("/v1/models", self.models), web.get("/health", self.health_check),
                        web.get("/metrics", self.metrics), web.get("/tokenizer_info", self.tokenizer_info),
                        web.post("/tokenize", self.tokenize), web.post("/detokenize", self.detokenize)])
        # keep-alive timeout = header timeout: aiohttp closes a connection that has not sent a whole
        # request head this long after opening, or after its last response; what is left unread of a
        # body after the answer (a 401, a 408) is drained for at most a second, then the connection ends
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                    keepalive_timeout=host.config.http_header_timeout_s, lingering_time=1.0)
        await self.runner.setup()
        try:
            self._listener = await asyncio.get_running_loop().create_server(
                self._connection, host.config.host, host.config.http_port, reuse_address=True)
        except OSError as e:
            raise MeshserveError(listen_error("--port", host.config.host, host.config.http_port, "the OpenAI API",
                                              e)) from None
        self.port = self._listener.sockets[0].getsockname()[1]
        log.info("meshserve OpenAI API listening on %s:%d", host.config.host, self.port)

    def describe(self) -> str:
        return f"OpenAI API http://{_url_host(self.host.config.host)}:{self.port}/v1"

    async def ready(self, host: "ProcessHost") -> None:
        pass

    async def health(self, serving: bool) -> None:
        pass  # GET /health asks the host each time

    def _connection(self) -> asyncio.Protocol:
        """A new connection's protocol: aiohttp's, or, past http_max_connections, a 503 and close."""
        if len(self.runner.server.connections) >= self.host.config.http_max_connections:
            self.host.metrics.http_refused.inc()
            return _Refuse(self.host.config.http_max_connections)
        server = self.runner.server  # what Server.__call__ makes, with our error answers
        return _Protocol(server, loop=asyncio.get_running_loop(), **server._kwargs)

    async def stop(self, grace: float) -> None:
        if self._listener is not None:
            self._listener.close()
        if self.runner is not None:
            await self.runner.cleanup()

    # ---- middleware ---------------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except APIError as e:
            return _error(e)
        except web.HTTPException as e:  # no such route or method: still the envelope
            return _error(APIError(e.status, f"{request.method} {request.path}: {e.reason}"))
        except Exception as e:  # a fault of this server's: the envelope, never a traceback
            log.exception("%s %s failed", request.method, request.path)
            return _error(APIError(500, f"internal error: {type(e).__name__}: {e}"))

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        tokens = self.host.config.auth_tokens
        if tokens and request.path not in OPEN:
            if not bearer_ok(request.headers.get("Authorization"), tokens):
                if request.path.endswith("completions"):
                    self.host.metrics.requests.labels("unauthenticated").inc()
                raise APIError(401, "missing or wrong bearer token (header 'Authorization: Bearer <token>')",
                               None, "invalid_api_key")
        return await handler(request)

    # ---- small endpoints ----------------------------------------------------------------------------

    def _engine(self):
        """The preprocessor and what is known of the engine, while serving (else a 503)."""
        pre = self.host.serving()
        if pre is None:
            raise APIError(503, self.host.unavailable(), None, "unavailable", retry_after=5)
        return pre, self.host.info

    @property
    def model_name(self) -> str:
        """The model's one name on every API (EngineInfo.served_name)."""
        return self.host.info.served_name

    async def health_check(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.host.serving() is not None else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.host.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        _, info = self._engine()
        name = self.model_name
        return _json({"object": "list", "data": [{"id": name, "object": "model", "created": self.started,
                                                  "owned_by": "meshserve", "root": name, "parent": None,
                                                  "max_model_len": info.context_length, **info.numerics,
                                                  "sampling_defaults": {**API_DEFAULTS, **info.sampling_defaults}}]})

    async def tokenizer_info(self, request: web.Request) -> web.Response:
        _, info = self._engine()
        config = info.tokenizer.config
        return _json({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": (config.eos_tokens or (None,))[0],
                      "bos_token": config.bos_token, "pad_token": None, "chat_template": config.chat_template,
                      "model_max_length": info.context_length, "add_bos_token": config.add_bos_token})

    async def tokenize(self, request: web.Request) -> web.Response:
        pre, info = self._engine()
        body = await self._body(request)
        if ("prompt" in body) == ("messages" in body):
            raise invalid("give exactly one of prompt, messages", "prompt")
        if "prompt" in body:
            if not isinstance(body["prompt"], str) or not body["prompt"]:
                raise invalid("prompt must be a non-empty string", "prompt")
            add = _Body(body).get("add_special_tokens", (bool,), True)
            ids = await self._pre(pre.run(pre.encode, Prompt(text=body["prompt"]), add_special_tokens=add))
        else:
            call = parse_chat({"messages": body["messages"]})
            ids = await self._pre(pre.run(pre.encode, call.prompts[0]))
        return _json({"count": len(ids), "max_model_len": info.context_length, "tokens": ids, "token_strs": None})

    async def detokenize(self, request: web.Request) -> web.Response:
        pre, _ = self._engine()
        tokens = (await self._body(request)).get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise invalid("tokens must be a list of token ids", "tokens")
        return _json({"prompt": await self._pre(pre.run(pre.decode, tokens))})

    @staticmethod
    async def _body(request: web.Request) -> dict:
        """The JSON object a request carries; 400 in the envelope for a body that cannot be read: not
        the compression its Content-Encoding names, an unknown charset, not text, not JSON."""
        timeout = request.app[BODY_TIMEOUT]
        try:
            async with asyncio.timeout(timeout):
                raw = await request.read()
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {timeout:g} s "
                                "(server.http_body_timeout_s)", None, "request_timeout") from None
        except web.HTTPRequestEntityTooLarge:
            raise APIError(413, f"the request body is larger than {request.client_max_size} bytes "
                                "(server.max_message_bytes)", None, "request_too_large") from None
        except Exception as e:  # aiohttp's RequestPayloadError: a broken gzip or deflate body
            raise invalid(f"the request body cannot be read: {str(e).strip().splitlines()[-1].strip()}", None) from None
        charset = request.charset or "utf-8"
        try:
            body = json.loads(raw.decode(charset))
        except LookupError:
            raise invalid(f"the request body's charset {charset!r} is unknown (send UTF-8)", None) from None
        except (ValueError, RecursionError) as e:  # not JSON, not text in its charset, or nested too deep
            raise invalid(f"the request body is not valid JSON: {type(e).__name__}: {e}", None) from None
        if not isinstance(body, dict):
            raise invalid("the request body must be a JSON object", None)
        return body

    @staticmethod
    async def _pre(work):
        try:
            return await work
        except ConstraintError:
            raise
        except RequestError as e:
            raise invalid(str(e), _param_of(str(e))) from None

    # ---- generation ---------------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_completion)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_chat)

    async def _generate(self, request: web.Request, parse) -> web.StreamResponse:
        """One generation call: one session, counted once in the metrics, whatever its outcome."""
        async with self.host.session(time.monotonic()) as session:
            try:
                return await self._run(request, parse, session)
            except APIError as e:
                session.settle(e.outcome)
                raise

    async def _run(self, request, parse, session: Session) -> web.StreamResponse:
        call: Generation = parse(await self._body(request))
        pre, info = self._engine()
        if call.model is not None and call.model != self.model_name:
            raise APIError(404, f"the model {call.model!r} does not exist (this server serves {self.model_name!r})",
                           "model", "model_not_found")
        shaper = Shaper(call, self.model_name, _token_text(info.tokenizer), info.tokenizer.decode)
        async with self.host.admitting():
            requests = await self._prepare(call, pre, session.arrival)
            try:  # all at once (one engine step), all or none; the first of a prompt before its forks
                await session.admit(requests)
            except Exception as e:
                raise _api_error(e) from None
        prompt_ids = [requests[p * call.n].token_ids for p in range(len(call.prompts))]
        choices = [Choice(i) for i in range(len(requests))]
        if call.stream:
            return await self._stream(request, call, shaper, session, requests, choices, prompt_ids)
        await self._collect(session, requests, choices)
        return _json(shaper.response(choices, prompt_ids))

    async def _prepare(self, call: Generation, pre, arrival: float) -> list[Request]:
        """Every choice's engine request: each prompt tokenized once, its samples forks of the first."""
        requests = []
        default = None if call.chat else call.sampling.get("max_tokens")
        for prompt in call.prompts:
            sampling = dict(call.sampling)
            try:
                first = await self._pre(pre.run(pre.prepare, prompt, sampling, arrival=arrival,
                                                default_max_tokens=default, api_defaults=API_DEFAULTS))
            except ConstraintError as e:  # named by the field that carried the constraint
                raise invalid(str(e), call.guided_field) from None
            requests.append(first)
            for i, seed in enumerate(call.seeds()[1:], 1):  # scored once: forks take the first's scores
                params = dataclasses.replace(first.params, seed=seed)
                requests.append(Request(first.token_ids, params, first.priority, f"{first.request_id}-{i}",
                                              arrival, fork_of=first.request_id))
        return requests

    async def _collect(self, session: Session, requests: list[Request], choices: list[Choice]) -> None:
        try:
            async with asyncio.TaskGroup() as group:  # a cancelled handler (client gone) cancels them all
                for r, choice in zip(requests, choices):
                    group.create_task(self._follow(session, r, choice))
        except* APIError as failed:
            raise failed.exceptions[0] from None

    @staticmethod
    async def _follow(session: Session, r: Request, choice: Choice, on_output=None) -> None:
        try:
            async for out in session.outputs(r.request_id):
                _add(choice, out)
                if on_output is not None:
                    await on_output(choice, out)
        except MeshserveError as e:  # unavailable, rejected in the queue, failed
            session.fail(e)
            raise _api_error(e) from None

    async def _stream(self, request, call: Generation, shaper: Shaper, session: Session, requests: list[Request],
                      choices: list[Choice], prompt_ids) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        offsets = {}
        usage_every = call.include_usage and not call.continuous_usage

        async def send(body: dict) -> None:
            if call.continuous_usage:
                body["usage"] = shaper.usage_of(choices)
            elif usage_every:
                body["usage"] = None
            await response.write(_sse(body))

        if call.chat:
            for choice in choices:
                await send(shaper.chunk(choice.index, role=True))

        async def on_output(choice: Choice, out: RequestOutput) -> None:
            first = choice.index not in offsets
            prompt = prompt_ids[choice.index // call.n]
            text, entries = out.text, list(out.logprobs)
            if first and call.echo:
                echoed = shaper.echo_text(choice.index, prompt)
                text, entries = echoed + text, list(out.prompt_logprobs) + entries
                offsets[choice.index] = 0
            elif first:
                offsets[choice.index] = 0 if call.chat else len(shaper.echo_text(choice.index, prompt))
            if call.score_only:
                text, entries = (text[:len(text) - len(out.text)], entries[:len(entries) - len(out.logprobs)])
            logprobs = None
            if call.logprobs is not None:
                if call.chat:
                    logprobs = shaper.chat_logprobs(entries)
                else:
                    logprobs = shaper.completion_logprobs(entries, prompt, offsets[choice.index])
                    offsets[choice.index] += sum(len(t) for t in logprobs["tokens"])
            if choice.index in tool_streams:  # tools offered: content and tool-call deltas
                await send_tools(choice, tool_streams[choice.index], text, logprobs, out)
            elif text or logprobs or out.finished:
                await send(shaper.chunk(choice.index, text=text, logprobs=logprobs,
                                        finish_reason=out.finish_reason if out.finished else None))

        tool_streams = {c.index: s for c in choices if (s := shaper.tool_stream()) is not None}

        async def send_tools(choice: Choice, stream, text: str, logprobs, out: RequestOutput) -> None:
            deltas = stream.feed(text)
            reason = None
            if out.finished:
                deltas += stream.finish()
                reason = "tool_calls" if stream.calls and out.finish_reason == "stop" else out.finish_reason
            if logprobs and not deltas:
                deltas = [{}]
            for k, delta in enumerate(deltas):
                await send(shaper.delta_chunk(choice.index, delta, logprobs if k == 0 else None))
            if reason is not None:
                await send(shaper.delta_chunk(choice.index, {}, None, reason))

        error, gone = None, False
        try:
            async with asyncio.TaskGroup() as group:
                for r, choice in zip(requests, choices):
                    group.create_task(self._follow(session, r, choice, on_output))
            if call.include_usage:
                await response.write(_sse(shaper.usage_chunk(choices)))
        except* ConnectionResetError:  # the client left mid-stream: its requests were aborted on the way out
            gone = True
        except* APIError as group:  # after the stream started: the error as an event, then the end
            error = group.exceptions[0]
        if gone:
            return response
        if error is not None:
            await response.write(_sse(error.body()))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _add(choice: Choice, out: RequestOutput) -> None:
    choice.token_ids += out.token_ids
    choice.text.append(out.text)
    choice.logprobs += out.logprobs
    if out.prompt_logprobs:
        choice.prompt_logprobs = out.prompt_logprobs
    choice.prompt_tokens, choice.cached_tokens = out.prompt_tokens, out.cached_tokens
    if out.finished:
        choice.finish_reason = out.finish_reason


def _api_error(e: Exception) -> APIError:
    """A session's refusal or failure in the OpenAI envelope (the status follows the outcome)."""
    outcome = outcome_of(e)
    if outcome == "invalid":
        return invalid(str(e), _param_of(str(e)))
    if outcome == "rejected":
        return APIError(429, str(e), None, "queue_full", retry_after=RETRY_AFTER_S)
    if outcome == "unavailable":
        return APIError(503, str(e), None, "unavailable", retry_after=RETRY_AFTER_S)
    return APIError(500, str(e), None, None)


def _token_text(tokenizer):
    """Token id → its text as the OpenAI logprobs shapes show it (special tokens spelled out)."""
    @functools.lru_cache(maxsize=65536)
    def text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)
    return text
