"""What ``kodalle serve`` accepts: the limits, and every check of a request (its JSON body,
a job's fields, a caption, an image name) before anything reaches the job queue. A refused
request is a :class:`BadRequest`: its status and one line for the page."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import re

from starlette.requests import Request

from kodalle_cli.configs import SampleConfig
from kodalle_cli.errors import ConfigError, UsageError

# ---- limits ----------------------------------------------------------------------------------
MAX_IMAGES = 64  # images per request
MAX_CAPTION_CHARS = 1000
MAX_SEED = 2**53 - 1  # the largest integer the page's JavaScript holds exactly
MAX_TOP_K = 1_000_000
MAX_TEMPERATURE = 10.0
MAX_COND_SCALE = 50.0
MAX_BODY_BYTES = 64 * 1024

FIELDS = ("caption", "n", "seed", "top_k", "top_p", "temperature", "cond_scale", "keep")
_IMAGE_NAME = re.compile(r"(\d{1,4})\.png")


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


def check_job_request(body, *, reranker: bool) -> dict:
    """A job request's fields with the CLI's defaults filled in, or :class:`BadRequest`."""
    if not isinstance(body, dict):
        raise BadRequest("send a JSON object such as {\"caption\": \"...\", \"n\": 4}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field {shown(unknown[0])}: the fields are "
                         f"{', '.join(FIELDS)}")
    if "caption" not in body:
        raise BadRequest("caption is missing: type what to draw")
    given = {**sample_defaults(), **body}  # a field sent as null: none (seed: a random one)
    out = {"caption": check_caption(body["caption"])}
    out["n"] = _whole(given, "n", 1, MAX_IMAGES)
    out["seed"] = _whole(given, "seed", 0, MAX_SEED, optional=True)
    out["top_k"] = _number(given, "top_k", 0, MAX_TOP_K, optional=True)
    out["top_p"] = _number(given, "top_p", 0, 1, optional=True)
    out["temperature"] = _number(given, "temperature", 0, MAX_TEMPERATURE)
    out["cond_scale"] = _number(given, "cond_scale", 0, MAX_COND_SCALE)
    out["keep"] = _whole(given, "keep", 1, out["n"], optional=True)
    if out["keep"] is not None and not reranker:
        raise BadRequest("keep needs a reranker: start the server with --reranker DIR")
    try:  # the library's own checks (top-k a count or a fraction, top-p in (0, 1], ...)
        SampleConfig(captions=[out["caption"]], out=None, rerank=None, **{
            k: v for k, v in out.items() if k not in ("caption", "keep")}).validate()
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
