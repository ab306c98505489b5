"""`make bench` / `python -m bench`: imgpipe's performance harness (docs/performance.md).

Modules: images (the generated image set), servers (image host, black hole, webhook receiver),
stack (Kafka, PostgreSQL and the services), proc (CPU and memory from /proc), jobs (uploads and
their webhooks), baseline (bare Pillow), scenarios, report, and __main__ (the command line)."""
