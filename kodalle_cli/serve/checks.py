"""What ``kodalle serve`` accepts: the limits, and every check of a request (its JSON body,
a job's fields, a caption, an image name) before anything reaches the job queue. A refused
request is a :class:`BadRequest`: its status and one line for the page."""

from __future__ import annotations

import dataclasses
import io
import ipaddress
import json
import math
import re

from starlette.requests import Request

from kodalle_cli.configs import RANKINGS, SampleConfig
from kodalle_cli.errors import ConfigError, UsageError

# ---- limits ----------------------------------------------------------------------------------
MAX_IMAGES = 64  # images per request
MAX_CAPTION_CHARS = 1000
MAX_SEED = 2**53 - 1  # the largest integer the page's JavaScript holds exactly
MAX_TOP_K = 1_000_000
MAX_TEMPERATURE = 10.0
MAX_COND_SCALE = 50.0
MAX_BODY_BYTES = 64 * 1024
MAX_PROMPT_BYTES = 10 * 1024 * 1024  # an uploaded image prompt (POST /api/prompts)
MAX_PROMPT_PIXELS = 40_000_000  # ... and its pixels, decoded
PROMPT_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}

FIELDS = ("caption", "n", "seed", "top_k", "top_p", "temperature", "cond_scale", "rank",
          "keep", "init_image", "init_rows")
_IMAGE_NAME = re.compile(r"(\d{1,4})\.png")
PROMPT_ID = re.compile(r"[0-9a-f]{32}")  # an uploaded image prompt's id


def sample_defaults() -> dict:
    """The CLI's defaults for what a request may set (:class:`SampleConfig`'s fields)."""
    fields = {f.name: f.default for f in dataclasses.fields(SampleConfig)}
    return {name: fields[name] for name in FIELDS if name != "caption"}


class BadRequest(Exception):
    """A request the server refuses: its status and a message for the page."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---- checking a request ----------------------------------------------------------------------
def shown(value) -> str:
    """``value`` as JSON for a message, cut at 40 characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:40] + "…"


def _whole(body: dict, name: str, lo: int, hi: int, *, optional: bool = False):
    value = body.get(name)
    if value is None and optional:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be a whole number, not {shown(value)}")
    if not lo <= value <= hi:
        raise BadRequest(f"{name} {shown(value)} is out of range: give {lo} to {hi}")
    return value


def _number(body: dict, name: str, lo: float, hi: float, *, optional: bool = False):
    value = body.get(name)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{name} must be a number, not {shown(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not (math.isfinite(number) and lo <= number <= hi):
        raise BadRequest(f"{name} {shown(value)} is out of range: give {lo:g} to {hi:g}")
    return number


def check_caption(value, *, allow_empty: bool = False) -> str:
    """The caption as text of at most :data:`MAX_CAPTION_CHARS` characters."""
    if not isinstance(value, str):
        raise BadRequest(f"caption must be text, not {shown(value)}")
    if len(value) > MAX_CAPTION_CHARS:
        raise BadRequest(f"the caption is {len(value)} characters: at most "
                         f"{MAX_CAPTION_CHARS} are allowed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("the caption holds characters that are not text (lone surrogates)") \
            from None
    if not allow_empty and not value.strip():
        raise BadRequest("the caption is empty: type what to draw")
    return value


def check_job_request(body, *, reranker: bool, image_rows: int) -> dict:
    """A job request's fields with the CLI's defaults filled in, or :class:`BadRequest`.
    ``image_rows``: the model's rows of image codes (``init_rows`` keeps 1 to one less).

    ``rank``: null (the reranker when the server has one, else generation order) or
    ``"perplexity"`` (``--rank perplexity``); ``keep``: the best K of them. ``init_image``:
    the id of an image prompt uploaded to ``/api/prompts`` (``--init-image``), of which
    ``init_rows`` code rows are kept (``--init-rows``, default half); with one the caption
    may be empty (the ``--cond-drop`` null caption)."""
    if not isinstance(body, dict):
        raise BadRequest("send a JSON object such as {\"caption\": \"...\", \"n\": 4}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field {shown(unknown[0])}: the fields are "
                         f"{', '.join(FIELDS)}")
    if "caption" not in body:
        raise BadRequest("caption is missing: type what to draw")
    given = {**sample_defaults(), **body}  # a field sent as null: none (seed: a random one)
    prompt = given["init_image"]
    if prompt is not None and not (isinstance(prompt, str) and PROMPT_ID.fullmatch(prompt)):
        raise BadRequest(f"init_image {shown(prompt)} is not an uploaded image prompt's id "
                         "(POST the image to /api/prompts first)")
    out = {"caption": check_caption(body["caption"], allow_empty=prompt is not None)}
    out["n"] = _whole(given, "n", 1, MAX_IMAGES)
    out["seed"] = _whole(given, "seed", 0, MAX_SEED, optional=True)
    out["top_k"] = _number(given, "top_k", 0, MAX_TOP_K, optional=True)
    out["top_p"] = _number(given, "top_p", 0, 1, optional=True)
    out["temperature"] = _number(given, "temperature", 0, MAX_TEMPERATURE)
    out["cond_scale"] = _number(given, "cond_scale", 0, MAX_COND_SCALE)
    out["rank"] = given["rank"]
    if out["rank"] not in (None, *RANKINGS):
        raise BadRequest(f"rank {shown(out['rank'])}: give null (the reranker, when the "
                         f"server has one) or {' or '.join(map(shown, RANKINGS))}")
    out["keep"] = _whole(given, "keep", 1, out["n"], optional=True)
    if out["keep"] is not None and out["rank"] is None and not reranker:
        raise BadRequest('keep needs a ranking: rank by "perplexity", or start the server '
                         "with --reranker DIR")
    out["init_image"] = prompt
    if prompt is None and given["init_rows"] is not None:
        raise BadRequest("init_rows needs an image prompt (init_image)")
    if prompt is not None and image_rows < 2:
        raise BadRequest(f"this model's images are {image_rows} row of codes: an image "
                         "prompt would leave nothing to draw")
    out["init_rows"] = None
    if prompt is not None:  # the CLI's default: half the rows
        out["init_rows"] = (image_rows // 2 if given["init_rows"] is None
                            else _whole(given, "init_rows", 1, image_rows - 1))
    try:  # the library's own checks (top-k a count or a fraction, top-p in (0, 1], ...)
        SampleConfig(captions=[out["caption"]], out=None, **{
            k: out[k] for k in ("n", "seed", "top_k", "top_p", "temperature",
                                "cond_scale")}).settings()
    except ConfigError as exc:
        raise BadRequest(f"{exc.name} {shown(exc.value)}: {exc.reason}") from None
    except UsageError as exc:
        raise BadRequest(str(exc)) from None
    return out



def check_picked_attributes(body) -> dict[str, str]:
    """``{"attributes": {"part.name": "value", ...}}``: the picked values."""
    picked = body.get("attributes") if isinstance(body, dict) else None
    if not isinstance(picked, dict) or not picked or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) + len(v) < 200
            for k, v in picked.items()) or len(picked) > 100:
        raise BadRequest('send {"attributes": {"part.name": "value", ...}}')
    return picked


def check_encode_request(body) -> str:
    """``{"caption": "..."}``: the caption (empty allowed: the page asks as one types)."""
    if not isinstance(body, dict) or "caption" not in body:
        raise BadRequest('send {"caption": "..."}')
    return check_caption(body["caption"], allow_empty=True)


def check_image_name(name: str, count: int) -> int:
    """The index of ``I.png`` among a job's ``count`` images."""
    match = _IMAGE_NAME.fullmatch(name)
    if match is None:
        raise BadRequest("images are named by their number: .../images/0.png", 404)
    index = int(match.group(1))
    if index >= count:
        raise BadRequest(f"the job has {count} images: 0 to {count - 1}", 404)
    return index


async def image_body(request: Request) -> bytes:
    """An uploaded image prompt's bytes: sent as one of :data:`PROMPT_TYPES`, at most
    :data:`MAX_PROMPT_BYTES` (415 or 413 otherwise)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in PROMPT_TYPES:
        raise BadRequest(f"an image prompt must be a PNG, JPEG or WebP image, not "
                         f"{shown(kind or 'untyped data')}", 415)
    too_big = BadRequest(f"the image is larger than {MAX_PROMPT_BYTES // 2**20} MiB: "
                         "send a smaller one", 413)
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > MAX_PROMPT_BYTES):
        raise too_big
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_PROMPT_BYTES:
            raise too_big
    if not data:
        raise BadRequest("the image is empty: choose a picture")
    return bytes(data)


def check_prompt_image(data: bytes):
    """The uploaded bytes decoded (RGB, EXIF orientation applied): a PNG, JPEG or WebP of
    at most :data:`MAX_PROMPT_PIXELS` pixels, whatever type the request claimed."""
    from PIL import Image, UnidentifiedImageError

    from kodalle_cli.data.images import ImageError, open_image

    try:
        with Image.open(io.BytesIO(data)) as probe:
            found, (width, height) = probe.format, probe.size
    except Image.DecompressionBombError as exc:
        raise BadRequest(f"the image cannot be used: {exc}", 413) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise BadRequest("the file is not an image the server can read: send a PNG, "
                         "JPEG or WebP picture", 415) from None
    if found not in PROMPT_TYPES.values():
        raise BadRequest(f"the file is a {found} image: send a PNG, JPEG or WebP picture",
                         415)
    if width * height > MAX_PROMPT_PIXELS:
        raise BadRequest(f"the image is {width}x{height} pixels: at most "
                         f"{MAX_PROMPT_PIXELS:,} are allowed (it is fitted to the model's "
                         "size anyway)", 413)
    try:
        return open_image(data, max_pixels=MAX_PROMPT_PIXELS)[0]
    except ImageError as exc:
        raise BadRequest(f"the image cannot be used: {exc}") from None


async def json_body(request: Request):
    """The request's JSON body: sent as JSON, at most :data:`MAX_BODY_BYTES`, numbers JSON
    allows (no NaN or Infinity)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise BadRequest("send the request as JSON (Content-Type: application/json)", 415)
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
        raise BadRequest(f"the request is larger than {MAX_BODY_BYTES} bytes", 413)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise BadRequest(f"the request is larger than {MAX_BODY_BYTES} bytes", 413)

    def constant(name):
        raise ValueError(f"{name} is not a number JSON allows")

    try:
        return json.loads(body.decode("utf-8"), parse_constant=constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadRequest(f"the request is not valid JSON ({str(exc)[:80]})") from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 in brackets or not) is this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
