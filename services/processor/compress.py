"""Re-encode one image: by default smaller in its own format and pixel size, never more bytes than were
given. A job's options may ask for another quality, a maximum width and height (scaled down keeping the
aspect ratio, never enlarged) and another format (WebP, JPEG). Only an output the input itself could
stand for (same format, no scaling needed) falls back to the input when re-encoding does not make it
smaller: a caller asking for WebP or 100 px gets WebP or 100 px, even if that takes more bytes.

A JPEG kept a JPEG at its own size takes the fast path (services/processor/fast_jpeg.py); everything
else, and whatever that path does not cover, goes through Pillow. A JPEG to be scaled down is decoded
at the smallest of libjpeg's DCT scales (1/2, 1/4, 1/8) that still leaves it at least as large as the
target, then resampled to the exact size."""

import io
import struct
import warnings
import zlib
from dataclasses import dataclass, replace

from PIL import Image, ImageSequence, UnidentifiedImageError

from services.processor.failures import ImageFailure
from shared.events import JobOptions
from shared.failures import FailureCode
from shared.settings import Settings

# Pillow format name -> (file extension, content type). MPO is a JPEG with extra pictures appended
# (many cameras write it); its first picture is kept and saved as a plain JPEG.
SUPPORTED_FORMATS = {
    "JPEG": (".jpg", "image/jpeg"),
    "PNG": (".png", "image/png"),
    "WEBP": (".webp", "image/webp"),
    "GIF": (".gif", "image/gif"),
}
SAVED_AS: dict[str | None, str] = {"MPO": "JPEG"}  # keyed by Image.format, which may be None
# What Pillow's decoders raise on truncated or corrupt data.
CORRUPT_DATA_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    zlib.error,
)


@dataclass(frozen=True)
class CompressOptions:
    """What compress() needs of the settings: small, so it crosses to a worker process cheaply."""

    quality: int  # JPEG and WEBP
    jpeg_optimize: bool = False
    png_optimize: bool = False
    max_image_pixels: int = 100_000_000
    max_width: int | None = None
    max_height: int | None = None
    output_format: str | None = None  # a Pillow format name ("JPEG", "WEBP"); None keeps the input's

    @classmethod
    def from_settings(cls, settings: Settings) -> "CompressOptions":
        return cls(settings.default_quality, settings.jpeg_optimize, settings.png_optimize, settings.max_image_pixels)

    def for_job(self, job: JobOptions | None) -> "CompressOptions":
        """These settings with a job's options applied; no options (an older producer), or no quality: the settings'."""
        if job is None:
            return self
        return replace(
            self,
            quality=self.quality if job.quality is None else job.quality,
            max_width=job.max_width,
            max_height=job.max_height,
            output_format=None if job.format == "keep" else job.format.upper(),
        )


@dataclass(frozen=True)
class Compressed:
    data: bytes
    format: str  # Pillow format name, e.g. "JPEG"
    extension: str  # e.g. ".jpg"
    content_type: str  # e.g. "image/jpeg"
    codec: str  # which path encoded it: FAST_JPEG or PILLOW


FAST_JPEG, PILLOW = "turbojpeg", "pillow"


def compress(data: bytes | bytearray, options: CompressOptions) -> Compressed:
    if options.output_format in (None, "JPEG"):  # reencode() itself tells a JPEG from anything else
        from services.processor import fast_jpeg  # here, not above: the processor process itself needs no numpy

        encoded = fast_jpeg.reencode(
            data,
            options.quality,
            options.max_image_pixels,
            options.jpeg_optimize,
            options.max_width,
            options.max_height,
        )
        if encoded is not None:
            return _compressed(data, encoded, "JPEG", True, FAST_JPEG)
    try:
        with warnings.catch_warnings():
            # The limit is ours (_check_total_pixels, before any decoding), per call and not
            # process-wide; Pillow's own MAX_IMAGE_PIXELS stays a backstop (its error is caught below).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                input_format = SAVED_AS.get(image.format, image.format)
                if input_format not in SUPPORTED_FORMATS:
                    raise ImageFailure(FailureCode.UNSUPPORTED_FORMAT, f"{image.format} images are not supported")
                _check_total_pixels(image, options.max_image_pixels)
                image_format = options.output_format or input_format
                # A JPEG holds one picture: an animation converted to JPEG keeps its first frame.
                animated = "JPEG" not in (input_format, image_format) and getattr(image, "n_frames", 1) > 1
                size = fitted_size(image.size, options.max_width, options.max_height)
                input_would_do = image_format == input_format and size == image.size
                if size != image.size and not animated:
                    image.draft(image.mode, size)  # JPEG only: decoded at a DCT scale still >= size
                encoded = _encode(image, image_format, animated, size, options)
    except Image.DecompressionBombError as exc:
        raise ImageFailure(FailureCode.TOO_LARGE, str(exc)) from None
    except UnidentifiedImageError:
        raise ImageFailure(FailureCode.NOT_AN_IMAGE, "the content is not an image Pillow recognises") from None
    except MemoryError:
        raise ImageFailure(FailureCode.TOO_LARGE, "the image needs more memory than this processor has") from None
    except CORRUPT_DATA_ERRORS as exc:
        raise ImageFailure(FailureCode.DECODE_ERROR, f"the image is corrupt or truncated: {exc}") from None
    return _compressed(data, encoded, image_format, input_would_do, PILLOW)


def _compressed(
    data: bytes | bytearray, encoded: bytes, image_format: str, input_would_do: bool, codec: str
) -> Compressed:
    extension, content_type = SUPPORTED_FORMATS[image_format]
    if input_would_do and len(encoded) >= len(data):
        encoded = bytes(data)  # already as small as we can make it (an MPO stays as it was; it is still a valid JPEG)
    return Compressed(data=encoded, format=image_format, extension=extension, content_type=content_type, codec=codec)


def _check_total_pixels(image: Image.Image, max_pixels: int) -> None:
    """Every frame counts: an animation of many large frames is decoded, and for GIF held, whole."""
    frames = getattr(image, "n_frames", 1)
    width, height = image.size
    if frames * width * height > max_pixels:
        raise ImageFailure(
            FailureCode.TOO_LARGE, f"{frames} frames of {width}x{height} exceed {max_pixels} pixels in total"
        )


def fitted_size(size: tuple[int, int], max_width: int | None, max_height: int | None) -> tuple[int, int]:
    """The largest size within the bounds with the same aspect ratio, never larger than `size`."""
    width, height = size
    scale = min(1.0, (max_width or width) / width, (max_height or height) / height)
    if scale == 1.0:
        return size
    return max(1, round(width * scale)), max(1, round(height * scale))


def _encode(
    image: Image.Image, image_format: str, animated: bool, size: tuple[int, int], options: CompressOptions
) -> bytes:
    params: dict = {}
    for kept in ("icc_profile", "exif", "dpi"):
        if image.info.get(kept):
            params[kept] = image.info[kept]
    if image.mode == "CMYK" and image_format != "JPEG":
        params.pop("icc_profile", None)  # converted to RGB on saving: a CMYK profile would misdescribe it
    if image_format == "JPEG":
        params.update(quality=options.quality, optimize=options.jpeg_optimize)
        if image.info.get("progressive"):
            params["progressive"] = True
    elif image_format == "WEBP":
        params["quality"] = options.quality
    elif image_format == "PNG":
        params["optimize"] = options.png_optimize  # lossless: quality does not apply
    # Loaded first: saving an image that is not loaded yet decodes it into a copy, twice the memory.
    image.load()
    output = io.BytesIO()
    if animated:
        params["save_all"] = True  # animated stays animated; frame timings come from each frame's info
        if "loop" in image.info:
            params["loop"] = image.info["loop"]
        if size != image.size:
            frames = [frame.resize(size) for frame in ImageSequence.Iterator(image)]
            params["duration"] = [frame.info.get("duration", 0) for frame in ImageSequence.Iterator(image)]
            frames[0].save(output, image_format, append_images=frames[1:], **params)
            return output.getvalue()
    else:
        converted = image
        if size != image.size:
            if converted.mode in ("P", "1"):  # palette images would be scaled by nearest neighbour only
                converted = converted.convert("RGBA" if converted.has_transparency_data else "RGB")
            converted = converted.resize(size, Image.Resampling.LANCZOS)
        if image_format == "JPEG":
            converted = _for_jpeg(converted, params)
        if converted is not image:
            converted.save(output, image_format, **params)
            return output.getvalue()
    image.save(output, image_format, **params)
    return output.getvalue()


def _for_jpeg(image: Image.Image, params: dict) -> Image.Image:
    """JPEG has no transparency: transparent pixels are flattened on white."""
    if image.mode in ("RGB", "L", "CMYK"):
        return image
    params.pop("icc_profile", None)  # the colour space changes with the mode
    rgba = image.convert("RGBA")
    flattened = Image.new("RGB", image.size, "white")
    flattened.paste(rgba, mask=rgba.getchannel("A"))
    return flattened
