"""Runs a Qwen model locally: tokenizer and ChatML, config and checkpoint loading, the network, generation with
batching, stops and the GPU decode path, and the engine that ties them together (:mod:`.engine`).

Nothing here imports from the rest of the package but :mod:`qwen_agent.errors`: the agent, tools, benchmarks and
servers sit on top of the runtime, never under it.
"""
