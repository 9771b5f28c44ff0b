"""Servers and UIs on top of the package: they translate their protocol into the same engine, agent and tool
calls the Python API makes, and nothing below this package imports it."""
