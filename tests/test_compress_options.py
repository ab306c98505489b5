"""compress() with a job's options: quality, max_width / max_height (aspect kept, never enlarged), format."""

import io
from typing import cast

import pytest
from PIL import GifImagePlugin, Image, WebPImagePlugin

from services.processor.compress import CompressOptions, compress, fitted_size
from shared.events import JobOptions
from testbed.images import decode, encode, photo_like
from tests.support.settings import make_test_settings


@pytest.fixture
def defaults() -> CompressOptions:
    return CompressOptions.from_settings(make_test_settings())


def job(defaults: CompressOptions, **options) -> CompressOptions:
    return defaults.for_job(JobOptions(**options))


def quantization(data: bytes) -> dict:
    with Image.open(io.BytesIO(data)) as image:
        return image.quantization  # type: ignore[attr-defined]  # a JPEG's: JpegImageFile has it


def photo(size: tuple[int, int] = (800, 600), mode: str = "RGB") -> Image.Image:
    return photo_like(*size, seed=11, mode=mode)


def test_no_options_means_the_settings(defaults):
    assert defaults.for_job(None) == defaults
    assert job(defaults) == defaults  # every option at its default changes nothing


@pytest.mark.parametrize("quality", [30, 80])
def test_jpeg_is_saved_at_the_jobs_quality(defaults, quality):
    result = compress(encode(photo(), "JPEG", quality=95), job(defaults, quality=quality))
    reference = photo((64, 64))
    assert quantization(result.data) == quantization(encode(reference, "JPEG", quality=quality))
    assert quantization(result.data) != quantization(encode(reference, "JPEG", quality=quality - 1))
    assert quantization(result.data) != quantization(encode(reference, "JPEG", quality=quality + 1))


@pytest.mark.parametrize(
    ("bounds", "expected"),
    [
        ({"max_width": 100}, (100, 75)),
        ({"max_height": 60}, (80, 60)),
        ({"max_width": 400, "max_height": 150}, (200, 150)),
        ({"max_width": 2000, "max_height": 2000}, (800, 600)),  # never enlarged
        ({"max_width": 800}, (800, 600)),
    ],
)
def test_resize_keeps_the_aspect_ratio_and_never_enlarges(defaults, bounds, expected):
    result = compress(encode(photo(), "JPEG", quality=90), job(defaults, **bounds))
    assert decode(result.data).size == expected
    assert fitted_size((800, 600), bounds.get("max_width"), bounds.get("max_height")) == expected


def test_extreme_aspect_ratio_keeps_at_least_one_pixel():
    assert fitted_size((10_000, 2), 100, None) == (100, 1)


@pytest.mark.parametrize("source_format", ["PNG", "WEBP"])
def test_resize_keeps_the_format(defaults, source_format):
    source = encode(photo(mode="RGBA"), source_format)
    result = compress(source, job(defaults, max_width=200))
    assert result.format == source_format
    output = decode(result.data)
    assert output.format == source_format and output.size == (200, 150) and output.mode == "RGBA"


def test_a_resized_image_is_never_replaced_by_the_larger_unscaled_input(defaults):
    source = encode(photo(), "JPEG", quality=5)
    result = compress(source, job(defaults, max_width=790, quality=95))
    assert len(result.data) > len(source)  # the case this test is about
    assert decode(result.data).size == (790, 592)


def test_format_keep_still_never_grows(defaults):
    source = encode(photo(), "JPEG", quality=5)
    assert compress(source, job(defaults, quality=95, max_width=2000)).data == source


@pytest.mark.parametrize("source_format", ["JPEG", "PNG", "GIF"])
def test_converted_to_webp(defaults, source_format):
    image = photo((300, 200))
    source = encode(image.quantize(256) if source_format == "GIF" else image, source_format)
    result = compress(source, job(defaults, format="webp"))
    assert (result.format, result.extension, result.content_type) == ("WEBP", ".webp", "image/webp")
    output = decode(result.data)
    assert output.format == "WEBP" and output.size == (300, 200)


def test_webp_is_the_output_even_when_larger_than_the_input(defaults):
    source = encode(photo().quantize(4), "PNG")  # four colours: lossy WebP takes more bytes
    result = compress(source, job(defaults, format="webp", quality=95))
    assert len(result.data) > len(source)  # the case this test is about
    assert decode(result.data).format == "WEBP"


def test_webp_to_webp_never_grows(defaults):
    source = encode(photo(), "WEBP", quality=5)
    assert compress(source, job(defaults, format="webp", quality=95)).data == source


def test_png_with_alpha_to_jpeg_is_flattened_on_white(defaults):
    image = Image.new("RGBA", (200, 100), (0, 0, 255, 255))
    image.paste((255, 0, 0, 0), (0, 0, 100, 100))  # left half: red, fully transparent
    result = compress(encode(image, "PNG"), job(defaults, format="jpeg", quality=95))
    assert (result.format, result.extension, result.content_type) == ("JPEG", ".jpg", "image/jpeg")
    output = decode(result.data)
    assert output.mode == "RGB"
    white = cast(tuple[int, ...], output.getpixel((50, 50)))  # an RGB image: a pixel is a tuple
    assert all(channel > 245 for channel in white)  # white, not red or black
    blue = cast(tuple[int, ...], output.getpixel((150, 50)))
    assert blue[2] > 230 and blue[0] < 20


def test_palette_with_transparency_to_jpeg(defaults):
    image = photo((120, 80)).quantize(64)
    result = compress(encode(image, "PNG", transparency=0), job(defaults, format="jpeg"))
    assert decode(result.data).format == "JPEG"


def test_animated_gif_to_webp_stays_animated_and_is_resized(defaults):
    frames = [Image.new("RGB", (200, 150), (i * 50, 255 - i * 50, 100)) for i in range(4)]
    source = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    result = compress(source, job(defaults, format="webp", max_width=100))
    output = cast(WebPImagePlugin.WebPImageFile, Image.open(io.BytesIO(result.data)))  # checked: WEBP
    assert output.format == "WEBP" and output.n_frames == 4 and output.size == (100, 75)


def test_animated_gif_resized_stays_gif(defaults):
    frames = [Image.new("RGB", (200, 150), (i * 50, 255 - i * 50, 100)) for i in range(4)]
    source = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    output = cast(
        GifImagePlugin.GifImageFile, Image.open(io.BytesIO(compress(source, job(defaults, max_height=30)).data))
    )
    assert output.format == "GIF" and output.n_frames == 4 and output.size == (40, 30)


def test_animated_gif_to_jpeg_keeps_the_first_frame(defaults):
    frames = [Image.new("RGB", (200, 150), (i * 50, 255 - i * 50, 100)) for i in range(4)]
    source = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    output = decode(compress(source, job(defaults, format="jpeg")).data)
    assert output.format == "JPEG" and output.size == (200, 150)


def test_options_without_a_quality_take_the_settings_default():
    """A job.requested or image.requested producer may send options without one: IMGPIPE_DEFAULT_QUALITY applies."""
    processor = CompressOptions.from_settings(make_test_settings(default_quality=70))
    reference = photo()
    result = compress(encode(reference, "JPEG", quality=95), processor.for_job(JobOptions(format="keep")))
    assert quantization(result.data) == quantization(encode(reference, "JPEG", quality=70))
