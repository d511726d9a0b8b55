"""`python -m phi1.serve`: see phi1/serve/__init__.py."""

from phi1.serve import main

main()
