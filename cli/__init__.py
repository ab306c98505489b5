"""imgpipe's command line: submit a CSV, follow jobs with a live progress bar, read status, fetch the
output CSV. A client of the HTTP API only (httpx, typer, rich): it needs no imgpipe setting."""
