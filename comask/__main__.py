import sys

from comask.cli import main

sys.exit(main())
