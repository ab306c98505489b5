import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from services.api.csv_input import PLAIN_HTTP_URL, CsvError, TooManyImages, _is_plain_http_url, parse_csv
from services.api.urls import is_http_url

SAMPLE = (
    b"S. No.,Product Name,Input Image Urls\n"
    b'1,SKU1,"https://img.example.com/a.jpg,https://img.example.com/b.jpg, http://img.example.com/c.png"\n'
    b"2,SKU2,https://img.example.com/d.jpg\n"
)


def rejected(data: bytes, max_images: int = 100) -> CsvError:
    with pytest.raises(CsvError) as caught:
        parse_csv(data, max_images)
    return caught.value


def test_product_layout_splits_the_url_cell_and_keeps_other_columns():
    parsed = parse_csv(SAMPLE, max_images=100)
    assert parsed.header == ["S. No.", "Product Name", "Input Image Urls"]
    assert parsed.url_column == 2
    assert [row.row_number for row in parsed.rows] == [1, 2]
    assert parsed.rows[0].cells == [
        "1",
        "SKU1",
        "https://img.example.com/a.jpg,https://img.example.com/b.jpg, http://img.example.com/c.png",
    ]
    assert parsed.rows[0].urls == [
        "https://img.example.com/a.jpg",
        "https://img.example.com/b.jpg",
        "http://img.example.com/c.png",
    ]
    assert parsed.rows[1].urls == ["https://img.example.com/d.jpg"]
    assert parsed.total_images == 4


def test_url_layout_takes_one_url_per_row_kept_exactly():
    data = b"id,url,note\r\n7, https://x.example/p?a=1&b=2 ,first\r\n8,https://x.example/p?a=1&b=2,dup\r\n"
    parsed = parse_csv(data, max_images=100)
    assert parsed.url_column == 1
    assert [row.urls for row in parsed.rows] == [["https://x.example/p?a=1&b=2"], ["https://x.example/p?a=1&b=2"]]
    assert parsed.rows[0].cells == ["7", " https://x.example/p?a=1&b=2 ", "first"]


def test_url_column_of_the_url_layout_is_not_split_on_commas():
    parsed = parse_csv(b'url\n"https://res.example.com/w_100,h_100/a.jpg"\n', max_images=10)
    assert parsed.rows[0].urls == ["https://res.example.com/w_100,h_100/a.jpg"]


@pytest.mark.parametrize("name", ["  input IMAGE urls ", "INPUT IMAGE URLS", " URL", "Url  "])
def test_header_match_ignores_case_and_surrounding_spaces(name):
    parsed = parse_csv(f"a,{name}\nx,https://h.example/1.jpg\n".encode(), max_images=10)
    assert parsed.url_column == 1
    assert parsed.header == ["a", name]
    assert parsed.rows[0].urls == ["https://h.example/1.jpg"]


def test_bom_is_stripped():
    parsed = parse_csv(b"\xef\xbb\xbfurl\nhttps://h.example/1.jpg\n", max_images=10)
    assert parsed.header == ["url"]


def test_blank_lines_are_not_rows():
    data = b"\n\nurl,name\n\nhttps://h.example/1.jpg,one\n   \n\r\nhttps://h.example/2.jpg,two\n\n"
    parsed = parse_csv(data, max_images=10)
    assert [(row.row_number, row.urls) for row in parsed.rows] == [
        (1, ["https://h.example/1.jpg"]),
        (2, ["https://h.example/2.jpg"]),
    ]


def test_empty_pieces_of_a_url_cell_are_ignored():
    parsed = parse_csv(b'n,Input Image Urls\n1,"https://h.example/1.jpg,,https://h.example/2.jpg,"\n', 10)
    assert parsed.rows[0].urls == ["https://h.example/1.jpg", "https://h.example/2.jpg"]


def test_max_images_counts_urls_over_all_rows():
    data = b'n,Input Image Urls\n1,"https://h.example/1.jpg,https://h.example/2.jpg"\n2,https://h.example/3.jpg\n'
    assert parse_csv(data, max_images=3).total_images == 3
    error = rejected(data, max_images=2)
    assert isinstance(error, TooManyImages)
    assert error.row_number == 2
    assert "more than 2" in error.message


@pytest.mark.parametrize("data", [b"", b"\n\n  \n", b"\xef\xbb\xbf"])
def test_empty_file(data):
    error = rejected(data)
    assert "empty" in error.message
    assert error.row_number is None


def test_header_without_rows():
    assert "no data rows" in rejected(b"url\n\n").message


def test_missing_header_is_named():
    error = rejected(b"https://h.example/1.jpg\nhttps://h.example/2.jpg\n")
    assert "no header" in error.message


def test_no_url_column():
    error = rejected(b"id,image\n1,https://h.example/1.jpg\n")
    assert "no URL column" in error.message


def test_more_than_one_url_column():
    error = rejected(b"url,Input Image Urls\nhttps://h.example/1.jpg,https://h.example/2.jpg\n")
    assert "more than one URL column" in error.message


def test_not_utf8():
    error = rejected("url,name\nhttps://h.example/1.jpg,caf\u00e9\n".encode("latin-1"))
    assert "not UTF-8" in error.message


def test_nul_characters_are_refused():
    assert "NUL" in rejected(b"url,name\nhttps://h.example/1.jpg,a\x00b\n").message


@pytest.mark.parametrize(
    "row2, fragment",
    [
        (b"https://h.example/2.jpg", "has 1 cells but the header has 2"),
        (b"https://h.example/2.jpg,b,c", "has 3 cells but the header has 2"),
        (b",b", "has no image URL"),
        (b"  ,b", "has no image URL"),
        (b"ftp://h.example/2.jpg,b", "not an absolute http(s) URL"),
        (b"/relative/2.jpg,b", "not an absolute http(s) URL"),
        (b"https:///nohost.jpg,b", "not an absolute http(s) URL"),
        (b"https://h.example/a b.jpg,b", "not an absolute http(s) URL"),
        (b"http://[::1/x.jpg,b", "not an absolute http(s) URL"),
        (b"https://h.example:99999/x.jpg,b", "not an absolute http(s) URL"),
        (b"https://h.example/" + b"a" * 2040 + b",b", "longer than 2048"),
        (b'"https://h.example/2.jpg,b', "malformed CSV"),
    ],
)
def test_bad_rows_are_named(row2, fragment):
    error = rejected(b"url,name\n\nhttps://h.example/1.jpg,a\n\n" + row2 + b"\nhttps://h.example/3.jpg,c\n")
    assert fragment in error.message
    assert error.row_number == 2
    assert "row 2" in error.message


def test_bad_url_inside_a_multi_url_cell_names_row_and_position():
    error = rejected(b'n,Input Image Urls\n1,"https://h.example/1.jpg,not-a-url"\n')
    assert error.row_number == 1
    assert "row 1, URL 2" in error.message


def test_url_of_exactly_2048_characters_is_accepted():
    url = "https://h.example/" + "a" * (2048 - len("https://h.example/"))
    assert parse_csv(f"url\n{url}\n".encode(), 10).rows[0].urls == [url]


@settings(max_examples=500)
@given(url=st.from_regex(PLAIN_HTTP_URL, fullmatch=True))
@example(url="http://1.2.3.999/a.jpg")  # IPv4-like hosts must be valid addresses
@example(url="http://xn--a.example/a.jpg")  # an IDNA label that does not decode
@example(url="HTTPS://CDN.EXAMPLE.COM:8080/A%20B.JPG?w=1&h=2#x")
def test_the_parsers_fast_url_check_accepts_only_what_the_url_rule_accepts(url):
    """The parser checks the usual URL shape first (fast) and asks is_http_url only otherwise."""
    if _is_plain_http_url(url):
        assert is_http_url(url), url
