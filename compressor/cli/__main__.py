"""`python -m compressor.cli`: the same as the `compressor` command."""
import sys

from compressor.cli.main import main

sys.exit(main())
