"""YAML recipes: a model, tasks, fine-tuning variants and lambdas, then evaluation steps - validated before any work.

```yaml
model: ViT-B-32            # open_clip architecture
pretrained: openai         # tag, .safetensors file or open_clip folder
out_dir: runs/vitb32       # outputs: OUT_DIR/VARIANT/TASK.st and OUT_DIR/VARIANT/<eval>.json
data_root: ~/data          # optional; else --data-root / $TVTOOL_DATA
seed: 0                    # optional: default seed of every run (a finetune/variant `seed` overrides it) and merge
seeds: [0, 1, 2]           # optional, instead of seed: every variant runs once per seed (OUT_DIR/VARIANT/seed-S/);
                           # the results table shows mean +- std per variant and OrthoReg's paired difference to
                           # the lambda-0 variant of its mode (tvtool.results)
tasks: [cars, dtd, eurosat, gtsrb, mnist, resisc45, sun397, svhn]
finetune: {lr: 1.0e-5}     # any `tvtool finetune` setting shared by every run (TrainConfig fields)
variants:                  # one fine-tuning run per task and variant
  - {name: ft, mode: full}
  - {name: ft-orthoreg, mode: full, lambda: 10, orthoreg_form: plain}
eval:                      # optional steps, run per variant
  addition: {grid: "0:1:0.05"}
  negation: {control: imagenet, threshold: 0.95}
  cosine: true
  merge:                   # merged vectors, each followed by the addition alpha search applied to it
    - {method: ties, options: {k: 20}}          # alpha grid: the method's own (`tvtool merge --list`)
    - {method: lines, options: {base: ties}, name: lines-ties, tune: "0.1:1.5:0.1"}  # beta searched on Val
```
A merge step's alpha grid defaults to its method's paper grid; a method whose paper tunes an option instead
(LiNeS' beta) has it searched on Val over ``tune`` (default: the paper's range) unless ``options`` fix it.
After the evaluation steps the run's figures are summarized (``tvtool.results``) and written to
``OUT_DIR/summary.json``. Outputs that already exist are skipped when the settings digest they record
(``settings_digest`` in a vector's metadata, in each evaluation JSON) matches the recipe's (and a vector's base
fingerprint the base's), and redone (saying so) when it does not, so an interrupted
recipe picks up where it stopped and an edited one never shows stale results. Everything is validated before any
model is built (``Recipe.validate``). Files are read with ``yaml.SafeLoader`` with bounded alias expansion; errors
name the file, the line and the key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from .checks import check_finite
from .errors import TVToolError, command_line
from .merge.registry import REGISTRY, get_method, resolve_options
from .fileio import check_input
from .trainconfig import MAX_SEED, MODES, TrainConfig

TOP_KEYS = {"name", "model", "pretrained", "out_dir", "data_root", "tasks", "finetune", "variants", "eval", "seed",
            "seeds"}
TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)} - {"task", "model", "pretrained", "data_root"}
VARIANT_KEYS = {"name", "mode", "lambda"} | TRAIN_KEYS
EVAL_KEYS = {"addition": {"grid"}, "negation": {"control", "threshold", "grid"}, "cosine": None,
             "merge": None}
MERGE_KEYS = {"method", "options", "seed", "grid", "name", "tune"}


@dataclass
class Variant:
    name: str       # its output folder under out_dir: the recipe's name, or NAME/seed-S with `seeds:`
    settings: dict  # TrainConfig fields
    group: str = ""  # the recipe's variant name (the same as ``name`` without `seeds:`)
    seed: int | None = None  # the replicate seed with `seeds:`, else None


@dataclass
class Recipe:
    path: str
    model: str | None
    pretrained: str | None
    out_dir: Path
    data_root: str | None
    tasks: list[str]
    variants: list[Variant]
    eval: dict
    name: str = ""
    seed: int = 0  # the default training (and merge) seed; a `finetune:` or variant `seed` overrides it
    seeds: list[int] | None = None  # `seeds:`: every variant ran once per seed (``variants`` holds each run)

    def output(self, variant: Variant, task: str) -> Path:
        return self.out_dir / variant.name / f"{task}.st"

    def validate(self, *, device: str | None = None, only_train: bool = False) -> None:
        """Everything checkable before a model is built or a step trained: every run's options, datasets, data
        roots (with the splits each step reads) and weights spec, the output folder, and the evaluation steps'
        tasks and control task. `run_recipe` calls it first, so a bad control task fails in seconds, not after
        hours of training."""
        from .datasets.sources import check_available
        from .evaluate import default_control

        from .trainconfig import check_weights_spec

        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise TVToolError(f"{self.path}: out_dir {self.out_dir} exists and is not a folder")
        self.check_outputs_are_ours()
        # what TrainConfig.validate checks per run, with each dataset listed and each weights spec checked once
        configs = [self.train_config(v, t, **({"device": device} if device else {})).resolved()
                   for v in self.variants for t in self.tasks]
        for model, pretrained in dict.fromkeys((c.model, c.pretrained) for c in configs):
            check_weights_spec(model, pretrained)
        evaluates = any(c.eval for c in configs) or (not only_train and any(
            k in self.eval for k in ("addition", "negation", "merge")))
        for task in self.tasks:
            check_available(task, ("train", "val", "test") if evaluates else ("train",), self.data_root)
        if only_train:
            return
        if "negation" in self.eval:
            controls = {self.eval["negation"].get("control") or default_control(t) for t in self.tasks}
            for control in sorted(controls):
                if control in self.tasks:
                    raise TVToolError(f"{self.path}: eval.negation.control: {control!r} is one of the recipe's tasks; "
                                      "pick a control task that is not negated")
                try:
                    check_available(control, ("val", "test"), self.data_root)
                except TVToolError as exc:
                    raise TVToolError(f"{self.path}: eval.negation.control: {exc}") from None

    def check_outputs_are_ours(self) -> None:
        """A recipe redoes its own outputs made with other settings; a file at one of its output paths that is not
        a tvtool task vector at all (someone else's file) is never replaced: refused before any work."""
        from .taskvector import open_vector

        merged = [f"{merge_step_name(m)}.st" for m in self.eval.get("merge") or []]
        for variant in self.variants:
            paths = [self.output(variant, t) for t in self.tasks] + [self.out_dir / variant.name / m for m in merged]
            for path in paths:
                if not os.path.lexists(path):
                    continue
                try:
                    open_vector(path).close()
                except (TVToolError, OSError, ValueError) as exc:
                    raise TVToolError(f"{self.path}: {path} exists and is not a task vector tvtool wrote "
                                      f"({str(exc)[:100]}); the recipe replaces only its own outputs: move it away "
                                      "or pick another out_dir") from None

    def train_config(self, variant: Variant, task: str, **overrides) -> TrainConfig:
        return TrainConfig(task=task, model=self.model, pretrained=self.pretrained, data_root=self.data_root,
                           **{"seed": self.seed, **variant.settings, **overrides})


# A recipe is a page of settings: these bounds are far above any real one and stop a YAML alias bomb (each level of
# aliases multiplies the size) or a recursive alias before any expansion work is done.
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_NODES = 20_000
MAX_RECIPE_DEPTH = 64


def _construct(node: yaml.Node, lines: dict, path: tuple, state: dict | None = None) -> Any:
    """Build Python objects from a composed YAML node, remembering the line of every key.

    Aliases are expanded here (the composer shares the anchored node), so this is where expansion is bounded:
    ``state["budget"]`` counts every node produced, ``state["active"]`` holds the nodes being built (an alias to
    one of them is recursive)."""
    if state is None:
        state = {"budget": MAX_RECIPE_NODES, "active": set(), "loader": yaml.SafeLoader("")}
    state["budget"] -= 1
    if state["budget"] < 0:
        raise _ValueAt(node.start_mark.line + 1, f"the recipe expands to more than {MAX_RECIPE_NODES} values "
                                                 "(YAML aliases nested too deeply?)")
    if id(node) in state["active"]:
        raise _ValueAt(node.start_mark.line + 1, "recursive YAML alias (a value that contains itself)")
    if len(path) > MAX_RECIPE_DEPTH:
        raise _ValueAt(node.start_mark.line + 1, f"nested more than {MAX_RECIPE_DEPTH} levels deep")
    lines[path] = node.start_mark.line + 1
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        state["active"].add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [_construct(v, lines, path + (i,), state) for i, v in enumerate(node.value)]
            out = {}
            for k_node, v_node in node.value:
                if not isinstance(k_node, yaml.ScalarNode):
                    raise _ValueAt(k_node.start_mark.line + 1, "keys must be plain names")
                key = k_node.value
                lines[path + (key,)] = k_node.start_mark.line + 1
                out[key] = _construct(v_node, lines, path + (key,), state)
            return out
        finally:
            state["active"].discard(id(node))
    try:
        return state["loader"].construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
        raise _ValueAt(node.start_mark.line + 1, str(exc).splitlines()[0]) from None


class _ValueAt(Exception):
    def __init__(self, line: int, msg: str):
        super().__init__(msg)
        self.line = line


def load_recipe(path: str | os.PathLike) -> Recipe:
    path = Path(path)
    st = check_input(path, "a YAML recipe file")  # stat, not open: a FIFO or device must not block or be read
    if st.st_size > MAX_RECIPE_BYTES:
        raise TVToolError(f"{path}: {st.st_size} bytes is too large for a recipe (limit {MAX_RECIPE_BYTES})")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TVToolError(f"{path}: cannot read the recipe ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise TVToolError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise TVToolError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    except RecursionError:
        raise TVToolError(f"{path}: nested too deeply to be a recipe") from None
    if node is None:
        raise TVToolError(f"{path}: empty recipe")
    lines: dict = {}
    try:
        doc = _construct(node, lines, ())
    except _ValueAt as exc:
        raise TVToolError(f"{path}:{exc.line}: cannot read this value ({exc})") from None
    except TypeError:
        raise TVToolError(f"{path}: keys must be plain names") from None
    return parse_recipe(doc, str(path), lines, folder=path.parent)


def _nul_at(obj: Any, path: tuple = ()) -> tuple | None:
    """The key path of the first text (key or value) holding a NUL byte: no file or folder name can."""
    stack = [(obj, path)]
    while stack:
        o, p = stack.pop()
        if isinstance(o, str) and "\x00" in o:
            return p
        if isinstance(o, dict):
            for k, v in o.items():
                if isinstance(k, str) and "\x00" in k:
                    return p
                stack.append((v, p + (k,)))
        elif isinstance(o, list):
            stack.extend((v, p + (i,)) for i, v in enumerate(o))
    return None


def _folder_name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be a variant's folder name inside out_dir (None if it can)."""
    if not isinstance(name, str) or not name.strip():
        return "each variant needs a name (a folder name)"
    if name in (".", "..") or any(c in name for c in "/\\\x00") or name != name.strip():
        return f"variant name {name!r} is not a plain folder name (no '.', '..', separators or surrounding spaces)"
    return None


def _recipe_relative(pretrained: str | None, folder: Path | None) -> str | None:
    """A ``pretrained:`` weights path is relative to the recipe's folder (a tag such as ``openai`` is not a path)."""
    if not pretrained or folder is None:
        return pretrained
    expanded = os.path.expanduser(pretrained)
    if os.path.isabs(expanded):
        return expanded
    beside = folder / expanded
    if Path(expanded).suffix or os.sep in expanded or os.path.lexists(beside):
        return str(beside)
    return pretrained


def parse_recipe(doc: Any, source: str = "<recipe>", lines: dict | None = None, *,
                 folder: Path | None = None) -> Recipe:
    """Validate a recipe document; ``folder`` (the recipe file's) is what a relative ``pretrained:`` path is
    relative to."""
    lines = lines or {}

    def fail(keypath: tuple, msg: str):
        line = lines.get(keypath) or lines.get(keypath[:-1]) or lines.get(())
        raise TVToolError(f"{source}:{line}: {'.'.join(map(str, keypath)) or 'recipe'}: {msg}" if line
                          else f"{source}: {'.'.join(map(str, keypath)) or 'recipe'}: {msg}")

    if not isinstance(doc, dict):
        fail((), "expected a mapping of settings")
    nul = _nul_at(doc)
    if nul is not None:
        fail(nul, "contains a NUL byte, which no name or path can hold")
    for k in doc:
        if k not in TOP_KEYS:
            if k in TRAIN_KEYS or k == "lambda":
                fail((k,), "a fine-tuning setting: put it under `finetune:` (all variants) or in a variant")
            if k in EVAL_KEYS:
                fail((k,), "an evaluation step: put it under `eval:`")
            fail((k,), f"unknown key; expected one of {', '.join(sorted(TOP_KEYS))}")
    for k in ("tasks", "variants", "out_dir"):
        if k not in doc:
            fail((), f"missing required key {k!r}")
    for k in ("name", "model", "pretrained", "out_dir", "data_root"):
        if k in doc and not (isinstance(doc[k], str) and doc[k].strip()) and not (doc[k] is None and k != "out_dir"):
            fail((k,), f"expected a text value, got {doc[k]!r}")
    seed = doc.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        fail(("seed",), f"expected a whole number from 0 to {MAX_SEED}, got {seed!r}")
    seeds = doc.get("seeds")
    if seeds is not None:
        if not isinstance(seeds, list) or not seeds:
            fail(("seeds",), "expected a non-empty list of seeds, e.g. [0, 1, 2]")
        for i, x in enumerate(seeds):
            if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= MAX_SEED:
                fail(("seeds", i), f"expected a whole number from 0 to {MAX_SEED}, got {x!r}")
        if len(set(seeds)) != len(seeds):
            fail(("seeds",), f"a seed is listed twice in {seeds}")
        if "seed" in doc:
            fail(("seed",), "use either seed (one run per variant) or seeds (one run per variant and seed)")
    tasks = doc["tasks"]
    if isinstance(tasks, str):  # a suite (ta8 / ta14 / ta20) or a comma-separated list
        tasks = [tasks]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        fail(("tasks",), "expected a non-empty list of task names or a suite (ta8, ta14, ta20)")
    from .datasets import get_dataset, resolve_tasks

    for i, t in enumerate(tasks):
        try:
            resolve_tasks(t)
        except TVToolError as exc:
            fail(("tasks", i), str(exc))
    tasks = resolve_tasks(tasks)
    shared = doc.get("finetune") or {}
    if not isinstance(shared, dict):
        fail(("finetune",), "expected a mapping of fine-tuning settings")
    for k in shared:
        if k not in TRAIN_KEYS:
            fail(("finetune", k), _misplaced(k) or f"unknown setting; expected one of {', '.join(sorted(TRAIN_KEYS))}")
    field_types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    variants = []
    if not isinstance(doc["variants"], list) or not doc["variants"]:
        fail(("variants",), "expected a non-empty list of variants")
    names = set()
    for i, v in enumerate(doc["variants"]):
        if not isinstance(v, dict):
            fail(("variants", i), "expected a mapping like {name: ft, mode: full, lambda: 0}")
        for k in v:
            if k not in VARIANT_KEYS:
                fail(("variants", i, k), _misplaced(k) or "unknown setting; expected one of name, mode, lambda or a "
                                                          "finetune setting")
        name = v.get("name")
        problem = _folder_name_problem(name)
        if problem:
            fail(("variants", i, "name") if "name" in v else ("variants", i), problem)
        if name in names:
            fail(("variants", i, "name"), f"duplicate variant name {name!r}")
        names.add(name)
        settings = dict(shared)
        settings.update({k: val for k, val in v.items() if k not in ("name", "lambda")})
        if "lambda" in v:
            settings["lam"] = v["lambda"]
        if settings.get("mode", "full") not in MODES:
            fail(("variants", i, "mode"), f"unknown mode {settings['mode']!r}; use one of {', '.join(MODES)}")
        def where(k, v=v, i=i):
            return ("variants", i, "lambda" if k == "lam" else k) if (k in v or (k == "lam" and "lambda" in v)) \
                else ("finetune", k)

        for k, val in settings.items():
            _check_type(k, val, field_types.get(k, ""), lambda msg, kp=where(k): fail(kp, msg))
        try:  # values: finite numbers in range, valid choices (the same checks `tvtool finetune` makes)
            with command_line():  # messages name --flags, which `fail` turns into the recipe's key names
                TrainConfig(task=tasks[0], model=doc.get("model"),
                            pretrained=_recipe_relative(doc.get("pretrained"), folder),
                            **{"seed": seed, **settings}).resolved()
        except TVToolError as exc:
            bad = next((k for k in settings if f"--{k.replace('_', '-')} " in f"{exc} "
                        or (k == "lam" and "--lambda" in str(exc))), None)
            fail(where(bad) if bad else ("variants", i), str(exc).replace("--", "", 1))
        if seeds is not None:
            if "seed" in settings:
                fail(where("seed"), "the recipe's `seeds:` sets every run's seed; drop this one")
            variants += [Variant(f"{name}/seed-{x}", {**settings, "seed": x}, group=name, seed=x) for x in seeds]
        else:
            variants.append(Variant(name, settings, group=name))
    ev = doc.get("eval") or {}
    if not isinstance(ev, dict):
        fail(("eval",), "expected a mapping of evaluation steps")
    for k, val in ev.items():
        if k not in EVAL_KEYS:
            fail(("eval", k), f"unknown evaluation step; expected one of {', '.join(EVAL_KEYS)}")
        allowed = EVAL_KEYS[k]
        if allowed is not None:
            if val is None:
                ev[k] = val = {}
            if not isinstance(val, dict):
                fail(("eval", k), "expected a mapping of options")
            for opt in val:
                if opt not in allowed:
                    fail(("eval", k, opt), f"unknown option; expected one of {', '.join(sorted(allowed))}")
    if "merge" in ev:

        if not isinstance(ev["merge"], list):
            fail(("eval", "merge"), "expected a list like [{method: ties, options: {k: 20}}]")
        for i, m in enumerate(ev["merge"]):
            if not isinstance(m, dict) or "method" not in m:
                fail(("eval", "merge", i), "each merge step needs a method")
            for opt in m:
                if opt not in MERGE_KEYS:
                    fail(("eval", "merge", i, opt), f"unknown option; expected one of {', '.join(sorted(MERGE_KEYS))}")
            if m["method"] not in REGISTRY:
                fail(("eval", "merge", i, "method"), f"unknown merge method {m['method']!r}; one of "
                                                      f"{', '.join(REGISTRY)}")
            if REGISTRY[m["method"]].command is not None:  # refused here, not after the fine-tuning
                fail(("eval", "merge", i, "method"), f"{m['method']} is not a merge step (it learns from the test "
                     f"images): after `tvtool run`, run `{REGISTRY[m['method']].command}` on the run's vectors")
    for step in ("addition", "negation"):
        if step in ev and "grid" in ev[step]:
            try:
                grid_points(ev[step]["grid"])
            except TVToolError as exc:
                fail(("eval", step, "grid"), str(exc))
    for i, m in enumerate(ev.get("merge") or []):
        if "grid" in m:
            try:
                grid_points(m["grid"])
            except TVToolError as exc:
                fail(("eval", "merge", i, "grid"), str(exc))
    step_names: set[str] = set()
    for i, m in enumerate(ev.get("merge") or []):
        ms = m.get("seed", seed)
        if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
            fail(("eval", "merge", i, "seed"), f"expected a whole number >= 0, got {ms!r}")
        if m.get("options") is not None and not isinstance(m["options"], dict):
            fail(("eval", "merge", i, "options"), "expected a mapping of method options")
        try:  # typed and range-checked now, not after the fine-tuning
            resolve_options(m["method"], m.get("options") or {})
        except TVToolError as exc:
            fail(("eval", "merge", i, "options"), str(exc))
        if "tune" in m:
            if get_method(m["method"]).tune is None:
                fail(("eval", "merge", i, "tune"), f"{m['method']} tunes no option (only alpha, over `grid`)")
            try:
                grid_points(m["tune"])
            except TVToolError as exc:
                fail(("eval", "merge", i, "tune"), str(exc))
        name = merge_step_name(m)
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            fail(("eval", "merge", i, "name"), f"expected a plain file name like merge-ties, got {name!r}")
        if name in step_names:
            fail(("eval", "merge", i, "name" if "name" in m else "method"),
                 f"a second step named {name}; give each merge step of the same method its own `name`")
        step_names.add(name)
    if "negation" in ev and "threshold" in ev["negation"]:
        th = ev["negation"]["threshold"]
        try:
            check_finite("threshold", th, low=0, low_open=True)
        except TVToolError as exc:
            fail(("eval", "negation", "threshold"), str(exc))
    if "negation" in ev and "control" in ev["negation"]:
        try:
            get_dataset(ev["negation"]["control"])
        except TVToolError as exc:
            fail(("eval", "negation", "control"), str(exc))
    if "negation" in ev and ev["negation"].get("control") in tasks:
        fail(("eval", "negation", "control"), "the control task must not be one of the recipe's tasks")
    return Recipe(path=source, model=doc.get("model"), pretrained=_recipe_relative(doc.get("pretrained"), folder),
                  out_dir=Path(os.path.expanduser(str(doc["out_dir"]))),
                  data_root=os.path.expanduser(doc["data_root"]) if doc.get("data_root") else None,
                  tasks=tasks, variants=variants, eval=ev, name=str(doc.get("name") or ""), seed=seed,
                  seeds=list(seeds) if seeds is not None else None)


def _misplaced(key: str) -> str | None:
    """A hint for a known key in the wrong section, or None."""
    if key in ("model", "pretrained", "data_root", "out_dir", "tasks"):
        return f"{key} belongs at the top level of the recipe"
    if key in EVAL_KEYS or key in ("grid", "control", "threshold"):
        return f"{key} is an evaluation setting: put it under `eval:`"
    if key == "lambda":
        return "lambda is a per-variant setting: put it in a variant (the fine-tuning field is `lam`)"
    return None


def _check_type(key: str, value: Any, annotation: str, fail: Callable[[str], None]) -> None:
    ann = str(annotation)
    if value is None and "None" in ann:
        return
    if ann.startswith("bool"):
        ok = isinstance(value, bool)
    elif ann.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif ann.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif ann.startswith("str"):
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        fail(f"expected {ann.split('|')[0].strip()}, got {value!r}")


def _recorded(path: Path) -> tuple[str | None, int | None, int | None]:
    """(settings digest, epochs, steps) an existing task vector records (None where absent or not readable)."""
    from .taskvector import open_vector

    try:
        meta = open_vector(path).meta
    except (TVToolError, OSError, ValueError):
        return None, None, None
    train = meta.get("train") if isinstance(meta.get("train"), dict) else {}

    def whole(v):
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    digest = meta.get("settings_digest")
    return digest if isinstance(digest, str) else None, whole(train.get("epochs")), whole(train.get("steps"))


def _recorded_base(path: Path) -> str | None:
    """The fingerprint of the base an existing task vector was taken against (None if not recorded)."""
    from .taskvector import open_vector

    try:
        return open_vector(path).base_fingerprint
    except (TVToolError, OSError, ValueError):
        return None


def _base_fingerprint(cfg, cache: dict) -> str:
    """The image-tower fingerprint of the weights ``cfg`` fine-tunes from (the model is built once per spec)."""
    from .models import load_clip

    c = cfg.resolved()
    key = (c.model, str(c.pretrained))
    if key not in cache:
        cache[key] = load_clip(c.model, c.pretrained, device="cpu").fingerprint
    return cache[key]


def _same_schedule(cfg, trained_epochs: int | None, trained_steps: int | None) -> bool:
    """Would this config train for as long as the recorded run? The digest holds ``epochs`` as given (None = the
    dataset's epoch table), so a changed table is caught here: same epochs, or a run capped by ``max_steps`` at the
    same step count that more epochs would cap too."""
    epochs = cfg.effective_epochs()
    if trained_epochs is None or trained_epochs == epochs:
        return True
    return cfg.max_steps is not None and trained_steps == cfg.max_steps and epochs > trained_epochs


def run_recipe(recipe: Recipe, *, progress_factory=None, quiet: bool = False, log: Callable[[str], None] = print,
               only_train: bool = False, device: str | None = None) -> dict:
    """Fine-tune every (variant, task) whose output is missing or was made with other settings, then run the
    evaluation steps per variant. Everything is validated first (``Recipe.validate``)."""
    from . import train

    from .results import describe_runs

    recipe.validate(device=device, only_train=only_train)
    results: dict = {"recipe": recipe.path, "variants": {}, "runs": describe_runs(recipe), "seeds": recipe.seeds}
    recipe.out_dir.mkdir(parents=True, exist_ok=True)
    bases: dict = {}  # (model, pretrained) -> the base fingerprint, loaded once when an output exists
    n_runs, run, trained_s, n_trained = len(recipe.variants) * len(recipe.tasks), 0, 0.0, 0
    for variant in recipe.variants:
        folder = recipe.out_dir / variant.name
        folder.mkdir(parents=True, exist_ok=True)
        for task in recipe.tasks:
            run += 1
            out = recipe.output(variant, task)
            cfg = recipe.train_config(variant, task, **({"device": device} if device else {}))
            rerun = False
            if out.exists():
                (recorded, trained_epochs, trained_steps), wanted = _recorded(out), cfg.settings_digest()
                same_schedule = _same_schedule(cfg, trained_epochs, trained_steps)
                if recorded == wanted and same_schedule:
                    # the settings name the weights (`builtin`, a file), not their content: a re-made base
                    # file leaves them equal, so the base the vector was taken against is compared too
                    base_then, base_now = _recorded_base(out), _base_fingerprint(cfg, bases)
                    if base_then == base_now:
                        log(f"skip {out} (run {run} of {n_runs}: exists, same settings)")
                        continue
                    why = (f"was taken against base {base_then}, the model {cfg.model}:{cfg.pretrained} is now "
                           f"{base_now}")
                else:  # the recipe owns its outputs: one made with other settings (or unknown ones) is redone
                    why = ("records no settings" if recorded is None else f"was made with other settings ({recorded})"
                           if recorded != wanted else f"was trained for {trained_epochs} epochs, the run now has "
                           f"{cfg.effective_epochs()}")
                log(f"rerun {out}: it {why}; now {wanted}")
                rerun = True
            started = time.monotonic()
            if progress_factory is not None:
                with progress_factory(quiet, f"run {run}/{n_runs} {variant.name}/{task}") as report:
                    train.finetune(cfg, out, progress=report, force=rerun)
            else:
                train.finetune(cfg, out, force=rerun)
            trained_s, n_trained = trained_s + time.monotonic() - started, n_trained + 1
            left = n_runs - run
            evaluates = bool(recipe.eval) and not only_train
            eta = (f"; about {_duration(trained_s / n_trained * left)} left for the other {left} fine-tuning "
                   f"run{'s' if left > 1 else ''}" + (", then evaluation" if evaluates else "") if left
                   else "; evaluation next" if evaluates else "")
            log(f"wrote {out} (run {run} of {n_runs}{eta})")
        if only_train:
            continue
        results["variants"][variant.name] = run_evaluations(recipe, variant, log=log, device=device)
    if results["variants"]:
        from .evaluate import write_json
        from .results import summary

        doc, path = summary(results), recipe.out_dir / "summary.json"
        if _read_json(path) != json.loads(json.dumps(doc)):  # the recipe owns its out_dir; unchanged: left alone
            write_json(doc, path, force=True)
            log(f"wrote {path}")
    return results


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{seconds:.0f} s" if seconds < 90 else f"{minutes} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def grid_points(spec) -> list[float]:
    """A recipe grid: "START:STOP:STEP" (inclusive, e.g. "0:1:0.05") or an explicit list of values."""
    from .evaluate import DEFAULT_GRID, parse_grid

    if spec is None:
        return list(DEFAULT_GRID)
    if isinstance(spec, str):
        return parse_grid(spec)
    if isinstance(spec, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in spec):
        return parse_grid(",".join(str(x) for x in spec))
    raise TVToolError(f"grid {spec!r}: write \"START:STOP:STEP\" (e.g. \"0:1:0.05\") or a list of values")


def run_evaluations(recipe: Recipe, variant: Variant, *, log: Callable[[str], None] = print,
                    device: str | None = None) -> dict:
    """Cosine table, task addition and task negation of one variant's vectors; JSON results beside them."""
    from . import evaluate, inspection
    from .models import load_clip

    folder = recipe.out_dir / variant.name
    paths = [recipe.output(variant, t) for t in recipe.tasks]
    out: dict = {}
    ev_cfg = recipe.eval
    if ev_cfg.get("cosine"):
        res = inspection.compare(paths)
        out["cosine"] = {"tasks": recipe.tasks, "matrix": res["cosine"],
                         "mean": inspection.mean_offdiagonal(res["cosine"])}
    merges = {merge_step_name(m): m for m in ev_cfg.get("merge", [])}
    steps = [k for k in ("addition", "negation", *merges) if k in ev_cfg or k in merges]
    digests = {k: _eval_digest(recipe, k, merge_step_settings(merges[k]) if k in merges else ev_cfg.get(k), paths,
                               seed=_merge_seed(recipe, variant, merges[k]) if k in merges else recipe.seed)
               for k in steps}
    todo = []
    for k in steps:
        path = folder / f"{k}.json"
        previous = _read_json(path)
        if previous is not None and previous.get("settings_digest") == digests[k]:
            log(f"skip {path} (exists, same settings and vectors)")
            out[k] = previous
            if k in merges:
                previous.setdefault("method", merges[k]["method"])  # results written before it was recorded
            continue
        if path.exists():
            log(f"rerun {path}: its settings or input vectors changed")
        todo.append(k)
    if not todo:
        return out
    vectors = evaluate.open_vectors(paths)
    bundle = load_clip(recipe.model or vectors[0].meta["base"]["model"],
                       recipe.pretrained or vectors[0].meta["base"]["pretrained"], device=device)

    def say(line: str) -> None:
        log(f"{variant.name}: {line}")

    ev = evaluate.Evaluator(bundle, recipe.tasks, recipe.data_root, device=device,
                            linearized=evaluate.wants_linearized(vectors))
    if "addition" in todo:
        opts = ev_cfg["addition"]
        res = evaluate.addition(ev, vectors, grid_points(opts.get("grid")), progress=say)
        res["settings_digest"] = digests["addition"]
        evaluate.write_json(res, folder / "addition.json", force=True)
        out["addition"] = res
        log(f"wrote {folder / 'addition.json'}")
    if "negation" in todo:
        opts = ev_cfg["negation"]
        per_task = [evaluate.negation(ev, v, opts.get("control"), grid_points(opts.get("grid")),
                                      threshold=float(opts.get("threshold", evaluate.DEFAULT_THRESHOLD)),
                                      progress=say)
                    for v in vectors]
        ok = [r for r in per_task if r["alpha"] is not None]
        res = {"kind": "negation-all", "per_task": per_task, "qualified": len(ok), "tasks": len(per_task),
               "tar_acc": sum(r["tar_acc"] for r in ok) / len(ok) if ok else None,
               "con_acc": sum(r["con_acc"] for r in ok) / len(ok) if ok else None,
               "settings_digest": digests["negation"]}
        evaluate.write_json(res, folder / "negation.json", force=True)
        out["negation"] = res
        log(f"wrote {folder / 'negation.json'}")
    for name, m in merges.items():  # merged vector, then the addition alpha search applied to it
        if name not in todo:
            continue
        res = _merge_step(ev, vectors, paths, folder, name, m, seed=_merge_seed(recipe, variant, m), progress=say)
        res["method"] = m["method"]  # the summary's merge table names it
        res["settings_digest"] = digests[name]
        evaluate.write_json(res, folder / f"{name}.json", force=True)
        out[name] = res
        log(f"wrote {folder / (name + '.json')}")
    return out


def _merge_seed(recipe: Recipe, variant: Variant, step: dict) -> int:
    """A merge step's seed: its own, else the run's replicate seed (`seeds:`), else the recipe's seed."""
    return int(step.get("seed", variant.seed if variant.seed is not None else recipe.seed))


def merge_step_name(step: dict) -> str:
    """Where a merge step writes: OUT_DIR/VARIANT/<name>.st and <name>.json (default merge-<method>)."""
    return step.get("name") or f"merge-{step['method']}"


def merge_step_grid(step: dict) -> list[float]:
    """The step's alpha grid: its own, else its method's paper grid (`tvtool merge --list` gives the source)."""
    from .merge import alpha_grid

    return grid_points(step["grid"]) if "grid" in step else alpha_grid(step["method"])


def merge_step_tune(step: dict) -> tuple[str, list[float]] | None:
    """(option, values) when the method's paper tunes an option on Val (LiNeS' beta) that the step leaves free."""
    tune = get_method(step["method"]).tune
    if tune is None or tune[0] in (step.get("options") or {}):
        return None
    return tune[0], grid_points(step.get("tune", tune[1]))


def merge_step_settings(step: dict) -> dict:
    """What a merge step's result depends on, defaults made explicit (a changed default reruns the step)."""
    tune = merge_step_tune(step)
    return {**step, "grid": merge_step_grid(step), "tune": list(tune) if tune else None}


def _merge_step(ev, vectors, paths, folder: Path, name: str, step: dict, *, seed: int, progress) -> dict:
    """Merge, then the addition search on the merged vector; with a tuned option, one merge per value, the one
    with the best mean normalized Val accuracy (at its own Val-chosen alpha; ties: the first value) reported."""
    from . import evaluate
    from .merge import merge_files

    grid, tune = merge_step_grid(step), merge_step_tune(step)
    options = dict(step.get("options") or {})
    if get_method(step["method"]).collect is not None:  # data-aware (regmean, fisher): the run's model and data
        from .data_merge import merge_with_data

        ev.reset()  # its statistics are taken from theta_0 + tau_t: the tower must be at theta_0
        merge_files = lambda method, paths, out, opts, *, seed, force: merge_with_data(  # noqa: E731
            method, paths, out, opts, bundle=ev.bundle, data_root=ev.data_root, device=str(ev.device), seed=seed,
            force=force, progress=progress)
    if tune is None:
        merged_path = folder / f"{name}.st"
        # rebuilt with the step: its inputs or options may have changed since the last one
        merge_files(step["method"], paths, merged_path, options, seed=seed, force=True)
        merged = evaluate.open_vectors([merged_path])[0]
        return evaluate.addition(ev, vectors, grid, merged=merged, progress=progress)
    option, values = tune
    best, tried = None, []
    for value in values:
        path = folder / f"{name}-{option}{value:g}.st"
        merge_files(step["method"], paths, path, {**options, option: value}, seed=seed, force=True)
        res = evaluate.addition(ev, vectors, grid, merged=evaluate.open_vectors([path])[0], progress=progress)
        score = next(p["mean_val_norm_acc"] for p in res["curve"] if p["alpha"] == res["alpha"])
        tried.append({"value": value, "alpha": res["alpha"], "mean_val_norm_acc": score, "abs_acc": res["abs_acc"],
                      "merged": res["merged"]})
        if best is None or score > best[0]:
            best = (score, value, res)
    res = best[2]
    res["tuned"] = {"option": option, "chosen": best[1], "source": get_method(step["method"]).tune[2],
                    "tried": tried}
    return res


def _read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _eval_digest(recipe: Recipe, step: str, options, paths: list[Path], seed: int | None = None) -> str:
    """What an evaluation result depends on: the step and its options, the model, the seed (merges) and the
    content fingerprint of every input vector. A stored result with another digest is recomputed."""
    from .taskvector import open_vector

    key = {"step": step, "options": options, "model": recipe.model, "pretrained": recipe.pretrained,
           "seed": recipe.seed if seed is None else seed, "vectors": [_vector_identity(open_vector(p)) for p in paths]}
    from .datasets import get_dataset

    control = (options or {}).get("control") if step == "negation" and isinstance(options, dict) else None
    evaluated = list(recipe.tasks) + ([control] if control else [])
    if step == "negation" and not control:
        from .evaluate import default_control

        evaluated += sorted({default_control(t) for t in recipe.tasks})
    if any(get_dataset(t).needs_data_root for t in evaluated):  # the figures are those of the data found there
        root = recipe.data_root or os.environ.get("TVTOOL_DATA")
        key["data_root"] = str(Path(root).expanduser().resolve()) if root else None
    return "sha256:" + hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _vector_identity(vec) -> str:
    fp = vec.fingerprint
    if fp != "unknown":
        return fp
    st = Path(vec.path).stat()  # no content fingerprint recorded: the file's size and time stand in
    return f"{st.st_size}:{st.st_mtime_ns}"
