"""Photo-like test images made in code, so tests need no files from outside the repository."""

import io
import random

from PIL import Image, ImageDraw, ImageFilter


def photo_like(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Gradients, shapes and fine noise: compresses roughly like a photograph, unlike a flat colour."""
    rng = random.Random(seed)
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randrange(10, max(11, min(width, height) // 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    image = image.filter(ImageFilter.GaussianBlur(2))
    noise = Image.effect_noise((width, height), 24).convert("RGB")
    image = Image.blend(image, noise, 0.25)
    if mode == "RGBA":
        image.putalpha(Image.linear_gradient("L").resize((width, height)))
    return image


def decode(data: bytes) -> Image.Image:
    """An image's bytes decoded whole (a truncated file fails here, not later)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def jpeg_bytes(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    return encode(photo_like(width, height, seed), "JPEG", quality=quality)


def png_bytes(width: int, height: int, seed: int, mode: str = "RGB") -> bytes:
    return encode(photo_like(width, height, seed, mode), "PNG")
