"""Where the project is, found as pulumi finds it: the first folder from the current directory
upwards that holds a Pulumi.yaml. Its ``stackConfigDir`` (default: that folder) holds the stack
files, and the local state lives beside it in ``.infermesh/<stack>/``.

So an `infermesh` installed from one checkout works on the stacks of the checkout, worktree or
copy it is run in, never on its install location's. ``INFERMESH_PROJECT`` names the folder
instead; with no Pulumi.yaml above the current directory, the install's own checkout is used.

This module imports nothing of the project's: the spec, the paths and the CLI all build on it.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

INSTALL_ROOT = Path(__file__).resolve().parent.parent
MAX_PROJECT_FILE = 64 * 1024


class ProjectError(ValueError):
    """A Pulumi.yaml that cannot be read (one line, for the CLI)."""


def root(start: Path | None = None) -> Path:
    env = os.environ.get("INFERMESH_PROJECT")
    if env:
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "Pulumi.yaml").is_file():
            return folder
    return INSTALL_ROOT


def stacks_dir(project: Path | None = None) -> Path:
    """The project's stackConfigDir (pulumi's setting; the project folder when absent)."""
    project = project or root()
    path = project / "Pulumi.yaml"
    if not path.is_file():
        return project / "stacks"
    try:
        raw = path.read_bytes()[:MAX_PROJECT_FILE + 1]
        if len(raw) > MAX_PROJECT_FILE:
            raise ProjectError(f"{path}: larger than {MAX_PROJECT_FILE} bytes")
        doc = yaml.safe_load(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ProjectError(f"{path}: not a readable Pulumi project file ({type(e).__name__})") from None
    configured = doc.get("stackConfigDir") if isinstance(doc, dict) else None
    return project / configured if isinstance(configured, str) and configured else project


def state_root(project: Path | None = None) -> Path:
    return (project or root()) / ".infermesh"
