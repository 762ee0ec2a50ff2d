"""The README's configuration table matches the declared settings (novelcrafter.config)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic_core import PydanticUndefined

from novelcrafter.config import SETTINGS_CLASSES, Settings, env_names, flag_of

README = Path(__file__).resolve().parent.parent / "README.md"
VARIABLE = re.compile(r"`((?:NOVELCRAFTER|AWS|HF)_[A-Z0-9_]+)`")
FLAG = re.compile(r"`(--[a-z][a-z-]*)`")


def declarations() -> dict[str, tuple[type[Settings], str]]:
    """Every variable a setting is read from → (its settings class, its field)."""
    found: dict[str, tuple[type[Settings], str]] = {}
    for cls in SETTINGS_CLASSES:
        for name in cls.model_fields:
            for env in env_names(cls, name):
                found.setdefault(env, (cls, name))
    return found


def table_rows() -> list[tuple[list[str], list[str], str]]:
    """(variables, flags, default cell) of each row of the README's configuration table."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not VARIABLE.search(cells[0]):
            continue
        names, _, flags = cells[0].partition(" / ")
        rows.append((VARIABLE.findall(names), FLAG.findall(flags), cells[2]))
    return rows


def shown(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_the_table_is_found() -> None:
    assert len(table_rows()) > 20


def test_every_variable_in_the_table_is_a_declared_setting() -> None:
    declared = declarations()
    unknown = [v for variables, _, _ in table_rows() for v in variables if v not in declared]
    assert not unknown, f"in the README but not declared in novelcrafter/config.py: {unknown}"


def test_every_declared_setting_is_in_the_table() -> None:
    documented = {v for variables, _, _ in table_rows() for v in variables}
    missing = sorted(
        {
            f"{cls.__name__}.{name}"
            for cls, name in declarations().values()
            if not set(env_names(cls, name)) & documented
        }
    )
    assert not missing, f"declared but not in the README's configuration table: {missing}"


def test_flags_in_the_table_are_the_declared_flags() -> None:
    declared = declarations()
    for variables, flags, _ in table_rows():
        fields = list(dict.fromkeys(declared[v] for v in variables))
        wanted = [flag_of(cls, name) for cls, name in fields]
        assert flags == [f for f in wanted if f], (variables, flags, wanted)


@pytest.mark.parametrize("row", range(len(table_rows())))
def test_defaults_in_the_table_are_the_declared_defaults(row: int) -> None:
    variables, _, cell = table_rows()[row]
    declared = declarations()
    fields = list(dict.fromkeys(declared[v] for v in variables))
    cells = [cell] if len(fields) == 1 else cell.split(", ")
    if len(cells) != len(fields):
        return  # one description of the defaults of several settings
    for (cls, name), text in zip(fields, cells, strict=True):
        default = cls.model_fields[name].default
        if default is None or default is PydanticUndefined:
            continue  # no value of its own (unset, or computed): described in words
        assert f"`{shown(default)}`" in text, (name, default, text)
