"""ddp_resnet: distributed ResNet training in plain PyTorch."""

__version__ = "0.1.0"
