"""Hand-written hostile HTTP requests for the server's contract test, and the check that an answer is what the OpenAPI
document says: a documented status (or 405 with ``Allow`` for an undocumented method), and a JSON body valid against
the schema documented for that status.

Kinds: the edges of every integer field; invalid Unicode in every text field, header, query and path; every
scheduler at 1-4 steps; bodies that are huge, deep, not JSON or not UTF-8; every route's path parameters; methods no
route serves; odd ``Prefer`` and ``Idempotency-Key`` headers; query parameters out of range.
"""
from __future__ import annotations

import json
import random
import re

INT_EDGES = [-2**63 - 1, -2**63, -1, 0, 1, 2, 3, 4, 5, 63, 64, 65, 149, 150, 151, 999, 1000, 1001, 2**31 - 1, 2**31,
             2**53 + 1, 2**63 - 2, 2**63 - 1, 2**63, 2**64, 10**30]
BAD_TEXT = ["a \ud800 b", "\udfff", "\udc00\ud800", "\x00", "\ufeff", "\u202e evil", "e\u0301" * 300, "\U0001f600" * 50,
            "../../etc/passwd", "' OR 1=1 --", "<script>alert(1)</script>", "%00", "\r\nX-Injected: 1", ""]
RAW_BODIES = [b"{", b"[]", b"null", b"\xff\xfe\xfd", b'{"prompt": "x",}', b'{"prompt": "\xc3\x28"}',
              b'{"prompt": "x\xed\xa0\x80"}', b"[" * 20000 + b"]" * 20000, b'{"prompt": ' + b"[" * 3000 + b"]" * 3000
              + b"}", b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", b'{"prompt": "x", "n": 1e400}',
              b'{"prompt": "x", "guidance_scale": NaN}', b'{"prompt": "x", "guidance_scale": -Infinity}',
              b'{"prompt": "' + b"a" * 70_000 + b'"}', b'{"prompt": "x", "prompt": 5}', b"\xef\xbb\xbf{}"]
TEXT_FIELDS = ["prompt", "negative_prompt", "scheduler", "model", "size", "webhook", "id"]
INT_FIELDS = ["n", "steps", "seed", "guidance_scale"]
PATHS = ["/", "/health", "/health/live", "/health/ready", "/metrics", "/v1/models", "/v1/images/generations",
         "/v1/jobs", "/v1/jobs/{id}", "/v1/jobs/{id}/cancel", "/v1/jobs/{id}/events", "/v1/jobs/{id}/images/0.png"]


def requests(rng: random.Random, count: int, job_id: str, schedulers) -> list:
    """``count`` hostile requests: (method, path, headers, raw body bytes)."""
    makers = [_int_edge, _bad_text, _raw_body, _path_params, _methods, _headers, _queries,
              lambda r, j: _schedule(r, schedulers)]
    return [rng.choice(makers)(rng, job_id) for _ in range(count)]


def _create_path(rng):
    return rng.choice(["/v1/jobs", "/v1/images/generations"])


def _body(fields: dict) -> bytes:
    return json.dumps({"prompt": "a red circle", "steps": 2, **fields}).encode()


def _int_edge(rng, job_id):
    field = rng.choice(INT_FIELDS)
    fields = {field: rng.choice(INT_EDGES)}
    if field == "seed" and rng.random() < 0.5:
        fields["n"] = rng.choice([1, 2, 4])
    return "POST", _create_path(rng), {"prefer": "wait=5"}, _body(fields)


def _bad_text(rng, job_id):
    text = rng.choice(BAD_TEXT)
    where = rng.randrange(4)
    if where == 0:
        return "POST", _create_path(rng), {"prefer": "wait=5"}, _body({rng.choice(TEXT_FIELDS): text})
    if where == 1:
        return "GET", f"/v1/jobs?status={_escaped(text)}", {}, b""
    if where == 2:
        return "GET", f"/v1/jobs/{_escaped(text)}", {}, b""
    raw = bytes(b for b in text.encode("utf-8", "surrogatepass") if b >= 0x20 and b != 0x7f).strip() or b"k"
    return "POST", "/v1/jobs", {"Idempotency-Key": raw}, _body({})   # no CR/LF/NUL: a client cannot send them


def _escaped(text: str) -> str:
    """``text`` percent-encoded as its UTF-8 bytes, lone surrogates included (what a hostile client sends)."""
    import urllib.parse

    return urllib.parse.quote(text.encode("utf-8", "surrogatepass"), safe="")


def _raw_body(rng, job_id):
    return "POST", _create_path(rng), {}, rng.choice(RAW_BODIES)


def _path_params(rng, job_id):
    jid = rng.choice([job_id, "0" * 32, "g" * 32, "x" * 5000, "%2e%2e%2f", "..", job_id.upper(), job_id + "0", " "])
    index = rng.choice(["0", "1", "-1", "999", "1000", "99999999999999999999999", "abc", "0.5", "%00"])
    path = rng.choice([f"/v1/jobs/{jid}", f"/v1/jobs/{jid}/cancel", f"/v1/jobs/{jid}/events",
                       f"/v1/jobs/{jid}/images/{index}.png"])
    return ("POST" if path.endswith("/cancel") else "GET"), path, {}, b""


def _methods(rng, job_id):
    path = rng.choice(PATHS).replace("{id}", job_id)
    return rng.choice(["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "POST", "GET"]), path, {}, b"{}"


def _headers(rng, job_id):
    headers = rng.choice([{"prefer": "wait=-1"}, {"prefer": "wait=99999999999"}, {"prefer": "wait=abc, wait=1"},
                          {"prefer": "x" * 300}, {"Idempotency-Key": "k" * 201}, {"content-type": "text/plain"},
                          {"content-type": "application/json; charset=latin-1"},
                          {"Idempotency-Key": f"same-{rng.randrange(3)}"}])
    body = _body({"seed": rng.randrange(3)}) if rng.random() < 0.8 else b""
    return "POST", rng.choice(["/v1/jobs", "/v1/images/generations"]), headers, body


def _queries(rng, job_id):
    q = rng.choice(["limit=0", "limit=-1", "limit=1001", "limit=1e3", "limit=" + "9" * 40, "status=", "status=QUEUED",
                    "status=queued&status=failed", "limit=1&limit=2", "foo=bar"])
    return "GET", f"/v1/jobs?{q}", {}, b""


def _schedule(rng, schedulers):
    return "POST", "/v1/images/generations", {"prefer": "wait=20"}, _body(
        {"scheduler": rng.choice(list(schedulers)), "steps": rng.randrange(1, 5), "seed": rng.randrange(10)})


# ---- the document's verdict ---------------------------------------------------------------------------------
class Contract:
    """What the OpenAPI document allows each route to answer."""

    def __init__(self, doc: dict):
        self.doc = doc
        self.routes = [(re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", p) + "$"), p, ops)
                       for p, ops in doc["paths"].items()]

    def problem(self, method: str, path: str, status: int, headers, body: bytes) -> "str | None":
        """Why this answer breaks the document (None: it keeps it)."""
        from jsonschema import Draft202012Validator

        path = path.split("?")[0]
        found = [(p, ops) for rx, p, ops in self.routes if rx.match(path)]
        if status >= 500:
            return f"{status} (a server error)"
        if path == "/" and method == "GET":
            return None if status == 200 else f"the page answered {status}"
        op = next((ops.get(method.lower()) for _, ops in found if method.lower() in ops), None)
        if op is None:
            if status == 405 and headers.get("allow"):
                return None
            if status == 404 and not found:
                return None if _is_error(body) else "404 without the error body"
            return f"{method} {path}: {status} (no such operation; want 405 with Allow)"
        doc = op["responses"].get(str(status))
        if doc is None:
            return f"{method} {path}: {status} is not documented ({sorted(op['responses'])})"
        schema = doc.get("content", {}).get("application/json", {}).get("schema")
        if schema is None or not headers.get("content-type", "").startswith("application/json"):
            return None
        errors = list(Draft202012Validator({**schema, "components": self.doc["components"]}).iter_errors(
            json.loads(body)))
        return f"{method} {path}: {status} body breaks its schema: {errors[0].message[:200]}" if errors else None


def _is_error(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body)["error"]["message"], str)
    except (ValueError, KeyError, TypeError):
        return False
