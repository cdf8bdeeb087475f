"""Credentials never leave the process: one function that blanks them out of any text.

`redact(text)` replaces, wherever a URI appears in `text`, the password of its userinfo
(`scheme://user:PASSWORD@host` -> `scheme://user:***@host`) and the values of query
parameters that carry secrets (token, key, secret, password, signature, credential,
session ... and every X-Amz-* parameter) with `***`. Every print, error message, MLflow
param/tag and job summary of dakd goes through it (cli, tracking, config errors).
"""

from __future__ import annotations

import contextlib
import re
import sys

MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s/@:?#]*):(?P<password>[^\s/?#]*)@")
_SECRET_PARAM = re.compile(
    r"(?P<key>[?&;](?:[A-Za-z0-9_.-]*(?:token|key|secret|passw(?:or)?d|pwd|signature|sig|credential|session|auth)"
    r"[A-Za-z0-9_.-]*|x-amz-[A-Za-z0-9_.-]+)=)(?P<value>[^&;#\s'\"]+)",
    re.IGNORECASE,
)


def redact(text) -> str:
    """`text` (any object, as str) with URI passwords and secret query values replaced by ***."""
    text = str(text)
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _SECRET_PARAM.sub(lambda m: f"{m['key']}{MASK}", text)


def redact_obj(obj):
    """A JSON-like structure with every string redacted (dict keys kept)."""
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    return redact(obj) if isinstance(obj, str) else obj


class RedactingFilter:
    """A logging filter that redacts every record's formatted message."""

    def filter(self, record) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logged as it is
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class RedactingStream:
    """A text stream proxy whose write() redacts (for libraries that write URIs straight to
    sys.stdout, such as MLflow's "View run at <tracking URI>" lines)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacted_std_streams():
    """While the block runs, everything written to sys.stdout / sys.stderr is redacted."""
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = old
