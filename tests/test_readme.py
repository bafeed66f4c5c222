"""README.md's commands are the ones CI runs and the CLI accepts."""

import re
from pathlib import Path

from rankcut.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    blocks = _bash_blocks()
    assert len(blocks) >= 2
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert blocks[1].strip() == ci.strip()


def test_readme_main_command_uses_existing_flags():
    main = _bash_blocks()[0]
    parser = build_parser()
    for part in main.split("&&"):
        part = part.strip()
        if not part.startswith("rankcut "):
            continue
        argv = [a.strip('"') for a in part.split()[1:]]
        argv = [a.replace("$MODEL", "m").replace("$CALIB", "c").replace("$TEXT", "t") for a in argv]
        parser.parse_args(argv)  # raises SystemExit on an unknown flag
