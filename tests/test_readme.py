"""The README's promises: its Python example runs as written and its method table matches the code."""

from __future__ import annotations

import re

import sidetune

from conftest import REPO

README = (REPO / "README.md").read_text()


def test_readme_api_example_runs_as_written(tmp_path, monkeypatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "the README must show the Python API"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    model = namespace["model"]
    assert (tmp_path / "runs" / "e3va" / "adapter_model.safetensors").is_file()
    assert model.num_parameters() > 0
    assert all(p.grad is None for p in model.backbone.parameters())


def test_readme_commands_come_first() -> None:
    first_code = README.index("```")
    assert README[first_code:].startswith("```bash\nmake demo") and "make test" in README[first_code:][:200]


def test_readme_method_table_matches_the_registry() -> None:
    rows = re.findall(r"^\| `([^`]+)` \| (\w+) \| (yes|no) \| ([^|]+) \|", README, flags=re.M)
    table = {name: (kind, bp == "yes", [f.strip() for f in fams.split(",")]) for name, kind, bp, fams in rows}
    registry = {m["name"]: (m["kind"], m["backprop_through_backbone"], m["families"]) for m in sidetune.list_methods()}
    assert table == registry
