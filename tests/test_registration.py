"""A model family is its adapter module, its tiny components and one registration line in
``fleximmt/models/__init__.py``: everything else that names the families is derived from the registrations
(``SUPPORTED``, ``REGISTRY``, ``fleximmt``'s lazy exports and ``__all__``, the command line's help, ComfyUI's
model list, the contract suite's table from the rows each family's tiny module declares, the benchmarks' models and
memory.py's figures), and what Wan, HunyuanVideo 1.5 and LTX-2 share lives once in ``models/shared.py``."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fleximmt
from fleximmt.models import FAMILIES, REGISTRY, SUPPORTED, adapters, pipeline_class
from fleximmt.toy.contract import contract_rows

SRC = Path(fleximmt.__file__).parent
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# a fifth family registered by one line: its module (Wan's adapter under another family name) and the line
PROBE_MODULE = """
from fleximmt.models.wan import FlexiMMTWanPipeline, WanAdapter


class ProbeAdapter(WanAdapter):
    family = "probe"
    stated_defaults = {"num_frames": 33, "height": 272}
    true_sizes = {"probe-14b": WanAdapter.true_sizes["wan2.1"]}


class FlexiMMTProbePipeline(FlexiMMTWanPipeline):
    adapter_class = ProbeAdapter
"""
PROBE_LINE = (
    'register_family(Family("Probe", "probe", "probe", "FlexiMMTProbePipeline", ("ProbeImageToVideoPipeline",)))'
)
# the probe family's tiny components module (``toy/tiny_<module>.py``): one contract row, on Wan's tiny components
PROBE_TINY_MODULE = """
from fleximmt.toy.contract import ContractRow
from fleximmt.toy.tiny import tiny_wan_components

CONTRACT_ROWS = (
    ContractRow(
        "probe-1",
        lambda: tiny_wan_components(0, "2.1"),
        size=(64, 64, 9),
        call=dict(num_inference_steps=2, max_sequence_length=24),
        scale=30.0,
    ),
)
"""
# run first in a fresh interpreter: fleximmt.models is served with its own source plus PROBE_LINE, and the probe
# family's modules join fleximmt.models and fleximmt.toy, before any import
ONE_MORE_LINE = """
import ast, importlib.abc, importlib.machinery, json, sys, types
from pathlib import Path

folder, line = sys.argv[1:3]


class OneMoreLine(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name not in ("fleximmt.models", "fleximmt.toy"):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        spec.submodule_search_locations.append(folder)  # where the probe family's modules lie
        if name == "fleximmt.models":
            spec.loader = self
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):  # the line goes after the registrations already there
        source = Path(module.__spec__.origin).read_text().splitlines()
        last = max(n.end_lineno for n in ast.parse("\\n".join(source)).body if "register_family(" in ast.unparse(n))
        source.insert(last, line)
        exec(compile("\\n".join(source), module.__spec__.origin, "exec"), module.__dict__)


sys.meta_path.insert(0, OneMoreLine())
"""
# what the places that name the families show, written to a JSON file
PROBE_RUN = (
    ONE_MORE_LINE
    + """
out, models, comfyui, benchmarks = sys.argv[3:7]
import fleximmt
from fleximmt.apps.cli import build_parser
from fleximmt.models import REGISTRY, SUPPORTED, family_name, pipeline_class

parser = build_parser()
help_of = lambda command: " ".join(parser._subparsers._group_actions[0].choices[command].format_help().split())
seen = {
    "supported": SUPPORTED,
    "all": fleximmt.__all__,
    "export": fleximmt.FlexiMMTProbePipeline.adapter_class.family,
    "registry": pipeline_class("ProbeImageToVideoPipeline").__name__,
    "name": family_name("probe"),
    "display": fleximmt.FlexiMMTProbePipeline.adapter_class.display_name,
    "generate_help": help_of("generate"),
}
sys.path.insert(0, benchmarks)  # the benchmarks' --model choices (parsers built, no model run)
import block, gpu, memory

choices = lambda parser: next(a for a in parser._actions if a.dest == "model").choices
seen["bench_models"] = {name: choices(m.build_parser()) for name, m in (("block", block), ("gpu", gpu), ("memory", memory))}
seen["bench_family"] = gpu.CHECKPOINTS["probe-14b"][0].family
# memory.py counts the probe's checkpoint (its tiny config: a dry run) with no line naming the family
seen["memory"] = memory.main(["--model", "probe-14b", "--tiny", "--tokens", "8"])
if comfyui:  # the node pack's V3 nodes, from ComfyUI's source (comfy_api)
    sys.path.insert(0, comfyui)
    folder_paths = types.ModuleType("folder_paths")  # ComfyUI's, as the Load FlexiMMT model node reads it
    folder_paths.get_folder_paths = lambda kind: [models] if kind == "diffusers" else []
    sys.modules["folder_paths"] = folder_paths
    from fleximmt.apps.comfy import nodes

    seen["comfy_models"] = nodes.model_folders()
    seen["comfy_description"] = nodes.LoadModel.define_schema().description
Path(out).write_text(json.dumps(seen))
"""
)
# the contract suite's test ids, collected only (no test runs)
PROBE_COLLECT = (
    ONE_MORE_LINE
    + """
import pytest

sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", sys.argv[3]]))
"""
)


def run_probe(tmp_path, script: str, *arguments: str) -> str:
    """Run ``script`` in a fresh interpreter with the probe family registered by its one line (its modules in
    ``tmp_path``); its standard output."""
    (tmp_path / "probe.py").write_text(PROBE_MODULE)
    (tmp_path / "tiny_probe.py").write_text(PROBE_TINY_MODULE)
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), PROBE_LINE, *arguments],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    return run.stdout


def probe(tmp_path, comfyui: str = "") -> dict:
    """What the places that name the families show with the probe family registered by its one line (``comfyui``:
    ComfyUI's source folder, to read the node pack's nodes too)."""
    models = tmp_path / "diffusers"
    for name, cls in (("probe-model", "ProbeImageToVideoPipeline"), ("other", "StableDiffusionPipeline")):
        (models / name).mkdir(parents=True)
        (models / name / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    out = tmp_path / "seen.json"
    run_probe(tmp_path, PROBE_RUN, str(out), str(models), comfyui, str(BENCHMARKS))
    return json.loads(out.read_text())


def test_a_family_registered_by_one_line_reaches_every_place_that_names_the_families(tmp_path):
    seen = probe(tmp_path)
    assert seen["supported"] == "CogVideoX, Wan, HunyuanVideo 1.5, LTX-2 or Probe"
    assert seen["all"][-1] == "FlexiMMTProbePipeline" and seen["export"] == "probe"
    assert seen["registry"] == "FlexiMMTProbePipeline"
    assert seen["name"] == seen["display"] == "Probe image-to-video"
    assert (
        "121 for HunyuanVideo 1.5, 121 for LTX-2, 33 for Probe" in seen["generate_help"]
    )  # --frames: the adapter's default
    assert (
        "the image's aspect bucket for HunyuanVideo 1.5, 512 for LTX-2, 272 for Probe)" in seen["generate_help"]
    )  # --height
    assert (
        "the image's aspect bucket for HunyuanVideo 1.5, 768 for LTX-2, 832 for Probe)" in seen["generate_help"]
    )  # --width
    # the benchmarks' models: the probe's true size (declared in its module) beside every other family's
    assert all("probe-14b" in models for models in seen["bench_models"].values())
    assert all({"5b", "wan2.1", "hunyuan1.5", "ltx2"} < set(models) for models in seen["bench_models"].values())
    assert seen["bench_family"] == "probe"
    (report,) = seen["memory"]["probe"]
    assert report["model"] == "probe-14b" and report["peaks_gib"]["step_flexi"] > report["peaks_gib"]["step_plain"] > 0


def test_a_family_registered_by_one_line_gets_the_contract_suites_tests_from_its_tiny_module(tmp_path):
    """The probe's tiny module declares one row, made as wan-2.1's (Wan's adapter, default flags): the contract
    suite, collected with no edit to it, gives that row every test it gives wan-2.1, after the registered rows."""
    ids = run_probe(tmp_path, PROBE_COLLECT, str(Path(__file__).parent / "test_contract.py")).split()
    ids = [i for i in ids if i.startswith("tests/test_contract.py::")]
    probe_ids = {i for i in ids if "probe-1" in i}
    assert probe_ids and probe_ids == {i.replace("wan-2.1", "probe-1") for i in ids if "wan-2.1" in i}
    signature = "tests/test_contract.py::test_call_signature_is_diffusers_own_then_fleximmt_keywords["
    rows = [i.removeprefix(signature).removesuffix("]") for i in ids if i.startswith(signature)]
    assert rows == [*(row.name for row in contract_rows()), "probe-1"]


@pytest.mark.comfy
def test_a_family_registered_by_one_line_reaches_comfyuis_model_list(tmp_path):
    from comfy_server import COMFYUI

    seen = probe(tmp_path, str(COMFYUI))
    assert seen["comfy_models"] == ["probe-model"]
    assert "HunyuanVideo 1.5, LTX-2 or Probe image-to-video" in seen["comfy_description"]


def test_each_registration_agrees_with_its_adapter_module():
    for family, adapter_cls in zip(FAMILIES.values(), adapters()):
        assert adapter_cls.family == family.family
        assert adapter_cls.__module__ == f"fleximmt.models.{family.module}"
        assert adapter_cls.pipeline_class.__name__ in family.diffusers
        assert pipeline_class(family.pipeline).__name__ == family.pipeline
        assert all(REGISTRY[name] == (family.module, family.pipeline) for name in family.diffusers)
    assert SUPPORTED == "CogVideoX, Wan, HunyuanVideo 1.5 or LTX-2"


def test_every_registered_family_declares_rows_of_the_contract_suite():
    """Each registration's tiny components module (``toy/tiny_<module>.py``) gives the contract suite at least
    one row, named once across the table."""
    rows = contract_rows()
    assert [family for family in FAMILIES if any(row.family == family for row in rows)] == list(FAMILIES)
    assert len({row.name for row in rows}) == len(rows)
    assert all(row.ours.adapter_class.family == row.family for row in rows)


def code_names(path: Path) -> set[str]:
    """Every module a file imports (resolved) and every name and string its code holds (docstrings left out)."""
    tree = ast.parse(path.read_text())
    package = list(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            found.add(".".join([*base, *([node.module] if node.module else [])]))
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.add(node.value)
    return found


def test_no_code_outside_a_family_names_its_module_or_pipeline():
    """Only a family's own module, its registration line and its tiny components (``toy/``) name its module
    or its FlexiMMT pipeline class in code; ComfyUI's native patch finds each family's adapter by its
    registration (``models.adapter_class``)."""
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.parts[0] == "toy" or rel == Path("models", "__init__.py"):
            continue
        names = code_names(path)
        for family in FAMILIES.values():
            if rel == Path("models", f"{family.module}.py"):
                continue
            named = {f"fleximmt.models.{family.module}", family.pipeline} & names
            wrong += [f"{rel}: {name}" for name in sorted(named)]
    assert wrong == []


def test_what_wan_hunyuanvideo_15_and_ltx2_share_is_written_once():
    models = SRC / "models"
    pieces = {
        "class StateSlot": 1,
        "def slot_of": 1,
        "def training_attached": 1,
        "def sample_sigma": 1,
        "FEATURE_SHARE =": 1,
        "0.7": 1,  # the share as a number anywhere but a keyword's value (CogVideoX's VAE scaling_factor=0.7)
    }
    for piece, count in pieces.items():
        pattern = r"(?<![=\w.])0\.7\b" if piece == "0.7" else re.escape(piece)
        found = [p.name for p in models.glob("*.py") for _ in re.finditer(pattern, p.read_text())]
        assert len(found) == count and found[0] == "shared.py", (piece, found)


def test_importing_the_shared_module_registers_nothing():
    """``models/shared.py`` runs no call at its top level (what registered an attention kind with the opaque
    operators there): importing it defines, and registers nothing."""
    tree = ast.parse((SRC / "models" / "shared.py").read_text())
    calls = [node.lineno for node in tree.body if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)]
    assert calls == []
