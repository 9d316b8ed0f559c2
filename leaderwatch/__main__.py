import sys

from leaderwatch.cli import main

sys.exit(main())
