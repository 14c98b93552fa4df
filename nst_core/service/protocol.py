"""The job service's requests, validated: what docs/PROTOCOL.md allows, checked without a socket.

The server reads frames and hands their headers here: `unknown_field` for the small messages,
`version_error` for a hello, `parse_job` for a job's header (complete before any payload byte is
read), then `pictures` for its payload. Everything raises or returns `ProtocolError`s (or the `ParamError`
and `ImageError` of what the job asks), which the server sends back as they are.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..errors import ImageError, ProtocolError
from ..params import StyleParams
from . import limits
from .client import PROTOCOL_VERSION
from .scheduler import PRIORITIES

HELLO_FIELDS = {"type", "protocol", "client"}
JOB_FIELDS = {"type", "content", "styles", "params", "priority", "preview", "output_path", "result_format",
              "allow_cpu_fallback", "payload_size"}
RAW_FIELDS = {"width", "height", "channels", "bit_depth"}
MESSAGE_TYPES = ("hello", "ping", "status", "job", "cancel")


@dataclass
class JobRequest:
    """A job header that passed `parse_job`: image specs ({path} or raw {width, height, channels,
    bit_depth}), the engine's parameters and how the result goes back."""

    content: dict
    styles: list
    params: StyleParams
    priority: str
    preview: dict | None
    output_path: str | None
    result_format: dict
    allow_cpu_fallback: bool
    payload_size: int

    def images(self) -> list[tuple[str, dict]]:
        """(field, spec) of every image, content first."""
        return [("content", self.content)] + [(f"styles[{i}]", s) for i, s in enumerate(self.styles)]


def unknown_field(header: dict, allowed: set) -> ProtocolError | None:
    """The error for the first field a small message does not take (payload_size aside), or None."""
    unknown = sorted(set(header) - allowed - {"payload_size"})
    if not unknown:
        return None
    return ProtocolError(unknown[0], f"unknown field in a {header['type']} message "
                                     f"(known: {', '.join(sorted(allowed - {'type'}))})")


def version_error(hello: dict) -> ProtocolError | None:
    """The error for a hello in a protocol version other than ours, or None."""
    version = hello.get("protocol")
    if version != PROTOCOL_VERSION:
        return ProtocolError("protocol", f"unsupported protocol version {version!r}; this service speaks "
                                         f"{PROTOCOL_VERSION}")
    return None


def parse_job(h: dict, lim: dict) -> JobRequest:
    """Validate a job header completely, before its payload is read. `lim`: the hello's limits."""
    unknown = sorted(set(h) - JOB_FIELDS)
    if unknown:
        raise ProtocolError(unknown[0], f"unknown field in a job (known: {', '.join(sorted(JOB_FIELDS - {'type'}))})")
    if "content" not in h:
        raise ProtocolError("content", "a job needs a content image")
    content = image_spec("content", h["content"], lim)
    styles = h.get("styles", [])
    if not isinstance(styles, list):
        raise ProtocolError("styles", f"must be a list of images, got {type(styles).__name__}")
    if len(styles) > lim["max_styles"]:
        raise ProtocolError("styles", f"at most {lim['max_styles']} style images, got {len(styles)}")
    styles = [image_spec(f"styles[{i}]", s, lim) for i, s in enumerate(styles)]
    params = StyleParams.from_mapping(h.get("params") or {})
    priority = h.get("priority", "interactive")
    if priority not in PRIORITIES:
        raise ProtocolError("priority", f"must be interactive or batch, got {priority!r}")
    preview = _preview(h.get("preview"))
    out = h.get("output_path")
    if out is not None and (not isinstance(out, str) or not os.path.isabs(out)):
        raise ProtocolError("output_path", f"must be null or an absolute path, got {out!r}")
    fmt = h.get("result_format") or {}
    if not isinstance(fmt, dict) or set(fmt) - {"channels", "bit_depth"}:
        raise ProtocolError("result_format", "must be null or {channels, bit_depth}")
    if fmt.get("channels") not in (None, 3, 4) or isinstance(fmt.get("channels"), bool):
        raise ProtocolError("result_format.channels", f"must be 3 or 4, got {fmt.get('channels')!r}")
    if fmt.get("bit_depth") not in (None, 8, 16) or isinstance(fmt.get("bit_depth"), bool):
        raise ProtocolError("result_format.bit_depth", f"must be 8 or 16, got {fmt.get('bit_depth')!r}")
    fallback = h.get("allow_cpu_fallback", False)
    if not isinstance(fallback, bool):
        raise ProtocolError("allow_cpu_fallback", f"must be true or false, got {fallback!r}")
    size = h.get("payload_size", 0)
    expected = sum(raw_size(s) for s in [content, *styles] if "path" not in s)
    if size > lim["max_payload"]:
        raise ProtocolError("payload_size", f"payload of {size:,} bytes is over the limit of {lim['max_payload']:,}")
    if size != expected:
        raise ProtocolError("payload_size", f"wrong pixel count: the raw images described need {expected:,} bytes, "
                                            f"the header announces {size:,}")
    return JobRequest(content, styles, params, priority, preview, out, fmt, fallback, size)


def _preview(preview) -> dict | None:
    if preview is None:
        return None
    if not isinstance(preview, dict) or set(preview) - {"max_side", "interval"}:
        raise ProtocolError("preview", "must be null or {max_side, interval}")
    side = preview.get("max_side", 256)
    interval = preview.get("interval", 1.0)
    if not _is_int(side) or not 16 <= side <= 4096:
        raise ProtocolError("preview.max_side", f"must be a whole number from 16 to 4096, got {side!r}")
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 <= interval <= 3600:
        raise ProtocolError("preview.interval", f"must be a number of seconds from 0 to 3600, got {interval!r}")
    return {"max_side": side, "interval": float(interval)}


def image_spec(what: str, spec, lim: dict) -> dict:
    """A content or style image: {path} (absolute) or raw pixels within lim["max_pixels"]."""
    if not isinstance(spec, dict):
        raise ProtocolError(what, f"must be {{path}} or {{width, height, channels, bit_depth}}, got {spec!r:.80}")
    if "path" in spec:
        if set(spec) != {"path"}:
            raise ProtocolError(what, f"a path image takes no other fields, got {', '.join(sorted(spec))}")
        if not isinstance(spec["path"], str) or not os.path.isabs(spec["path"]):
            raise ProtocolError(f"{what}.path", f"must be an absolute path, got {spec['path']!r}")
        return spec
    if set(spec) != RAW_FIELDS:
        extra = sorted(set(spec) - RAW_FIELDS)
        missing = sorted(RAW_FIELDS - set(spec))
        raise ProtocolError(f"{what}.{(extra or missing)[0]}",
                            "unknown field" if extra else "missing (raw images need width, height, channels, bit_depth)")
    w, h, c, b = (spec[k] for k in ("width", "height", "channels", "bit_depth"))
    for name, v in (("width", w), ("height", h)):
        if not _is_int(v) or v < 1:
            raise ProtocolError(f"{what}.{name}", f"must be a whole number above 0, got {v!r}")
    if not _is_int(c) or c not in (3, 4):
        raise ProtocolError(f"{what}.channels", f"must be 3 (RGB) or 4 (RGBA), got {c!r}")
    if not _is_int(b) or b not in (8, 16):
        raise ProtocolError(f"{what}.bit_depth", f"must be 8 or 16, got {b!r}")
    if w * h > lim["max_pixels"]:
        raise ImageError(None, f"{what}: {w}×{h} = {w * h:,} pixels is more than the {lim['max_pixels']:,} accepted")
    return spec


def raw_size(spec: dict) -> int:
    """Bytes of a raw image's pixels."""
    return spec["width"] * spec["height"] * spec["channels"] * spec["bit_depth"] // 8


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_raw_work(req: JobRequest, limit: tuple[int, str] | None) -> None:
    """The work bound, from the header alone, for a job whose images all come as pixels (the
    scheduler checks every job again once its files are read). limit: (pixels, device) or None."""
    if limit is None or any("path" in spec for spec in [req.content, *req.styles]):
        return
    limits.check_work((req.content["height"], req.content["width"]),
                      [(s["height"], s["width"]) for s in req.styles], req.params, *limit)


def pictures(req: JobRequest, payload: bytes):
    """(content, styles) from the payload: a Picture for each raw image, the path for the others."""
    from ..images import picture_from_pixels

    view = memoryview(payload)
    offset = 0
    out = []
    for i, spec in enumerate([req.content, *req.styles]):
        if "path" in spec:
            out.append(spec["path"])
            continue
        n = raw_size(spec)
        pic = picture_from_pixels(view[offset:offset + n], spec["width"], spec["height"], spec["channels"],
                                  spec["bit_depth"])
        pic.source = "content (pixels)" if i == 0 else f"style {i} (pixels)"
        out.append(pic)
        offset += n
    return out[0], out[1:]


def json_safe(value):
    """Non-finite floats (a diverging loss) become null: the protocol is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
