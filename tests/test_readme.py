"""The README and docs/ pages name only what exists: every link, repository path and `python -m` module."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# top-level names of the repository: a backticked token starting with one of them is a path in it
TOP_LEVEL = ("train.py", "config/", "guidance/", "gaussian_renderer/", "scene/", "utils/", "training/",
             "evaluation/", "export/", "tests/", "bench/", "submodules/", "docs/", "requirements.txt")
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\s]+)`")
MODULE = re.compile(r"python3? -m ([A-Za-z_][\w.]*)")


def _repo_path(token: str) -> str | None:
    """The repository path a backticked token names (without a `:function` or `::test` suffix), or None."""
    if not token.startswith(TOP_LEVEL) or any(ch in token for ch in "=*<>{}$"):
        return None
    path = token.split("::")[0].split(":")[0].rstrip(".,;)")
    last = path.rstrip("/").rsplit("/", 1)[-1]
    # a file has a suffix, a folder a trailing slash; anything else (`scene/gaussians`) is a tag, not a path
    return path if path.endswith("/") or "." in last else None


def _module_exists(module: str) -> bool:
    base = REPO.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_path_a_page_names_exists(page):
    text = page.read_text()
    missing = []
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        if not (page.parent / target.split("#")[0]).exists():
            missing.append(f"link {target}")
    for token in CODE.findall(text):
        path = _repo_path(token)
        if path is not None and not (REPO / path).exists():
            missing.append(f"path {token}")
    for module in MODULE.findall(text):
        if module.split(".")[0] in {"pip", "venv", "pytest", "http"}:
            continue
        if not _module_exists(module):
            missing.append(f"module {module}")
    assert not missing, f"{page.relative_to(REPO)} names what does not exist: {missing}"


def test_the_readme_is_the_map():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for must in ("pip install -r requirements.txt", "python train.py --opt config/bagel.yaml --guidance_type sctd "
                 "--phase_num 5 --num_ddim_timesteps 50 --guid_scale 7.5", "config/demo.yaml",
                 "guidance/losses/sctd.py", "Eq. 9", "Eq. 10", "Eq. 11", "Algorithm 1"):
        assert must in readme, must
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme, f"README does not link docs/{page.name}"


def test_the_check_can_fail(tmp_path):
    assert _repo_path("training/no_such_file.py") == "training/no_such_file.py"
    assert not (REPO / "training/no_such_file.py").exists()
    assert _repo_path("guidance/losses/sctd.py:SCTDLoss.direction") == "guidance/losses/sctd.py"
    assert _repo_path("outputs/run") is None and _repo_path("scene/gaussians") is None
    assert not _module_exists("training.no_such_module") and _module_exists("training.sweep")
