"""Builds the output CSV: the input CSV as uploaded, plus a last column with the output URLs."""

import csv
import io
from collections import defaultdict
from collections.abc import Iterable, Mapping

OUTPUT_COLUMN = "Output Image Urls"
FAILED_PREFIX = "failed:"


def render_output_csv(header: list[str], rows: Iterable[Mapping], images: Iterable[Mapping]) -> str:
    """rows: {"row_number", "cells"} in input order; images: {"row_number", "position", "status",
    "output_url", "error_code"}. A row's output cell lists its images by position, joined with ","; a
    failed image's slot holds "failed:<error_code>" so every output URL stays aligned with its input URL."""
    images_by_row: dict[int, list[Mapping]] = defaultdict(list)
    for image in images:
        images_by_row[image["row_number"]].append(image)

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*header, OUTPUT_COLUMN])
    for row in rows:
        slots = sorted(images_by_row[row["row_number"]], key=lambda image: image["position"])
        writer.writerow([*row["cells"], ",".join(_slot(image) for image in slots)])
    return out.getvalue()


def _slot(image: Mapping) -> str:
    if image["status"] == "processed":
        return image["output_url"]
    if image["status"] == "failed":
        return f"{FAILED_PREFIX}{image['error_code']}"
    return ""  # still pending; the API only renders completed jobs
