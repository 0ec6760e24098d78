"""`python -m vitune.datagen SUBCOMMAND ...`, the same as `vitune datagen SUBCOMMAND ...`."""

import sys

from vitune.datagen.commands import main

sys.exit(main())
