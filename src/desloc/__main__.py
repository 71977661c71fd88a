import sys

from desloc.cli import main

sys.exit(main())
