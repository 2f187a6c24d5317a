"""``python -m iaflash.agent`` is ``iaflash-agent``."""

from iaflash.agent.cli.main import main

main()
