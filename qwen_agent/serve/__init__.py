"""Servers and UIs on top of the package: they translate their protocol into the same engine, agent and tool
calls the Python API makes, and nothing below this package imports it.

* :mod:`qwen_agent.serve.openai_api`: ``qwen-agent serve``, the OpenAI-compatible HTTP server (``[serve]``).
* :mod:`qwen_agent.serve.web`: ``qwen-agent web``, a Gradio browser UI for the agent (``[web]``).
* :mod:`qwen_agent.serve.mcp_server`: ``qwen-agent mcp``, the sandboxed interpreter as an MCP server (``[mcp]``).
"""
