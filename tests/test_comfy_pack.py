"""The node pack folder (``comfyui/``) as ComfyUI-Manager and the Comfy Registry take it, checked against
the registry's published specification - docs.comfy.org/registry/specifications (the Comfy-Org/docs
repository's registry/specifications.mdx) and its security standards (registry/standards.mdx) - and
read by the ``COMFYUI`` version's own parser of it (``comfy_config``, kept in step with comfy-cli's
registry types). Runs in `make test-comfy`."""

import ast
import re
import sys
from pathlib import Path

import pytest
import tomllib
from comfy_server import COMFYUI, NODE_PACK, comfyui_version
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

pytestmark = pytest.mark.comfy

ROOT = Path(__file__).resolve().parents[1]
PACK = tomllib.loads((NODE_PACK / "pyproject.toml").read_text())
PACKAGE = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_node_id_follows_the_registrys_rules():
    name = PACK["project"]["name"]
    assert len(name) < 100
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name)  # no leading or doubled specials
    assert "comfyui" not in name.lower()  # the spec's best practice


def test_the_pack_is_the_packages_version_and_requires_exactly_it():
    version = PACK["project"]["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version) and version == PACKAGE["version"]  # semantic X.Y.Z
    assert PACK["project"]["dynamic"] == ["dependencies"]
    assert PACK["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    lines = [line for line in (NODE_PACK / "requirements.txt").read_text().splitlines() if line.strip()]
    requirements = [Requirement(line) for line in lines]
    assert [r.name for r in requirements] == ["fleximmt"]
    assert requirements[0].specifier.contains(version)
    assert PACK["project"]["requires-python"] == PACKAGE["requires-python"]


def test_the_licence_is_a_file_of_the_packages_licence():
    assert PACK["project"]["license"] == {"file": "LICENSE"}  # the spec's file form
    text = (NODE_PACK / "LICENSE").read_text()
    assert PACKAGE["license"] == {"text": "Apache-2.0"}
    assert text.startswith("Apache License\nVersion 2.0, January 2004") and "END OF TERMS AND CONDITIONS" in text


def test_the_registry_fields_are_there_and_the_tested_comfyui_versions_meet_requires_comfyui():
    comfy = PACK["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "FlexiMMT"  # PublisherId: required to publish
    assert PACK["project"]["description"]
    assert PACK["project"]["classifiers"] == ["Operating System :: OS Independent"]
    supported = SpecifierSet(comfy["requires-comfyui"])
    assert supported.contains(Version("0.33.0")) and supported.contains(Version("0.3.64"))
    assert "Icon" not in comfy  # optional; the pack has none (an icon is a URL, SVG/PNG/JPG/GIF, 800 x 400 at most)


def test_comfyuis_own_parser_reads_the_pack(monkeypatch):
    monkeypatch.syspath_prepend(str(COMFYUI))
    for module in [m for m in sys.modules if m == "comfy_config" or m.startswith("comfy_config.")]:
        monkeypatch.delitem(sys.modules, module)
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(NODE_PACK))
    assert config.project.name == "fleximmt" and config.project.version == PACKAGE["version"]
    assert config.project.license.file == "LICENSE" and config.project.supported_os == ["OS Independent"]
    assert config.tool_comfy.publisher_id == PACK["tool"]["comfy"]["PublisherId"]
    assert config.tool_comfy.display_name == "FlexiMMT"
    assert config.project.supported_comfyui_version == PACK["tool"]["comfy"]["requires-comfyui"]
    assert SpecifierSet(config.project.supported_comfyui_version).contains(
        Version(".".join(map(str, comfyui_version(COMFYUI))))
    )


def test_no_eval_exec_nor_subprocess_in_the_pack_or_its_nodes():
    """The registry's security standards: no eval/exec, no package installs at run time (nothing
    starts a process)."""
    sources = [*NODE_PACK.rglob("*.py"), *(ROOT / "src" / "fleximmt" / "apps" / "comfy").rglob("*.py")]
    for path in sources:
        tree = ast.parse(path.read_text())
        nodes = list(ast.walk(tree))
        calls = {n.func.id for n in nodes if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        imported = {alias.name for n in nodes if isinstance(n, ast.Import) for alias in n.names}
        imported |= {n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.module}
        assert not calls & {"eval", "exec"} and not imported & {"subprocess", "pip"}, path


def test_the_server_loads_the_pack_with_its_frontend_extension(comfy_server):
    import urllib.request

    assert "/extensions/fleximmt/fleximmt.js" in comfy_server.get("/extensions")
    with urllib.request.urlopen(f"{comfy_server.url}/extensions/fleximmt/fleximmt.js") as response:
        assert b"FlexiMMT.MotionInfo" in response.read()
