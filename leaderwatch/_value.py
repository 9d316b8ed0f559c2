"""The one base of every frozen value that crosses a boundary."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["FrozenValue"]


class FrozenValue(BaseModel):
    """An immutable, hashable pydantic value that refuses unknown fields.

    ``str()`` equals ``repr()``, so a printed value always names its kind
    (``Serve(epoch=2)``, never a bare ``epoch=2``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __str__(self) -> str:
        return self.__repr__()
