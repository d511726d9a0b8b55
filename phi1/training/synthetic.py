"""Moved to phi1.testing.synthetic (a test fixture); this alias goes once every import is updated."""
from phi1.testing.synthetic import *  # noqa: F401,F403
