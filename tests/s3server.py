"""A local S3-compatible server for the object-store tests: moto's S3 app (what the S3
libraries test against) behind a small WSGI layer that the test drives through a JSON
file, on 127.0.0.1.

    python tests/s3server.py PORT CONTROL.json LOG.jsonl

The layer (i) refuses a request signed with another access key than ``testing``
(InvalidAccessKeyId, 403), (ii) logs every GET of an object (user agent's rank, range,
bytes sent) to LOG.jsonl, and (iii) for the object keys CONTROL.json names, answers
ranged GETs of tensor data (a range starting past byte 8) with ``{"fail": N}``: HTTP 500
the first N times (-1: always), or ``{"truncate": true}``: half the bytes, with a
Content-Length that says so.
"""

import json
import os
import re
import sys
import threading

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple

ACCESS_KEY = "testing"
_lock = threading.Lock()
_failed: dict[str, int] = {}


def _control(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _xml_error(start_response, status: str, code: str, message: str):
    body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
            f"<Message>{message}</Message></Error>").encode()
    start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
    return [body]


def make_app(control: str, log: str):
    moto = DomainDispatcherApplication(create_backend_app)

    def app(environ, start_response):
        auth = environ.get("HTTP_AUTHORIZATION", "")
        found = re.search(r"Credential=([^/]+)/", auth)
        if found and found.group(1) != ACCESS_KEY:
            return _xml_error(start_response, "403 Forbidden", "InvalidAccessKeyId",
                              "The AWS Access Key Id you provided does not exist in our records.")
        method, key = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "").lstrip("/")
        rng = environ.get("HTTP_RANGE", "")
        start = int(re.match(r"bytes=(\d+)-", rng).group(1)) if rng else 0
        # tensor data only: distload reads a header with the ranges from 0 and from 8
        fault = _control(control).get(key, {}) if method == "GET" and start > 8 else {}
        if "fail" in fault:
            with _lock:
                n = _failed.get(key, 0)
                fail = fault["fail"] < 0 or n < fault["fail"]
                _failed[key] = n + 1
            if fail:
                with _lock, open(log, "a") as f:
                    f.write(json.dumps({"key": key, "range": rng, "status": 500}) + "\n")
                return _xml_error(start_response, "500 Internal Server Error", "InternalError",
                                  "We encountered an internal error. Please try again.")
        status_headers = {}

        def capture(status, headers, exc_info=None):
            status_headers["status"], status_headers["headers"] = status, headers
            return lambda data: None

        body = b"".join(moto(environ, capture))
        status, headers = status_headers["status"], status_headers["headers"]
        if fault.get("truncate") and status.startswith("206"):
            body = body[:len(body) // 2]
            headers = [(k, str(len(body)) if k.lower() == "content-length" else v) for k, v in headers]
        if method == "GET" and status[:3] in ("200", "206"):
            agent = re.search(r"distload-rank/(\d+)", environ.get("HTTP_USER_AGENT", ""))
            with _lock, open(log, "a") as f:
                f.write(json.dumps({"key": key, "range": rng, "bytes": len(body), "status": int(status[:3]),
                                    "rank": int(agent.group(1)) if agent else None}) + "\n")
        start_response(status, headers)
        return [body]

    return app


if __name__ == "__main__":
    port, control_file, log_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ.setdefault("MOTO_ALLOW_NONEXISTENT_REGION", "true")
    run_simple("127.0.0.1", port, make_app(control_file, log_file), threaded=True)
