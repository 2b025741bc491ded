"""What ships: save/load without pickle, ONNX/TorchScript export, ``profile``."""
