"""Settings come from the environment, with the IMGPIPE_ names winning over the conventional ones."""

from shared.settings import Settings


def test_the_imgpipe_name_wins_over_the_conventional_one(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://conventional/db")
    monkeypatch.setenv("IMGPIPE_DATABASE_URL", "postgresql://imgpipe/db")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "conventional:9092")
    monkeypatch.setenv("IMGPIPE_KAFKA_BOOTSTRAP_SERVERS", "imgpipe:9092")
    assert (Settings().database_url, Settings().kafka_bootstrap_servers) == ("postgresql://imgpipe/db", "imgpipe:9092")


def test_the_conventional_name_alone_is_read(monkeypatch):
    monkeypatch.delenv("IMGPIPE_DATABASE_URL", raising=False)
    monkeypatch.delenv("IMGPIPE_KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.setenv("DATABASE_URL", "postgresql://conventional/db")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "conventional:9092")
    assert (Settings().database_url, Settings().kafka_bootstrap_servers) == (
        "postgresql://conventional/db",
        "conventional:9092",
    )


def test_the_default_quality_is_also_read_by_its_former_name(monkeypatch):
    monkeypatch.delenv("IMGPIPE_DEFAULT_QUALITY", raising=False)
    monkeypatch.setenv("IMGPIPE_JPEG_QUALITY", "65")
    assert Settings().default_quality == 65
    monkeypatch.setenv("IMGPIPE_DEFAULT_QUALITY", "70")
    assert Settings().default_quality == 70


def test_fields_are_set_by_their_own_names(monkeypatch):
    monkeypatch.setenv("IMGPIPE_DATABASE_URL", "postgresql://from-env/db")
    assert Settings(database_url="postgresql://explicit/db").database_url == "postgresql://explicit/db"


def test_lists_are_comma_separated(monkeypatch):
    monkeypatch.setenv("IMGPIPE_ALLOWED_PRIVATE_HOSTS", "images.internal, 10.0.0.5")
    assert Settings().allowed_private_hosts == ["images.internal", "10.0.0.5"]


def test_private_addresses_are_refused_by_default(monkeypatch):
    monkeypatch.delenv("IMGPIPE_ALLOW_PRIVATE_ADDRESSES", raising=False)
    assert Settings().allow_private_addresses is False
