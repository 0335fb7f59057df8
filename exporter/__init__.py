"""ReducedLlava -> four ONNX graphs: per-stage export, the TensorRT-compatibility lint, validation against PyTorch, `export_bundle`."""
