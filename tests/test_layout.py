"""Repository layout and library hygiene (../shared/DESIGN.md, STYLE.md)."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from anygen.hub import bundled_models, card_metadata

REPO = Path(__file__).resolve().parents[1]
LIBRARY_FILES = sorted((REPO / "anygen").rglob("*.py"))
PRINT_ALLOWED = {REPO / "anygen" / "cli.py", REPO / "anygen" / "__main__.py"}


def test_tokenizers_folder_is_files_only():
    folder = REPO / "tokenizers"
    assert folder.is_dir()
    assert not (folder / "__init__.py").exists(), "tokenizers/__init__.py shadows HF tokenizers"
    assert sorted(str(p.relative_to(REPO)) for p in folder.rglob("*.py*")) == []


def test_import_tokenizers_from_repo_root_is_huggingface():
    code = "import tokenizers; print(tokenizers.__file__); print(tokenizers.Tokenizer.__name__)"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    module_file, cls = run.stdout.split()
    assert not Path(module_file).is_relative_to(REPO / "tokenizers")
    assert cls == "Tokenizer"


def test_tests_are_flat():
    assert not (REPO / "tests" / "__init__.py").exists()
    folders = [
        p.name
        for p in (REPO / "tests").iterdir()
        if p.is_dir() and not p.name.startswith((".", "__"))
    ]
    assert folders == [], f"tests/ must be flat, found folders {folders}"


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node


def test_no_print_in_library_code():
    found = [
        f"{path.relative_to(REPO)}:{call.lineno}"
        for path in LIBRARY_FILES
        if path not in PRINT_ALLOWED
        for call in _calls(path)
        if isinstance(call.func, ast.Name) and call.func.id == "print"
    ]
    assert found == [], f"print() in library code (use logging): {found}"


def test_torch_load_always_weights_only():
    def weights_only(call: ast.Call) -> bool:
        return any(
            k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in call.keywords
        )

    found = [
        f"{path.relative_to(REPO)}:{call.lineno}"
        for path in LIBRARY_FILES
        for call in _calls(path)
        if isinstance(call.func, ast.Attribute)
        and call.func.attr == "load"
        and isinstance(call.func.value, ast.Name)
        and call.func.value.id == "torch"
        and not weights_only(call)
    ]
    assert found == [], f"torch.load without weights_only=True: {found}"


def test_every_subpackage_is_packaged():
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in LIBRARY_FILES
        if "__pycache__" not in p.parts
    }
    missing = sorted(on_disk - listed)
    assert missing == [], f"add {missing} to [tool.setuptools] packages in pyproject.toml"
    # and the other way: a listed package with no Python file in it (an empty folder,
    # which git does not keep) breaks the install of a clean clone
    dirs = setuptools.get("package-dir", {})
    empty = sorted(
        name
        for name in listed - on_disk
        if not any((REPO / dirs.get(name, name.replace(".", "/"))).glob("*"))
    )
    assert empty == [], f"{empty} listed in pyproject.toml but have no files"
    assert setuptools["package-dir"]["anygen._tokenizers"] == "tokenizers"


def test_bundled_items_have_cards_and_stay_small():
    items = bundled_models()
    assert "shapes-bpe" in items
    for name, folder in items.items():
        card = card_metadata(folder)
        assert {"recipe", "seed"} <= card.keys(), f"{name}: card lacks recipe or seed"
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        assert size < 25 * 2**20, f"{name} is {size / 2**20:.1f} MiB; keep bundled models small"


def test_bundled_configs_name_no_folder_of_the_machine_that_saved_them():
    leaks = []
    for folder in bundled_models().values():
        for file in folder.rglob("*.json"):
            text = file.read_text()
            if '"_name_or_path"' in text or re.search(r'"/[\w.-]+/[\w.-]+', text):
                leaks.append(str(file.relative_to(REPO)))
    assert leaks == [], f"these bundled files record a local path: {leaks}"
