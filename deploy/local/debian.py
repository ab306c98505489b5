"""Debian packages the project needs from the system: installed with apt-get when missing and running as
root (as on a fresh CI machine), otherwise a clear error naming the package.

CLI: python -m deploy.local.debian   (what `make install` needs: libturbojpeg0, libjpeg-turbo-progs)
"""
import ctypes.util
import os
import shutil
import subprocess
import sys

# A package -> how to tell it is there without dpkg: a library the loader finds, or a command on the PATH.
LIBRARIES = {"libturbojpeg0": "turbojpeg"}  # the processor's fast JPEG path (services/processor/fast_jpeg.py)
COMMANDS = {"libjpeg-turbo-progs": "jpegtran"}  # the tests make arithmetic-coded JPEGs with it


def apt_install(package: str) -> None:
    if os.geteuid() != 0:
        raise RuntimeError(f"the Debian package {package} is missing: install it, e.g. `sudo apt-get install -y {package}`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", package], check=True, env=env)


def ensure_installed() -> None:
    present = {**{package: lambda name=name: ctypes.util.find_library(name) for package, name in LIBRARIES.items()},
               **{package: lambda name=name: shutil.which(name) for package, name in COMMANDS.items()}}
    for package, found in present.items():
        if found() is None:
            apt_install(package)
            if found() is None:
                raise RuntimeError(f"installed {package} but still cannot find what it provides")


if __name__ == "__main__":
    try:
        ensure_installed()
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        sys.exit(str(exc))
