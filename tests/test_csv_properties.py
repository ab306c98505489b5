"""Properties of the CSV parser and the output CSV, checked on generated tables and bytes (hypothesis).

The examples in test_csv_input.py and test_output_csv.py show each rule once; these check that the rules
hold for any table: any cell text (commas, quotes, newlines, spaces, any Unicode but NUL), any of the usual
ways of writing it down (quoting, line endings, BOM, blank lines), and that nothing but CsvError comes out
of the parser, whatever the bytes. Examples are derived from each test's name (tests/conftest.py loads
a derandomized profile), so every run checks the same cases.
"""

import csv
import io

import httpx
from hypothesis import assume, example, given
from hypothesis import strategies as st

from services.api.csv_input import CsvError, TooManyImages, parse_csv
from services.api.output_csv import FAILED_PREFIX, OUTPUT_COLUMN, render_output_csv
from services.api.urls import is_http_url
from tests.support.csv_tables import csv_texts, tables

MAX_IMAGES = 1000


@st.composite
def image_records(draw, row_urls: list[list[str]]) -> list[dict]:
    """One image record per input URL, as the database gives them (in any order), processed or failed."""
    images = []
    for row_number, found in enumerate(row_urls, start=1):
        for position in range(1, len(found) + 1):
            failed = draw(st.booleans())
            images.append(
                {
                    "row_number": row_number,
                    "position": position,
                    "status": "failed" if failed else "processed",
                    "output_url": None if failed else f"https://out.example/{row_number}/{position}.jpg",
                    "error_code": draw(st.sampled_from(["http_404", "timeout", "not_an_image"])) if failed else None,
                }
            )
    return draw(st.permutations(images))


def expected_slot(image: dict) -> str:
    return image["output_url"] if image["status"] == "processed" else FAILED_PREFIX + image["error_code"]


def read_csv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


@given(table=tables(), data=st.data())
def test_a_table_written_in_any_usual_csv_style_parses_back_exactly(table, data):
    """Header and cells come back unchanged, rows in order and numbered 1..n, URLs in order, whatever the
    quoting, line endings (\\n, \\r\\n, \\r, mixed), blank lines between records, BOM or final newline."""
    header, url_column, rows, row_urls = table
    text = data.draw(csv_texts([header, *rows]))
    bom = data.draw(st.booleans())
    # Without a BOM, a file that starts with U+FEFF is read as having one: that character is not kept.
    assume(bom or not text.startswith("\ufeff"))

    parsed = parse_csv(("\ufeff" if bom else "").encode() + text.encode(), MAX_IMAGES)

    assert parsed.header == header
    assert parsed.url_column == url_column
    assert [row.row_number for row in parsed.rows] == list(range(1, len(rows) + 1))
    assert [row.cells for row in parsed.rows] == rows
    assert [row.urls for row in parsed.rows] == row_urls
    assert parsed.total_images == sum(map(len, row_urls))


@given(table=tables(), data=st.data())
def test_whatever_the_parser_accepts_round_trips_through_the_output_csv(table, data):
    """The output CSV holds the parsed header and every row's cells unchanged and in order, each row's
    outputs in the order of its URLs; and uploaded again, it is the same job (same rows and URLs)."""
    header, _, rows, row_urls = table
    parsed = parse_csv(data.draw(csv_texts([header, *rows])).encode(), MAX_IMAGES)
    images = data.draw(image_records([row.urls for row in parsed.rows]))
    db_rows = [{"row_number": row.row_number, "cells": row.cells} for row in parsed.rows]

    output = render_output_csv(parsed.header, db_rows, images)

    records = read_csv(output)
    assert records[0] == [*parsed.header, OUTPUT_COLUMN]
    assert [record[:-1] for record in records[1:]] == [row.cells for row in parsed.rows]
    slots_by_row: dict[int, list[str]] = {}
    for image in sorted(images, key=lambda image: (image["row_number"], image["position"])):
        slots_by_row.setdefault(image["row_number"], []).append(expected_slot(image))
    for row, record in zip(parsed.rows, records[1:], strict=True):
        slots = record[-1].split(",")
        assert len(slots) == len(row.urls)  # each input URL has exactly its own output slot
        assert slots == slots_by_row[row.row_number]

    again = parse_csv(output.encode(), MAX_IMAGES)
    assert again.header == [*parsed.header, OUTPUT_COLUMN]
    assert [row.urls for row in again.rows] == [row.urls for row in parsed.rows]
    assert [row.cells[:-1] for row in again.rows] == [row.cells for row in parsed.rows]


@given(data=st.binary(max_size=300), max_images=st.integers(0, 5))
@example(data=b"\xef\xbb\xbf\xef\xbb\xbf", max_images=1)
@example(data=b'url\n"', max_images=1)
def test_arbitrary_bytes_raise_nothing_but_csv_errors(data, max_images):
    parse_or_refuse(data, max_images)


# Pieces that make bytes look like CSV, so that generated files get past the header into the rows.
HEADER_LINES = [
    b"url",
    b"URL ",
    b"Input Image Urls",
    b"name,url",
    b'n,"input image urls",x',
    b"\xef\xbb\xbfurl",
    b"url,url",
    b"",
]
URL_TOKENS = [
    b"https://h.example/a.jpg",
    b"http://h.example/b.png",
    b"http://[::1]:80/c",
    b"HTTPS://h.example:443/d",
    b"http://[::1/e",
    b"https://h.example:99999/f",
    b"http://h.example:8o/g",
    b"http:///h",  # URLs urlsplit rejects
]
CELL_TOKENS = [
    b",",
    b'"',
    b'""',
    b" ",
    b"\t",
    b"\n",
    b"name",
    b"http://",
    b"h.example",
    b"[",
    b":99999",
    b"/a.jpg",
    b"?q=1,2",
    b"#f",
    b"@",
    b"%",
    b"ftp://x",
    b"\xef\xbb\xbf",
    b"\xc3\xa9",
    b"\xe2\x80\xa8",
    b"\xc2\x85",
]
RARE_TOKENS = [b"\x00", b"\xff", b"\xc3"]  # each refuses the whole file, so drawn seldom
csv_like_row = st.lists(st.sampled_from(URL_TOKENS * 40 + CELL_TOKENS * 5 + RARE_TOKENS), min_size=1, max_size=4).map(
    b"".join
)
csv_like_bytes = st.builds(
    lambda header, rows: header + b"".join(row + end for row, end in rows),
    st.sampled_from(HEADER_LINES).map(lambda line: line + b"\n"),
    st.lists(st.tuples(csv_like_row, st.sampled_from([b"\n", b"\r\n", b"\r", b""])), max_size=6),
)


@given(data=csv_like_bytes, max_images=st.integers(0, 12))
def test_csv_like_bytes_raise_nothing_but_csv_errors_and_what_is_accepted_is_whole(data, max_images):
    parsed = parse_or_refuse(data, max_images)
    if parsed is None:
        return
    assert 1 <= parsed.total_images <= max_images
    assert [row.row_number for row in parsed.rows] == list(range(1, len(parsed.rows) + 1))
    for row in parsed.rows:
        assert len(row.cells) == len(parsed.header)
        assert row.urls and all(is_http_url(url) for url in row.urls)


def parse_or_refuse(data: bytes, max_images: int):
    """parse_csv's answer, or None when it refused with a CsvError that names a real data row (or none)."""
    try:
        return parse_csv(data, max_images)
    except CsvError as error:  # anything else fails the test
        assert error.message
        assert error.row_number is None or error.row_number >= 1
        return None


@given(table=tables(), max_images=st.integers(1, 12), data=st.data())
def test_too_many_images_names_the_row_that_crosses_the_limit(table, max_images, data):
    header, _, rows, row_urls = table
    encoded = data.draw(csv_texts([header, *rows])).encode()
    running_totals = [sum(map(len, row_urls[: index + 1])) for index in range(len(row_urls))]
    if running_totals[-1] <= max_images:
        assert parse_csv(encoded, max_images).total_images == running_totals[-1]
        return
    try:
        parse_csv(encoded, max_images)
    except TooManyImages as error:
        crossing_row = next(index + 1 for index, total in enumerate(running_totals) if total > max_images)
        assert error.row_number == crossing_row
    else:
        raise AssertionError("a CSV over the image limit was accepted")


@given(table=tables(), data=st.data())
def test_a_bad_row_is_named_by_its_record_number_not_its_line(table, data):
    """Row numbers count records: cells spanning several lines and blank lines before it do not shift them."""
    header, _, rows, _ = table
    bad_row_number = data.draw(st.integers(1, len(rows) + 1))
    wrong_width = data.draw(st.sampled_from([len(header) + 1, len(header) + 2]))
    bad_row = ["x"] * wrong_width
    records = [header, *rows[: bad_row_number - 1], bad_row, *rows[bad_row_number - 1 :]]
    try:
        parse_csv(data.draw(csv_texts(records)).encode(), MAX_IMAGES)
    except CsvError as error:
        assert error.row_number == bad_row_number
        assert f"row {bad_row_number} has {wrong_width} cells" in error.message
    else:
        raise AssertionError("a row with too many cells was accepted")


@given(table=tables(), encoding=st.sampled_from(["utf-16", "utf-16-le", "utf-16-be", "utf-32"]), data=st.data())
def test_utf16_and_utf32_files_are_refused_not_misread(table, encoding, data):
    header, _, rows, _ = table
    encoded = data.draw(csv_texts([header, *rows])).encode(encoding)
    try:
        parse_csv(encoded, MAX_IMAGES)
    except CsvError as error:
        assert "not UTF-8" in error.message or "NUL" in error.message
    else:
        raise AssertionError(f"a {encoding} file was accepted")


@given(table=tables(), data=st.data())
def test_a_nul_anywhere_is_refused(table, data):
    """PostgreSQL text cannot hold NUL, so no accepted CSV may carry one into the job."""
    header, _, rows, _ = table
    text = data.draw(csv_texts([header, *rows]))
    at = data.draw(st.integers(0, len(text)))
    try:
        parse_csv((text[:at] + "\x00" + text[at:]).encode(), MAX_IMAGES)
    except CsvError as error:
        assert "NUL" in error.message
    else:
        raise AssertionError("a CSV with a NUL character was accepted")


@given(
    scheme=st.sampled_from(["http", "https"]),
    host=st.text(max_size=8) | st.text(st.characters(codec="utf-8", min_codepoint=0x80), min_size=1, max_size=3),
    rest=st.text(max_size=6),
)
@example(scheme="http", host="c\x8a", rest="")  # not a valid IDNA host name: once a 500 on the webhook_url check
@example(scheme="http", host="xn--zz.com", rest="")  # not a valid A-label: httpx parses it, but fails on .host
def test_every_url_the_rule_accepts_is_one_the_http_client_can_parse(scheme, host, rest):
    """Image URLs and webhook URLs are later requested with httpx: one it cannot parse must be refused at upload."""
    url = f"{scheme}://{host}/{rest}"
    if is_http_url(url):
        assert httpx.URL(url).host
