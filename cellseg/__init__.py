"""cellseg: U-Net segmentation of grayscale microscopy images into cell and background."""

__version__ = "0.1.0"
