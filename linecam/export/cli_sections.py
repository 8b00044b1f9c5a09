"""A click command whose --help lists its options in sections.

``export-engine vlm`` exports a VLM and, with ``--distil-from``, distils one first: one command
because the distilled student leaves through the same export (precisions, agreement check,
bundle), but its 27 options read as one list. Options whose help starts with ``"<Section>: "``
are listed under that section's heading, the prefix dropped; the rest under "Options".
"""

from __future__ import annotations

import click


class SectionedCommand(click.Command):
    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {"Options": []}
        for param in self.get_params(ctx):
            rec = param.get_help_record(ctx)
            if rec is None:
                continue
            name, text = rec
            head, sep, rest = text.partition(": ")
            if sep and head in self.sections:
                sections.setdefault(self.sections[head], []).append((name, rest[:1].upper() + rest[1:]))
            else:
                sections["Options"].append((name, text))
        for title, rows in sections.items():
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    #: help prefix -> section heading
    sections: dict[str, str] = {"Distil": "Distillation options (with --distil-from; --model is then the student)"}
