"""The chat page of `llama3v serve`: static files from web/ at `/`, and the media preview the page draws.

The page is plain HTML, CSS and JavaScript shipped in the package (no build step, nothing fetched from
elsewhere). It talks to the same OpenAI endpoints as any client, with the same API key and limits.
`POST /v1/llama3v/media` tells it what the runtime will make of an upload before it is sent: an image's
tiles (from the same image processing a request runs) and a video's sampled frames with their times.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at definition time.
import asyncio
import base64
import io
from collections.abc import Awaitable, Callable
from pathlib import Path

from PIL import Image

from llama3v.errors import Llama3vError
from llama3v.runtime import openai_api as oa
from llama3v.runtime.image_processing import TileLayout, tile_boxes
from llama3v.runtime.media import describe, image_parts, image_spec, sample_video
from llama3v.runtime.session import Session

WEB = Path(__file__).with_name("web")
FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
# The page may load only its own files and talk only to this server; model output is inserted as text.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
THUMB = 112  # pixels on the long side of a video frame's preview


def public(path: str) -> bool:
    """Paths served without the API key: the page's own files (they hold no data) and /health."""
    return path in ("/", "/health") or path.removeprefix("/web/") in FILES


def router(session: Session, config: object, read_json: Callable[..., Awaitable[dict]]):  # -> fastapi.APIRouter
    """The page's routes over `session`, under the server's `config` (ServerConfig); `read_json(request, config)`
    is the server's body reader, so the preview has the API's body limits."""
    from fastapi import APIRouter, Request
    from fastapi.responses import Response

    routes = APIRouter()

    def static(name: str) -> Response:
        return Response((WEB / name).read_bytes(), media_type=FILES[name], headers=HEADERS)

    @routes.get("/", include_in_schema=False)
    async def index() -> Response:
        return static("index.html")

    @routes.get("/web/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in FILES:
            raise oa.RequestError(f"unknown route: GET /web/{name}", 404)
        return static(name)

    @routes.post("/v1/llama3v/media")
    async def media(request: Request) -> dict:
        payload = await read_json(request, config)
        kind = payload.get("type")
        if kind not in ("image", "video"):
            raise oa.RequestError("type must be image or video")
        if session.encoder is None:
            raise oa.RequestError("this server has no mmproj, so it cannot take images or videos")
        return await asyncio.to_thread(preview, session, kind, payload.get("url"), config.media)

    return routes


def preview(session: Session, kind: str, url: object, policy: oa.MediaPolicy) -> dict:
    """What a request with this media would do, under the same policy and checks as the API."""
    temp_files: list[Path] = []
    try:
        source = oa.fetch(url, kind, policy, temp_files)
        return image_preview(session, source) if kind == "image" else video_preview(session, source)
    except oa.RequestError:
        raise
    except Llama3vError as e:
        raise oa.RequestError(oa.public_message(str(e), temp_files)) from None
    finally:
        oa.remove_temp(temp_files)


def image_preview(session: Session, source: bytes | Path) -> dict:
    """An image's layout, tiles (boxes in image pixels) and prompt rows, as the session would encode it."""
    o = session.options
    info = describe(image_parts(source, 0, session.encoder, session.cache, o.max_tiles, o.image_layout))
    layout = TileLayout(info.layout, tuple(info.grid), tuple(info.image_size))
    base, tiles = tile_boxes(layout, image_spec(session.encoder, o.max_tiles))
    return {"kind": "image", "width": layout.image_size[0], "height": layout.image_size[1], "layout": layout.kind,
            "grid": list(layout.grid), "n_tiles": info.n_tiles, "rows": info.rows,
            "tower_size": session.encoder.spec.size, "mode": session.encoder.spec.mode,
            "base": list(base), "tiles": [list(b) for b in tiles]}


def video_preview(session: Session, source: bytes | Path) -> dict:
    """A video's sampled frames as the tower sees them (small JPEGs) with their indices and times."""
    video = sample_video(source, 0, session.encoder, session.options.video_sampling)
    frames = [{"index": i, "time": t, "image": _jpeg(tile)}
              for i, t, tile in zip(video.frames, video.timestamps, video.tiles, strict=True)]
    return {"kind": "video", "duration": video.duration, "frames": frames,
            "rows_per_frame": session.encoder.tokens_per_tile}


def _jpeg(tile: object) -> str:
    image = Image.fromarray(tile)
    image.thumbnail((THUMB, THUMB))  # only ever shrinks
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()
