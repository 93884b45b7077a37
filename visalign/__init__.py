"""visalign: align text-to-image and text-to-video generators with reward models."""

__version__ = "0.1.0"
