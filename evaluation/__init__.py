"""Answer accuracy on easy-vqa: the method grid on the reduced PyTorch model, bundles through the runtime, calibration sets."""
