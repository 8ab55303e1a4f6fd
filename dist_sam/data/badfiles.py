"""Find the unreadable files that real ImageNet contains, before a decoder trips over them.

DALI's decoders stop the whole pipeline on an empty, truncated or non-image file; PIL raises. The
quick check (~30 us per file) parses the header with PIL and looks for the format's end marker,
and only a file without one is fully decoded to decide. CMYK and grayscale JPEGs and PNG data
named ``.JPEG`` are *good*: both backends decode them to 3-channel RGB by content.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, UnidentifiedImageError

__all__ = ["check_image", "find_bad_files", "warn_bad_files", "DECODABLE_FORMATS"]

# Formats both DALI's image decoders and PIL read; anything else (GIF, say) is skipped.
DECODABLE_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "PPM", "WEBP")
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}
_TAIL_BYTES = 1024


def _decodes(path: str) -> str | None:
    try:
        with Image.open(path) as img:
            img.convert("RGB").load()
    except Exception as err:  # noqa: BLE001 -- any decoder failure means "unreadable"
        return f"decode failed: {type(err).__name__}: {err}"
    return None


def check_image(path: str, full: bool = False) -> str | None:
    """Return why ``path`` cannot be decoded, or ``None`` if it can.

    Args:
        path: Image file.
        full: Decode the whole image instead of the quick header and end-marker check.
    """
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            if size == 0:
                return "empty file"
            fh.seek(max(0, size - _TAIL_BYTES))
            tail = fh.read()
            fh.seek(0)
            with Image.open(fh) as img:
                fmt = img.format
    except UnidentifiedImageError:
        return "not an image (unrecognized header)"
    except Exception as err:  # noqa: BLE001 -- unreadable header
        return f"unreadable header: {type(err).__name__}: {err}"
    if fmt not in DECODABLE_FORMATS:
        return f"unsupported format {fmt}"
    marker = _END_MARKERS.get(fmt)
    if full or (marker is not None and marker not in tail):
        # No end marker: truncated, unless the file merely carries trailing bytes; decode to know.
        return _decodes(path)
    return None


def find_bad_files(paths: Iterable[str], num_threads: int = 4, full: bool = False) -> dict[str, str]:
    """Check ``paths`` in a thread pool; return ``{path: reason}`` for the unreadable ones."""
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        reasons = pool.map(lambda p: check_image(p, full), paths, chunksize=256)
        return {p: r for p, r in zip(paths, reasons) if r is not None}


def warn_bad_files(bad: Mapping[str, str], what: str, action: str, show: int = 3) -> None:
    """One warning for a whole set of bad files, naming the first few."""
    if not bad:
        return
    first = "; ".join(f"{p} ({r})" for p, r in list(bad.items())[:show])
    more = f" and {len(bad) - show} more" if len(bad) > show else ""
    warnings.warn(
        f"{len(bad)} unreadable image file(s) in {what} {action}: {first}{more}", RuntimeWarning, stacklevel=3
    )
