"""Servers and user interfaces on top of the agent: nothing below ``serve/`` imports this package.

* :mod:`qwen_agent.serve.web`: ``qwen-agent web``, a Gradio browser UI for the agent (the ``[web]`` extra).
"""
