"""python -m fusetune.cli: the fusetune command."""
import sys

from fusetune.cli import main

sys.exit(main())
