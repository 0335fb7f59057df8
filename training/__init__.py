"""The recipe of the `shapes` built-in model (trained on easy-vqa)."""
