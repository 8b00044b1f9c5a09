"""Replace the generated benchmark block of a README (between the bench markers)."""

from __future__ import annotations

from pathlib import Path

from linecam.errors import LinecamError

START = "<!-- bench:start -->"
END = "<!-- bench:end -->"


def replace_block(readme: Path, block: str) -> None:
    """Put ``block`` between :data:`START` and :data:`END` in ``readme`` (markers kept)."""
    if not readme.is_file():
        raise LinecamError(f"{readme} not found: the README with the benchmark markers must exist "
                           f"(add a line '{START}' and a line '{END}' where the table goes)")
    text = readme.read_text(encoding="utf-8")
    i, j = text.find(START), text.find(END)
    if i < 0 or j < 0 or j < i or text.count(START) != 1 or text.count(END) != 1:
        raise LinecamError(f"{readme} needs exactly one '{START}' followed by one '{END}' line "
                           "around the benchmark table: add them, then run this again")
    new = text[: i + len(START)] + "\n" + block.rstrip("\n") + "\n" + text[j:]
    readme.write_text(new, encoding="utf-8")
