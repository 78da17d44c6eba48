"""The front end: the `compressor` command (main.py) and its `bench` subcommand (bench.py)."""
from compressor.cli.main import main

__all__ = ["main"]
