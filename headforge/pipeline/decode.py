"""Decode stage: upload bytes → upright RGB8 pixels, or a clear error with a stable code.

Accepted: JPEG (including MPO from phone cameras), PNG, WebP, BMP and TIFF; the first frame of
multi-frame files. The EXIF orientation tag is applied, and every pixel mode is converted to RGB8:
grayscale and palette are expanded, CMYK converted, 16-bit and 32-bit samples scaled to 8 bits, and
alpha composited over white (a transparent background reads as a plain studio backdrop to the face
detector, where dropping alpha would expose whatever colour the encoder left under it).

The pixel limit (decompression bombs) is checked from the header, before any pixel is decoded.

Refusals: `not_an_image` when the signature is not one of the accepted formats, `truncated_image`
when an accepted format's data ends early, `corrupt_image` when it is complete but broken (a failed
PNG checksum, an unparsable header, data the decoder rejects).
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
import warnings
import zlib
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray
from PIL import (  # importing the plugins registers exactly the formats we accept
    BmpImagePlugin,  # noqa: F401
    Image,
    ImageOps,
    JpegImagePlugin,  # noqa: F401
    PngImagePlugin,  # noqa: F401
    TiffImagePlugin,  # noqa: F401
    UnidentifiedImageError,
    WebPImagePlugin,  # noqa: F401
)

from headforge.errors import (
    CorruptImageError,
    EmptyFileError,
    NotAnImageError,
    TooManyPixelsError,
    TruncatedImageError,
)
from headforge.pipeline.types import DecodedImage

DEFAULT_MAX_PIXELS = 40_000_000
MAX_PIXELS_ENV = "HEADFORGE_MAX_IMAGE_PIXELS"

# Pillow format name -> the name we report. MPO is the multi-picture JPEG many phones write.
SUPPORTED_FORMATS = {
    "JPEG": "JPEG",
    "MPO": "JPEG",
    "PNG": "PNG",
    "WEBP": "WEBP",
    "BMP": "BMP",
    "TIFF": "TIFF",
}

# Pillow's openers for them (MPO files come through the JPEG opener).
PILLOW_OPENERS = ["JPEG", "PNG", "WEBP", "BMP", "TIFF"]

EXIF_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}


class ImageProbe(NamedTuple):
    """What the header says: format and upright size (after EXIF orientation)."""

    format: str
    width: int
    height: int


def max_pixels_from_env() -> int:
    """The pixel limit: `HEADFORGE_MAX_IMAGE_PIXELS` when set, else 40 megapixels."""
    raw = os.environ.get(MAX_PIXELS_ENV)
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        return DEFAULT_MAX_PIXELS
    return value if value > 0 else DEFAULT_MAX_PIXELS


def probe_image(data: bytes, max_pixels: int | None = None) -> ImageProbe:
    """Validate format and size from the header only (no pixel decoding); raise like `decode_image`."""
    image, _caught = _open(data, max_pixels)
    with image:
        orientation = _orientation(image, data)
        width, height = image.size
    if orientation in _SWAPS_AXES:
        width, height = height, width
    return ImageProbe(SUPPORTED_FORMATS[str(image.format)], width, height)


def verify_image(data: bytes, max_pixels: int | None = None) -> ImageProbe:
    """The gateway's check: refuse like `decode_image` would, without a full-resolution RGB8 decode.

    Every byte of image data is still decoded, so truncated and corrupt files are refused, but never
    into the RGB8 and float copies `decode_image` makes. PNGs are inflated as a stream and thrown
    away as they go (chunk CRCs, the exact number of filtered bytes the header implies, and a valid
    filter type at each row start), so memory stays a few MB however many pixels the header claims;
    JPEGs decode at 1/8 scale (libjpeg's DCT scaling reads all the entropy-coded data at a fraction
    of the memory); WebP, BMP and TIFF decode in their own pixel mode. A JPEG whose entropy-coded
    data is too short to hold as many 8×8 blocks as its frame header claims is refused as
    truncated: libjpeg pads such a file with gray without an error."""
    image, caught = _open(data, max_pixels)
    with image:
        source_format = SUPPORTED_FORMATS[str(image.format)]
        orientation = _orientation(image, data)
        width, height = image.size
        try:
            with warnings.catch_warnings(record=True) as load_warnings:
                warnings.simplefilter("always")
                if source_format == "PNG":
                    _verify_png_stream(data)
                else:
                    if source_format == "JPEG":
                        _check_jpeg_scan_length(data)
                        image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
                    image.load()
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as error:
            _raise_decode_error(data, error, caught + list(load_warnings))
    if orientation in _SWAPS_AXES:
        width, height = height, width
    return ImageProbe(source_format, width, height)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Adam7 passes: x0, y0, dx, dy.
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_INFLATE_BLOCK = 1 << 20


def _png_row_runs(
    width: int, height: int, bits_per_pixel: int, interlaced: bool
) -> list[tuple[int, int, int]]:
    """The filtered image data as runs (start offset, row count, row stride incl. its filter byte)."""
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    runs = []
    offset = 0
    for x0, y0, dx, dy in passes:
        columns = -(-(width - x0) // dx) if width > x0 else 0
        rows = -(-(height - y0) // dy) if height > y0 else 0
        if columns == 0 or rows == 0:
            continue
        stride = 1 + -(-(columns * bits_per_pixel) // 8)
        runs.append((offset, rows, stride))
        offset += rows * stride
    return runs


def _verify_png_stream(data: bytes) -> None:
    """Check a PNG without holding its pixels: every chunk's CRC, the IDAT stream inflating to
    exactly the filtered size the header implies, and a filter type (0..4) at every row start.
    Raises `TruncatedImageError` when the chunks or the stream end early, `ValueError` (reported
    as corrupt) for anything broken."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG signature")
    position = len(PNG_SIGNATURE)
    header: tuple[int, int, int, int, int] | None = None
    runs: list[tuple[int, int, int]] = []
    expected = 0
    inflater = zlib.decompressobj()
    produced = 0
    seen_idat = False
    ended = False
    while not ended:
        if position + 8 > len(data):
            raise TruncatedImageError(
                "the PNG file ends early (truncated upload?)", details={"format": "PNG", "bytes": len(data)}
            )
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        body_end = position + 8 + length
        if body_end + 4 > len(data):
            raise TruncatedImageError(
                "the PNG file ends early (truncated upload?)", details={"format": "PNG", "bytes": len(data)}
            )
        body = data[position + 8 : body_end]
        (crc,) = struct.unpack(">I", data[body_end : body_end + 4])
        if zlib.crc32(body, zlib.crc32(kind)) != crc:
            raise ValueError(f"broken PNG file: bad checksum in its {kind.decode('latin-1')} chunk")
        position = body_end + 4
        if kind == b"IHDR":
            if len(body) != 13:
                raise ValueError("broken PNG file: bad IHDR chunk")
            width, height, depth, color, _compression, _filter, interlace = struct.unpack(">IIBBBBB", body)
            if color not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16):
                raise ValueError(f"broken PNG file: colour type {color} at bit depth {depth}")
            header = (width, height, depth, color, interlace)
            runs = _png_row_runs(width, height, _PNG_CHANNELS[color] * depth, interlace == 1)
            expected = sum(rows * stride for _start, rows, stride in runs)
        elif kind == b"IDAT":
            if header is None:
                raise ValueError("broken PNG file: IDAT before IHDR")
            if inflater.eof:
                raise ValueError("broken PNG file: data after the end of the image stream")
            seen_idat = True
            pending = body
            while pending:
                block = inflater.decompress(pending, _INFLATE_BLOCK)
                _check_png_filters(block, produced, runs)
                produced += len(block)
                if produced > expected:
                    raise ValueError("broken PNG file: more image data than the header's size holds")
                pending = inflater.unconsumed_tail
                if inflater.eof:
                    break
        elif kind == b"IEND":
            ended = True
    if not seen_idat or not inflater.eof or produced < expected:
        raise TruncatedImageError(
            "the PNG image data ends early (truncated upload?)", details={"format": "PNG", "bytes": len(data)}
        )


def _check_png_filters(block: bytes, offset: int, runs: list[tuple[int, int, int]]) -> None:
    """Raise ValueError when a row of `block` (at `offset` in the filtered stream) starts with a
    filter type other than 0..4."""
    if not block:
        return
    view = np.frombuffer(block, np.uint8)
    end = offset + len(block)
    for start, rows, stride in runs:
        run_end = start + rows * stride
        if run_end <= offset or start >= end:
            continue
        first = start + max(0, -(-(offset - start) // stride)) * stride
        starts = np.arange(first, min(run_end, end), stride) - offset
        if starts.size and int(view[starts].max()) > 4:
            raise ValueError("broken PNG file: unknown filter type")


def _check_jpeg_scan_length(data: bytes) -> None:
    """Raise `TruncatedImageError` when the first image's entropy-coded data cannot hold its blocks.

    Every 8×8 block costs at least one bit in a sequential scan (its DC difference) and in a
    progressive file's first DC scan, so a frame of N blocks needs at least N/8 bytes of scan data.
    Real files are far above this bound; a header claiming a large frame over a few bytes is not."""
    frame: tuple[int, int, dict[int, tuple[int, int]]] | None = None
    needed_bits = 0
    scanned = 0
    position = 2
    size = len(data)
    while position + 4 <= size:
        if data[position] != 0xFF:
            return  # not where a marker should be: Pillow's own checks judge the file
        marker = data[position + 1]
        if marker == 0xFF:
            position += 1
            continue
        if marker == 0xD9:
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            position += 2
            continue
        length = struct.unpack(">H", data[position + 2 : position + 4])[0]
        segment = data[position + 4 : position + 2 + length]
        if marker in (0xC0, 0xC1, 0xC2) and len(segment) >= 6:
            height, width, count = struct.unpack(">HHB", segment[1:6])
            components = {}
            for index in range(count):
                entry = segment[6 + 3 * index : 9 + 3 * index]
                if len(entry) == 3:
                    components[entry[0]] = (entry[1] >> 4, entry[1] & 15)
            frame = (width, height, components)
        elif marker in (0xC3, 0xC5, 0xC6, 0xC7) or (0xC9 <= marker <= 0xCF and marker != 0xCC):
            return  # lossless, hierarchical or arithmetic coding: no simple bound
        position += 2 + length
        if marker == 0xDA and frame is not None and len(segment) >= 1:
            count = segment[0]
            ids = [segment[1 + 2 * i] for i in range(count) if 1 + 2 * i < len(segment)]
            tail = segment[1 + 2 * count : 4 + 2 * count]
            first_dc = len(tail) == 3 and tail[0] == 0 and (tail[2] >> 4) == 0
            if first_dc:
                needed_bits += sum(_jpeg_blocks(frame, component) for component in ids)
            # The entropy-coded data runs to the next marker other than a restart or a stuffed 0xFF00.
            start = position
            while True:
                found = data.find(b"\xff", position)
                if found < 0 or found + 1 >= size:
                    position = size
                    break
                follower = data[found + 1]
                if follower == 0 or 0xD0 <= follower <= 0xD7:
                    position = found + 2
                    continue
                position = found
                break
            scanned += position - start
    if frame is not None and scanned * 8 < needed_bits:
        raise TruncatedImageError(
            f"the JPEG file ends early: its {frame[0]}x{frame[1]} frame needs at least {needed_bits // 8} bytes "
            f"of image data, the file has {scanned}",
            details={"format": "JPEG", "bytes": size, "width": frame[0], "height": frame[1]},
        )


def _jpeg_blocks(frame: tuple[int, int, dict[int, tuple[int, int]]], component: int) -> int:
    """8×8 blocks of one component of a frame (without the padding of interleaved scans)."""
    width, height, components = frame
    if component not in components or not components:
        return 0
    h_max = max(h for h, _v in components.values()) or 1
    v_max = max(v for _h, v in components.values()) or 1
    h, v = components[component]
    columns = math.ceil(math.ceil(width * h / h_max) / 8)
    rows = math.ceil(math.ceil(height * v / v_max) / 8)
    return columns * rows


def decode_image(data: bytes, max_pixels: int | None = None) -> DecodedImage:
    """Decode `data` to upright RGB8; raise `EmptyFileError`, `NotAnImageError`,
    `TruncatedImageError`, `CorruptImageError` or `TooManyPixelsError`."""
    image, caught = _open(data, max_pixels)
    with image:
        source_format = SUPPORTED_FORMATS[str(image.format)]
        source_mode = image.mode
        orientation = _orientation(image, data)
        try:
            with warnings.catch_warnings(record=True) as load_warnings:
                warnings.simplefilter("always")
                if source_format == "PNG":
                    _verify_png_checksums(data)
                if source_format == "JPEG":
                    _check_jpeg_scan_length(data)
                image.load()
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
            _raise_decode_error(data, error, caught + list(load_warnings))
        upright = _apply_orientation(image, orientation)
        rgb = _to_rgb8(upright)
    return DecodedImage(
        rgb=rgb, source_format=source_format, source_mode=source_mode, exif_orientation=orientation
    )


def _open(data: bytes, max_pixels: int | None) -> tuple[Image.Image, list[warnings.WarningMessage]]:
    """Open lazily (header only) and enforce format and pixel limit."""
    if not data:
        raise EmptyFileError("the file is empty")
    limit = max_pixels if max_pixels is not None else max_pixels_from_env()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # Only the accepted formats' parsers ever see upload bytes.
            image = Image.open(io.BytesIO(data), formats=PILLOW_OPENERS)
        except Image.DecompressionBombError as error:
            claimed = re.search(r"\((\d+) pixels\)", str(error))
            details: dict[str, int] = {"max_pixels": limit}
            if claimed:
                details["pixels"] = int(claimed.group(1))
            raise TooManyPixelsError(
                f"the image has too many pixels to decode safely (over the {limit / 1e6:.1f} MP limit)",
                details=details,
            ) from error
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
            _raise_decode_error(data, error, list(caught))
    if image.format not in SUPPORTED_FORMATS:
        found = image.format
        image.close()
        raise NotAnImageError(
            f"unsupported image format {found}; use JPEG, PNG, WebP, BMP or TIFF",
            details={"format": found, "supported": sorted(set(SUPPORTED_FORMATS.values()))},
        )
    width, height = image.size
    if width <= 0 or height <= 0:
        found = SUPPORTED_FORMATS[str(image.format)]
        image.close()
        raise CorruptImageError(
            f"the {found} header gives an empty size",
            details={"format": found, "width": width, "height": height},
        )
    if width * height > limit:
        image.close()
        raise TooManyPixelsError(
            f"the image is {width}x{height} = {width * height / 1e6:.1f} MP, over the {limit / 1e6:.1f} MP limit",
            details={"width": width, "height": height, "pixels": width * height, "max_pixels": limit},
        )
    return image, list(caught)


def _verify_png_checksums(data: bytes) -> None:
    """Check every PNG chunk's CRC (Pillow's decoder skips them, so corrupt IDAT data would decode to noise)."""
    with Image.open(io.BytesIO(data)) as checker:
        checker.verify()


def _raise_decode_error(data: bytes, error: BaseException, caught: list[warnings.WarningMessage]) -> None:
    """Turn a Pillow failure into `NotAnImageError` (no accepted signature), `TruncatedImageError`
    (an accepted format that ends early) or `CorruptImageError` (an accepted format, broken)."""
    signature = sniff_format(data)
    if signature is None:
        other = _other_format(data)
        if other is not None:
            raise NotAnImageError(
                f"unsupported image format {other}; use JPEG, PNG, WebP, BMP or TIFF",
                details={"format": other, "supported": sorted(set(SUPPORTED_FORMATS.values()))},
            ) from error
        raise NotAnImageError(
            "the file is not an image headforge can read (JPEG, PNG, WebP, BMP, TIFF)"
        ) from error
    if _looks_truncated(data, signature, error, caught):
        raise TruncatedImageError(
            f"the {signature} file ends early (truncated upload?)",
            details={"format": signature, "bytes": len(data)},
        ) from error
    # Pillow's "cannot identify image file <_io.BytesIO …>" says nothing useful about the bytes.
    reason = "its header cannot be parsed" if isinstance(error, UnidentifiedImageError) else str(error)
    raise CorruptImageError(
        f"the {signature} file is corrupt: {reason}", details={"format": signature, "reason": reason}
    ) from error


def _other_format(data: bytes) -> str | None:
    """Name a few common formats we refuse, so the message says what was sent."""
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIF"
    if data.startswith(b"%PDF"):
        return "PDF"
    if data.startswith(b"\x00\x00\x01\x00"):
        return "ICO"
    return None


def sniff_format(data: bytes) -> str | None:
    """The format named by the file's magic bytes, if it is one we accept."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    return None


def _looks_truncated(
    data: bytes, signature: str, error: BaseException, caught: list[warnings.WarningMessage]
) -> bool:
    """Whether a failed decode is explained by missing bytes at the end of the file."""
    messages = [str(error), *(str(w.message) for w in caught)]
    if any("truncat" in m.lower() for m in messages) or isinstance(error, EOFError):
        return True
    if signature == "PNG":
        return b"IEND" not in data[-16:]
    if signature == "WEBP" and len(data) >= 8:
        return len(data) < struct.unpack("<I", data[4:8])[0] + 8
    if signature == "BMP" and len(data) >= 6:
        return len(data) < struct.unpack("<I", data[2:6])[0]
    if signature == "JPEG":
        return b"\xff\xd9" not in data[-64:]
    if signature == "TIFF":
        return _tiff_first_directory_missing(data)
    return False


def _tiff_first_directory_missing(data: bytes) -> bool:
    """Whether a classic TIFF's first image directory lies (partly) past the end of the data."""
    if len(data) < 8 or data[2:4] not in (b"*\x00", b"\x00*"):
        return len(data) < 16
    order = "<" if data[:2] == b"II" else ">"
    offset = struct.unpack(order + "I", data[4:8])[0]
    if offset + 2 > len(data):
        return True
    entries = struct.unpack(order + "H", data[offset : offset + 2])[0]
    return offset + 2 + 12 * entries + 4 > len(data)


def _orientation(image: Image.Image, data: bytes) -> int:
    """The EXIF orientation tag (1..8), 1 when absent or invalid. For a PNG the eXIf chunk is found
    by walking the chunks: Pillow's `getexif` decodes every pixel to look past IDAT."""
    try:
        if image.format == "PNG":
            exif = Image.Exif()
            chunk = _png_chunk(data, b"eXIf")
            if chunk is None:
                return 1
            exif.load(chunk)
            value = exif.get(EXIF_ORIENTATION_TAG, 1)
        else:
            value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF must not fail the upload; treat as upright
        return 1
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1


def _png_chunk(data: bytes, kind: bytes) -> bytes | None:
    """The body of a PNG's first chunk of `kind`, found from the chunk lengths alone."""
    position = len(PNG_SIGNATURE)
    while position + 8 <= len(data):
        length, found = struct.unpack(">I4s", data[position : position + 8])
        if found == kind:
            return data[position + 8 : position + 8 + length]
        if found == b"IEND":
            return None
        position += 12 + length
    return None


def _apply_orientation(image: Image.Image, orientation: int) -> Image.Image:
    """Rotate/flip pixels so the image is upright."""
    if orientation == 1:
        return image
    transposed = ImageOps.exif_transpose(image)
    return transposed if transposed is not None else image


def _to_rgb8(image: Image.Image) -> NDArray[np.uint8]:
    """Any Pillow mode → contiguous (H, W, 3) uint8."""
    mode = image.mode
    if mode == "RGB":
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        samples = np.asarray(image).astype(np.float64)
        # 16-bit files arrive as I;16 or (older Pillow) as I with values up to 65535.
        peak = 65535.0 if (mode != "I" or samples.max(initial=0) > 255) else 255.0
        gray = np.clip(np.rint(samples * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if mode == "F":
        samples = np.asarray(image, dtype=np.float64)
        scale = 255.0 if samples.max(initial=0) <= 1.0 else 1.0
        gray = np.clip(np.rint(samples * scale), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        composited = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        return np.ascontiguousarray(np.clip(np.rint(composited), 0, 255).astype(np.uint8))
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
