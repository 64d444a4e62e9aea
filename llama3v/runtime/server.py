"""`llama3v serve`: an OpenAI-compatible HTTP server over one session (FastAPI + uvicorn).

FastAPI and uvicorn are what llama-cpp-python's own server uses: maintained, typed, with
server-sent events through Starlette. The model serves `--parallel` requests at once (one by
default), decoded together in one context (Worker): more wait in a bounded queue (a full queue
answers 503) and start in order as slots free up; a client that disconnects stops its generation
at the next token, freeing its slot. Loopback by default;
optional API key; local media only under the allowed roots; remote URLs only if enabled.
Besides /v1/chat/completions it answers the legacy /v1/completions (text_completions.py) and serves
the chat page at / (page.py).
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations (Request)
# at definition time, and they are imported inside create_app because FastAPI is optional.
import asyncio
import json
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from llama3v.errors import Llama3vError
from llama3v.runtime import openai_api as oa
from llama3v.runtime import text_completions as tc
from llama3v.runtime.http_guard import Guard, GuardPolicy, error_body, header_deadline_protocol
from llama3v.runtime.options import CONVERSATION_MAX_TOKENS
from llama3v.runtime.session import Generation, Session

log = logging.getLogger("llama3v.server")
# How often a non-streamed request looks for its client. uvicorn notices a closed connection only while it
# reads from it, which each look resumes, so a departure is seen within two looks.
DISCONNECT_CHECK_S = 0.25


@dataclass
class ServerConfig:
    """Limits and policy of a server (docs/serving.md lists them with their flags)."""

    model_name: str = "llama3v"
    api_key: str | None = None
    media: oa.MediaPolicy = field(default_factory=oa.MediaPolicy)
    max_body_bytes: int = 64 << 20
    max_queue: int = 16
    request_timeout_s: float = 600.0
    body_timeout_s: float = 30.0  # a client that trickles its body this long is dropped (slow-client attacks)
    header_timeout_s: float = 10.0  # the same for the request line and headers
    max_pending_bytes: int = 256 << 20  # bodies of admitted requests not yet running, together (503 beyond)
    allowed_hosts: tuple[str, ...] = ()  # Host names answered besides IP literals and localhost
    fetch_workers: int = 4  # threads for remote media fetches, apart from everything else
    default_max_tokens: int = CONVERSATION_MAX_TOKENS


@dataclass
class Job:
    """One request for the worker: chat messages (or a raw prompt) and sampling options; `push` gets its events."""

    messages: list[dict]
    options: dict
    # delivers ("piece", text, token logprobs) / ("done", Result) / ("error", status, text)
    push: Callable[[tuple], None] | None = None
    ticket: int = 0  # bytes admitted for this request (Worker.admit); given back when it leaves the queue
    cancel: threading.Event = field(default_factory=threading.Event)
    temp_files: list[Path] = field(default_factory=list)
    queued: float = field(default_factory=time.monotonic)
    prompt: str | None = None  # /v1/completions: raw text to continue instead of messages


@dataclass
class _Active:
    """A job in a slot: its generation and how many logprobs were sent."""

    job: Job
    gen: Generation
    steps: Iterator[str | int]
    sent: int = 0


class Worker:
    """Runs jobs on the session's slots in a thread of its own: the one thread that touches llama.cpp.

    Each round it asks every running generation for its next token (sampled from the last batch's
    logits), then starts queued jobs in free slots (encoding their media and decoding their prompt
    into their own sequence, one job after another: libmtmd and libllama are not safe to call from
    several threads), then decodes the round's tokens of every slot in one batch.

    Admission comes before a request's body is read: a request holds a place in the queue (and its body's
    bytes count against `max_pending_bytes`) from its headers until the worker takes it, so concurrent big
    bodies are refused with 503 before they are received and decoded, not after."""

    def __init__(self, session: Session, config: ServerConfig):
        self.session, self.config = session, config
        self.jobs: queue.Queue[Job | None] = queue.Queue()  # bounded by admission
        self.slots: list[_Active | None] = [None] * session.ctx.n_seq
        self.stats = {"served": 0, "cancelled": 0, "failed": 0, "rejected": 0, "slots_peak": 0}
        self._lock = threading.Lock()
        self._admitted = self._admitted_bytes = 0
        self._thread = threading.Thread(target=self._run, name="llama3v-worker", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """Whether any slot is generating."""
        return self.in_use > 0

    @property
    def in_use(self) -> int:
        """Slots generating now."""
        return sum(a is not None for a in self.slots)

    def admit(self, nbytes: int) -> int:
        """Hold a place for a request whose body has `nbytes` bytes (at most); raise a 503 RequestError when the
        queue or the pending-bytes budget is full. Returns the ticket to `release` or hand to a job."""
        with self._lock:
            full = self._admitted >= self.config.max_queue
            if full or self._admitted_bytes + nbytes > self.config.max_pending_bytes:
                self.stats["rejected"] += 1
                what = f"{self.config.max_queue} requests are waiting" if full else \
                    f"requests waiting hold {self.config.max_pending_bytes >> 20} MiB of bodies"
                raise oa.RequestError(f"server busy: {what}; retry later", 503)
            self._admitted += 1
            self._admitted_bytes += nbytes
        return nbytes

    def release(self, ticket: int) -> None:
        """Give back an admitted place."""
        with self._lock:
            self._admitted -= 1
            self._admitted_bytes -= ticket

    def submit(self, job: Job) -> None:
        """Queue an admitted job."""
        self.jobs.put_nowait(job)

    def stop(self) -> None:
        """Finish the running jobs and end the thread."""
        self.jobs.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        stopping = False
        while not stopping or self.busy:
            tokens: dict[int, int] = {}
            for slot in range(len(self.slots)):
                if self.slots[slot] is not None:
                    self._advance(slot, tokens)
            while not stopping and None in self.slots:
                try:  # wait only when nothing is running
                    job = self.jobs.get_nowait() if self.busy else self.jobs.get()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    continue
                self.release(job.ticket)
                if job.cancel.is_set():  # its client left while it waited
                    self.stats["cancelled"] += 1
                    oa.remove_temp(job.temp_files)
                else:
                    self._start(job, tokens)
            try:
                self.session.decode_step(tokens)
            except Exception as e:  # the batch failed: every generation in it ends
                log.exception("batch decode failed")
                for slot in tokens:
                    self._fail(slot, e)

    def _start(self, job: Job, tokens: dict[int, int]) -> None:
        """Begin a job in a free slot: the session picks the one that holds the longest prefix of its prompt."""
        free = [i for i, a in enumerate(self.slots) if a is None]
        try:
            if job.prompt is None:
                gen = self.session.chat(job.messages, slot=free, **job.options)
            else:
                gen = self.session.complete(job.prompt, slot=free, **job.options)
        except Exception as e:
            self._refuse(job, e)
            oa.remove_temp(job.temp_files)
            return
        self.slots[gen.slot] = _Active(job, gen, gen.steps())
        self.stats["slots_peak"] = max(self.stats["slots_peak"], self.in_use)
        self._advance(gen.slot, tokens)

    def _advance(self, slot: int, tokens: dict[int, int]) -> None:
        """Run a slot's generation to its next token to decode (into `tokens`), or to its end."""
        active = self.slots[slot]
        job = active.job
        if job.cancel.is_set() or time.monotonic() > job.queued + self.config.request_timeout_s:
            self.stats["cancelled"] += 1
            if not job.cancel.is_set():
                job.push(("error", 504, f"request timed out after {self.config.request_timeout_s:.0f} s"))
            self._free(slot)
            return
        try:
            for step in active.steps:
                if isinstance(step, int):
                    tokens[slot] = step
                    return
                job.push(("piece", step, active.gen.logprobs[active.sent:]))
                active.sent = len(active.gen.logprobs)
        except Exception as e:
            self._fail(slot, e)
            return
        self.stats["served"] += 1
        job.push(("done", active.gen.result))
        self._free(slot)

    def _fail(self, slot: int, e: Exception) -> None:
        """Answer a slot's job with the error and free the slot."""
        self._refuse(self.slots[slot].job, e)
        self._free(slot)

    def _refuse(self, job: Job, e: Exception) -> None:
        self.stats["failed"] += 1
        if isinstance(e, oa.RequestError):
            job.push(("error", e.status, oa.public_message(str(e), job.temp_files)))
        elif isinstance(e, Llama3vError):
            job.push(("error", 400, oa.public_message(str(e), job.temp_files)))
        else:  # a bug must not take the worker down
            log.error("request failed", exc_info=e)
            job.push(("error", 500, f"internal error: {type(e).__name__}"))

    def _free(self, slot: int) -> None:
        """Close a slot's generation (a no-op once finished; else the KV cache keeps what was decoded so far),
        remove its uploads, then report the slot free."""
        active = self.slots[slot]
        active.gen.close()
        oa.remove_temp(active.job.temp_files)
        self.slots[slot] = None


def create_app(session: Session, config: ServerConfig):  # -> fastapi.FastAPI
    """The FastAPI application serving `session`."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import StreamingResponse
        from starlette.exceptions import HTTPException
    except ImportError as e:
        raise Llama3vError("the server needs FastAPI and uvicorn: pip install 'llama3v[server]'") from e
    from llama3v.runtime import page  # the chat page at / (imports FastAPI too)

    worker = Worker(session, config)
    fetch_pool = ThreadPoolExecutor(config.fetch_workers, thread_name_prefix="llama3v-fetch")
    app = FastAPI(title="llama3v", version="1", docs_url=None, redoc_url=None)
    app.state.worker = worker
    app.add_middleware(Guard, policy=GuardPolicy(config.api_key, config.allowed_hosts, config.max_body_bytes,
                                                 page.public))

    @app.exception_handler(oa.RequestError)
    async def refused(_request: Request, exc: oa.RequestError):  # noqa: ANN202
        return _error(exc.status, oa.public_message(str(exc), []))

    @app.exception_handler(HTTPException)  # unknown routes and methods: OpenAI's error object, not FastAPI's
    async def routing(request: Request, exc: HTTPException):  # noqa: ANN202
        what = {404: "unknown route", 405: "method not allowed"}.get(exc.status_code, exc.detail)
        return _error(exc.status_code, f"{what}: {request.method} {request.url.path}")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "busy": worker.busy, "slots_in_use": worker.in_use, "slots": len(worker.slots),
                "queued": worker.jobs.qsize(), **worker.stats}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "llama3v"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):  # noqa: ANN202 - JSON or an event stream
        async def load(payload: dict, job: Job) -> None:
            messages = payload.get("messages")
            # Remote fetches run in a pool of their own: slow servers cannot hold up other requests' media.
            pool = fetch_pool if oa.has_remote(messages) else None
            job.messages = await asyncio.get_running_loop().run_in_executor(
                pool, oa.session_messages, messages, config.media, job.temp_files)

        return await answer(request, load, oa.ChatFormat)

    @app.post("/v1/completions")
    async def completions(request: Request):  # noqa: ANN202 - JSON or an event stream
        async def load(payload: dict, job: Job) -> None:
            job.prompt = tc.prompt_text(payload)

        return await answer(request, load, tc.TextFormat)

    async def answer(request: Request, load: Callable[[dict, Job], Awaitable[None]],  # noqa: ANN202
                     fmt: oa.ResponseFormat):
        """Admit the request, read and `load` it into a job, queue it; stream its events or wait for the whole
        answer, written in `fmt`."""
        length = request.headers.get("content-length")
        job = Job(messages=[], options={}, ticket=worker.admit(int(length) if length else config.max_body_bytes))
        try:
            payload = await read_json(request, config)
            job.options = oa.sampling(payload, config.default_max_tokens)
            await load(payload, job)
        except BaseException:
            worker.release(job.ticket)
            oa.remove_temp(job.temp_files)
            raise
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.push = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
        worker.submit(job)
        request_id = oa.new_id(fmt.id_prefix)
        if payload.get("stream"):
            include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_sse(events, job, request_id, config.model_name, include_usage, fmt),
                                     media_type="text/event-stream")
        return await _collect(request, events, job, request_id, config.model_name, fmt)

    app.include_router(page.router(session, config, read_json))
    return app


async def read_json(request, config: ServerConfig) -> dict:  # noqa: ANN001 - a Starlette Request
    """The request body as a JSON object, within the body size and time limits; anything JSON accepts but a
    client must not send (NaN and Infinity, lone surrogates, deep nesting) is a 400."""
    try:
        body = await asyncio.wait_for(_read_body(request, config.max_body_bytes), config.body_timeout_s)
    except TimeoutError:
        raise oa.RequestError(f"request body not received within {config.body_timeout_s:.0f} s", 408) from None
    try:
        payload = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise oa.RequestError("request body is nested too deeply") from None
    except ValueError as e:
        raise oa.RequestError(f"request body is not JSON: {e}") from None
    if not isinstance(payload, dict):
        raise oa.RequestError("request body must be a JSON object")
    _check_strings(payload)
    return payload


def _no_constant(name: str) -> None:
    raise oa.RequestError(f"request body holds {name}, which is not a JSON number")


def _check_strings(payload: object) -> None:
    """Refuse strings that are not valid Unicode text (JSON escapes can spell lone surrogates)."""
    stack = [payload]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise oa.RequestError("request body holds a lone surrogate (invalid Unicode text)") from None


def _error(status: int, message: str, kind: str = "invalid_request_error"):  # noqa: ANN202 - a Response
    from fastapi.responses import Response

    return Response(error_body(status, message, kind), status_code=status, media_type="application/json")


async def _read_body(request, limit: int) -> bytes:  # noqa: ANN001 - a Starlette Request
    """The body, refused as soon as it passes `limit` bytes (chunked uploads have no Content-Length)."""
    chunks, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            raise oa.RequestError(f"request body over the {limit >> 20} MiB limit", 413)
        chunks.append(piece)
    return b"".join(chunks)


async def _collect(request, events: asyncio.Queue, job: Job, request_id: str, model: str,  # noqa: ANN001, ANN202
                   fmt: oa.ResponseFormat):
    """Wait for a non-streamed answer, cancelling the job if the client goes away (checked every
    DISCONNECT_CHECK_S, also while pieces keep arriving)."""
    try:
        next_check = time.monotonic() + DISCONNECT_CHECK_S
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=max(0.0, next_check - time.monotonic()))
            except TimeoutError:
                event = None
            if time.monotonic() >= next_check:
                if await request.is_disconnected():
                    return _error(499, "client disconnected")
                next_check = time.monotonic() + DISCONNECT_CHECK_S
            if event is None or event[0] == "piece":
                continue
            if event[0] == "done":
                return fmt.whole(event[1], model, request_id)
            return _error(event[1], event[2])
    finally:
        job.cancel.set()  # no-op when finished; stops the worker if this handler is cancelled


async def _sse(events: asyncio.Queue, job: Job, request_id: str, model: str,
               include_usage: bool, fmt: oa.ResponseFormat) -> AsyncIterator[str]:
    """Server-sent events: an opening chunk (chat), text chunks, a final chunk, [DONE]; cancelled on disconnect."""
    try:
        if (opening := fmt.opening(request_id, model)) is not None:
            yield _event(opening)
        while True:
            event = await events.get()
            if event[0] == "piece":
                yield _event(fmt.piece(request_id, model, event[1], event[2]))
            elif event[0] == "done":
                yield _event(fmt.closing(request_id, model, event[1], include_usage))
                break
            else:
                yield _event({"error": {"message": event[2], "code": event[1]}})
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()  # the client went away (or we are done): stop generating


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def serve(session: Session, config: ServerConfig, host: str = "127.0.0.1", port: int = 8080,
          log_level: str = "info") -> None:
    """Run the server until interrupted."""
    try:
        import uvicorn
    except ImportError as e:
        raise Llama3vError("the server needs FastAPI and uvicorn: pip install 'llama3v[server]'") from e
    if host not in ("0.0.0.0", "::", ""):  # the name it was started with is its own
        config = replace(config, allowed_hosts=(*config.allowed_hosts, host))
    app = create_app(session, config)
    logging.basicConfig(level=getattr(logging, log_level.upper()), format="%(message)s")
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False,
                    http=header_deadline_protocol(config.header_timeout_s))
    finally:
        app.state.worker.stop()
