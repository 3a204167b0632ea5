"""Adapter names and references ("name" = latest version, "name@N" = version N).

Names become directory names in the store, so the rule is strict and ASCII-only: no path
separators, no leading dot, no look-alike unicode.
"""

from __future__ import annotations

import re

from adapters.validation import AdapterValidationError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
MAX_VERSION = 999_999_999     # version numbers are at most 9 digits


class AdapterNameError(AdapterValidationError):
    """A name or reference that the store refuses (a ValueError, like every rejected upload)."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AdapterNameError(
            f"invalid adapter name {name!r}: use 1-64 ASCII letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """'name' → (name, None); 'name@3' → (name, 3)."""
    if not isinstance(ref, str):
        raise AdapterNameError(f"invalid adapter reference {ref!r}")
    name, sep, version = ref.partition("@")
    check_name(name)
    if not sep:
        return name, None
    if not re.fullmatch(r"[1-9][0-9]{0,19}", version, re.ASCII) or int(version) > MAX_VERSION:
        raise AdapterNameError(f"invalid adapter version in {ref!r}: expected name@N with N an integer "
                               f"from 1 to {MAX_VERSION}")
    return name, int(version)


def format_ref(name: str, version: int) -> str:
    return f"{name}@{version}"
