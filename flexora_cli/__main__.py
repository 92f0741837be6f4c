"""`python -m flexora_cli <stage> ...`, which is what `accelerate launch -m flexora_cli ...` runs."""

import sys

from flexora_cli.cli import main

sys.exit(main())
