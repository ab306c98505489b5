"""Re-encode one image smaller in its own format and pixel size; never return more bytes than were given."""
import io
import struct
import warnings
import zlib
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from shared.failures import FailureCode
from services.processor.failures import ImageFailure
from shared.settings import Settings

# Pillow format name -> (file extension, content type). MPO is a JPEG with extra pictures appended
# (many cameras write it); its first picture is kept and saved as a plain JPEG.
SUPPORTED_FORMATS = {
    "JPEG": (".jpg", "image/jpeg"),
    "PNG": (".png", "image/png"),
    "WEBP": (".webp", "image/webp"),
    "GIF": (".gif", "image/gif"),
}
SAVED_AS = {"MPO": "JPEG"}
# What Pillow's decoders raise on truncated or corrupt data.
CORRUPT_DATA_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error, zlib.error)


@dataclass(frozen=True)
class CompressOptions:
    """What compress() needs of the settings: small, so it crosses to a worker process cheaply."""
    quality: int = 50  # JPEG and WEBP
    jpeg_optimize: bool = False
    png_optimize: bool = False
    max_image_pixels: int = 100_000_000

    @classmethod
    def from_settings(cls, settings: Settings) -> "CompressOptions":
        return cls(settings.jpeg_quality, settings.jpeg_optimize, settings.png_optimize, settings.max_image_pixels)


@dataclass(frozen=True)
class Compressed:
    data: bytes
    format: str  # Pillow format name, e.g. "JPEG"
    extension: str  # e.g. ".jpg"
    content_type: str  # e.g. "image/jpeg"


def compress(data: bytes | bytearray, options: CompressOptions) -> Compressed:
    try:
        with warnings.catch_warnings():
            # The limit is ours (_check_total_pixels, before any decoding), per call and not
            # process-wide; Pillow's own MAX_IMAGE_PIXELS stays a backstop (its error is caught below).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image_format = SAVED_AS.get(image.format, image.format)
                if image_format not in SUPPORTED_FORMATS:
                    raise ImageFailure(FailureCode.UNSUPPORTED_FORMAT, f"{image.format} images are not supported")
                _check_total_pixels(image, options.max_image_pixels)
                animated = image_format != "JPEG" and getattr(image, "n_frames", 1) > 1
                encoded = _encode(image, image_format, animated, options)
    except Image.DecompressionBombError as exc:
        raise ImageFailure(FailureCode.TOO_LARGE, str(exc)) from None
    except UnidentifiedImageError:
        raise ImageFailure(FailureCode.NOT_AN_IMAGE, "the content is not an image Pillow recognises") from None
    except MemoryError:
        raise ImageFailure(FailureCode.TOO_LARGE, "the image needs more memory than this processor has") from None
    except CORRUPT_DATA_ERRORS as exc:
        raise ImageFailure(FailureCode.DECODE_ERROR, f"the image is corrupt or truncated: {exc}") from None
    extension, content_type = SUPPORTED_FORMATS[image_format]
    if len(encoded) >= len(data):
        encoded = bytes(data)  # already as small as we can make it (an MPO stays as it was; it is still a valid JPEG)
    return Compressed(data=encoded, format=image_format, extension=extension, content_type=content_type)


def _check_total_pixels(image: Image.Image, max_pixels: int) -> None:
    """Every frame counts: an animation of many large frames is decoded, and for GIF held, whole."""
    frames = getattr(image, "n_frames", 1)
    width, height = image.size
    if frames * width * height > max_pixels:
        raise ImageFailure(FailureCode.TOO_LARGE, f"{frames} frames of {width}x{height} exceed {max_pixels} pixels in total")


def _encode(image: Image.Image, image_format: str, animated: bool, options: CompressOptions) -> bytes:
    params: dict = {}
    for kept in ("icc_profile", "exif", "dpi"):
        if image.info.get(kept):
            params[kept] = image.info[kept]
    if image_format == "JPEG":
        params.update(quality=options.quality, optimize=options.jpeg_optimize)
        if image.info.get("progressive"):
            params["progressive"] = True
    elif image_format == "WEBP":
        params["quality"] = options.quality
    elif image_format == "PNG":
        params["optimize"] = options.png_optimize  # lossless: quality does not apply
    if animated:
        params["save_all"] = True  # animated stays animated; frame timings come from each frame's info
        if "loop" in image.info:
            params["loop"] = image.info["loop"]
    # Loaded first: saving an image that is not loaded yet decodes it into a copy, twice the memory.
    image.load()
    output = io.BytesIO()
    image.save(output, image_format, **params)
    return output.getvalue()
