"""The ``rankcut`` command line: one module per subcommand (``compress``, ``eval``, ``analyze``, ``sweep``,
``recover``, ``bench``, ``generate``), each parsing its flags and calling the Python API; the output it prints
or writes comes from :mod:`rankcut.report`.

Errors: the API's ValueError (and OSError) becomes ``rankcut: error: …`` and exit code 2, its wording turned
into the command line's by :func:`cli_message`; Ctrl-C anywhere becomes ``rankcut: interrupted; …`` and exit
code 130. This module imports only the standard library at import time: the subcommands are imported inside
:func:`main`'s error handling.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys

#: The subcommand modules of this package, in the order ``rankcut --help`` lists them.
SUBCOMMANDS = ("compress", "evaluate", "analyze", "sensitivity", "search", "sweep", "recover", "bench", "generate")


class CLIError(ValueError):
    """A bad combination of flags that only the command line can see."""


#: API wording -> command-line wording, applied in order (the API names Python keywords; the CLI, its flags).
PHRASES = [
    ("distillation (distill > 0) needs the dense model as teacher (dense=...)", "--distill needs --dense MODEL"),
    ("residual init of mode grow needs the dense model (dense=...)", "--mode grow --init residual needs --dense MODEL"),
    ("mode factors needs PEFT", "--mode factors needs PEFT"),
    ("(or use mode grow)", "(or use --mode grow)"),
    ("need calibration data (calib=...)", "need --calib TEXT"),
    ("needs calibration data (calib=...)", "needs --calib TEXT"),
    ("at least one perplexity text (ppl=...)", "at least one --ppl TEXT"),
    ("(pass tokenizer= or token ids)", "(the model has no tokenizer)"),
    ("pass restart (--restart)", "pass --restart"),
    ("pass overwrite=True (--overwrite)", "pass --overwrite"),
    ("pass overwrite=True", "pass --overwrite"),
]


def cli_message(text: str, flags: dict[str, str] | None = None) -> str:
    """An API error message in the command line's words: the phrases of :data:`PHRASES`; any remaining
    ``name=...`` / ``name=True`` / ``name (--flag)`` naming a flag of this subcommand becomes the flag; a message
    that opens with a setting's name (``max_windows must be >= 1``) is prefixed with its flag."""
    flags = flags or {}
    for api, cli in PHRASES:
        text = text.replace(api, cli)

    def doubled(m: re.Match) -> str:  # "restart (--restart)" -> "--restart"
        return m.group(2) if flags.get(m.group(1)) == m.group(2) else m.group(0)

    def keyword(m: re.Match) -> str:  # "dense=..." / "overwrite=True" -> "--dense" / "--overwrite"
        return flags.get(m.group(1), m.group(0))

    text = re.sub(r"\b(\w+) \((--[\w-]+)\)", doubled, text)
    text = re.sub(r"\b(\w+)=(?:\.\.\.|True)", keyword, text)
    text = re.sub(r"option\(s\) ([\w, ]+?) apply to none",
                  lambda m: f"option(s) {', '.join(flags.get(n, n) for n in m.group(1).split(', '))} apply to none",
                  text)
    lead = re.match(r"(\w+) must\b", text)
    if lead and lead.group(1) in flags:
        text = f"{flags[lead.group(1)]}: {text}"
    return text


def flag_map(parser: argparse.ArgumentParser) -> dict[str, str]:
    """``dest -> --flag`` of a (sub)parser's options."""
    return {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (imports the subcommand modules and, through them, the API)."""
    import importlib

    from rankcut import __version__

    parser = argparse.ArgumentParser(prog="rankcut", description="Low-rank compression of transformer models")
    parser.add_argument("--version", action="version", version=f"rankcut {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"rankcut.cli.{name}")
        p = module.add_parser(sub)
        p.set_defaults(run=module.run, flags=flag_map(p))
    return parser


def close_progress_bars() -> None:
    """Close every open tqdm bar (innermost first), so that a message after an interruption or error starts on
    a line of its own rather than at the end of a half-drawn bar."""
    tqdm = sys.modules.get("tqdm.std")
    if tqdm is None:
        return
    bars = sorted(list(getattr(tqdm.tqdm, "_instances", [])), key=lambda bar: -abs(getattr(bar, "pos", 0)))
    for bar in bars:
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot be closed must not hide the message
            pass


class _Quiet:
    """``--quiet``: transformers' progress bars (its "Loading weights" bar) and the ``rankcut.cost`` decode-speed
    warning off for the run, restored afterwards (main may run many times in one process)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.bars, self.level = quiet, False, None

    def __enter__(self):
        if self.quiet:
            from transformers.utils import logging as hf_logging

            cost = logging.getLogger("rankcut.cost")
            self.level = cost.level
            cost.setLevel(logging.ERROR)
            self.bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc) -> None:
        if self.quiet:
            from transformers.utils import logging as hf_logging

            logging.getLogger("rankcut.cost").setLevel(self.level)
            if self.bars:
                hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, 2 for bad input, 130 when interrupted). ``--help``,
    ``--version`` and argparse's own errors exit through SystemExit as usual."""
    args = None
    try:
        logging.basicConfig(level=logging.WARNING, format="rankcut: %(levelname)s: %(message)s")
        parser = build_parser()
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        with _Quiet(args.quiet):
            return args.run(args)
    except KeyboardInterrupt:
        close_progress_bars()
        note = getattr(args, "interrupted", None) or "nothing was saved"
        print(f"rankcut: interrupted; {note}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        close_progress_bars()
        print(f"rankcut: error: {cli_message(str(err), getattr(args, 'flags', None))}", file=sys.stderr)
        return 2
