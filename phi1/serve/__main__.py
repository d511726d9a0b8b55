"""`python -m phi1.serve`: see phi1/serve/__init__.py."""

import sys

from phi1.serve import main

sys.exit(main())
