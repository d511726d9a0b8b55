"""Moved to phi1.testing.toy_model (a test fixture); this alias goes once every import is updated."""
from phi1.testing.toy_model import *  # noqa: F401,F403
