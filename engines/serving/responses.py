"""How the server answers: JSON that always encodes, and the one error body (OpenAI-shaped).

>>> error(404, "no job x", kind="not_found_error").body
b'{"error":{"message":"no job x","type":"not_found_error","param":null}}'
"""
from __future__ import annotations

import json

from fastapi.responses import JSONResponse

JSON_BODY = 'the body must be a JSON object in UTF-8 (Content-Type: application/json), e.g. {"prompt": "a red circle"}'


class SafeJSON(JSONResponse):
    """JSON with non-ASCII escaped: whatever text a job holds (even a lone surrogate from an old store) answers."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error(status: int, message: str, param=None, kind="invalid_request_error", headers=None) -> JSONResponse:
    return SafeJSON({"error": {"message": " ".join(str(message).split()), "type": kind, "param": param}},
                    status_code=status, headers=headers)
