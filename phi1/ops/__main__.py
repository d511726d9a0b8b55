"""`python -m phi1.ops`: build the fused ops ahead of time and check them against their references."""

import sys

from phi1.ops.loader import main

sys.exit(main())
