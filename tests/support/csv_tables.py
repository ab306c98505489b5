"""Hypothesis strategies for CSV uploads: tables a person could build, and the CSV text they could save them as."""

from hypothesis import strategies as st

URL_COLUMN_NAMES = ("url", "input image urls")
CSV_SPECIALS = ',"\r\n \t\ufeff'

# Cell text: anything the parser must carry unchanged, with CSV's special characters drawn often.
cell_text = st.text(
    st.one_of(st.sampled_from(CSV_SPECIALS), st.characters(codec="utf-8", exclude_characters="\x00")), max_size=12
)


@st.composite
def urls(draw, comma_allowed: bool) -> str:
    scheme = draw(st.sampled_from(["http", "https", "HTTP", "Https"]))
    host = draw(
        st.sampled_from(["127.0.0.1", "[::1]", "img.example.com"])
        | st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\.[a-z]{2,6}){0,2}", fullmatch=True)
    )
    port = draw(st.none() | st.integers(0, 65535))
    path_char = st.characters(
        codec="utf-8",
        exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp"),
        exclude_characters="" if comma_allowed else ",",
    ).filter(lambda ch: not ch.isspace())
    path = draw(st.text(path_char, max_size=16))
    return f"{scheme}://{host}{'' if port is None else f':{port}'}/{path}"


@st.composite
def url_cells(draw, split_cell: bool) -> tuple[str, list[str]]:
    """(the URL column's cell, the URLs the parser must find in it)."""
    padding = st.text(st.sampled_from(" \t\n\r"), max_size=2)
    if not split_cell:
        url = draw(urls(comma_allowed=True))
        return f"{draw(padding)}{url}{draw(padding)}", [url]
    found = draw(st.lists(urls(comma_allowed=False), min_size=1, max_size=4))
    separator = st.sampled_from([",", ", ", " ,", ",,", " , ", ",\n"])
    cell = draw(st.sampled_from(["", ",", " "]))
    for index, url in enumerate(found):
        cell += url if index == 0 else draw(separator) + url
    return cell + draw(st.sampled_from(["", ",", " ", ", "])), found


@st.composite
def tables(draw) -> tuple[list[str], int, list[list[str]], list[list[str]]]:
    """(header, URL column index, rows of cells, each row's URLs), as a person would build the sheet."""
    base = draw(st.sampled_from(URL_COLUMN_NAMES))
    name = "".join(ch.upper() if draw(st.booleans()) else ch for ch in base)
    name = draw(st.sampled_from(["", " ", "  "])) + name + draw(st.sampled_from(["", " ", "\t"]))
    other_name = cell_text.filter(lambda text: text.strip().lower() not in URL_COLUMN_NAMES)
    others = draw(st.lists(other_name, max_size=3))
    url_column = draw(st.integers(0, len(others)))
    header = [*others[:url_column], name, *others[url_column:]]
    split_cell = base == "input image urls"
    rows, row_urls = [], []
    for _ in range(draw(st.integers(1, 5))):
        cells = draw(st.lists(cell_text, min_size=len(header), max_size=len(header)))
        cells[url_column], found = draw(url_cells(split_cell))
        rows.append(cells)
        row_urls.append(found)
    return header, url_column, rows, row_urls


@st.composite
def csv_texts(draw, records: list[list[str]]) -> str:
    """The records as CSV text, written independently of the csv module and in any of its usual styles:
    quoted where needed or everywhere, \\n, \\r\\n or \\r line endings (mixed), blank lines between
    records, with or without a final line ending."""
    quote_all = draw(st.booleans())
    terminators = st.sampled_from(["\n", "\r\n", "\r"])
    blank_lines = st.lists(st.sampled_from(["", " ", "\t", "  "]), max_size=2)

    def field(cell: str) -> str:
        if quote_all or any(ch in cell for ch in ',"\r\n'):
            return '"' + cell.replace('"', '""') + '"'
        return cell

    lines = []
    for record in records:
        lines.extend(draw(blank_lines))
        lines.append(",".join(field(cell) for cell in record))
    text = "".join(line + draw(terminators) for line in lines)
    return text if draw(st.booleans()) else text.rstrip("\r\n")
