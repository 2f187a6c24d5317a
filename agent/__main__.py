"""``python -m agent`` is ``iaflash-agent``."""

from agent.cli import main

main()
