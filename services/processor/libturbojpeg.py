"""Where libjpeg-turbo's TurboJPEG library is, found and loaded without numpy: the processor process
checks it at start but never encodes (its workers do), and numpy would cost it 13 MB of memory."""

import ctypes
import ctypes.util

from shared.runtime import StartupError


class LibraryMissing(StartupError):
    pass


def library_path(configured: str | None = None) -> str:
    """The library's file (`configured`, or where the system's loader finds it), once it has loaded;
    LibraryMissing names the package to install."""
    path = configured or ctypes.util.find_library("turbojpeg")
    try:
        if path is None:
            raise OSError("the loader does not know it")
        ctypes.CDLL(path)
    except OSError as exc:
        raise LibraryMissing(
            f"libjpeg-turbo's TurboJPEG library was not found (Debian: apt-get install -y libturbojpeg0): {exc}"
        ) from None
    return path
