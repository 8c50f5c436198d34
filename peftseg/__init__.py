"""peftseg: PEFT experiment runner for instance segmentation."""

__version__ = "0.1.0"
