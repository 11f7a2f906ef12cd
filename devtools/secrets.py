r"""Find a token where it must never be: strings, files, S3 objects, Dagster event logs.

A leak scan is only as good as the forms it looks for, so :class:`TokenScanner` looks
for the token as written, URL-encoded (with and without ``/`` kept, and as a form
body), base64-encoded (at each of the three byte alignments, so a token inside a
larger base64 blob is found too), JSON-escaped (also with ``\/``), HTML-escaped and
as UTF-16: the ways a token is turned into text by the layers between a client and
a log file. Every finding names where it was and never repeats the token itself.

Examples:
    >>> scanner = TokenScanner("sk-LEAKCHECK-0123456789abcdef")
    >>> scanner.scan_text("Authorization: Bearer sk-LEAKCHECK-0123456789abcdef", "header")
    [Leak(where='header', form='plain')]
    >>> scanner.scan_text("Authorization: Bearer ***", "header")
    []
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

__all__ = ["Leak", "TokenScanner"]

# A token shorter than this would match by chance in binary data (images, sqlite pages).
_MIN_TOKEN_CHARS = 12


@dataclass(frozen=True)
class Leak:
    """One place a token was found: where, and in which encoding (never the token)."""

    where: str
    form: str


def _base64_forms(token: bytes) -> dict[str, bytes]:
    """The stable middle of the token's base64 at each of the three alignments.

    Base64 of a token inside a longer value depends on where the token starts modulo
    3; the first and last few characters also mix in neighbouring bytes, so only the
    characters fully determined by the token are kept.
    """
    forms: dict[str, bytes] = {}
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + token)
        # Characters 0..ceil(shift*4/3) mix in the padding bytes; the last 4 may mix in
        # whatever follows the token.
        start = -(-shift * 4 // 3) + 1
        core = encoded[start:-4]
        if len(core) >= _MIN_TOKEN_CHARS:
            forms[f"base64/{shift}"] = core
    return forms


class TokenScanner:
    """Scans text, bytes, files, S3 buckets and Dagster instances for one token.

    Args:
        token: The secret to look for (at least 12 characters, so chance matches in
            binary data are not reported).

    Raises:
        ValueError: the token is too short to scan for reliably.
    """

    def __init__(self, token: str) -> None:
        if len(token) < _MIN_TOKEN_CHARS:
            raise ValueError(
                f"token: {len(token)} characters is too short to scan for reliably; "
                f"use a recognisable token of at least {_MIN_TOKEN_CHARS} characters"
            )
        raw = token.encode()
        forms: dict[str, bytes] = {
            "plain": raw,
            "url-encoded": quote(token, safe="").encode(),
            "url-encoded-path": quote(token).encode(),
            "form-encoded": quote_plus(token).encode(),
            "json-escaped": json.dumps(token)[1:-1].encode(),
            "json-escaped-slash": json.dumps(token)[1:-1].replace("/", "\\/").encode(),
            # The same inside a repr() (an exception message quoting a body excerpt).
            "json-escaped-slash-repr": json.dumps(token)[1:-1]
            .replace("/", "\\/")
            .replace("\\", "\\\\")
            .encode(),
            "html-escaped": html.escape(token).encode(),
            "utf-16": token.encode("utf-16-le"),
            **_base64_forms(raw),
        }
        # Keep distinct encodings only (a token of plain ASCII is its own URL encoding).
        distinct: dict[bytes, str] = {}
        for form, needle in forms.items():
            distinct.setdefault(needle, form)
        self._forms = {form: needle for needle, form in distinct.items()}

    def __repr__(self) -> str:
        return f"TokenScanner(forms={sorted(self._forms)})"

    # ---- primitives --------------------------------------------------------------------

    def scan_bytes(self, data: bytes, where: str) -> list[Leak]:
        """Every encoding of the token found in ``data``."""
        return [Leak(where, form) for form, needle in self._forms.items() if needle in data]

    def scan_text(self, text: str, where: str) -> list[Leak]:
        """Every encoding of the token found in ``text``."""
        return self.scan_bytes(text.encode("utf-8", "surrogatepass"), where)

    def scan_object(self, value: Any, where: str) -> list[Leak]:
        """A value's ``repr`` and, when it has them, its ``str`` and JSON form."""
        texts = [repr(value), str(value)]
        with contextlib.suppress(TypeError, ValueError):  # not JSON-able: repr and str suffice
            texts.append(json.dumps(value, default=repr))
        found: dict[str, Leak] = {}
        for text in texts:
            for leak in self.scan_text(text, where):
                found.setdefault(leak.form, leak)
        return list(found.values())

    def scan_exception(self, exc: BaseException, where: str = "exception") -> list[Leak]:
        """An exception, its arguments, notes and the whole ``__cause__``/``__context__`` chain."""
        leaks: list[Leak] = []
        seen: set[int] = set()
        current: BaseException | None = exc
        depth = 0
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            label = f"{where}[{depth}] {type(current).__name__}"
            leaks += self.scan_object(current, label)
            leaks += self.scan_object(list(current.args), f"{label}.args")
            leaks += self.scan_object(getattr(current, "__notes__", []), f"{label}.__notes__")
            leaks += self.scan_object(vars(current) if hasattr(current, "__dict__") else {}, label)
            current = current.__cause__ or current.__context__
            depth += 1
        return leaks

    # ---- places ------------------------------------------------------------------------

    def scan_files(self, root: str | os.PathLike[str]) -> list[Leak]:
        """Every regular file under ``root`` (or ``root`` itself), read as bytes."""
        base = Path(root)
        paths: Iterable[Path] = [base] if base.is_file() else sorted(base.rglob("*"))
        leaks: list[Leak] = []
        for path in paths:
            if path.is_file() and not path.is_symlink():
                try:
                    data = path.read_bytes()
                except OSError:
                    continue  # a file removed while scanning (a temp file) holds nothing now
                leaks += self.scan_bytes(data, str(path))
        return leaks

    def scan_s3(
        self, client: Any, bucket: str, prefix: str = "", *, workers: int = 8
    ) -> tuple[list[Leak], int]:
        """Every object's key, body, content type and user metadata in a bucket.

        Objects are read ``workers`` at a time (a thousand images take seconds, not a
        minute). Returns the leaks and the number of objects scanned, so a caller can
        assert that the scan saw something.
        """

        def scan_one(key: str) -> list[Leak]:
            where = f"s3://{bucket}/{key}"
            found = self.scan_text(key, f"{where} (key)")
            answer = client.get_object(Bucket=bucket, Key=key)
            body = answer["Body"]
            try:
                found += self.scan_bytes(body.read(), f"{where} (body)")
            finally:
                body.close()
            head = {
                "ContentType": answer.get("ContentType"),
                "Metadata": answer.get("Metadata", {}),
            }
            return found + self.scan_object(head, f"{where} (metadata)")

        keys = list(_s3_keys(client, bucket, prefix))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            leaks = [leak for found in pool.map(scan_one, keys) for leak in found]
        return leaks, len(keys)

    def scan_instance(self, instance: Any) -> tuple[list[Leak], int]:
        """Every event of every run of a Dagster instance, serialized, plus run configs and tags.

        Returns the leaks and the number of events scanned.
        """
        from dagster._serdes import serialize_value

        leaks: list[Leak] = []
        count = 0
        for run in instance.get_runs():
            where = f"run {run.run_id}"
            leaks += self.scan_serialized(serialize_value(run), f"{where} (run record)")
            for record in instance.all_logs(run.run_id):
                count += 1
                leaks += self.scan_serialized(serialize_value(record), f"{where} (event log)")
        return leaks, count

    def scan_serialized(self, text: str, where: str) -> list[Leak]:
        """A JSON document as stored, and every string in it as it reads once decoded.

        Serializing escapes again what a message had already escaped (``\\/`` becomes
        ``\\\\/``); the decoded strings show each form as the message held it.
        """
        found = {leak.form: leak for leak in self.scan_text(text, where)}
        with contextlib.suppress(ValueError):
            for value in _strings(json.loads(text)):
                for leak in self.scan_text(value, f"{where} (decoded)"):
                    found.setdefault(leak.form, leak)
        return list(found.values())


def _strings(value: Any) -> Iterator[str]:
    """Every string in a decoded JSON value (keys included)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)


def _s3_keys(client: Any, bucket: str, prefix: str) -> Iterator[str]:
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            yield str(obj["Key"])
