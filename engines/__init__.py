"""Running and judging bundles: the TensorRT builder and backend, the runtime `Pipeline`, `ficoco-check`, `ficoco-bench`."""
