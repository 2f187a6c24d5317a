"""``iaflash-engines``: the model publisher's and the technician's inference tools.

Subcommands live beside the code they drive (``engines/cli_bundle.py``: keygen, sign,
verify, allow-rollback; ``engines/cli_pack.py``: pack; ``engines/cli_build.py``: build;
``engines/cli_trust.py``: trust); this module only assembles the group.

Exit codes: 0 ok, 1 operational error, 2 usage error, 3 check found problems.
"""

from __future__ import annotations

import importlib
import logging

import click

from iaflash.engines.cli_common import version_option

CONTEXT = {"help_option_names": ["-h", "--help"]}

log = logging.getLogger(__name__)

# (module, attribute) of each command or group attached to `main`.
_COMMANDS = (
    ("iaflash.engines.cli_bundle", "commands"),
    ("iaflash.engines.cli_pack", "commands"),
    ("iaflash.engines.cli_build", "commands"),
    ("iaflash.engines.cli_trust", "commands"),
)


@click.group(context_settings=CONTEXT)
@version_option("iaflash-engines")
def main() -> None:
    """iaflash-engines: build, pack, sign and verify model bundles and TensorRT engines.

    \b
    Example:
      iaflash-engines keygen --out publisher
      iaflash-engines pack model.onnx --labels labels.csv --name vmmr --version 1.0 --out bundle/
      iaflash-engines sign bundle/ --key publisher.key
      iaflash-engines verify bundle/ --trust /etc/iaflash/trust/
      iaflash-engines build bundle/ --precision fp16
    """


def _attach() -> None:
    for module_name, attr in _COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        for command in getattr(module, attr):
            main.add_command(command)


_attach()
