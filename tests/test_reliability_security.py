"""Loading is never code execution: an AST scan of `src/vitune` for unpickling (`torch.load`
without `weights_only=True`, `pickle`, `np.load(allow_pickle=True)`, accelerate's pickled custom
states), `eval`/`exec`, unsafe YAML, `shell=True`, and remote code (`trust_remote_code` is never
set true in code, defaults to false everywhere, and every CLI flag for it is off unless given)."""

from __future__ import annotations

import argparse
import ast
import functools
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vitune"


@functools.cache
def sources() -> list[tuple[Path, ast.Module]]:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 30, "the scan must see the package"
    return [(f, ast.parse(f.read_text(encoding="utf-8"), str(f))) for f in files]


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(SRC.parent)}:{getattr(node, 'lineno', '?')}: {ast.unparse(node)[:120]}"


def kwarg(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_no_unpickling_anywhere() -> None:
    problems = []
    for path, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "marshal", "shelve") for n in names):
                    problems.append(where(path, node))
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            if func.endswith("torch.load") or func == "load" and any(
                    isinstance(n, ast.ImportFrom) and n.module == "torch" for n in ast.walk(tree)):
                if not is_true(kwarg(node, "weights_only")):
                    problems.append("torch.load without weights_only=True: " + where(path, node))
            if func.endswith(("np.load", "numpy.load")) and is_true(kwarg(node, "allow_pickle")):
                problems.append(where(path, node))
            if func.endswith(("load_custom_state", "register_for_checkpointing")):
                problems.append("accelerate pickles custom states (weights_only=False): " + where(path, node))
            if func.endswith(("yaml.load", "yaml.unsafe_load", "yaml.full_load")) and "SafeLoader" not in ast.unparse(node):
                problems.append(where(path, node))
            if func in ("eval", "exec", "compile", "__import__"):
                problems.append(where(path, node))
            if is_true(kwarg(node, "shell")):
                problems.append(where(path, node))
    assert not problems, "\n".join(problems)


def test_torch_load_calls_exist_only_with_weights_only() -> None:
    """The scan above is not vacuous: the one torch checkpoint reader is found, and it is safe."""
    found = []
    for path, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("torch.load"):
                found.append((path.name, is_true(kwarg(node, "weights_only"))))
    assert found and all(ok for _, ok in found), found


def test_trust_remote_code_is_never_on_by_default() -> None:
    problems = []
    params = 0
    for path, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and is_true(kwarg(node, "trust_remote_code")):
                problems.append("trust_remote_code=True in code: " + where(path, node))
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and isinstance(node.value, ast.Constant) \
                    and node.value.value not in (False, None):
                problems.append(where(path, node))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + list(node.args.defaults) + list(node.args.kw_defaults)
                for arg, default in zip(args, defaults, strict=True):
                    if arg.arg == "trust_remote_code":
                        params += 1
                        # required (the caller decides) or false by default
                        if default is not None and not (isinstance(default, ast.Constant) and default.value is False):
                            problems.append(f"parameter defaulting to {ast.unparse(default)}: {path.name}:{node.lineno} {node.name}")
            if isinstance(node, ast.Assign) and any("trust_remote_code" in ast.unparse(t) for t in node.targets) and is_true(node.value):
                problems.append(where(path, node))
    assert params > 0, "the loaders that take trust_remote_code should be found"
    assert not problems, "\n".join(problems)


def test_cli_remote_code_flags_are_off_unless_given() -> None:
    from vitune.cli import build_parser

    flags = []

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{prefix} {name}")
            elif "remote" in action.dest or "pickle" in action.dest:
                flags.append((prefix, action.option_strings, action.default, action.nargs))
                assert action.default in (False, None), (prefix, action.option_strings, action.default)
                assert isinstance(action, argparse._StoreTrueAction), (prefix, action.option_strings)

    walk(build_parser(), "vitune")
    assert flags, "the --trust-remote-code flags should be found"


def test_remote_code_reaches_transformers_only_when_asked(monkeypatch: pytest.MonkeyPatch, tiny_backbones: tuple[Path, Path]) -> None:
    """Dynamic check of the model builder: every transformers loader it calls sees trust_remote_code false."""
    import transformers

    from vitune.model.build import build_llava

    seen: list[object] = []
    for cls_name in ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoTokenizer", "AutoImageProcessor"):
        cls = getattr(transformers, cls_name)
        original = cls.from_pretrained.__func__

        def spy(klass, *args, __orig=original, **kw):  # type: ignore[no-untyped-def]
            seen.append(kw.get("trust_remote_code", False))
            return __orig(klass, *args, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    build_llava(str(tiny_backbones[0]), str(tiny_backbones[1]))
    assert seen and not any(seen), seen


def test_checkpoints_are_safetensors_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A model directory holds no pickle, and loading one opens no pickle even if one is planted."""
    import shutil

    import torch

    from vitune.model.llava import LlavaModel

    assert not [p.name for p in tiny_model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert (tiny_model_dir / "model.safetensors").is_file()
    planted = tmp_path / "planted"
    shutil.copytree(tiny_model_dir, planted, dirs_exist_ok=True)

    class Boom:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (exec, ("raise SystemExit('pickle executed')",))

    torch.save({"x": Boom()}, planted / "pytorch_model.bin")
    model = LlavaModel.from_pretrained(planted)  # reads model.safetensors; the planted pickle is never opened
    assert model.config.num_image_tokens > 0
    (planted / "model.safetensors").unlink()
    with pytest.raises(Exception, match="model.safetensors") as info:
        LlavaModel.from_pretrained(planted)
    assert "pickle executed" not in str(info.value)


def test_interop_refuses_a_malicious_torch_checkpoint(tmp_path: Path) -> None:
    import torch

    from vitune.errors import VituneError
    from vitune.interop import hf

    class Boom:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (exec, ("raise SystemExit('pickle executed')",))

    torch.save({"weight": torch.zeros(2), "payload": Boom()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(VituneError, match="weights_only=True"):
        hf.read_weights(tmp_path)
    # a plain tensors-only file still loads
    torch.save({"weight": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    assert torch.equal(hf.read_weights(tmp_path)["weight"], torch.ones(2))
