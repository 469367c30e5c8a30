"""setup.py's lower bounds and constraints-min.txt (what CI's oldest-versions job installs) stay equal."""
import ast
import os

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO


def _literal(node, names: dict):
    """A string, list or dict literal of setup.py, with `NAME` / `*NAME` of a list assigned above it."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return names[node.id]
    if isinstance(node, ast.List):
        items = []
        for item in node.elts:
            if isinstance(item, ast.Starred):
                items.extend(names[item.value.id])
            else:
                items.append(_literal(item, names))
        return items
    if isinstance(node, ast.Dict):
        return {_literal(k, names): _literal(v, names) for k, v in zip(node.keys, node.values)}
    raise ValueError(ast.dump(node))


def setup_requirements(setup_py: str) -> list[str]:
    """INSTALL_REQUIRES and the `test` extra, read from setup.py's source (setuptools is not run)."""
    with open(setup_py, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                names[node.targets[0].id] = _literal(node.value, names)
            except (ValueError, KeyError):
                pass  # not a literal (HERE, VERSION)
    return names["INSTALL_REQUIRES"] + names["EXTRAS_REQUIRE"]["test"]


def lower_bounds(requirements: list[str]) -> dict[str, str]:
    """{name: version} of each requirement's `>=` bound; a requirement without one is a failure."""
    bounds = {}
    for line in requirements:
        requirement = Requirement(line)
        lower = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        assert len(lower) == 1, f"{line!r} in setup.py has no single lower bound (>=)"
        bounds[canonicalize_name(requirement.name)] = lower[0]
    return bounds


def pins(constraints_txt: str) -> dict[str, str]:
    """{name: version} of a constraints file; every line must be an exact `NAME==VERSION` pin."""
    pinned = {}
    with open(constraints_txt, encoding="utf-8") as f:
        for line in f:
            line = line.split("#")[0].strip()
            if not line:
                continue
            requirement = Requirement(line)
            specs = list(requirement.specifier)
            assert len(specs) == 1 and specs[0].operator == "==", f"{line!r} is not a NAME==VERSION pin"
            pinned[canonicalize_name(requirement.name)] = specs[0].version
    return pinned


def disagreements(setup_py: str, constraints_txt: str) -> list[str]:
    """One line per dependency whose setup.py lower bound and pin differ, or that only one side names."""
    bounds, pinned = lower_bounds(setup_requirements(setup_py)), pins(constraints_txt)
    problems = []
    for name in sorted(set(bounds) | set(pinned)):
        if name not in pinned:
            problems.append(f"{name}: setup.py >={bounds[name]} is not pinned in constraints-min.txt")
        elif name not in bounds:
            problems.append(f"{name}: pinned in constraints-min.txt but not a direct dependency in setup.py")
        elif bounds[name] != pinned[name]:
            problems.append(f"{name}: setup.py >={bounds[name]}, constraints-min.txt =={pinned[name]}")
    return problems


@pytest.mark.smoke
def test_constraints_min_pins_each_direct_dependency_at_its_setup_py_lower_bound():
    problems = disagreements(os.path.join(REPO, "setup.py"), os.path.join(REPO, "constraints-min.txt"))
    assert not problems, "\n".join(problems)
    assert "jax" in pins(os.path.join(REPO, "constraints-min.txt"))  # the files were read, not both empty


def test_a_bound_moved_on_one_side_or_an_extra_pin_is_named(tmp_path):
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        setup_py = f.read()
    with open(os.path.join(REPO, "constraints-min.txt"), encoding="utf-8") as f:
        constraints = f.read()
    numpy = lower_bounds(setup_requirements(os.path.join(REPO, "setup.py")))["numpy"]
    (tmp_path / "setup.py").write_text(setup_py.replace(f'"numpy>={numpy}"', '"numpy>=9.9"'))
    (tmp_path / "constraints-min.txt").write_text(constraints + "protobuf==6.31.1\n")
    assert disagreements(str(tmp_path / "setup.py"), str(tmp_path / "constraints-min.txt")) == [
        f"numpy: setup.py >=9.9, constraints-min.txt =={numpy}",
        "protobuf: pinned in constraints-min.txt but not a direct dependency in setup.py"]


def test_every_package_directory_and_its_data_files_go_into_the_wheel():
    """A folder of modules without __init__.py is left out of a non-editable install by find_packages
    (masksub_jax/data once was); its non-Python files need package_data."""
    import setuptools
    packages = set(setuptools.find_packages(where=REPO, include=["masksub_jax", "masksub_jax.*"]))
    for folder, _, files in os.walk(os.path.join(REPO, "masksub_jax")):
        if "__pycache__" in folder or not any(f.endswith(".py") for f in files):
            continue
        name = os.path.relpath(folder, REPO).replace(os.sep, ".")
        assert name in packages, f"{name} has modules but no __init__.py: a wheel would leave it out"
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        assert 'package_data={"masksub_jax.data": ["*_classes.txt"]}' in f.read()
