"""Servers and UIs on top of the package: they translate HTTP or UI events into the same engine, agent and tool
calls the Python API makes. Nothing outside this package imports it."""
