"""Reads an uploaded CSV into its rows and their image URLs, or says exactly what is wrong with it.

Two layouts are accepted: a column named "Input Image Urls" whose cell holds one or more
comma-separated URLs, or a column named "url" holding one URL per row. Every other column
is carried through untouched.
"""
import codecs
import csv
import io
from dataclasses import dataclass

from services.api.urls import MAX_URL_LENGTH, is_http_url

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


def parse_csv(data: bytes, max_images: int) -> ParsedCsv:
    records = _non_blank_records(_decode(data))
    header = next(records, None)
    if header is None:
        raise CsvError("the CSV file is empty")
    url_column = _find_url_column(header)
    split_cell = MULTI_URL_COLUMN == header[url_column].strip().lower()

    rows: list[CsvRow] = []
    total = 0
    for row_number, cells in enumerate(records, start=1):
        if len(cells) != len(header):
            raise CsvError(
                f"row {row_number} has {len(cells)} cells but the header has {len(header)} columns", row_number
            )
        urls = _urls_of(cells[url_column], split_cell, row_number)
        total += len(urls)
        if total > max_images:
            raise TooManyImages(f"the CSV holds more than {max_images} image URLs (the limit per job)", row_number)
        rows.append(CsvRow(row_number=row_number, cells=cells, urls=urls))
    if not rows:
        raise CsvError("the CSV has a header but no data rows")
    return ParsedCsv(header=header, url_column=url_column, rows=rows)


def _decode(data: bytes) -> str:
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CsvError(f"the file is not UTF-8 text (invalid byte at offset {exc.start})") from None
    if "\x00" in text:  # PostgreSQL text and jsonb cannot hold NUL
        raise CsvError("the file contains NUL characters; it is not a text CSV")
    return text


def _non_blank_records(text: str):
    """Yield the CSV records, skipping fully blank lines (they are not rows)."""
    # strict: an unclosed quote or text after a closing quote is an error, not silently merged cells
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
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
            raise CsvError(
                f"row {row_number}, URL {position} is longer than {MAX_URL_LENGTH} characters", row_number
            )
        if not is_http_url(url):
            raise CsvError(
                f"row {row_number}, URL {position} is not an absolute http(s) URL with a host: {url[:200]!r}",
                row_number,
            )
    return urls
