"""Helpers shared by the tests.

`server` (the PostgreSQL the tests use), `cli` (CLI workspaces), `faults` and `fault_proxy` (fault injection).
"""
