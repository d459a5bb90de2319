"""`python -m registry_scripts`: the `kronos-registry` CLI."""

import sys

from .cli import main

sys.exit(main())
