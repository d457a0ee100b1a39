"""`python -m bot.cli …` runs the `rapport` command."""

from bot.cli.main import main

main()
