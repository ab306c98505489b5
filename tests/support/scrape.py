"""Reading a service's /metrics (Prometheus text) and /readyz as an operator's tools would."""

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families


class Samples(dict):
    """(sample name, frozenset of label items) -> value, from one scrape."""

    def value(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels; 0 when absent (a labelled counter not yet incremented)."""
        return self.get((name, frozenset(labels.items())), 0.0)

    def matching(self, name: str, **labels: str) -> dict[frozenset, float]:
        """Every sample of `name` whose labels include these."""
        wanted = set(labels.items())
        return {key[1]: value for key, value in self.items() if key[0] == name and wanted <= key[1]}


def scrape(base_url: str, **client_options) -> Samples:
    response = httpx.get(f"{base_url}/metrics", timeout=10, **client_options)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = Samples()
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(base_urls: list[str], name: str, **labels: str) -> float:
    """The sum of one sample over several processes (e.g. every processor)."""
    return sum(scrape(url).value(name, **labels) for url in base_urls)


def wait_for_answer(url: str, timeout: float = 60, **client_options) -> httpx.Response:
    """The first answer of a server that is starting (connection refused until it listens)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(url, timeout=10, **client_options)
        except httpx.TransportError:
            assert time.monotonic() < deadline, f"{url} never answered"
            time.sleep(0.1)


def wait_until(condition, timeout: float = 60, what: str = "condition"):
    """Poll `condition` until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        time.sleep(0.2)
    return result
