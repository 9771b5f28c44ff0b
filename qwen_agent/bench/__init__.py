"""The benchmarks: Qwen's tool-use benchmark (:mod:`.tool_use`), the code-interpreter benchmark
(:mod:`.code_interpreter`), the metrics both report (:mod:`.metrics`, rendered by :mod:`.report`), and the
comparison of tool-use runs (:mod:`.compare`)."""
