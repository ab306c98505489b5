import csv
import io
from typing import Any

from services.api.output_csv import render_output_csv


def image(row_number, position, status, output_url=None, error_code=None):
    return {
        "row_number": row_number,
        "position": position,
        "status": status,
        "output_url": output_url,
        "error_code": error_code,
    }


def test_rows_urls_and_extra_columns_are_kept_in_order_with_failed_slots():
    header = ["S. No.", "Product Name", "Input Image Urls", "Note"]
    rows: list[dict[str, Any]] = [
        {"row_number": 1, "cells": ["1", "SKU1", "https://i/a.jpg,https://i/b.jpg,https://i/c.jpg", 'say "hi", ok']},
        {"row_number": 2, "cells": ["2", "SKU2", "https://i/d.jpg", "line1\nline2"]},
    ]
    images = [  # deliberately not in order: the renderer orders by position within each row
        image(2, 1, "processed", "https://o/d.jpg"),
        image(1, 3, "processed", "https://o/c.jpg"),
        image(1, 1, "processed", "https://o/a.jpg"),
        image(1, 2, "failed", error_code="http_404"),
    ]
    text = render_output_csv(header, rows, images)
    parsed = list(csv.reader(io.StringIO(text, newline="")))
    assert parsed == [
        [*header, "Output Image Urls"],
        [*rows[0]["cells"], "https://o/a.jpg,failed:http_404,https://o/c.jpg"],
        [*rows[1]["cells"], "https://o/d.jpg"],
    ]


def test_url_layout_gets_one_output_url_per_row():
    rows = [{"row_number": n, "cells": [f"https://i/{n}.png"]} for n in (1, 2, 3)]
    images = [image(n, 1, "processed", f"https://o/{n}.png") for n in (3, 1, 2)]
    parsed = list(csv.reader(io.StringIO(render_output_csv(["url"], rows, images), newline="")))
    assert parsed == [["url", "Output Image Urls"]] + [[f"https://i/{n}.png", f"https://o/{n}.png"] for n in (1, 2, 3)]


def test_output_url_with_comma_and_quotes_round_trips():
    rows = [{"row_number": 1, "cells": ["https://i/x.jpg"]}]
    output_url = 'https://o/w_1,h_1/"x".jpg'
    text = render_output_csv(["url"], rows, [image(1, 1, "processed", output_url)])
    assert list(csv.reader(io.StringIO(text, newline="")))[1] == ["https://i/x.jpg", output_url]
