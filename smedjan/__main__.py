import sys

from smedjan.cli import main

sys.exit(main())
