"""Reading dataset files without trusting them: the one place dataset readers open files, decode text and images.

A data root is downloaded from the internet or copied from a shared disk, so its files are treated like any other
untrusted input:
- every file is opened through :func:`tvtool.fileio.open_input` (a FIFO or device is refused, never blocked on);
- text (split lists, CSV, JSON) must be UTF-8 and below a size bound; JSON nesting is bounded;
- images open only in the formats the datasets use (:data:`IMAGE_FORMATS`), so no Pillow plugin that hands the file
  to another program (EPS -> Ghostscript) is ever reached, and an image declaring more pixels than Pillow's bomb
  limit is refused from its header (Pillow's ``DecompressionBombWarning`` is an error here), before decoding;
- sizes declared inside a file (array shapes, label counts) are checked against the bytes the file really holds
  before anything is allocated (:func:`check_declared`).
Errors are one-line :class:`TVToolError` messages that name the file.
"""
from __future__ import annotations

import io
import os
import threading
from pathlib import Path

from ..errors import TVToolError
from .. import fileio
from ..fileio import open_input, read_bytes

# Pillow format ids of the files the datasets ship: JPEG (most), PNG (RenderedSST2, tests), PPM/PGM (GTSRB; Pillow's
# PPM plugin reads both), TIFF, BMP and WebP (accepted image folders). No plugin here runs another program.
IMAGE_FORMATS = ("JPEG", "PNG", "PPM", "TIFF", "BMP", "WEBP")
# Bounds far above any real file of the datasets: the largest text file is FER2013's csv (~300 MB), the largest
# array file PCAM's train images (~7 GB), the largest class count ImageNet's 1,000.
MAX_TEXT_BYTES = 1 << 30
MAX_EXAMPLES = 50_000_000
# deflate cannot compress better than about 1032:1; a file whose declared content is larger than that is lying
MAX_DEFLATE_RATIO = 1100


def reject_nul(name: str, where) -> str:
    """A name read from a data file (split list, CSV, JSON) with a NUL byte cannot name a file."""
    if "\x00" in name:
        raise TVToolError(f"{where}: a file name with a NUL byte ({name[:60]!r}); the file is damaged, re-download it")
    return name


def relative_name(name: str, where) -> str:
    """A relative file name read from a data file: no NUL, not absolute, no '..' (it must stay in the dataset)."""
    reject_nul(name, where)
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or not name.strip():
        raise TVToolError(f"{where}: file name {name[:80]!r} points outside the dataset folder; the file is damaged or "
                          "not from this dataset, re-download it")
    return name


def decode_text(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise TVToolError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); the file is damaged or not from this "
                          "dataset, re-download it") from None


def read_text(path: Path, what: str = "a text file of the dataset", limit: int = MAX_TEXT_BYTES) -> str:
    """A UTF-8 text file (split list, annotations), refused in one line if it is not one."""
    return decode_text(read_bytes(path, what, limit), path)


def read_json(path: Path, what: str = "a JSON file of the dataset", limit: int = MAX_TEXT_BYTES):
    return fileio.read_json(path, what, limit=limit)


def open_text(path: Path, what: str = "a CSV file of the dataset") -> io.TextIOWrapper:
    """A text file opened for streaming (large CSVs); decoding errors surface as UnicodeDecodeError while reading
    (then :func:`not_utf8` says where)."""
    return io.TextIOWrapper(open_input(path, what), encoding="utf-8", errors="strict", newline="")


def not_utf8(path: Path) -> TVToolError:
    """The one-line error for a streamed text file that is not UTF-8, naming the first bad line (found by
    scanning the bytes again: a streaming decoder fails a whole buffer ahead of the line being parsed)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open_input(path, "a text file") as f:
        while True:
            chunk = f.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:  # exc.object: the few bytes held back from before, then this chunk
                line += exc.object[:exc.start].count(b"\n")
                break
            if not chunk:
                break
            line += chunk.count(b"\n")
    return TVToolError(f"{path}:{line}: not UTF-8 text; the file is damaged or not from this dataset, re-download it")


def check_declared(path: Path, declared_bytes: int, what: str, *, compressed: bool = False,
                   available: int | None = None) -> None:
    """Refuse a file whose header declares more data than it can hold, before anything is allocated.

    ``available`` is the number of bytes the file really holds for this content (default: its size); a
    ``compressed`` file may inflate, but not beyond what deflate can do."""
    size = os.stat(path).st_size if available is None else available
    bound = size * MAX_DEFLATE_RATIO if compressed else size
    if declared_bytes < 0 or declared_bytes > bound:
        raise TVToolError(f"{path}: declares {what} ({declared_bytes} bytes) but holds only {size} bytes"
                          f"{' compressed' if compressed else ''}; the file is damaged, re-download it")


_OPENING = threading.Lock()


def open_image(path: str | os.PathLike):
    """A dataset image as a loaded PIL image: a regular file, in one of :data:`IMAGE_FORMATS`, of at most Pillow's
    ``MAX_IMAGE_PIXELS`` pixels (checked from the header, before decoding). Raises on anything else; the decoder
    counts such a file as unreadable and names it."""
    with open_input(path, "an image file") as f:
        return _checked_image(f, path)


def image_from_bytes(data: bytes, where):
    """The same checks and decoding for an encoded image held in memory (a parquet cell of a Hugging Face snapshot);
    ``where`` names it in messages."""
    return _checked_image(io.BytesIO(data), where)


def _checked_image(f, where):
    import warnings

    from PIL import Image

    # Only the header is parsed here (cheap): serialised, because the warning filter that turns Pillow's
    # decompression-bomb warning into an error is process-wide. Decoding (load) runs in parallel.
    with _OPENING, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(f, formats=IMAGE_FORMATS)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise TVToolError(f"{where}: {str(exc).split('. ')[0]}; refusing to decode it") from None
        except Image.UnidentifiedImageError:
            raise TVToolError(f"{where}: not an image in a dataset format ({', '.join(IMAGE_FORMATS)})") from None
    width, height = img.size
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:  # Pillow's bound, even if it warned
        raise TVToolError(f"{where}: {width}x{height} pixels is more than an image of a dataset can be")
    img.load()  # decoded while the file is open; it is closed on return
    return img


MAX_MAT_INFLATED = 2 << 30  # SVHN's largest file (the 531k-image extra split) holds 1.6 GB of pixels


def _inflated_size(stream, cap: int) -> int:
    """How many bytes a zlib stream inflates to, counted in constant memory, stopping past ``cap``."""
    import zlib

    d = zlib.decompressobj()
    total = 0
    for i in range(0, len(stream), 1 << 20):
        data = stream[i:i + (1 << 20)]
        while data:
            total += len(d.decompress(data, 1 << 20))
            if total > cap or d.eof:
                return total
            data = d.unconsumed_tail
    return total


def _check_mat_elements(data: bytes, path: Path) -> None:
    """Before scipy inflates anything: the top-level elements of a MAT v5 file must fit in the file, and its
    compressed elements must not inflate past MAX_MAT_INFLATED in all (counted by streaming them once), so a
    small file cannot make scipy allocate gigabytes."""
    import struct
    import zlib

    if len(data) < 128 or data[126:128] not in (b"IM", b"MI"):
        return  # not v5 (v4 has no compression; v7.3 is HDF5, which scipy refuses): scipy says what it is
    order = "<" if data[126:128] == b"IM" else ">"
    view = memoryview(data)
    offset, inflated = 128, 0
    while offset + 8 <= len(data):
        kind, nbytes = struct.unpack_from(f"{order}II", data, offset)
        if kind >> 16:  # a small data element: type and size packed in 4 bytes, data in the next 4
            offset += 8
            continue
        start = offset + 8
        if nbytes > len(data) - start:
            raise TVToolError(f"{path}: an element declares {nbytes} bytes but only {len(data) - start} follow; the "
                              "file is truncated, re-download it")
        if kind == 15:  # miCOMPRESSED: a zlib stream holding one element
            try:
                inflated += _inflated_size(view[start:start + nbytes], MAX_MAT_INFLATED - inflated)
            except zlib.error:
                pass  # scipy reports the damaged stream
            if inflated > MAX_MAT_INFLATED:
                raise TVToolError(f"{path}: its compressed variables inflate to more than {MAX_MAT_INFLATED} "
                                  "bytes; the file is damaged or not from this dataset")
            offset = start + nbytes
        else:
            offset = start + nbytes + (-nbytes % 8)


def loadmat(path: Path, what: str, limit: int = 4 << 30, **kw) -> dict:
    """A MATLAB .mat file read with scipy from memory (a declared element size never makes Python allocate more
    than the file holds, nor compressed ones inflate past MAX_MAT_INFLATED); anything scipy cannot read is one
    line."""
    import scipy.io

    data = read_bytes(path, what, limit)
    _check_mat_elements(data, path)
    try:
        return scipy.io.loadmat(io.BytesIO(data), **kw)
    except MemoryError:
        raise TVToolError(f"{path}: declares more data than fits in memory; the file is damaged, re-download it"
                          ) from None
    except Exception as exc:  # scipy raises ValueError/TypeError/OSError/... on a damaged or foreign file
        reason = (str(exc).splitlines() or [""])[0][:120]
        raise TVToolError(f"{path}: not a readable .mat file ({type(exc).__name__}: {reason}); re-download it"
                          ) from None
