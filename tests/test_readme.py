"""README.md is what users run: CI runs its test command verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def shell_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command():
    blocks = shell_blocks((ROOT / "README.md").read_text())
    test_command = next(b for b in blocks if "pytest" in b)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_readme_names_the_default_job_command():
    blocks = shell_blocks((ROOT / "README.md").read_text())
    assert any(b.endswith("pipetrain train") and "pip install" in b for b in blocks)
