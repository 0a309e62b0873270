"""Models: the U-Net (torch, training only), ONNX export, inference backends, the forest."""
