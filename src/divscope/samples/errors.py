"""The one exception type for bad input files."""

from __future__ import annotations


class SampleFileError(ValueError):
    """A sample file (or a pair of them) cannot be used as given.

    The message always names the file, the record (where one is involved) and the fix.
    The CLI turns this error into exit code 2.
    """

    def __init__(
        self,
        path: object,
        problem: str,
        fix: str,
        *,
        record: int | None = None,
        response: int | None = None,
        token: int | None = None,
    ) -> None:
        where = [str(path)]
        if record is not None:
            where.append(f"record {record}")
        if response is not None:
            where.append(f"response {response}")
        if token is not None:
            where.append(f"token {token}")
        self.path = str(path)
        self.record = record
        self.problem = problem
        self.fix = fix
        super().__init__(f"{', '.join(where)}: {problem}. Fix: {fix}")
