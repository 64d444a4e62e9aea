"""`python -m llama3v.cli`: the same as the `llama3v` console script."""

import sys

from llama3v.cli.main import main

sys.exit(main())
