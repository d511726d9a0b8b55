"""Helpers for phi1's own tests (and users' tests of their variants): not used by the library itself."""
