"""Provenance recorded in every skill pack: tool version, sources, creation time, command line."""

from __future__ import annotations

import datetime as _dt
from importlib import metadata


def skillgraft_version() -> str:
    try:
        return metadata.version("skillgraft")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def provenance(command: str, sources: list[str]) -> dict:
    return {
        "skillgraft_version": skillgraft_version(),
        "sources": sources,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }
