"""The one rule for URLs the API accepts (image URLs in the CSV, the webhook URL)."""
from urllib.parse import urlsplit

import httpx

MAX_URL_LENGTH = 2048


def is_http_url(url: str) -> bool:
    """True for an absolute http(s) URL with a host, at most MAX_URL_LENGTH characters, that httpx (which
    downloads images and sends webhooks) can parse: not, for example, a host name that is not valid IDNA."""
    if not url or len(url) > MAX_URL_LENGTH or any(ch.isspace() or ord(ch) < 32 for ch in url):
        return False
    try:
        parts = urlsplit(url)
        parts.port  # raises ValueError for a port that is not a number in range
        httpx.URL(url).host  # httpx.InvalidURL, or ValueError (UnicodeError) for an undecodable "xn--" label
    except (ValueError, httpx.InvalidURL):  # e.g. an unclosed IPv6 bracket
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
