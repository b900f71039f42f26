"""neoxconv: GPT-NeoX checkpoint conversion with numerical parity checks."""

__version__ = "0.1.0"
