"""The leak scanner finds the token in every form it can take, so a clean scan means something."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from urllib.parse import quote

import pytest

from devtools.secrets import TokenScanner

from ._support import LEAK_TOKEN


@pytest.mark.parametrize("pad", ["", "x", "xy", "xyz"])
def test_finds_the_token_inside_base64_at_any_alignment(pad: str) -> None:
    blob = base64.b64encode(f"Authorization: Bearer {pad}{LEAK_TOKEN} trailing".encode())
    assert TokenScanner(LEAK_TOKEN).scan_bytes(blob, "blob") != []


def test_finds_plain_url_encoded_json_and_utf16_forms() -> None:
    scanner = TokenScanner(LEAK_TOKEN)
    forms = {
        "plain": f"token={LEAK_TOKEN}",
        "url-encoded": quote(json.dumps({"t": LEAK_TOKEN}), safe=""),
        "utf-16": LEAK_TOKEN.encode("utf-16-le").decode("latin-1"),
    }
    for form, text in forms.items():
        found = scanner.scan_bytes(text.encode("latin-1"), form)
        assert found, form
        assert all(LEAK_TOKEN not in repr(leak) for leak in found)


def test_finds_the_token_in_an_exception_chain_and_in_files(tmp_path: Path) -> None:
    scanner = TokenScanner(LEAK_TOKEN)
    try:
        try:
            raise KeyError(f"Bearer {LEAK_TOKEN}")
        except KeyError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert scanner.scan_exception(outer) != []
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "log.txt").write_text(f"x {LEAK_TOKEN} y")
    (tmp_path / "clean.txt").write_text("nothing here")
    leaks = scanner.scan_files(tmp_path)
    assert [Path(leak.where).name for leak in leaks] == ["log.txt"]


def test_clean_text_and_a_redacted_token_are_not_leaks() -> None:
    scanner = TokenScanner(LEAK_TOKEN)
    assert scanner.scan_text("Authorization: Bearer ***", "header") == []
    assert scanner.scan_text(LEAK_TOKEN[:-1], "a near miss") == []


def test_a_short_token_is_refused() -> None:
    with pytest.raises(ValueError, match="too short"):
        TokenScanner("abc")
