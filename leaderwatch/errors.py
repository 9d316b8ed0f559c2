"""The root of every error this library raises.

Catch :class:`LeaderwatchError` to handle any of them in one place; each
concrete error also keeps its conventional base (``ValueError`` for bad
input, ``RuntimeError`` for a backend that cannot run, ...), so existing
``except ValueError`` clauses keep working.
"""

from __future__ import annotations

__all__ = ["LeaderwatchError"]


class LeaderwatchError(Exception):
    """Base class of every error raised by leaderwatch; messages say what to do."""
