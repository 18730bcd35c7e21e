"""The one way dataset images are opened: folder layouts and Hugging Face snapshots alike call :func:`open_image`.

Pillow is asked only for the formats the datasets use, so no plugin that hands a file to an external program (EPS
-> Ghostscript) is ever reached, whatever a file's name says.
"""
from __future__ import annotations

IMAGE_FORMATS = ("JPEG", "PNG", "PPM", "TIFF", "BMP", "WEBP", "GIF")


def open_image(source):
    """A lazily decoded PIL image from a path or a binary file object (e.g. ``io.BytesIO`` of a parquet cell)."""
    from PIL import Image

    return Image.open(source, formats=IMAGE_FORMATS)
