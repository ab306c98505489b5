"""compress(): format kept, pixels kept, smaller or unchanged, metadata kept, bad input named."""

import io
from dataclasses import replace
from typing import cast

import pytest
from PIL import GifImagePlugin, Image, ImageCms

from services.processor.compress import CompressOptions, compress
from services.processor.failures import ImageFailure
from testbed.images import decode, encode, photo_like
from tests.support.settings import make_test_settings

ORIENTATION = 0x0112


@pytest.fixture
def options() -> CompressOptions:
    """What the processor passes with the default settings."""
    return CompressOptions.from_settings(make_test_settings())


def photo(size: tuple[int, int] = (800, 600), mode: str = "RGB") -> Image.Image:
    return photo_like(*size, seed=7, mode=mode)


def failure_code(data: bytes, options: CompressOptions) -> str:
    with pytest.raises(ImageFailure) as caught:
        compress(data, options)
    return caught.value.code


def test_jpeg_photo_is_recompressed_smaller_at_the_same_size(options):
    source = encode(photo(), "JPEG", quality=90)
    result = compress(source, options)
    assert (result.format, result.extension, result.content_type) == ("JPEG", ".jpg", "image/jpeg")
    assert len(result.data) < 0.7 * len(source)
    output = decode(result.data)
    assert output.format == "JPEG" and output.size == (800, 600) and output.mode == "RGB"


def quantization(data: bytes) -> dict:
    with Image.open(io.BytesIO(data)) as image:
        return image.quantization  # type: ignore[attr-defined]  # a JPEG's: JpegImageFile has it


def test_jpeg_is_saved_at_quality_50(options):
    """The quantization tables in the output are the ones libjpeg derives for quality 50, not 49 or 51."""
    result = compress(encode(photo(), "JPEG", quality=90), options)
    reference = photo((64, 64))
    assert quantization(result.data) == quantization(encode(reference, "JPEG", quality=50))
    assert quantization(result.data) != quantization(encode(reference, "JPEG", quality=49))
    assert quantization(result.data) != quantization(encode(reference, "JPEG", quality=51))


def test_jpeg_keeps_exif_orientation_icc_profile_and_progressive(options):
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # rotate 90° clockwise when displayed
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    source = encode(photo(), "JPEG", quality=90, exif=exif.tobytes(), icc_profile=icc, progressive=True)
    result = compress(source, options)
    assert len(result.data) < len(source)
    output = decode(result.data)
    assert output.getexif()[ORIENTATION] == 6
    assert output.info["icc_profile"] == icc
    assert output.info.get("progressive")


def test_baseline_jpeg_stays_baseline(options):
    result = compress(encode(photo(), "JPEG", quality=90), options)
    assert not decode(result.data).info.get("progressive")


def test_low_quality_jpeg_is_never_made_larger(options):
    source = encode(photo(), "JPEG", quality=20)
    result = compress(source, options)
    assert len(result.data) <= len(source)
    assert decode(result.data).size == (800, 600)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
def test_png_is_recompressed_losslessly(options, mode):
    image = photo((400, 300), mode="RGBA" if mode == "RGBA" else "RGB")
    if mode == "P":
        image = image.quantize(64)
    params = {"transparency": 0} if mode == "P" else {}
    source = encode(image, "PNG", compress_level=1, **params)  # a fast encoder's output
    result = compress(source, options)
    assert (result.format, result.extension, result.content_type) == ("PNG", ".png", "image/png")
    assert len(result.data) < len(source)
    output = decode(result.data)
    assert output.mode == mode and output.size == (400, 300)
    assert output.tobytes() == decode(source).tobytes()
    if mode == "P":
        assert output.info["transparency"] == 0


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_well_compressed_png_is_returned_unchanged(options, mode):
    source = encode(photo((400, 300), mode=mode), "PNG", compress_level=9)
    assert compress(source, options).data == source


def test_webp_is_recompressed_smaller(options):
    source = encode(photo(), "WEBP", quality=90)
    result = compress(source, options)
    assert (result.format, result.extension, result.content_type) == ("WEBP", ".webp", "image/webp")
    assert len(result.data) < 0.7 * len(source)
    assert decode(result.data).size == (800, 600)


def with_xmp_extension(gif: bytes, size: int) -> bytes:
    """Insert an XMP application extension (as Photoshop writes) after the global colour table."""
    flags = gif[10]
    table_end = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    payload = bytes(range(256)) * (size // 256)
    blocks = b"".join(
        bytes([len(chunk)]) + chunk for chunk in (payload[i : i + 255] for i in range(0, len(payload), 255))
    )
    extension = b"\x21\xff\x0bXMP DataXMP" + blocks + b"\x00"
    return gif[:table_end] + extension + gif[table_end:]


def test_animated_gif_stays_animated(options):
    frames = []
    for i in range(5):
        frame = Image.new("RGB", (200, 150), (i * 40, 255 - i * 40, 100))
        frame.paste((0, 0, 0), (10 + i * 20, 10, 60 + i * 20, 50))
        frames.append(frame)
    durations = [100, 200, 100, 200, 300]
    plain = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    source = with_xmp_extension(plain, 20_000)
    assert cast(GifImagePlugin.GifImageFile, decode(source)).n_frames == 5
    result = compress(source, options)
    assert (result.format, result.extension, result.content_type) == ("GIF", ".gif", "image/gif")
    assert len(result.data) < len(source)  # really re-encoded, not handed back
    output = cast(GifImagePlugin.GifImageFile, Image.open(io.BytesIO(result.data)))  # checked: GIF
    assert output.is_animated and output.n_frames == 5 and output.info["loop"] == 0
    timings = []
    for index in range(output.n_frames):
        output.seek(index)
        timings.append(output.info["duration"])
    assert timings == durations


def test_mpo_from_a_camera_is_saved_as_jpeg(options):
    first, second = photo(), photo().rotate(180)
    source = encode(first, "MPO", save_all=True, append_images=[second], quality=90)
    assert Image.open(io.BytesIO(source)).format == "MPO"
    result = compress(source, options)
    assert (result.format, result.extension) == ("JPEG", ".jpg")
    assert len(result.data) < 0.7 * len(source)
    assert decode(result.data).size == (800, 600)


def test_garbage_is_not_an_image(options):
    assert failure_code(b"<html><body>Not found</body></html>", options) == "not_an_image"


def test_truncated_jpeg_is_a_decode_error(options):
    source = encode(photo(), "JPEG", quality=90)
    assert failure_code(source[: len(source) // 2], options) in ("decode_error", "not_an_image")


def test_truncated_png_is_a_decode_error(options):
    source = encode(photo((400, 300)), "PNG")
    assert failure_code(source[: len(source) // 2], options) == "decode_error"


def test_other_formats_are_unsupported(options):
    assert failure_code(encode(photo((64, 48)), "BMP"), options) == "unsupported_format"
    assert failure_code(encode(photo((64, 48)), "TIFF"), options) == "unsupported_format"


@pytest.mark.parametrize("size", [(120, 100), (400, 300)])  # between 1x and 2x the limit, and far above it
def test_decompression_bomb_is_too_large(options, size):
    source = encode(Image.new("RGB", size), "PNG")
    assert failure_code(source, replace(options, max_image_pixels=10_000)) == "too_large"


def test_many_frames_count_against_the_pixel_limit(options):
    frames = [Image.new("RGB", (50, 50), (i, 0, 0)) for i in range(10)]  # 2,500 pixels each, 25,000 together
    source = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert failure_code(source, replace(options, max_image_pixels=10_000)) == "too_large"
    assert compress(source, replace(options, max_image_pixels=30_000)).format == "GIF"
