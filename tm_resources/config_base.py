"""What every configuration section shares: strict models, the operator-facing error, and checked value types."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


class ConfigError(Exception):
    """A configuration problem, worded so the operator knows which key to fix."""


class Strict(BaseModel):
    # A misspelt key is the commonest config mistake: refuse it rather than ignore it.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _known_zone(value: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"'{value}' is not a time zone (an IANA name such as Europe/Paris or UTC)") from None
    return value


# An IANA time zone name, checked when the configuration is read.
TimeZone = Annotated[str, AfterValidator(_known_zone)]
