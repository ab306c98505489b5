"""The one rule for URLs the API accepts (image URLs in the CSV, the webhook URL)."""

from urllib.parse import urlsplit

import httpx

from services.api.errors import ApiError
from shared.addresses import AddressRule, ForbiddenAddress
from shared.settings import Settings

MAX_URL_LENGTH = 2048


def is_http_url(url: str) -> bool:
    """True for an absolute http(s) URL with a host, at most MAX_URL_LENGTH characters, that httpx (which
    downloads images and sends webhooks) can parse: not, for example, a host name that is not valid IDNA."""
    if not url or len(url) > MAX_URL_LENGTH or any(ch.isspace() or ord(ch) < 32 for ch in url):
        return False
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number in range
        _ = httpx.URL(url).host  # httpx.InvalidURL, or ValueError (UnicodeError) for an undecodable "xn--" label
    except (ValueError, httpx.InvalidURL):  # e.g. an unclosed IPv6 bracket
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def check_webhook_url(url: str, settings: Settings) -> None:
    """Raise ApiError 422 invalid_webhook_url unless the notifier could send to this URL: is_http_url, and the
    address rule it applies when sending (a webhook to a private address would only fail later). A host that
    does not resolve now is accepted (DNS may come back); sending checks again."""
    if not is_http_url(url):
        raise ApiError(
            422,
            "invalid_webhook_url",
            f"webhook_url must be an absolute http(s) URL with a host, at most {MAX_URL_LENGTH} characters",
        )
    parsed = httpx.URL(url)
    rule = AddressRule(settings.allow_private_addresses, settings.allowed_private_hosts)
    try:
        rule.refuse_private_host(parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80))
    except ForbiddenAddress as exc:
        raise ApiError(
            422, "invalid_webhook_url", f"webhook_url: {exc}; webhooks are sent to public addresses only"
        ) from None
    except OSError:
        pass
