"""The fast JPEG path (services/processor/fast_jpeg.py) through compress(): what it keeps, what it
falls back on, and shrink on load for scaled JPEGs."""

import io
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from typing import cast

import numpy as np
import pytest
from PIL import Image, ImageCms, JpegImagePlugin

from services.processor.compress import FAST_JPEG, PILLOW, CompressOptions, compress
from testbed.images import decode, encode, photo_like
from tests.support.settings import make_test_settings

ORIENTATION = 0x0112
SAMPLING_420, SAMPLING_422 = 2, 1  # Pillow's names for the chroma subsampling it reads


@pytest.fixture
def options() -> CompressOptions:
    return CompressOptions.from_settings(make_test_settings())


def photo(size: tuple[int, int] = (801, 601), mode: str = "RGB") -> Image.Image:
    return photo_like(*size, seed=11, mode=mode)  # odd sizes: the planes' padding is part of what is tested


def pillow_at_quality_50(source: bytes) -> bytes:
    """What Pillow's re-encode gives, keeping what the Pillow path keeps (the path before the fast one)."""
    with Image.open(io.BytesIO(source)) as image:
        kept = {key: image.info[key] for key in ("icc_profile", "exif", "dpi") if image.info.get(key)}
        return encode(image, "JPEG", quality=50, **kept)


def error(data: bytes, source: bytes) -> float:
    """Mean absolute difference of the decoded pixels from the source's."""
    a = np.asarray(decode(data).convert("RGB"), dtype=np.int16)
    b = np.asarray(decode(source).convert("RGB"), dtype=np.int16)
    return float(np.abs(a - b).mean())


def test_the_fast_path_keeps_quality_50s_tables_the_size_exif_icc_density_and_comment(options):
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    source = encode(
        photo(), "JPEG", quality=90, exif=exif.tobytes(), icc_profile=icc, dpi=(300, 300), comment=b"shot in the studio"
    )
    result = compress(source, options)
    assert result.codec == FAST_JPEG and result.format == "JPEG"
    output = cast(JpegImagePlugin.JpegImageFile, decode(result.data))  # result.format is JPEG
    reference = cast(JpegImagePlugin.JpegImageFile, decode(pillow_at_quality_50(source)))
    assert output.quantization == reference.quantization
    assert output.size == (801, 601) and output.mode == "RGB"
    assert output.getexif()[ORIENTATION] == 6 and output.info["icc_profile"] == icc
    assert output.info["dpi"] == (300, 300) and output.info["comment"] == b"shot in the studio"
    assert JpegImagePlugin.get_sampling(output) == SAMPLING_420
    assert len(result.data) <= 1.01 * len(pillow_at_quality_50(source))
    assert error(result.data, source) <= error(pillow_at_quality_50(source), source) + 0.05


@pytest.mark.parametrize("progressive", [True, False])
def test_progressive_stays_progressive_and_baseline_baseline(options, progressive):
    result = compress(encode(photo(), "JPEG", quality=90, progressive=progressive), options)
    assert result.codec == FAST_JPEG
    assert bool(decode(result.data).info.get("progressive")) is progressive


def test_greyscale_stays_greyscale(options):
    source = encode(photo().convert("L"), "JPEG", quality=90)
    result = compress(source, options)
    assert result.codec == FAST_JPEG and decode(result.data).mode == "L"
    assert error(result.data, source) <= error(pillow_at_quality_50(source), source) + 0.05


def test_the_sources_chroma_subsampling_is_kept(options):
    source = encode(photo(), "JPEG", quality=90, subsampling="4:2:2")
    result = compress(source, options)
    assert result.codec == FAST_JPEG and JpegImagePlugin.get_sampling(decode(result.data)) == SAMPLING_422
    assert error(result.data, source) <= error(pillow_at_quality_50(source), source) + 0.05


def test_a_444_source_is_subsampled_and_not_larger_than_pillows_output(options):
    source = encode(photo(), "JPEG", quality=90, subsampling="4:4:4")
    result = compress(source, options)
    assert result.codec == FAST_JPEG and JpegImagePlugin.get_sampling(decode(result.data)) == SAMPLING_420
    assert len(result.data) <= len(pillow_at_quality_50(source))
    assert error(result.data, source) <= error(pillow_at_quality_50(source), source) + 0.05


def test_optimised_huffman_tables_when_the_setting_asks_for_them(options):
    source = encode(photo(), "JPEG", quality=90)
    plain = compress(source, options)
    optimised = compress(source, replace(options, jpeg_optimize=True))
    assert optimised.codec == FAST_JPEG and len(optimised.data) < len(plain.data)
    assert compress(source, options).data == plain.data  # the setting does not outlive its image
    assert "TJ_OPTIMIZE" not in os.environ


def test_a_cmyk_jpeg_goes_through_pillow(options):
    source = encode(photo().convert("CMYK"), "JPEG", quality=90)
    result = compress(source, options)
    assert result.codec == PILLOW and decode(result.data).mode == "CMYK"
    assert len(result.data) < len(source)


@pytest.mark.parametrize("progressive", [True, False])
def test_an_arithmetic_coded_jpeg_which_pillow_cannot_decode_takes_the_fast_path(options, tmp_path, progressive):
    source = encode(photo(), "JPEG", quality=90)
    (tmp_path / "huffman.jpg").write_bytes(source)
    # jpegtran (Debian's libjpeg-turbo-progs, which `make install` brings) recodes it losslessly.
    command = ["jpegtran", "-arithmetic", *(["-progressive"] if progressive else []), str(tmp_path / "huffman.jpg")]
    arithmetic = subprocess.run(command, capture_output=True, check=True).stdout
    assert (b"\xff\xca" if progressive else b"\xff\xc9") in arithmetic  # SOF10 or SOF9: arithmetic coding
    with pytest.raises(OSError):
        decode(arithmetic)
    result = compress(arithmetic, options)
    assert result.codec == FAST_JPEG and bool(decode(result.data).info.get("progressive")) is progressive
    assert decode(result.data).size == (801, 601)
    assert error(result.data, source) <= error(pillow_at_quality_50(source), source) + 0.05


def test_data_the_fast_decoder_warns_about_goes_through_pillow(options):
    source = encode(photo(), "JPEG", quality=90)
    damaged = source[:-2] + b"\x00" * 16 + source[-2:]  # extraneous bytes before the end marker
    result = compress(damaged, options)
    assert result.codec == PILLOW and decode(result.data).size == (801, 601)


@pytest.fixture(scope="module")
def large_jpeg() -> bytes:
    return encode(photo_like(2000, 1500, seed=3), "JPEG", quality=90)


@pytest.mark.parametrize(
    "bounds, expected",
    [((800, None), (800, 600)), ((None, 333), (444, 333)), ((97, 97), (97, 73)), ((999, None), (999, 749))],
)
def test_shrink_on_load_gives_exactly_the_requested_size(options, large_jpeg, bounds, expected):
    source = large_jpeg
    result = compress(source, replace(options, max_width=bounds[0], max_height=bounds[1]))
    assert result.codec == PILLOW and decode(result.data).size == expected
    # Close to resampling the whole decoded image, as the path before shrink on load did.
    with Image.open(io.BytesIO(source)) as image:
        full = encode(image.resize(expected, Image.Resampling.LANCZOS), "JPEG", quality=50)
    assert error(result.data, full) < 3.0


def test_an_image_within_the_bounds_takes_the_fast_path(options):
    result = compress(encode(photo(), "JPEG", quality=90), replace(options, max_width=801, max_height=2000))
    assert result.codec == FAST_JPEG and decode(result.data).size == (801, 601)


def test_the_processor_will_not_start_without_the_library():
    with tempfile.TemporaryDirectory() as empty:
        env = {
            **os.environ,
            "IMGPIPE_TURBOJPEG_LIBRARY": f"{empty}/libturbojpeg.so.0",
            "IMGPIPE_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",
        }
        started = subprocess.run(
            [sys.executable, "-m", "services.processor"], env=env, capture_output=True, text=True, timeout=60
        )
    assert started.returncode == 1
    lines = started.stderr.strip().splitlines()
    assert len(lines) == 1 and "libjpeg-turbo's TurboJPEG library was not found" in lines[0], started.stderr
    assert "apt-get install -y libturbojpeg0" in lines[0]
