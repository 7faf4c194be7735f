"""python -m medgen COMMAND ...: the same as the `medgen` command."""
import sys

from medgen.cli import main

sys.exit(main())
