import sys

from graphfold.cli import main

sys.exit(main())
