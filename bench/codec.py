"""The codec alone, on one core and without the services: the fast JPEG path (services/processor/
fast_jpeg.py) against Pillow's decode and save at the same quality, on the bench's JPEGs; the quality
(SSIMULACRA2, from the `ssimulacra2` package, a Python port of the reference implementation) and bytes
of both; and 12-megapixel JPEGs scaled to 800 px wide with shrink on load against resampling the
whole decoded image, as compress() did before."""

import io
import statistics
import time
from dataclasses import replace

from PIL import Image
from ssimulacra2 import compute_ssimulacra2

from bench.baseline import pillow_reencode
from bench.checks import check, log
from services.processor import fast_jpeg
from services.processor.compress import CompressOptions, compress, fitted_size
from shared.settings import Settings

ROUNDS = 3  # each path, alternating; the median counts
QUALITY = 50
QUALITY_IMAGES = 12  # JPEGs of at most a megapixel, spread over the set (the scorer takes ~1 s a megapixel)
QUALITY_MAX_MEGAPIXELS = 1.0
RESIZE_WIDTH = 800


def _timed(function, items: list[bytes]) -> float:
    started = time.perf_counter()
    for data in items:
        function(data)
    return time.perf_counter() - started


def _alternating(paths: dict, items: list[bytes]) -> dict[str, float]:
    """Median seconds of each path over `items`, the paths taking turns (the machine's noise hits both)."""
    for function in paths.values():  # warm: plugins and libraries load on first use
        function(items[0])
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(ROUNDS):
        for name, function in paths.items():
            seconds[name].append(_timed(function, items))
    return {name: statistics.median(values) for name, values in seconds.items()}


def _score(source: bytes, output: bytes) -> float:
    return compute_ssimulacra2(io.BytesIO(source), io.BytesIO(output))


def _resized_whole(data: bytes, width: int, image_format: str = "JPEG") -> bytes:
    """Scaled as compress() did before shrink on load: the whole image decoded, then resampled."""
    with Image.open(io.BytesIO(data)) as image:
        size = fitted_size(image.size, width, None)
        output = io.BytesIO()
        image.resize(size, Image.Resampling.LANCZOS).save(
            output, image_format, **({"quality": QUALITY} if image_format == "JPEG" else {})
        )
        return output.getvalue()


def _fast(data: bytes) -> bytes:
    output = fast_jpeg.reencode(data, QUALITY, 10**9)
    if output is None:  # the set's JPEGs are Pillow's, RGB, 4:2:0: every one is the fast path's
        raise RuntimeError("the fast JPEG path refused one of the bench's JPEGs")
    return output


def codec(bench) -> dict:

    jpegs = [image for image in bench.images.mixed if image.format == "JPEG"]
    data = [bench.images.read(image) for image in jpegs]
    fast_jpeg.load()
    seconds = _alternating({"fast": _fast, "pillow": lambda d: pillow_reencode(d, QUALITY)}, data)
    speed = seconds["pillow"] / seconds["fast"]
    log(
        f"{len(data)} JPEGs, one core: fast path {seconds['fast']:.2f} s, Pillow {seconds['pillow']:.2f} s ({speed:.2f}x)"
    )

    fast_bytes = sum(len(_fast(d)) for d in data)
    pillow_bytes = sum(len(pillow_reencode(d, QUALITY)) for d in data)
    small = [(image, d) for image, d in zip(jpegs, data, strict=True) if image.megapixels <= QUALITY_MAX_MEGAPIXELS]
    step = max(1, len(small) // QUALITY_IMAGES)
    scores = []
    for image, d in small[::step][:QUALITY_IMAGES]:
        scores.append(
            {"image": image.name, "fast": _score(d, _fast(d)), "pillow": _score(d, pillow_reencode(d, QUALITY))}
        )
    worst = min(score["fast"] - score["pillow"] for score in scores)
    log(f"SSIMULACRA2 on {len(scores)} images: fast - Pillow >= {worst:+.2f}; bytes {fast_bytes / pillow_bytes:.3f}x")

    large = [bench.images.read(image) for image in bench.images.large]
    options = replace(CompressOptions.from_settings(Settings()), max_width=RESIZE_WIDTH)
    resize_seconds = _alternating(
        {"shrink on load": lambda d: compress(d, options), "whole image": lambda d: _resized_whole(d, RESIZE_WIDTH)},
        large,
    )
    resize_speed = resize_seconds["whole image"] / resize_seconds["shrink on load"]
    # The scaled pixels (both saved losslessly, through compress()'s own path), which is what shrink on load
    # changes; two outputs at quality 50 differ by their own JPEG artefacts too, so that score is reported
    # beside it, with each output's score against the whole image's lossless pixels.
    pixels_score = min(
        _score(_resized_whole(d, RESIZE_WIDTH, "PNG"), compress(d, replace(options, output_format="PNG")).data)
        for d in large
    )
    outputs_score = min(_score(_resized_whole(d, RESIZE_WIDTH), compress(d, options).data) for d in large)
    against_whole = min(
        _score(_resized_whole(d, RESIZE_WIDTH, "PNG"), compress(d, options).data)
        - _score(_resized_whole(d, RESIZE_WIDTH, "PNG"), _resized_whole(d, RESIZE_WIDTH))
        for d in large
    )
    log(
        f"{len(large)} 12-megapixel JPEGs to {RESIZE_WIDTH} px: {resize_speed:.2f}x, SSIMULACRA2 of the pixels >= "
        f"{pixels_score:.1f}, of the outputs >= {outputs_score:.1f}, against the lossless whole: {against_whole:+.2f}"
    )

    checks = [
        check(
            "codec: fast path, one core",
            f"{speed:.2f}x Pillow ({len(data)} JPEGs in {seconds['fast']:.2f} s vs {seconds['pillow']:.2f} s)",
            ">= 1.4x Pillow decode + save",
            speed >= 1.4,
            speed,
        ),
        check(
            "codec: quality",
            f"SSIMULACRA2 fast - Pillow >= {worst:+.2f} on {len(scores)} images",
            ">= -0.5 on every image",
            worst >= -0.5,
            worst,
        ),
        check(
            "codec: bytes",
            f"{fast_bytes / pillow_bytes:.3f}x Pillow's ({len(data)} JPEGs)",
            "<= 1.01x",
            fast_bytes <= 1.01 * pillow_bytes,
            fast_bytes / pillow_bytes,
        ),
        check(
            f"resize to {RESIZE_WIDTH} px",
            f"{resize_speed:.2f}x ({len(large)} 12-megapixel JPEGs in "
            f"{resize_seconds['shrink on load']:.2f} s vs {resize_seconds['whole image']:.2f} s)",
            ">= 2.5x the whole image resampled",
            resize_speed >= 2.5,
            resize_speed,
        ),
        check(
            f"resize to {RESIZE_WIDTH} px: quality",
            f"SSIMULACRA2 of the scaled pixels >= {pixels_score:.1f} against "
            f"the whole image resampled (outputs at quality 50 against each other >= {outputs_score:.1f}; each "
            f"against the whole image's lossless pixels: {against_whole:+.2f} of the old output's score)",
            ">= 85",
            pixels_score >= 85,
            pixels_score,
        ),
    ]
    rows = [(f"{name}, one core, in memory", len(data), seconds[name]) for name in seconds]
    rows += [
        (f"12-megapixel JPEGs to {RESIZE_WIDTH} px, {name}", len(large), resize_seconds[name])
        for name in resize_seconds
    ]
    jobs = [
        {
            "job": job,
            "images": images,
            "seconds": took,
            "images_per_second": images / took,
            "finished": True,
            "failed_images": 0,
        }
        for job, images, took in rows
    ]
    return {
        "checks": checks,
        "jobs": jobs,
        "seconds": seconds,
        "resize_seconds": resize_seconds,
        "scores": scores,
        "bytes": {"fast": fast_bytes, "pillow": pillow_bytes},
    }
