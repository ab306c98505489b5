"""The one way tests build Settings: from explicit field names only, never from the environment of
whoever runs the tests (a DATABASE_URL or IMGPIPE_STORAGE there must not change what a test checks)."""

import os
import uuid

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from shared.settings import Settings

# Inherited variables that would otherwise reach a service process started by a test.
_SETTINGS_VARIABLES = ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")


class _ExplicitSettings(Settings):
    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def make_test_settings(**fields) -> Settings:
    return _ExplicitSettings(**fields)


def own_names(tag: str = "") -> dict[str, str]:
    """Settings fields naming every topic and consumer group, each of its own (a random suffix, after
    `tag` if given), so that tests sharing the broker never consume each other's events."""
    suffix = f"{tag}-{uuid.uuid4().hex[:8]}" if tag else uuid.uuid4().hex[:8]
    return dict(
        topic_requested=f"image.requested.{suffix}",
        topic_requested_bulk=f"image.requested.bulk.{suffix}",
        topic_processed=f"image.processed.{suffix}",
        topic_dead_letter=f"image.requested.dlq.{suffix}",
        topic_processed_dead_letter=f"image.processed.dlq.{suffix}",
        topic_job_requested=f"job.requested.{suffix}",
        topic_job_dead_letter=f"job.requested.dlq.{suffix}",
        processor_group=f"processor-{suffix}",
        notifier_group=f"notifier-{suffix}",
        intake_group=f"intake-{suffix}",
    )


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The whole environment that gives a service process exactly these settings: this process's
    environment without any imgpipe setting, plus one IMGPIPE_ variable per field."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGPIPE_") and k not in _SETTINGS_VARIABLES}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if isinstance(value, list):
            value = ",".join(value)
        env[f"IMGPIPE_{name.upper()}"] = str(value)
    return {**env, **extra}
