"""How to install what is missing. hf-ptq is not published on the package index yet, so every hint names the
install from a checkout; change these two lines, and only these, when it is."""

from __future__ import annotations

UPGRADE = "upgrade hf-ptq (update your hf_ptq checkout and reinstall it: git pull && pip install -e .)"


def extra_install(extra: str) -> str:
    """The command that installs hf_ptq's optional `extra` (e.g. "hqq", "plot")."""
    return f'pip install -e ".[{extra}]" in your hf_ptq checkout'
