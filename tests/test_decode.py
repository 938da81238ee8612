"""Decode stage: every accepted format and pixel mode, EXIF orientation, and each refusal code,
on real files written by Pillow (and OpenCV for 16-bit colour, which Pillow cannot write)."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

from headforge.errors import (
    CorruptImageError,
    EmptyFileError,
    NotAnImageError,
    TooManyPixelsError,
    TruncatedImageError,
)
from headforge.pipeline.decode import (
    DEFAULT_MAX_PIXELS,
    MAX_PIXELS_ENV,
    decode_image,
    probe_image,
    verify_image,
)

FORMATS = ["JPEG", "PNG", "WEBP", "BMP", "TIFF"]
LOSSLESS = {"PNG", "BMP", "TIFF"}
# The worker's decode and the gateway's check decode refuse the same files with the same codes.
CHECKS = pytest.mark.parametrize("check", [decode_image, verify_image], ids=["decode", "verify"])


@pytest.fixture(scope="module")
def small_photo() -> np.ndarray:
    return np.ascontiguousarray(data.astronaut()[::2, ::2])  # 256x256 keeps the suite fast


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_decodes_to_rgb8(small_photo: np.ndarray, fmt: str) -> None:
    payload = encode(Image.fromarray(small_photo), fmt)
    decoded = decode_image(payload)
    assert decoded.source_format == fmt
    assert decoded.rgb.dtype == np.uint8 and decoded.rgb.shape == small_photo.shape
    assert decoded.rgb.flags.c_contiguous
    error = np.abs(decoded.rgb.astype(int) - small_photo.astype(int)).mean()
    assert error == 0 if fmt in LOSSLESS else error < 8
    assert probe_image(payload) == (fmt, small_photo.shape[1], small_photo.shape[0])


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("L", "PNG"),
        ("L", "JPEG"),
        ("CMYK", "JPEG"),
        ("CMYK", "TIFF"),
        ("P", "PNG"),
        ("P", "BMP"),
        ("1", "PNG"),
    ],
)
def test_pixel_modes_convert_to_rgb(small_photo: np.ndarray, mode: str, fmt: str) -> None:
    source = Image.fromarray(small_photo).convert(mode)
    decoded = decode_image(encode(source, fmt))
    assert decoded.source_mode == mode
    assert decoded.rgb.shape == small_photo.shape and decoded.rgb.dtype == np.uint8
    expected = np.asarray(source.convert("RGB"), dtype=int)
    tolerance = 0 if fmt != "JPEG" else 8
    assert np.abs(decoded.rgb.astype(int) - expected).mean() <= tolerance


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grayscale_scales_to_8_bit(small_photo: np.ndarray, fmt: str) -> None:
    gray8 = np.asarray(Image.fromarray(small_photo).convert("L"))
    gray16 = gray8.astype(np.uint16) * 257  # full 16-bit range
    decoded = decode_image(encode(Image.fromarray(gray16), fmt))
    assert decoded.source_mode.startswith("I")
    assert np.array_equal(decoded.rgb[..., 0], gray8)
    assert np.array_equal(decoded.rgb[..., 0], decoded.rgb[..., 2])


@pytest.mark.parametrize("extension", [".png", ".tiff"])
def test_16_bit_colour_scales_to_8_bit(small_photo: np.ndarray, extension: str) -> None:
    ok, encoded = cv2.imencode(extension, small_photo[..., ::-1].astype(np.uint16) * 257)
    assert ok
    decoded = decode_image(encoded.tobytes())
    assert np.abs(decoded.rgb.astype(int) - small_photo.astype(int)).max() <= 1


def test_alpha_is_composited_on_white(small_photo: np.ndarray) -> None:
    rgba = np.dstack([small_photo, np.zeros(small_photo.shape[:2], np.uint8)])
    rgba[:, : small_photo.shape[1] // 2, 3] = 255  # left half opaque, right half transparent
    rgba[:, -10:, 3] = 128
    decoded = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert decoded.source_mode == "RGBA"
    half = small_photo.shape[1] // 2
    assert np.array_equal(decoded.rgb[:, :half], small_photo[:, :half])
    assert (decoded.rgb[:, half:-10] == 255).all()
    blended = np.rint(small_photo[:, -10:] * (128 / 255) + 255 * (127 / 255))
    assert np.abs(decoded.rgb[:, -10:].astype(float) - blended).max() <= 1


def test_palette_transparency_and_grayscale_alpha(small_photo: np.ndarray) -> None:
    la = Image.fromarray(np.dstack([small_photo[..., 0], np.zeros(small_photo.shape[:2], np.uint8)]), "LA")
    assert (decode_image(encode(la, "PNG")).rgb == 255).all()
    palette = Image.fromarray(small_photo).convert("P")
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])
    decoded = decode_image(encode(palette, "PNG", transparency=palette.info["transparency"]))
    assert (decoded.rgb[0, 0] == 255).all()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_and_reported(orientation: int) -> None:
    # A 60x40 image whose top-left quadrant is red: after orientation, find where red lands.
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:20, :30] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = encode(Image.fromarray(stored), "PNG", exif=exif.tobytes())
    decoded = decode_image(payload)
    expected = np.asarray(
        Image.fromarray(stored).transpose(_TRANSPOSES[orientation])
        if orientation > 1
        else Image.fromarray(stored)
    )
    assert decoded.exif_orientation == orientation
    assert np.array_equal(decoded.rgb, expected)
    assert probe_image(payload)[1:] == (decoded.width, decoded.height)
    assert (decoded.width, decoded.height) == ((40, 60) if orientation >= 5 else (60, 40))


_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def test_jpeg_exif_orientation(small_photo: np.ndarray) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(
        encode(Image.fromarray(small_photo[:, :100]), "JPEG", exif=exif.tobytes(), quality=95)
    )
    assert decoded.exif_orientation == 6 and decoded.rgb.shape == (100, 256, 3)


@CHECKS
def test_empty_file(check: Callable[[bytes], object]) -> None:
    with pytest.raises(EmptyFileError) as caught:
        check(b"")
    assert caught.value.code == "empty_file"
    with pytest.raises(EmptyFileError):
        probe_image(b"")


@pytest.mark.parametrize("payload", [b"hello, this is text", b"\x00" * 4096, b"%PDF-1.7\n" + b"x" * 100])
@CHECKS
def test_not_an_image(payload: bytes, check: Callable[[bytes], object]) -> None:
    with pytest.raises(NotAnImageError) as caught:
        check(payload)
    assert caught.value.code == "not_an_image" and caught.value.http_status == 415


@pytest.mark.parametrize(("fmt", "named"), [("GIF", True), ("ICO", True), ("TGA", False), ("PCX", False)])
def test_unsupported_formats_are_refused(small_photo: np.ndarray, fmt: str, named: bool) -> None:
    payload = encode(Image.fromarray(small_photo), fmt)
    for call in (probe_image, decode_image, verify_image):
        with pytest.raises(NotAnImageError) as caught:
            call(payload)
        assert (fmt in caught.value.message) == named


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("keep", [0.5, 0.1])
@CHECKS
def test_truncated_files(
    small_photo: np.ndarray, fmt: str, keep: float, check: Callable[[bytes], object]
) -> None:
    payload = encode(Image.fromarray(small_photo), fmt)
    with pytest.raises(TruncatedImageError) as caught:
        check(payload[: int(len(payload) * keep)])
    assert caught.value.code == "truncated_image"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
@CHECKS
def test_header_only_fragment_is_truncated(
    small_photo: np.ndarray, fmt: str, check: Callable[[bytes], object]
) -> None:
    payload = encode(Image.fromarray(small_photo), fmt)
    with pytest.raises(TruncatedImageError):
        check(payload[:40])


def _jpeg_segment(payload: bytes | bytearray, marker: int) -> int:
    """Offset of the first JPEG segment with this marker (0xC4 DHT, 0xDA SOS, ...), walking the
    segment lengths from SOI."""
    offset = 2
    while offset + 4 <= len(payload):
        assert payload[offset] == 0xFF, "not at a marker"
        if payload[offset + 1] == marker:
            return offset
        offset += 2 + struct.unpack(">H", payload[offset + 2 : offset + 4])[0]
    raise AssertionError(f"no marker {marker:#x}")


def _assert_corrupt(
    payload: bytes, fmt: str, check: Callable[[bytes], object] = decode_image
) -> CorruptImageError:
    with pytest.raises(CorruptImageError) as caught:
        check(payload)
    error = caught.value
    assert error.code == "corrupt_image" and error.http_status == 400
    assert error.details["format"] == fmt and fmt in error.message
    assert "BytesIO" not in error.message  # Pillow's object repr says nothing to a user
    return error


@CHECKS
def test_corrupt_png_data_is_refused(small_photo: np.ndarray, check: Callable[[bytes], object]) -> None:
    """The file is whole (IEND present) and its signature is PNG, but IDAT's CRC fails: corrupt,
    neither truncated nor "not an image"."""
    payload = bytearray(encode(Image.fromarray(small_photo), "PNG"))
    middle = len(payload) // 2
    payload[middle : middle + 64] = bytes(64)  # damage IDAT; its CRC no longer matches
    error = _assert_corrupt(bytes(payload), "PNG", check)
    assert "checksum" in error.message


def test_corrupt_header_is_refused(small_photo: np.ndarray) -> None:
    """IHDR's width and height overwritten without fixing its CRC: the header is damaged, which is a
    corrupt PNG. (The same absurd size with a valid CRC is a decompression bomb: too_many_pixels,
    see test_pixel_limit_checked_from_header.)"""
    payload = bytearray(encode(Image.fromarray(small_photo), "PNG"))
    payload[16:24] = b"\xff" * 8
    for call in (decode_image, probe_image, verify_image):
        with pytest.raises(CorruptImageError) as caught:
            call(bytes(payload))
        assert caught.value.code == "corrupt_image" and caught.value.details["format"] == "PNG"


def _jpeg_bad_huffman_table(payload: bytearray) -> None:
    table = _jpeg_segment(payload, 0xC4)
    payload[table + 5 : table + 21] = b"\xff" * 16  # code counts that no Huffman tree can hold


def _jpeg_random_scan(payload: bytearray) -> None:
    scan = _jpeg_segment(payload, 0xDA)
    noise = np.random.default_rng(0).integers(0, 256, 4900, dtype=np.uint8).tobytes()
    payload[scan + 100 : scan + 5000] = noise


def _bmp_bad_depth(payload: bytearray) -> None:
    payload[28:30] = struct.pack("<H", 7)  # 7 bits per pixel does not exist


def _tiff_bad_directory(payload: bytearray) -> None:
    directory = struct.unpack("<I", payload[4:8])[0]
    payload[directory + 2 : directory + 2 + 36] = b"\xff" * 36  # first three IFD entries


@pytest.mark.parametrize(
    ("fmt", "damage"),
    [
        ("JPEG", _jpeg_bad_huffman_table),
        ("JPEG", _jpeg_random_scan),
        ("BMP", _bmp_bad_depth),
        ("TIFF", _tiff_bad_directory),
    ],
    ids=["jpeg-huffman-table", "jpeg-scan-noise", "bmp-depth", "tiff-directory"],
)
@CHECKS
def test_corrupt_files_of_each_format(
    small_photo: np.ndarray, fmt: str, damage: Callable[[bytearray], None], check: Callable[[bytes], object]
) -> None:
    """Whole files of an accepted format with damaged headers or data: `corrupt_image` (400), kept
    apart from `not_an_image` (415, another format) and `truncated_image` (400, bytes missing)."""
    payload = bytearray(encode(Image.fromarray(small_photo), fmt))
    intact = bytes(payload)
    damage(payload)
    assert len(payload) == len(intact) and bytes(payload) != intact
    _assert_corrupt(bytes(payload), fmt, check)
    check(intact)  # the same file undamaged decodes


@CHECKS
def test_lzw_tiff_with_garbage_strips_is_corrupt(
    small_photo: np.ndarray, check: Callable[[bytes], object]
) -> None:
    payload = bytearray(encode(Image.fromarray(small_photo), "TIFF", compression="tiff_lzw"))
    payload[200:2000] = b"\xff" * 1800  # inside the compressed strips; the directory is intact
    _assert_corrupt(bytes(payload), "TIFF", check)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, followed by one tiny IDAT: a decompression bomb's
    header without its pixels, so the test proves the limit is enforced before decoding."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def test_pixel_limit_checked_from_header() -> None:
    bomb = _png_header_only(20_000, 20_000)  # 400 MP claimed, a few dozen bytes on disk
    assert len(bomb) < 200
    for call in (decode_image, probe_image, verify_image):
        with pytest.raises(TooManyPixelsError) as caught:
            call(bomb)
        assert caught.value.code == "too_many_pixels" and caught.value.http_status == 413
        assert caught.value.details["pixels"] == 400_000_000


def test_pixel_limit_default_and_override(small_photo: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    big = _png_header_only(8000, 6000)  # 48 MP > the 40 MP default
    assert DEFAULT_MAX_PIXELS < 8000 * 6000
    with pytest.raises(TooManyPixelsError):
        probe_image(big)
    payload = encode(Image.fromarray(small_photo), "PNG")
    with pytest.raises(TooManyPixelsError):
        decode_image(payload, max_pixels=256 * 256 - 1)
    assert decode_image(payload, max_pixels=256 * 256).width == 256
    monkeypatch.setenv(MAX_PIXELS_ENV, str(100 * 100))
    with pytest.raises(TooManyPixelsError):
        probe_image(payload)


def test_real_larger_image_under_limit(small_photo: np.ndarray) -> None:
    large = Image.new("RGB", (2000, 1500), (10, 20, 30))
    decoded = decode_image(encode(large, "JPEG"))
    assert decoded.rgb.shape == (1500, 2000, 3)
    assert np.abs(decoded.rgb.astype(int) - [10, 20, 30]).max() <= 3


def test_mpo_from_phone_cameras_reads_as_jpeg(small_photo: np.ndarray) -> None:
    frames = [Image.fromarray(small_photo), Image.fromarray(small_photo[::-1].copy())]
    buffer = io.BytesIO()
    frames[0].save(buffer, "MPO", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    decoded = decode_image(buffer.getvalue())
    assert decoded.source_format == "JPEG"
    assert np.abs(decoded.rgb.astype(int) - small_photo.astype(int)).mean() < 8  # the first frame


# --------------------------------------------------------------------------- the gateway's check decode


def _png(width: int, height: int, rows: list[bytes], *, color: int = 0, interlace: int = 0) -> bytes:
    """A PNG from already filtered rows (each starting with its filter byte), 8-bit samples."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, interlace)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )


def _adam7_rows(gray: np.ndarray) -> list[bytes]:
    """The seven Adam7 passes of a grayscale image, each row unfiltered (filter byte 0)."""
    rows = []
    for x0, y0, dx, dy in (
        (0, 0, 8, 8),
        (4, 0, 8, 8),
        (0, 4, 4, 8),
        (2, 0, 4, 4),
        (0, 2, 2, 4),
        (1, 0, 2, 2),
        (0, 1, 1, 2),
    ):
        part = gray[y0::dy, x0::dx]
        if part.size:
            rows += [b"\0" + row.tobytes() for row in part]
    return rows


def test_check_decode_reads_interlaced_png_as_pillow_does() -> None:
    gray = np.random.default_rng(1).integers(0, 256, (13, 11), dtype=np.uint8)
    payload = _png(11, 13, _adam7_rows(gray), interlace=1)
    assert np.array_equal(decode_image(payload).rgb[..., 0], gray)  # Pillow agrees it is a valid file
    assert verify_image(payload) == ("PNG", 11, 13)
    # One row short of what the seven passes need: the image data ends early.
    with pytest.raises(TruncatedImageError):
        verify_image(_png(11, 13, _adam7_rows(gray)[:-1], interlace=1))


def test_png_with_an_unknown_row_filter_is_corrupt() -> None:
    """Checksums intact, but one row's filter byte is 7 (0..4 exist). libpng refuses such a file;
    Pillow decodes it to whatever the row holds, so only the gateway's check sees it."""
    rows = [b"\0" + bytes(range(16)) for _ in range(8)]
    rows[5] = b"\x07" + rows[5][1:]
    with pytest.raises(CorruptImageError):
        verify_image(_png(16, 8, rows))
    verify_image(_png(16, 8, [b"\0" + bytes(range(16)) for _ in range(8)]))


def test_png_whose_stream_holds_more_rows_than_its_header_is_corrupt() -> None:
    rows = [b"\0" + bytes(16) for _ in range(9)]
    with pytest.raises(CorruptImageError):
        verify_image(_png(16, 8, rows))


def _lying_jpeg(width: int, height: int) -> bytes:
    """A real 16×16 JPEG whose frame header claims `width`×`height` (its scan data stays 16×16's)."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (120, 80, 60)), "JPEG", quality=90))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 7] = height.to_bytes(2, "big")
    data[sof + 7 : sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


@CHECKS
def test_jpeg_whose_data_ends_far_before_its_frame_size_is_truncated(
    check: Callable[[bytes], object],
) -> None:
    """A 6000×6000 frame header over a 16×16 image's scan: libjpeg would pad it with gray silently."""
    payload = _lying_jpeg(6000, 6000)
    assert len(payload) < 1000
    with pytest.raises(TruncatedImageError) as caught:
        check(payload)
    assert caught.value.details["width"] == 6000


@pytest.mark.parametrize(
    "options",
    [
        {"quality": 95},
        {"quality": 30, "optimize": True},
        {"progressive": True, "optimize": True},
        {"subsampling": 0},
    ],
    ids=["q95", "q30-optimized", "progressive", "444"],
)
@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
def test_flat_jpegs_pass_the_scan_length_bound(options: dict[str, object], mode: str) -> None:
    """A flat image is the fewest bits a real JPEG spends per block: still over the bound."""
    color = {"L": 128, "RGB": (128, 128, 128), "CMYK": (0, 0, 0, 0)}[mode]
    payload = encode(Image.new(mode, (2400, 1600), color), "JPEG", **options)  # type: ignore[arg-type]
    assert verify_image(payload) == ("JPEG", 2400, 1600)
    assert decode_image(payload).rgb.shape == (1600, 2400, 3)


# Pixel modes Pillow cannot write in a format are left out.
_UNWRITABLE = {
    ("JPEG", "RGBA"),
    ("JPEG", "LA"),
    ("JPEG", "P"),
    ("JPEG", "I;16"),
    ("BMP", "LA"),
    ("BMP", "I;16"),
}


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [
        (f, m)
        for f in FORMATS
        for m in ("RGB", "RGBA", "L", "LA", "P", "1", "I;16")
        if (f, m) not in _UNWRITABLE
    ],
)
def test_check_decode_accepts_what_decode_accepts(small_photo: np.ndarray, fmt: str, mode: str) -> None:
    payload = encode(Image.fromarray(small_photo[:, :200]).convert(mode), fmt)
    decoded = decode_image(payload)
    assert verify_image(payload) == (decoded.source_format, decoded.width, decoded.height)


def test_png_orientation_is_read_from_its_exif_chunk(small_photo: np.ndarray) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    payload = encode(Image.fromarray(small_photo[:, :100]), "PNG", exif=exif.tobytes())
    assert verify_image(payload) == ("PNG", 256, 100)  # upright: rotated a quarter turn
    assert probe_image(payload) == ("PNG", 256, 100)
    assert decode_image(payload).rgb.shape == (100, 256, 3)


def test_check_decode_of_a_40_megapixel_png_holds_no_pixels(tmp_path: Path) -> None:
    """An 8000×5000 RGBA PNG (160 MB of pixels): the check decode raises the process's peak RSS
    by a few MB, where a decode holds the whole image (measured in a fresh process)."""
    path = tmp_path / "big.png"
    Image.new("RGBA", (8000, 5000), (0, 0, 0, 0)).save(path, "PNG", compress_level=1)
    script = (
        "import resource, sys; from pathlib import Path\n"
        "from headforge.pipeline.decode import verify_image\n"
        "data = Path(sys.argv[1]).read_bytes()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "verify_image(data)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    growth_mb = int(done.stdout.strip())
    assert growth_mb < 32, growth_mb
