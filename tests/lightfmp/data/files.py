"""Small data files in the formats Light-FMP reads, written for tests."""

from __future__ import annotations

import textwrap
from pathlib import Path


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding=encoding)
    return path


def criteo_line(label, dense, sparse) -> str:
    return "\t".join([str(label)] + [str(x) for x in dense] + [str(x) for x in sparse])


def ml100k_dir(root: Path) -> Path:
    root.mkdir()
    write(root / "u.data", "1\t10\t5\t100\n2\t10\t3\t300\n1\t20\t4\t200\n3\t20\t1\t50\n")
    write(root / "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n3|17|M|student|1234\n")
    flags_10 = "|".join("1" if i in (1, 5) else "0" for i in range(19))  # Action, Comedy
    flags_20 = "|".join("1" if i == 8 else "0" for i in range(19))  # Drama
    write(
        root / "u.item",
        f"10|Movie A (1995)|01-Jan-1995||http://x|{flags_10}\n20|Movie B (1987)|01-Jan-1987||http://y|{flags_20}\n",
        encoding="latin-1",
    )
    return root


def ml1m_dir(root: Path) -> Path:
    root.mkdir()
    write(root / "ratings.dat", "1::10::5::100\n2::10::3::300\n1::20::4::200\n3::20::1::50\n")
    write(root / "users.dat", "1::M::18::7::85711\n2::F::50::0::94043-123\n3::M::1::10::01234\n")
    write(
        root / "movies.dat",
        "10::Movie A: the sequel (1995)::Action|Comedy\n20::Movie B (1987)::Drama\n",
        encoding="latin-1",
    )
    return root
