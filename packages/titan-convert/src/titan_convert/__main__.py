import sys

from titan_convert.cli import main

sys.exit(main())
