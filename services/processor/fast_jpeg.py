"""JPEG to JPEG at the same size without leaving YCbCr. Pillow decodes to RGB (upsampling the chroma,
converting the colour) and its encoder converts back and subsamples again; libjpeg-turbo's TurboJPEG
API decodes to the source's own Y, Cb and Cr planes and encodes from them, skipping both round trips
(docs/performance.md has the figures). What the Pillow path keeps is kept: EXIF, the ICC profile, the
JFIF density, comments, progressive scans, greyscale.

reencode() answers None for whatever it does not cover (CMYK and RGB JPEGs, lossless or differential
coding, data the decoder warns about or refuses), and compress() takes the Pillow path instead, which
also names the failure of an image that is really broken."""

import os
import warnings

import numpy as np

# Debian's libturbojpeg0 is the 2.1 series, whose API PyTurboJPEG 1.x binds (2.x needs libjpeg-turbo 3).
from turbojpeg import (
    TJCS_GRAY,
    TJFLAG_PROGRESSIVE,
    TJFLAG_STOPONWARNING,
    TJSAMP_420,
    TJSAMP_422,
    TJSAMP_440,
    TJSAMP_444,
    TJSAMP_GRAY,
    TJCS_YCbCr,
    TurboJPEG,
)

from services.processor.libturbojpeg import library_path

SOI = b"\xff\xd8"
APP0, APP1, APP2, COM, SOS = 0xE0, 0xE1, 0xE2, 0xFE, 0xDA
# Start-of-frame markers the fast path decodes: baseline, extended and progressive, Huffman or arithmetic
# coding (always encoded with Huffman tables). Pillow cannot decode an arithmetic-coded JPEG larger than
# its read buffer (libjpeg's arithmetic decoder cannot suspend; TurboJPEG holds the whole file).
DECODED_FRAMES = {0xC0: False, 0xC1: False, 0xC2: True, 0xC9: False, 0xCA: True}  # marker -> progressive
OTHER_FRAMES = {0xC3, 0xC5, 0xC6, 0xC7, 0xCB, 0xCD, 0xCE, 0xCF}  # lossless, differential
# The segments carried over to the output, as the Pillow path keeps them (the density, EXIF, ICC, comments).
KEPT = {APP0: b"JFIF\x00", APP1: b"Exif\x00\x00", APP2: b"ICC_PROFILE\x00", COM: b""}
SUBSAMPLINGS = {TJSAMP_444, TJSAMP_422, TJSAMP_420, TJSAMP_GRAY, TJSAMP_440}  # what the 2.1 API encodes from
PLANE_ROW_ALIGNMENT = 4  # PyTurboJPEG's YUV buffers pad every plane's rows to 4 bytes

_library: TurboJPEG | None = None


def load(path: str | None = None) -> TurboJPEG:
    """Load the TurboJPEG library (from `path`, or where the system's loader finds it) for this process;
    LibraryMissing names the package to install."""
    global _library
    _library = TurboJPEG(library_path(path))
    return _library


def library() -> TurboJPEG:
    return _library or load()


def reencode(
    data: bytes | bytearray,
    quality: int,
    max_pixels: int,
    optimize: bool = False,
    max_width: int | None = None,
    max_height: int | None = None,
) -> bytes | None:
    """The JPEG re-encoded at `quality`, or None when the fast path does not cover it (an image larger
    than the bounds, which must be scaled, included)."""
    source = _read_headers(data)
    if source is None:
        return None
    progressive, kept_segments = source
    turbo = library()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # PyTurboJPEG turns libjpeg's warnings (a truncated file) into these
            width, height, subsampling, colorspace = turbo.decode_header(data)
            if colorspace not in (TJCS_YCbCr, TJCS_GRAY) or subsampling not in SUBSAMPLINGS:
                return None
            if width * height > max_pixels or width > (max_width or width) or height > (max_height or height):
                return None
            yuv, subsampling = _decoded(turbo, data, subsampling)
            if optimize:  # TurboJPEG 2.1 has no flag for optimised Huffman tables, only this variable
                os.environ["TJ_OPTIMIZE"] = "1"
            encoded = turbo.encode_from_yuv(
                yuv,
                height,
                width,
                quality=quality,
                jpeg_subsample=subsampling,
                flags=TJFLAG_PROGRESSIVE if progressive else 0,
            )
    except (OSError, ValueError, UserWarning):
        return None
    finally:
        os.environ.pop("TJ_OPTIMIZE", None)
    return _with_segments(encoded, kept_segments)


def _decoded(turbo: TurboJPEG, data: bytes | bytearray, subsampling: int) -> tuple[np.ndarray, int]:
    """The source's planes as one buffer, and the subsampling to encode them with."""
    flags = TJFLAG_STOPONWARNING  # a truncated or damaged file is Pillow's to judge, not filled in grey
    if subsampling != TJSAMP_444:
        return turbo.decode_to_yuv(data, pad=PLANE_ROW_ALIGNMENT, flags=flags)[0], subsampling
    # Subsampled as Pillow's encoder does by default (4:2:0), so no output grows.
    luma, blue, red = turbo.decode_to_yuv_planes(data, flags=flags)
    return _yuv_buffer([luma, _halved(blue), _halved(red)]), TJSAMP_420


def _read_headers(data: bytes | bytearray) -> tuple[bool, list[bytes]] | None:
    """(progressive, the source's segments to keep) from the markers before the first scan; None when
    the frame is lossless or differential or the markers do not parse."""
    if data[:2] != SOI:
        return None
    kept, progressive, position = [], None, 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        end = position + 2 + length
        if length < 2 or end > len(data):
            return None
        if marker == SOS:
            return (progressive, kept) if progressive is not None else None
        if marker in DECODED_FRAMES:
            progressive = DECODED_FRAMES[marker]
        elif marker in OTHER_FRAMES:
            return None
        elif marker in KEPT and data[position + 4 : position + 4 + len(KEPT[marker])] == KEPT[marker]:
            kept.append(bytes(data[position:end]))
        position = end
    return None


def _with_segments(encoded: bytes, kept_segments: list[bytes]) -> bytes:
    """The encoder's output with the source's segments after its start; the source's JFIF header (its
    density) replaces the encoder's default one."""
    own_jfif_end = 2
    if encoded[2:4] == b"\xff\xe0":
        own_jfif_end = 4 + int.from_bytes(encoded[4:6], "big")
    if not any(segment[1] == APP0 for segment in kept_segments):
        return encoded[:own_jfif_end] + b"".join(kept_segments) + encoded[own_jfif_end:]
    return SOI + b"".join(kept_segments) + encoded[own_jfif_end:]


def _halved(plane: np.ndarray) -> np.ndarray:
    """A chroma plane at half its width and height, each sample the mean of a 2x2 block, as libjpeg's
    h2v2 downsampling does; an odd last row or column is repeated."""
    height, width = plane.shape
    padded = np.pad(plane, ((0, height % 2), (0, width % 2)), mode="edge").astype(np.uint16)
    sums = padded[0::2, 0::2] + padded[1::2, 0::2] + padded[0::2, 1::2] + padded[1::2, 1::2]
    return ((sums + 1) >> 2).astype(np.uint8)


def _yuv_buffer(planes: list[np.ndarray]) -> np.ndarray:
    """4:2:0 planes laid end to end as TurboJPEG reads them: the luma plane padded to an even width and
    height (its last row and column repeated), every row padded to a multiple of 4 bytes."""
    luma = planes[0]
    luma = np.pad(luma, ((0, luma.shape[0] % 2), (0, luma.shape[1] % 2)), mode="edge")
    rows = []
    for plane in [luma, *planes[1:]]:
        extra = -plane.shape[1] % PLANE_ROW_ALIGNMENT
        rows.append((np.pad(plane, ((0, 0), (0, extra))) if extra else plane).ravel())
    return np.concatenate(rows)
