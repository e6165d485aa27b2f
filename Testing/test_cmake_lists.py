"""The extension's packaging: Slicer installs only what the CMake lists name.

A Python file of ``pclseg/`` or a resource a module loads that is missing from
``MODULE_PYTHON_SCRIPTS`` / ``MODULE_PYTHON_RESOURCES`` works in a source checkout and breaks
in the Extension Manager build, so these tests read the lists the way CMake does.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = ("PCLPretrain", "PCLSegment")
LIBRARY = REPO / "PCLSegment" / "pclseg"


def strip_comments(text: str) -> str:
    """CMake source without ``#`` comments (a ``#`` inside a quoted argument is kept)."""
    return re.sub(r'("[^"]*")|#[^\n]*', lambda m: m.group(1) or "", text)


def cmake_commands(text: str) -> list[tuple[str, list[str]]]:
    """``(command, arguments)`` of every command call, comments stripped, quotes kept out."""
    text = strip_comments(text)
    commands = []
    for match in re.finditer(r"(\w+)\s*\((.*?)\)", text, flags=re.S):
        args = re.findall(r'"[^"]*"|[^\s"]+', match.group(2))
        commands.append((match.group(1).lower(), [a.strip('"') for a in args]))
    return commands


def cmake_variables(path: Path) -> dict[str, list[str]]:
    """The ``set(NAME values...)`` of a CMake file, ``${VAR}`` expanded."""
    variables: dict[str, list[str]] = {}
    for command, args in cmake_commands(path.read_text()):
        if command == "set" and args:
            values = [
                re.sub(r"\$\{(\w+)\}", lambda m: " ".join(variables.get(m.group(1), [])), a)
                for a in args[1:]
            ]
            variables[args[0]] = values
    return variables


@pytest.fixture(scope="module")
def module_lists() -> dict[str, dict[str, list[str]]]:
    """Each module's CMake variables."""
    return {name: cmake_variables(REPO / name / "CMakeLists.txt") for name in MODULES}


@pytest.fixture(scope="module")
def extension_variables() -> dict[str, list[str]]:
    return cmake_variables(REPO / "CMakeLists.txt")


def test_cmake_parser_reads_sets_and_expands_variables(tmp_path: Path) -> None:
    cmake = tmp_path / "CMakeLists.txt"
    cmake.write_text('set(A x) # set(B no)\nset(LIST\n  ${A}.py\n  "b c"\n  "u#v" # w\n  )\n')
    assert cmake_variables(cmake) == {"A": ["x"], "LIST": ["x.py", "b c", "u#v"]}


@pytest.mark.parametrize("module", MODULES)
def test_every_listed_file_exists(module: str, module_lists: dict) -> None:
    listed = (
        module_lists[module]["MODULE_PYTHON_SCRIPTS"]
        + module_lists[module]["MODULE_PYTHON_RESOURCES"]
    )
    missing = [f for f in listed if not (REPO / module / f).is_file()]
    assert not missing, f"{module}/CMakeLists.txt lists files that do not exist: {missing}"


def test_every_library_file_is_installed_with_pcl_segment(module_lists: dict) -> None:
    scripts = set(module_lists["PCLSegment"]["MODULE_PYTHON_SCRIPTS"])
    resources = set(module_lists["PCLSegment"]["MODULE_PYTHON_RESOURCES"])
    python = {
        p.relative_to(REPO / "PCLSegment").as_posix()
        for p in LIBRARY.rglob("*.py")
        if "__pycache__" not in p.parts
    }
    data = {
        p.relative_to(REPO / "PCLSegment").as_posix()
        for p in LIBRARY.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    }
    assert sorted(python - scripts) == [], "add these to MODULE_PYTHON_SCRIPTS of PCLSegment"
    assert sorted(data - resources) == [], "add these to MODULE_PYTHON_RESOURCES of PCLSegment"


@pytest.mark.parametrize("module", MODULES)
def test_module_file_icon_and_ui_are_listed(module: str, module_lists: dict) -> None:
    lists = module_lists[module]
    assert f"{module}.py" in lists["MODULE_PYTHON_SCRIPTS"]
    # Slicer shows Resources/Icons/<Module>.png in the module list; the modules load their .ui.
    assert f"Resources/Icons/{module}.png" in lists["MODULE_PYTHON_RESOURCES"]
    assert f"Resources/UI/{module}.ui" in lists["MODULE_PYTHON_RESOURCES"]


@pytest.mark.parametrize("module", MODULES)
def test_every_resource_the_module_loads_is_listed(module: str, module_lists: dict) -> None:
    source = (REPO / module / f"{module}.py").read_text()
    used = {f"Resources/{p}" for p in re.findall(r'resourcePath\(\s*"([^"]+)"', source)}
    assert used, f"{module}.py loads no resource; the check would be vacuous"
    assert sorted(used - set(module_lists[module]["MODULE_PYTHON_RESOURCES"])) == []


@pytest.mark.parametrize("module", MODULES)
def test_every_pclseg_module_a_slicer_module_imports_is_installed(
    module: str, module_lists: dict
) -> None:
    tree = ast.parse((REPO / module / f"{module}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pclseg"):
            imported.add(node.module)
            imported.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names if a.name.startswith("pclseg"))
    files = {f"pclseg/{m.split('.', 1)[1].replace('.', '/')}.py" for m in imported if "." in m}
    files = {f for f in files if (REPO / "PCLSegment" / f).is_file()}  # names, not modules
    assert files, f"{module}.py imports nothing from pclseg; the check would be vacuous"
    assert sorted(files - set(module_lists["PCLSegment"]["MODULE_PYTHON_SCRIPTS"])) == []


def test_extension_metadata(extension_variables: dict) -> None:
    v = extension_variables
    for name in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
    ):
        assert v.get(name) and all(v[name]), f"{name} is not set"
    assert v["EXTENSION_CATEGORY"] == ["Segmentation"]
    assert "PyTorch" in v["EXTENSION_DEPENDS"]


def test_extension_builds_each_module_and_packages(extension_variables: dict) -> None:
    commands = cmake_commands((REPO / "CMakeLists.txt").read_text())
    subdirectories = [args[0] for command, args in commands if command == "add_subdirectory"]
    assert sorted(subdirectories) == sorted(MODULES)
    includes = [args[0] for command, args in commands if command == "include"]
    assert "${Slicer_EXTENSION_CPACK}" in includes


def test_icon_and_screenshot_urls_point_at_files_in_the_repository(
    extension_variables: dict,
) -> None:
    urls = (
        extension_variables["EXTENSION_ICONURL"] + extension_variables["EXTENSION_SCREENSHOTURLS"]
    )
    for url in urls:
        relative = re.sub(r"^https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/", "", url)
        assert relative != url, f"{url} is not a raw file URL"
        assert (REPO / relative).is_file(), f"{url} names {relative}, which does not exist"


def test_catalog_entry_follows_the_schema(extension_variables: dict) -> None:
    entry = json.loads((REPO / "PCLSegment.json").read_text())
    allowed = {
        "$schema",
        "category",
        "scm_url",
        "scm_revision",
        "scm_type",
        "build_dependencies",
        "dicom_support_rule",
        "build_subdirectory",
        "enabled",
        "tier",
    }
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert set(entry) <= allowed
    assert entry["$schema"].startswith(
        "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v"
    )
    assert entry["category"] == extension_variables["EXTENSION_CATEGORY"][0]
    assert set(extension_variables["EXTENSION_DEPENDS"]) <= set(entry["build_dependencies"])
    assert 1 <= entry.get("tier", 1) <= 5
    homepage = extension_variables["EXTENSION_HOMEPAGE"][0]
    assert homepage.startswith(entry["scm_url"])


def test_license_is_apache_2() -> None:
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
