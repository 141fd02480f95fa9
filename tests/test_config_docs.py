"""Every config key is documented where the others are: in its dataclass's docstring
(``captioner/config.py``, the reference the README points to)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from captioner import config


def sections():
    return [cls for cls in vars(config).values()
            if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == config.__name__]


def documented(cls) -> set[str]:
    """Names that start an ``Attributes`` entry (``name:`` or ``a, b:`` at the entry's indent),
    or that a prose docstring names in double backquotes (````name````)."""
    doc = cls.__doc__ or ""
    names = set(re.findall(r"``([a-z_][a-z0-9_]*)``", doc))
    for line in doc.splitlines():
        m = re.match(r"^\s{4,16}([a-z_][a-z0-9_]*(?:\s*,\s*[a-z_][a-z0-9_]*)*)\s*:", line)
        if m:
            names |= {n.strip() for n in m.group(1).split(",")}
    return names


@pytest.mark.parametrize("cls", sections(), ids=lambda c: c.__name__)
def test_every_key_is_documented_in_its_section(cls):
    keys = {f.name for f in dataclasses.fields(cls)}
    nested = {f.name for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.type) or
              (isinstance(f.type, str) and f.type.endswith("Config"))}
    assert sorted(keys - nested - documented(cls)) == []


def test_the_check_sees_a_missing_entry():
    @dataclasses.dataclass
    class Example:
        """Attributes:
            alpha: documented.
        """

        alpha: int = 0
        beta: int = 0

    assert documented(Example) == {"alpha"}
