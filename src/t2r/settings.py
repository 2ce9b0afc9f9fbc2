"""Typed settings: the base every settings model derives from (unknown keys refused, values checked when made, frozen)
and the one-line errors that name the key, as a recipe file (`distill.tokens`) or the command line (`--tokens`) writes
it. The models themselves live with what they configure: training (`t2r.train.settings`), the pipeline recipe
(`t2r.stages.recipes`), the speed benchmark (`t2r.bench.settings`).

A settings model refuses an unknown key or a value of the wrong type or range with one line naming the key
(`SettingsError`, which the CLI prints as `t2r CMD: error: ...` with exit code 2)."""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import T2RError


class SettingsError(T2RError, ValueError):
    """Settings with an unknown key, or a value of the wrong type or out of range; the message names the key."""


def model_in(annotation) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (`X`, `X | None`), or None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _field_path(model: type[BaseModel], loc: tuple) -> tuple[list, type[BaseModel] | None]:
    """The part of an error location that names fields (list indices included, union member tags dropped), and the
    model the last one holds."""
    path, cls = [], model
    for part in loc:
        if isinstance(part, int):
            path.append(part)
            continue
        if cls is None or part not in cls.model_fields:
            break
        path.append(part)
        cls = model_in(cls.model_fields[part].annotation)
    return path, cls


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _message(error: dict) -> str:
    msg = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if error["type"] in ("missing", "value_error", "assertion_error"):
        return msg
    return f"{msg} (got {_short(error['input'])})"


def dotted(path: list) -> str:
    """distill.tokens: a key as a recipe file writes it."""
    return ".".join(str(p) for p in path)


def flag(path: list) -> str:
    """--batch-size: a key as the command line writes it."""
    return "--" + str(path[-1]).replace("_", "-")


def describe_errors(err: ValidationError, model: type[BaseModel], name: Callable[[list], str] = dotted) -> str:
    """One line for every error of a validation: `key: what is wrong (got VALUE)`, joined by '; '."""
    messages: dict[str, list[str]] = {}
    for error in err.errors(include_url=False):
        path, cls = _field_path(model, error["loc"])
        if error["type"] == "extra_forbidden":
            key = name([*path, error["loc"][len(path)]])
            text = "unknown setting" + (f"; known: {', '.join(cls.model_fields)}" if cls else "")
        else:
            key, text = (name(path) if path else ""), _message(error)
        if text not in messages.setdefault(key, []):
            messages[key].append(text)
    return "; ".join(f"{key}: {' or '.join(texts)}" if key else " or ".join(texts) for key, texts in messages.items())


class Settings(BaseModel):
    """Base of every settings model: unknown keys are refused, values are checked when made and never change.
    Made in Python (`DistillSettings(lr=0.01)`), a bad value raises pydantic's `ValidationError` (a ValueError);
    `parse` raises a one-line `SettingsError` instead."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, coerce_numbers_to_str=True)

    @classmethod
    def parse(cls, values: dict, name: Callable[[list], str] = dotted):
        """Validate `values` (strings are converted: "0.01" -> 0.01); errors in one line naming each key with
        `name` (`dotted` as a recipe file writes it, `flag` as the command line does)."""
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            raise SettingsError(describe_errors(err, cls, name)) from None
