"""The benchmark's images, made in code from fixed seeds: photo-like JPEGs (quality 90) spread from 0.3
to 12 megapixels, some ~1-megapixel PNGs (RGB and RGBA) and a few 12-megapixel JPEGs. They are cached
under .cache/bench-images/<hash of the parameters>/, so a later run reads them instead of making them."""

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from deploy.local.services import REPO_ROOT
from testbed.images import encode, photo_like

CACHE_ROOT = REPO_ROOT / ".cache" / "bench-images"
GENERATOR_VERSION = 1  # bump when the way images are made changes, so that old caches are not reused
ASPECTS = [(4, 3), (3, 2), (1, 1), (3, 4), (16, 9)]
LARGE_SIZE = (4000, 3000)  # 12 megapixels
PNG_MEGAPIXELS = 1.0


@dataclass(frozen=True)
class ImageFile:
    name: str  # file name in the cache folder; the image server serves it as /img/<name>
    format: str  # "JPEG" or "PNG"
    mode: str  # "RGB" or "RGBA"
    width: int
    height: int
    seed: int

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6


@dataclass(frozen=True)
class ImageSpec:
    jpegs: int  # mixed JPEGs, sizes spread evenly on a log scale from min to max megapixels
    pngs: int  # ~1-megapixel PNGs, alternately RGB and RGBA
    large: int  # 12-megapixel JPEGs, for the memory scenario
    min_megapixels: float = 0.3
    max_megapixels: float = 12.0
    jpeg_quality: int = 90
    seed: int = 2026


@dataclass
class ImageSet:
    directory: Path
    mixed: list[ImageFile]  # JPEGs and PNGs in a fixed shuffled order; jobs cycle through it
    large: list[ImageFile]

    def read(self, image: ImageFile) -> bytes:
        return (self.directory / image.name).read_bytes()

    def small(self) -> list[ImageFile]:
        """The JPEGs of at most half a megapixel (the smallest one if there is none): the images of the
        fair-share scenarios, whose jobs are large."""
        jpegs = sorted((i for i in self.mixed if i.format == "JPEG"), key=lambda i: i.megapixels)
        return [i for i in jpegs if i.megapixels <= 0.5] or jpegs[:1]

    def typical(self) -> ImageFile:
        """The JPEG closest to one megapixel: the image of the one-image jobs."""
        return min((i for i in self.mixed if i.format == "JPEG"), key=lambda i: abs(i.megapixels - 1.0))


def _size(megapixels: float, aspect: tuple[int, int]) -> tuple[int, int]:
    a, b = aspect
    width = round((megapixels * 1e6 * a / b) ** 0.5)
    return width, round(width * b / a)


def plan(spec: ImageSpec) -> tuple[list[ImageFile], list[ImageFile]]:
    """(mixed, large): what to make, without making it."""
    mixed = []
    for n in range(spec.jpegs):
        fraction = n / (spec.jpegs - 1) if spec.jpegs > 1 else 1.0
        megapixels = spec.min_megapixels * (spec.max_megapixels / spec.min_megapixels) ** fraction
        width, height = _size(megapixels, ASPECTS[n % len(ASPECTS)])
        mixed.append(ImageFile(f"j{n:03d}-{width}x{height}.jpg", "JPEG", "RGB", width, height, spec.seed + n))
    for n in range(spec.pngs):
        mode = "RGBA" if n % 2 else "RGB"
        width, height = _size(PNG_MEGAPIXELS, ASPECTS[n % len(ASPECTS)])
        mixed.append(
            ImageFile(f"p{n:03d}-{mode.lower()}-{width}x{height}.png", "PNG", mode, width, height, spec.seed + 1000 + n)
        )
    random.Random(spec.seed).shuffle(mixed)
    large = [
        ImageFile(f"l{n:03d}-{LARGE_SIZE[0]}x{LARGE_SIZE[1]}.jpg", "JPEG", "RGB", *LARGE_SIZE, spec.seed + 2000 + n)
        for n in range(spec.large)
    ]
    return mixed, large


def ensure_images(spec: ImageSpec, cache_root: Path = CACHE_ROOT) -> ImageSet:
    mixed, large = plan(spec)
    key = json.dumps({"version": GENERATOR_VERSION, "spec": asdict(spec)}, sort_keys=True)
    directory = cache_root / hashlib.sha256(key.encode()).hexdigest()[:16]
    if not (directory / "complete").exists():
        print(f"making {len(mixed) + len(large)} benchmark images in {directory} (once)", flush=True)
        # Made in a folder of this process's own and renamed when whole, so a concurrent or
        # interrupted run never sees half a set.
        partial = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for image in mixed + large:
            options = {"quality": spec.jpeg_quality} if image.format == "JPEG" else {}
            pixels = photo_like(image.width, image.height, image.seed, image.mode)
            (partial / image.name).write_bytes(encode(pixels, image.format, **options))
        (partial / "complete").write_text(key)
        try:
            partial.rename(directory)
        except OSError:  # another run finished the same set first
            shutil.rmtree(partial, ignore_errors=True)
    return ImageSet(directory, mixed, large)
