"""Exceptions raised by collectives.

Every failure of a collective, and of start-up once peers are involved (unreachable,
refused, timed out), is a :class:`CollectiveError`, so that one ``except cc.CollectiveError``
catches them all; the subclasses say what kind of failure it was. Bad arguments and
settings raise ValueError or TypeError before anything is sent.
"""

__all__ = ["CollectiveError", "TimeoutError", "ProtocolVersionError", "AuthenticationError"]


class CollectiveError(RuntimeError):
    """A collective or the start-up of a communicator failed on this or another rank."""


# Shadows the builtin inside this module on purpose: the public name is cc.TimeoutError,
# as in concurrent.futures.TimeoutError, and it is a CollectiveError so that one except
# clause catches every failure of a collective.
class TimeoutError(CollectiveError):  # noqa: A001
    """A peer did not answer, or an operation did not finish, within its deadline."""


class ProtocolVersionError(CollectiveError):
    """A peer speaks another version of the collectives wire protocol."""


class AuthenticationError(CollectiveError):
    """A peer could not prove that it holds this job's secret (or we could not)."""
