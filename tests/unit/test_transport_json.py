"""Request bodies and answers as JSON: orjson when installed (the 'fast' extra), the json module otherwise; error
answers mapped to the exception family."""

from __future__ import annotations

import json

import httpx
import pytest

from flexguard_integrations.errors import ContextLengthExceededError, GuardResponseError
from flexguard_integrations.transport import base, error_from_response

BODY = {
    "model": "Qwen/Qwen3Guard-Gen-8B",
    "messages": [{"role": "user", "content": 'Grüße, "quoted" \\ back\nslash — 你好 \u2028 emoji 🙂'}],
    "temperature": 0,
    "max_tokens": 128,
    "logprobs": True,
}
ANSWER = b'{"choices":[{"index":0,"message":{"role":"assistant","content":"Safety: Safe\\nCategories: None"}}]}'


@pytest.fixture(params=["orjson", "json"])
def codec(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "orjson":
        pytest.importorskip("orjson")
    else:
        monkeypatch.setattr(base, "_orjson", None)
    return str(request.param)


def test_the_body_is_compact_utf8_json_that_reads_back_the_same(codec: str) -> None:
    payload = base.encode_body(BODY)
    assert json.loads(payload) == BODY
    assert "你好".encode() in payload and b"\\u" not in payload  # UTF-8 as is, not \u escapes
    compact = json.dumps(BODY, ensure_ascii=False, separators=(",", ":")).encode()
    assert payload == compact  # no padding between items


def test_both_codecs_send_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("orjson")
    fast = base.encode_body(BODY)
    monkeypatch.setattr(base, "_orjson", None)
    assert base.encode_body(BODY) == fast


def test_a_body_orjson_refuses_falls_back_to_json(codec: str) -> None:
    body = {"model": "m", "max_tokens": 2**70, "messages": []}  # orjson has no integers past 64 bits
    assert json.loads(base.encode_body(body)) == body


def test_a_lone_surrogate_is_an_encoding_error_with_either_codec(codec: str) -> None:
    with pytest.raises(UnicodeEncodeError):
        base.encode_body({"messages": [{"role": "user", "content": "a\ud800b"}]})


def test_answers_decode_and_non_json_is_a_clear_error(codec: str) -> None:
    assert base.decode_completion(ANSWER, "application/json")["choices"][0]["message"]["role"] == "assistant"
    with pytest.raises(GuardResponseError, match=r"non-JSON \(text/html\): '<html> oops'"):
        base.decode_completion(b"<html> oops", "text/html; charset=utf-8")
    with pytest.raises(GuardResponseError, match="no choices"):
        base.decode_completion(b'{"object": "list"}', "application/json")


def test_an_error_page_is_summarised_by_its_title_and_a_413_means_too_large() -> None:
    page = (
        b"<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n"
        b"<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>"
    )
    err = error_from_response(413, {}, page)
    assert isinstance(err, ContextLengthExceededError) and err.status_code == 413
    assert str(err).endswith("(HTTP 413): 413 Request Entity Too Large")
    plain = error_from_response(404, {}, b"<p>no title here</p>")
    assert "<p>no title here</p>" in str(plain)  # no title: the text as before


def test_a_connection_error_without_a_message_names_its_type() -> None:
    from flexguard_integrations.transport.http import _map_httpx_error

    assert str(_map_httpx_error(httpx.ReadError(""), "a check")).endswith("during a check: ReadError")
    assert str(_map_httpx_error(httpx.ConnectError(""), "a check")).endswith("for a check: ConnectError")
