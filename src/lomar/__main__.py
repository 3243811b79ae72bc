import sys

from lomar.cli.app import main

sys.exit(main())
