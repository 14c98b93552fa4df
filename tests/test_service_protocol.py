"""The job service's request validation (nst_core.service.protocol), without a socket: what a
header may hold, what each mistake is answered with, and the payload split into pictures."""

from __future__ import annotations

import math

import pytest

from nst_core.errors import ImageError, ParamError, ProtocolError
from nst_core.images import picture_to_pixels
from nst_core.service import limits, protocol

LIMITS = limits.announced(budget=1 << 30, work_pixels=1 << 20, request_timeout=30.0)


def raw(w, h, c=3, b=8) -> dict:
    return {"width": w, "height": h, "channels": c, "bit_depth": b}


def job(**changes) -> dict:
    h = {"type": "job", "content": raw(3, 2, 4, 16), "styles": [{"path": "/styles/wave.png"}, raw(2, 2)],
         "params": {"size": 64, "iterations": 3, "weights": "random"}, "payload_size": 3 * 2 * 4 * 2 + 2 * 2 * 3}
    h.update(changes)
    return {k: v for k, v in h.items() if v is not None}


def test_a_good_header_becomes_a_request_and_its_payload_the_pictures_sent():
    req = protocol.parse_job(job(preview={"max_side": 64}, result_format={"channels": 3}), LIMITS)
    assert (req.params.size, req.params.iterations, req.priority) == (64, 3, "interactive")
    assert req.preview == {"max_side": 64, "interval": 1.0} and req.result_format == {"channels": 3}
    assert req.images()[1] == ("styles[0]", {"path": "/styles/wave.png"}) and not req.allow_cpu_fallback
    content = bytes(range(48))
    style = bytes(range(100, 112))
    got_content, (path, got_style) = protocol.pictures(req, content + style)
    assert path == "/styles/wave.png"
    assert picture_to_pixels(got_content, 4, 16) == content and got_content.source == "content (pixels)"
    assert picture_to_pixels(got_style, 3, 8) == style and got_style.source == "style 2 (pixels)"


@pytest.mark.parametrize("changes, field, words", [
    ({"colour": "blue"}, "colour", "unknown field in a job"),
    ({"content": None}, "content", "needs a content image"),
    ({"styles": "wave.png"}, "styles", "must be a list"),
    ({"styles": [{"path": "/s.png"}] * 17, "payload_size": 48}, "styles", "at most 16"),
    ({"priority": "urgent"}, "priority", "interactive or batch"),
    ({"preview": {"max_side": 8}}, "preview.max_side", "16 to 4096"),
    ({"preview": {"interval": True}}, "preview.interval", "seconds"),
    ({"preview": {"size": 64}}, "preview", "max_side, interval"),
    ({"output_path": "out.png"}, "output_path", "absolute path"),
    ({"result_format": {"channels": 5}}, "result_format.channels", "3 or 4"),
    ({"result_format": {"bit_depth": True}}, "result_format.bit_depth", "8 or 16"),
    ({"allow_cpu_fallback": "yes"}, "allow_cpu_fallback", "true or false"),
    ({"payload_size": 10}, "payload_size", "wrong pixel count"),
    ({"payload_size": 1 << 40}, "payload_size", "over the limit"),
    ({"content": {"width": 3, "height": 2, "channels": 4}}, "content.bit_depth", "missing"),
    ({"content": {**raw(3, 2), "depth": 8}}, "content.depth", "unknown field"),
    ({"content": raw(0, 2)}, "content.width", "above 0"),
    ({"content": raw(3, 2, 2)}, "content.channels", "3 (RGB) or 4"),
    ({"content": {"path": "rel.png"}}, "content.path", "absolute path"),
    ({"styles": [{"path": "/s.png", "width": 3}]}, "styles[0]", "no other fields"),
])
def test_each_mistake_in_a_job_header_is_a_protocol_error_naming_its_field(changes, field, words):
    with pytest.raises(ProtocolError) as e:
        protocol.parse_job(job(**changes), LIMITS)
    assert e.value.field == field and words in e.value.message
    assert e.value.to_mapping()["kind"] == "protocol"


def test_what_the_job_asks_is_checked_with_the_engines_own_errors():
    with pytest.raises(ParamError) as e:
        protocol.parse_job(job(params={"size": "big"}), LIMITS)
    assert e.value.field == "size"
    with pytest.raises(ImageError, match="more than the"):
        protocol.parse_job(job(content=raw(1 << 14, 1 << 14), payload_size=None), LIMITS)
    req = protocol.parse_job(job(content=raw(2048, 2048), styles=[], params={"size": 2048},
                                 payload_size=2048 * 2048 * 3), LIMITS)
    with pytest.raises(ParamError, match="too large"):
        protocol.check_raw_work(req, (1 << 20, "cpu"))
    protocol.check_raw_work(req, (1 << 23, "cpu"))  # within the bound
    protocol.check_raw_work(protocol.parse_job(job(), LIMITS), (1, "cpu"))  # files: checked once read


def test_small_messages_and_hello():
    assert protocol.unknown_field({"type": "ping"}, {"type"}) is None
    err = protocol.unknown_field({"type": "cancel", "job": "j1"}, {"type", "job_id"})
    assert err.field == "job" and "known: job_id" in err.message
    assert protocol.version_error({"type": "hello", "protocol": 1}) is None
    assert protocol.version_error({"type": "hello", "protocol": 99}).field == "protocol"


def test_non_finite_losses_travel_as_null():
    assert protocol.json_safe({"total": math.nan, "parts": [math.inf, 1.5]}) == {"total": None, "parts": [None, 1.5]}
