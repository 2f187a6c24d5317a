"""The one loader of the agent's versioned JSON Schemas (capture, event, command, response).

Schemas are package data beside this module, read on first use and checked once; importing
this module does no I/O.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator


def schema_text(name: str) -> str:
    """The raw text of schema ``name`` (for instance ``"event.v1.json"``)."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


@lru_cache(maxsize=8)
def validator(name: str) -> Draft202012Validator:
    """A draft 2020-12 validator of schema ``name``; the schema itself is checked first."""
    schema = json.loads(schema_text(name))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def schema(name: str) -> dict[str, Any]:
    """A fresh copy of schema ``name`` (the cached original is never handed out)."""
    doc: dict[str, Any] = json.loads(schema_text(name))
    return doc
