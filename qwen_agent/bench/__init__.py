"""The benchmarks: Qwen's tool-use benchmark (:mod:`.tool_use`), the code-interpreter benchmark
(:mod:`.code_interpreter`) and the metrics both report (:mod:`.metrics`)."""
