"""pydantic's validation errors as one line a person can act on: `field.path: what is wrong; ...`."""

from __future__ import annotations

from typing import Collection

from pydantic import ValidationError


def describe(exc: ValidationError, *, whole: str = "", skip: int = 0, hide: Collection[str] = ()) -> str:
    """Every error as `location: message`. `skip` drops leading location parts (wrappers the user never
    wrote), `hide` drops parts anywhere (union tags such as `classify`), `whole` names an error that is
    about the whole object; pydantic's "Value error, " prefix on our own validators' messages goes."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"][skip:] if p not in hide) or whole
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {message}" if loc else message)
    return "; ".join(parts)
