"""The single error type of the traces package: a bad input file, key or workload spec.

Messages are one line and name the file and its 1-based line (the header is line 1), e.g.
``azure.csv:17: ContextTokens is not an integer: 'abc'``, or the offending key/argument.
"""

from __future__ import annotations


class TraceError(ValueError):
    """Raised for every malformed trace, unknown format or invalid workload parameter."""
