"""Reads an uploaded CSV into its rows and their image URLs, or says exactly what is wrong with it.

Two layouts are accepted: a column named "Input Image Urls" whose cell holds one or more
comma-separated URLs, or a column named "url" holding one URL per row. Every other column
is carried through untouched.
"""

import codecs
import csv
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, TextIO

from services.api.urls import MAX_URL_LENGTH, is_http_url

# The usual shape of an image URL (a host name, no IPv4 or IDNA host, a plain ASCII path), which is_http_url
# always accepts (tests/test_csv_input.py): checked first because is_http_url parses every URL twice
# (urllib, httpx), which would be most of the time of a 100,000-row upload.
PLAIN_HTTP_URL = re.compile(
    r"https?://"
    r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)*[a-z](?:[a-z0-9-]*[a-z0-9])?"  # its last label is not a number
    r"(?::[1-9][0-9]{0,3})?"
    r"(?:/[A-Za-z0-9._~!$&'()*+,;=:@%/?#-]*)?",
    re.ASCII | re.IGNORECASE,
)
MULTI_URL_COLUMN = "input image urls"
SINGLE_URL_COLUMN = "url"

# The API bounds the whole file (max_csv_bytes), so a single cell needs no smaller bound;
# csv's default (131072 characters) would reject a row with a few thousand URLs.
csv.field_size_limit(2**31 - 1)


class CsvError(Exception):
    """The CSV cannot be accepted; row_number is the 1-based data row (header not counted) when known."""

    def __init__(self, message: str, row_number: int | None = None):
        super().__init__(message)
        self.message = message
        self.row_number = row_number

    def __reduce__(self):  # whole across processes (services/api/upload_workers.py)
        return type(self), (self.message, self.row_number)


class TooManyImages(CsvError):
    """The CSV holds more URLs than one job may have."""


@dataclass
class CsvRow:
    row_number: int
    cells: list[str]
    urls: list[str]


@dataclass
class ParsedCsv:
    header: list[str]
    url_column: int  # 0-based index into header
    rows: list[CsvRow]

    @property
    def total_images(self) -> int:
        return sum(len(row.urls) for row in self.rows)


@dataclass
class CsvStream:
    """A CSV whose header is read and checked; its rows are read, checked and counted as `rows` is
    iterated (each raises its CsvError when reached), so that a file of any size is never held whole."""

    header: list[str]
    url_column: int  # 0-based index into header
    rows: Iterator[CsvRow]


def parse_csv(data: bytes, max_images: int) -> ParsedCsv:
    """The whole CSV at once (small inputs and tests); read_csv streams."""
    stream = read_csv(io.BytesIO(data), max_images)
    return ParsedCsv(header=stream.header, url_column=stream.url_column, rows=list(stream.rows))


def read_csv(file: BinaryIO, max_images: int) -> CsvStream:
    """Read the header of a binary, seekable file now and its rows as they are iterated."""
    text = io.TextIOWrapper(file, encoding="utf-8-sig", newline="")
    records = _non_blank_records(_checked_lines(text, file))
    header = next(records, None)
    if header is None:
        raise CsvError("the CSV file is empty")
    url_column = _find_url_column(header)
    split_cell = MULTI_URL_COLUMN == header[url_column].strip().lower()
    return CsvStream(
        header=header, url_column=url_column, rows=_rows(records, len(header), url_column, split_cell, max_images)
    )


def _rows(
    records: Iterator[list[str]], columns: int, url_column: int, split_cell: bool, max_images: int
) -> Iterator[CsvRow]:
    total = 0
    row_number = 0
    for row_number, cells in enumerate(records, start=1):
        if len(cells) != columns:
            raise CsvError(f"row {row_number} has {len(cells)} cells but the header has {columns} columns", row_number)
        urls = _urls_of(cells[url_column], split_cell, row_number)
        total += len(urls)
        if total > max_images:
            raise TooManyImages(f"the CSV holds more than {max_images} image URLs (the limit per job)", row_number)
        yield CsvRow(row_number=row_number, cells=cells, urls=urls)
    if row_number == 0:
        raise CsvError("the CSV has a header but no data rows")


def _checked_lines(text: TextIO, file: BinaryIO) -> Iterator[str]:
    """The lines of the text, refused at the first one that is not UTF-8 or holds a NUL."""
    try:
        for line in text:
            if "\x00" in line:  # PostgreSQL text and jsonb cannot hold NUL
                raise CsvError("the file contains NUL characters; it is not a text CSV")
            yield line
    except UnicodeDecodeError:
        raise CsvError(f"the file is not UTF-8 text (invalid byte at offset {_first_invalid_byte(file)})") from None


def _first_invalid_byte(file: BinaryIO) -> int:
    """The offset of the first byte that is not UTF-8 (found again from the start: errors only)."""
    file.seek(0)
    decoder = codecs.getincrementaldecoder("utf-8")()
    consumed = 0
    while chunk := file.read(64 * 1024):
        buffered = len(decoder.getstate()[0])
        try:
            decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            return consumed - buffered + exc.start
        consumed += len(chunk)
    return consumed  # the file ends inside a character


def _non_blank_records(lines: Iterator[str]) -> Iterator[list[str]]:
    """Yield the CSV records, skipping fully blank lines (they are not rows)."""
    # strict: an unclosed quote or text after a closing quote is an error, not silently merged cells
    reader = csv.reader(lines, strict=True)
    data_rows_seen = 0
    try:
        for cells in reader:
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                continue
            yield cells
            data_rows_seen += 1
    except csv.Error as exc:
        # data_rows_seen counts the header too, so it is the number of the failing data row
        if data_rows_seen == 0:
            raise CsvError(f"the header line is malformed CSV ({exc})") from None
        raise CsvError(f"row {data_rows_seen} is malformed CSV ({exc})", data_rows_seen) from None


def _find_url_column(header: list[str]) -> int:
    names = [cell.strip().lower() for cell in header]
    found = [i for i, name in enumerate(names) if name in (MULTI_URL_COLUMN, SINGLE_URL_COLUMN)]
    if len(found) > 1:
        listed = ", ".join(repr(header[i]) for i in found)
        raise CsvError(f"the header has more than one URL column ({listed}); keep exactly one")
    if not found:
        if any(is_http_url(cell.strip()) for cell in header):
            raise CsvError(
                "the CSV has no header: its first line holds a URL; add a header line naming "
                "the URL column 'Input Image Urls' or 'url'"
            )
        raise CsvError("the header has no URL column: name one column 'Input Image Urls' or 'url'")
    return found[0]


def _urls_of(cell: str, split_cell: bool, row_number: int) -> list[str]:
    pieces = cell.split(",") if split_cell else [cell]
    urls = [piece.strip() for piece in pieces if piece.strip()]
    if not urls:
        raise CsvError(f"row {row_number} has no image URL", row_number)
    for position, url in enumerate(urls, start=1):
        if len(url) > MAX_URL_LENGTH:
            raise CsvError(f"row {row_number}, URL {position} is longer than {MAX_URL_LENGTH} characters", row_number)
        if not _is_plain_http_url(url) and not is_http_url(url):
            raise CsvError(
                f"row {row_number}, URL {position} is not an absolute http(s) URL with a host: {url[:200]!r}",
                row_number,
            )
    return urls


def _is_plain_http_url(url: str) -> bool:
    return len(url) <= MAX_URL_LENGTH and PLAIN_HTTP_URL.fullmatch(url) is not None and "xn--" not in url.lower()
