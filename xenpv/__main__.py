import sys

from xenpv.cli import main

sys.exit(main())
