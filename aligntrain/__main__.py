"""`python -m aligntrain ...` and `accelerate launch -m aligntrain ...`."""

import sys

from .cli import main

sys.exit(main())
