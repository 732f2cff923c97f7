"""A user's checkout of this repository, and the .env files compose reads."""

import shutil
import subprocess
from pathlib import Path

from tests.stack import REPO_ROOT


def copy_working_tree(destination: Path) -> None:
    """The files a clone would have (tracked ones, and new ones git does not ignore), at `destination`."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source = REPO_ROOT / name.decode()
        if source.is_file():
            target = destination / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=value lines; comments and blank lines skipped."""
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.lstrip().startswith("#"))
