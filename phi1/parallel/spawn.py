"""Moved to phi1.testing.spawn (a test fixture); this alias goes once every import is updated."""
from phi1.testing.spawn import *  # noqa: F401,F403
from phi1.testing.spawn import free_port, run_on_gloo  # noqa: F401
