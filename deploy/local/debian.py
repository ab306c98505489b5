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


def apt_install(*packages: str) -> None:
    if os.geteuid() != 0:
        names = " ".join(packages)
        raise RuntimeError(f"missing Debian packages: {names}; install them, e.g. `sudo apt-get install -y {names}`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", *packages], check=True, env=env)


def ensure_installed() -> None:
    present = {
        **{package: lambda name=name: ctypes.util.find_library(name) for package, name in LIBRARIES.items()},
        **{package: lambda name=name: shutil.which(name) for package, name in COMMANDS.items()},
    }
    missing = [package for package, found in present.items() if found() is None]
    if missing:
        apt_install(*missing)
        if still := [package for package in missing if present[package]() is None]:
            raise RuntimeError(f"installed {', '.join(still)} but still cannot find what they provide")


if __name__ == "__main__":
    try:
        ensure_installed()
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        sys.exit(str(exc))
