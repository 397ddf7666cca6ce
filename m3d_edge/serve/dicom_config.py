"""The DICOM node's config file (TOML): its AE, the allow-lists, limits, the destination and the task rules.

    [node]
    ae_title = "M3D_EDGE"
    port = 11112
    state_dir = "node-state"          # relative to this file
    quiet_seconds = 30
    allowed_ae_titles = ["ORTHANC"]   # empty or absent: any caller
    allowed_hosts = ["127.0.0.1"]     # empty or absent: any host

    [destination]
    ae_title = "ORTHANC"
    host = "127.0.0.1"
    port = 4242

    [[rules]]
    modality = ["CT"]
    body_part = ["ABDOMEN"]           # absent: any BodyPartExamined
    tasks = ["report", "segment liver"]

Every key is checked when the file is read; an unknown key or a bad value is one :class:`PromptError` line
naming the file and the key.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3d_edge.errors import PromptError

NODE_TASKS = ("report", "vqa", "locate", "segment", "refer_segment")
OUTPUT_KINDS = ("seg", "sr")


@dataclass(frozen=True)
class TaskSpec:
    """One configured task: ``"segment liver"`` -> task ``segment``, argument ``liver``."""

    task: str
    argument: str | None = None

    @property
    def key(self) -> str:
        """A folder-safe, stable name for this task's outputs (``segment-liver``)."""
        words = [self.task] + (self.argument.split() if self.argument else [])
        safe = "-".join("".join(c if c.isalnum() else "_" for c in w) for w in words)
        return safe[:60] or "task"

    @property
    def text(self) -> str:
        return f"{self.task} {self.argument}" if self.argument else self.task


@dataclass(frozen=True)
class Rule:
    modality: tuple[str, ...]
    body_part: tuple[str, ...]
    tasks: tuple[TaskSpec, ...]

    def matches(self, modality: str | None, body_part: str | None) -> bool:
        if self.modality and (modality or "").upper() not in self.modality:
            return False
        return not self.body_part or (body_part or "").upper() in self.body_part


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class NodeConfig:
    ae_title: str
    port: int
    state_dir: Path
    host: str = "0.0.0.0"
    quiet_seconds: float = 30.0
    allowed_ae_titles: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    max_spool_mb: float = 4096.0
    max_instances_per_association: int = 5000
    keep_instances: bool = False
    destination: Destination | None = None
    retry_initial_seconds: float = 10.0
    retry_max_seconds: float = 600.0
    outputs: tuple[str, ...] = OUTPUT_KINDS
    max_new_tokens: int | None = None
    threads: int = 0
    force_seg: bool = False  # bias [SEG] on segment tasks (random-weight test models), like run --force-seg
    rules: tuple[Rule, ...] = field(default_factory=tuple)

    def tasks_for(self, modality: str | None, body_part: str | None) -> list[TaskSpec]:
        """The tasks of every rule that matches, in file order, each once."""
        out: list[TaskSpec] = []
        for rule in self.rules:
            if rule.matches(modality, body_part):
                out.extend(t for t in rule.tasks if t not in out)
        return out


def parse_task(text: str, where: str) -> TaskSpec:
    words = str(text).split(None, 1)
    if not words or words[0] not in NODE_TASKS:
        raise PromptError(f"{where}: task {text!r}: start with one of {', '.join(NODE_TASKS)}")
    arg = words[1].strip() if len(words) > 1 else None
    if words[0] != "report" and not arg:
        raise PromptError(f"{where}: task {text!r} needs an argument (e.g. 'segment liver')")
    if words[0] == "report" and arg:
        raise PromptError(f"{where}: task {text!r}: report takes no argument")
    return TaskSpec(words[0], arg)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PromptError(f"{where}: expected a list of strings")
    return tuple(v.strip() for v in value if v.strip())


def _take(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = None):
    if key not in table:
        if default is ...:
            raise PromptError(f"{where}: '{key}' is required")
        return default
    value = table[key]
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else ()):
        raise PromptError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise PromptError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise PromptError(
            f"{where}: unknown key(s) {', '.join(extra)} (allowed: {', '.join(sorted(allowed))})"
        )


def _ae_title(value: str, where: str) -> str:
    v = value.strip()
    if not 0 < len(v) <= 16 or any(c in v for c in "\\") or not v.isprintable():
        raise PromptError(f"{where}: AE title {value!r}: 1 to 16 printable characters, no backslash")
    return v


def _port(value: int, where: str) -> int:
    if not 0 <= value <= 65535:
        raise PromptError(f"{where}: port {value}: expected 0..65535")
    return value


def load_config(path: Path | str) -> NodeConfig:
    """Read and check a node config; relative ``state_dir`` is taken from the file's folder."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromptError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PromptError(f"{path}: not a readable TOML file ({exc})") from None
    name = path.name
    _check_keys(data, {"node", "destination", "model", "rules"}, name)
    node = _take(data, "node", dict, name, ...)
    node_keys = {
        "ae_title", "host", "port", "state_dir", "quiet_seconds", "allowed_ae_titles", "allowed_hosts",
        "max_spool_mb", "max_instances_per_association", "keep_instances", "outputs",
    }  # fmt: skip
    _check_keys(node, node_keys, f"{name} [node]")
    w = f"{name} [node]"
    state = Path(_take(node, "state_dir", str, w, ...)).expanduser()
    kwargs: dict[str, Any] = {
        "ae_title": _ae_title(_take(node, "ae_title", str, w, "M3D_EDGE"), f"{w}.ae_title"),
        "host": _take(node, "host", str, w, "0.0.0.0"),
        "port": _port(_take(node, "port", int, w, 11112), f"{w}.port"),
        "state_dir": state if state.is_absolute() else (path.parent / state).resolve(),
        "quiet_seconds": float(_take(node, "quiet_seconds", (int, float), w, 30.0)),
        "allowed_ae_titles": _strings(node.get("allowed_ae_titles"), f"{w}.allowed_ae_titles"),
        "allowed_hosts": _strings(node.get("allowed_hosts"), f"{w}.allowed_hosts"),
        "max_spool_mb": float(_take(node, "max_spool_mb", (int, float), w, 4096.0)),
        "max_instances_per_association": _take(node, "max_instances_per_association", int, w, 5000),
        "keep_instances": _take(node, "keep_instances", bool, w, False),
        "outputs": _strings(node.get("outputs", list(OUTPUT_KINDS)), f"{w}.outputs"),
    }
    if (
        kwargs["quiet_seconds"] <= 0
        or kwargs["max_spool_mb"] <= 0
        or kwargs["max_instances_per_association"] < 1
    ):
        raise PromptError(f"{w}: quiet_seconds, max_spool_mb and max_instances_per_association must be > 0")
    bad = [o for o in kwargs["outputs"] if o not in OUTPUT_KINDS]
    if bad or not kwargs["outputs"]:
        raise PromptError(f"{w}.outputs: choose from {', '.join(OUTPUT_KINDS)}")

    if "destination" in data:
        dest = _take(data, "destination", dict, name)
        w = f"{name} [destination]"
        _check_keys(dest, {"ae_title", "host", "port", "retry_initial_seconds", "retry_max_seconds"}, w)
        kwargs["destination"] = Destination(
            ae_title=_ae_title(_take(dest, "ae_title", str, w, ...), f"{w}.ae_title"),
            host=_take(dest, "host", str, w, ...),
            port=_port(_take(dest, "port", int, w, ...), f"{w}.port"),
        )
        kwargs["retry_initial_seconds"] = float(_take(dest, "retry_initial_seconds", (int, float), w, 10.0))
        kwargs["retry_max_seconds"] = float(_take(dest, "retry_max_seconds", (int, float), w, 600.0))
        if not 0 < kwargs["retry_initial_seconds"] <= kwargs["retry_max_seconds"]:
            raise PromptError(f"{w}: need 0 < retry_initial_seconds <= retry_max_seconds")

    model = _take(data, "model", dict, name, {})
    w = f"{name} [model]"
    _check_keys(model, {"max_new_tokens", "threads", "force_seg"}, w)
    kwargs["max_new_tokens"] = _take(model, "max_new_tokens", int, w, None)
    kwargs["threads"] = _take(model, "threads", int, w, 0)
    kwargs["force_seg"] = _take(model, "force_seg", bool, w, False)

    rules = []
    for i, rule in enumerate(_take(data, "rules", list, name, [])):
        w = f"{name} [[rules]] #{i + 1}"
        if not isinstance(rule, dict):
            raise PromptError(f"{w}: expected a table")
        _check_keys(rule, {"modality", "body_part", "tasks"}, w)
        tasks = tuple(parse_task(t, w) for t in _strings(rule.get("tasks"), f"{w}.tasks"))
        if not tasks:
            raise PromptError(f'{w}: \'tasks\' is required (e.g. tasks = ["report", "segment liver"])')
        rules.append(
            Rule(
                modality=tuple(m.upper() for m in _strings(rule.get("modality"), f"{w}.modality")),
                body_part=tuple(b.upper() for b in _strings(rule.get("body_part"), f"{w}.body_part")),
                tasks=tasks,
            )
        )
    if not rules:
        raise PromptError(f"{name}: no [[rules]]: the node would run nothing")
    return NodeConfig(rules=tuple(rules), **kwargs)
