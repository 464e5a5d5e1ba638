"""Read the grade of each subject from the release's ``name_mapping.csv`` or a user's ``subject_id,grade`` table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from medsegdiff_monai.data.layout import GRADE_COLUMN, GRADE_TO_INDEX, SUBJECT_ID_COLUMN

GRADE_TABLE_COLUMNS: tuple[tuple[str, str], ...] = ((SUBJECT_ID_COLUMN, GRADE_COLUMN), ("subject_id", "grade"))
"""The (subject id, grade) column pairs a grade table may have: BraTS 2020's ``name_mapping.csv``, or a table of
one's own (e.g. for BraTS 2021 or 2023, which ship none; the ``grades.csv`` written by inference has this form)."""

__all__ = ["NameMapping", "parse_name_mapping", "read_name_mapping"]


@dataclass
class NameMapping:
    """Grades parsed from ``name_mapping.csv``.

    Attributes:
        grades: subject id -> grade index (LGG 0, HGG 1), for the valid rows.
        problems: problems with the table itself (missing file or column, a row without subject id).
        row_problems: subject id -> message, for rows with an unknown grade or a repeated subject id.
    """

    grades: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    row_problems: dict[str, str] = field(default_factory=dict)

    def all_problems(self) -> list[str]:
        """Table problems followed by row problems."""
        return self.problems + list(self.row_problems.values())


def parse_name_mapping(csv_path: str | Path) -> NameMapping:
    """Parse a grade table by column name (pandas), collecting every problem instead of stopping at the first.

    The columns used are ``BraTS_2020_subject_ID`` and ``Grade`` (the release's ``name_mapping.csv``; the older-ID
    columns may be empty or absent) or else ``subject_id`` and ``grade`` (a table of one's own). Grades are ``HGG``
    or ``LGG`` (surrounding spaces ignored).

    Args:
        csv_path: path of the CSV file.

    Returns:
        the grades of the valid rows and the problems found.
    """
    path = Path(csv_path)
    if not path.is_file():
        return NameMapping(problems=[f"grade table {path} not found: expected the release's name_mapping.csv."])
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as error:
        return NameMapping(problems=[f"grade table {path} cannot be read as CSV: {error}"])

    table.columns = [str(c).strip() for c in table.columns]
    pairs = [pair for pair in GRADE_TABLE_COLUMNS if set(pair) <= set(table.columns)]
    if not pairs:
        missing = [c for c in GRADE_TABLE_COLUMNS[0] if c not in table.columns]
        return NameMapping(
            problems=[
                f"grade table {path} has no column {', '.join(missing)}: expected columns "
                + " or ".join(f"{a} and {b}" for a, b in GRADE_TABLE_COLUMNS)
                + f", found {list(table.columns)}."
            ]
        )
    id_column, grade_column = pairs[0]

    mapping = NameMapping()
    for row_number, (subject_id, grade) in enumerate(
        zip(table[id_column].str.strip(), table[grade_column].str.strip(), strict=True), start=2
    ):
        if not subject_id:
            mapping.problems.append(f"grade table {path}, line {row_number}: empty {id_column}.")
        elif subject_id in mapping.grades or subject_id in mapping.row_problems:
            mapping.grades.pop(subject_id, None)
            mapping.row_problems[subject_id] = f"subject {subject_id}: listed more than once in {path}."
        elif grade not in GRADE_TO_INDEX:
            mapping.row_problems[subject_id] = (
                f"subject {subject_id}: unknown Grade '{grade}' in {path} (line {row_number}): expected HGG or LGG."
            )
        else:
            mapping.grades[subject_id] = GRADE_TO_INDEX[grade]
    return mapping


def read_name_mapping(csv_path: str | Path) -> dict[str, int]:
    """Grades of all subjects of ``name_mapping.csv``.

    Args:
        csv_path: path of the CSV file.

    Returns:
        subject id -> grade index (LGG 0, HGG 1).

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: listing every problem when a column is missing or a row is bad.
    """
    if not Path(csv_path).is_file():
        raise FileNotFoundError(f"grade table {csv_path} not found: expected the release's name_mapping.csv.")
    mapping = parse_name_mapping(csv_path)
    if mapping.all_problems():
        raise ValueError("\n".join(mapping.all_problems()))
    return mapping.grades
