"""The Kafka helpers every service uses, against the real broker."""

import uuid

from shared.kafka import make_producer, produce_and_wait, producer_config
from tests.support.kafka import read_to_end


def test_producers_wait_for_every_in_sync_replica(make_settings):
    """acks=all cannot be told apart from acks=1 on a one-broker cluster (Kafka caps the effective
    min.insync.replicas at the replica count since 3.7), so the configuration itself is checked,
    then used for a real round trip."""
    settings = make_settings()
    config = producer_config(settings)
    assert config["acks"] == "all" and config["enable.idempotence"] is True

    key = uuid.uuid4().hex.encode()
    assert produce_and_wait(make_producer(settings), settings.topic_dead_letter, [(key, b"v")]) == 1
    assert [
        m.value() for m in read_to_end(settings.kafka_bootstrap_servers, settings.topic_dead_letter) if m.key() == key
    ] == [b"v"]
