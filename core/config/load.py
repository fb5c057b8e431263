"""Read a case file, map the original Koifish layout, validate everything before any work starts.

All problems are collected and raised as one ConfigError, a line each:
    my_case.json: optimizer.lr: expected a number > 0, got -1
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from koifish_core.config.schema import Case
from koifish_core.errors import ConfigError

@dataclass
class LoadedCase:
    case: Case
    source: str
    format: str = "koifish"  # or "koifish-original"
    warnings: list[str] = field(default_factory=list)


def _type_name(t) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object"}.get(t, str(t))


def _check_scalar(value, want, path, meta, errors):
    """Returns the value converted to `want`, or None after recording an error."""
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    ok = isinstance(value, want) and not (want in (int, float) and isinstance(value, bool))
    if not ok:
        errors.append(f"{path}: expected {_type_name(want)}, got {json.dumps(value)}")
        return None
    if "choices" in meta and value not in meta["choices"]:
        errors.append(f"{path}: expected one of {', '.join(map(str, meta['choices']))}, got {json.dumps(value)}")
    for key, test, words in (("min", lambda v, b: v >= b, ">="), ("max", lambda v, b: v <= b, "<="),
                             ("gt", lambda v, b: v > b, ">"), ("lt", lambda v, b: v < b, "<")):
        if key in meta and not test(value, meta[key]):
            errors.append(f"{path}: expected {_type_name(want)} {words} {meta[key]}, got {json.dumps(value)}")
    return value


def _build(cls, data, path: str, errors: list[str]):
    """A dataclass instance from a dict, recording unknown keys and bad values in `errors`."""
    obj = cls()
    if not isinstance(data, dict):
        errors.append(f"{path or 'case'}: expected an object, got {json.dumps(data)[:60]}")
        return obj
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(fields)}"
            errors.append(f"{where}: unknown key{hint}")
            continue
        want, meta = hints[key], fields[key].metadata
        if dataclasses.is_dataclass(want):
            setattr(obj, key, _build(want, value, where, errors))
            continue
        args = typing.get_args(want)
        optional = type(None) in args
        if value is None:
            if not optional:
                errors.append(f"{where}: expected a value, got null")
            setattr(obj, key, None)
            continue
        base = next((a for a in args if a is not type(None)), want) if args else want
        if base is dict:
            if not isinstance(value, dict):
                errors.append(f"{where}: expected an object, got {json.dumps(value)}")
                continue
            for k, v in value.items():
                if "value_choices" in meta and v not in meta["value_choices"]:
                    errors.append(f"{where}.{k}: expected one of {', '.join(map(str, meta['value_choices']))}, got {json.dumps(v)}")
            setattr(obj, key, dict(value))
            continue
        checked = _check_scalar(value, base, where, meta, errors)
        if checked is not None:
            setattr(obj, key, checked)
    return obj


def _semantic_checks(case: Case, errors: list[str]) -> None:
    m, d = case.model, case.data
    if m.n_head and m.n_embd % m.n_head:
        errors.append(f"model.n_head: {m.n_head} heads do not divide model.n_embd {m.n_embd}")
    if d.seq_len > m.n_ctx:
        errors.append(f"data.seq_len: expected at most model.n_ctx ({m.n_ctx}), got {d.seq_len}")
    if case.precision.residual == "bf16" and case.precision.compute != "bf16":
        errors.append(f"precision.residual: bf16 needs precision.compute bf16, got compute {case.precision.compute}")
    if case.precision.residual_grad == "bf16" and case.precision.residual != "bf16":
        errors.append(f"precision.residual_grad: bf16 needs precision.residual bf16, got residual {case.precision.residual}")
    from koifish_core.train.instability import InstabilityConfig

    errors += InstabilityConfig.parse(case.instability)[1]  # a bad setting fails at load, not at step 1


def build_case(raw: dict, source: str) -> Case:
    errors: list[str] = []
    case = _build(Case, raw, "", errors)
    if not errors:
        _semantic_checks(case, errors)
    if len(errors) == 1:
        raise ConfigError(f"{source}: {errors[0]}")
    if errors:
        raise ConfigError(f"{source}: {len(errors)} problems:\n" + "\n".join(f"  {source}: {e}" for e in errors))
    return case


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such case file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, expected a case .json file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: JSON syntax error at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level, got {type(raw).__name__}")
    return raw


def default_case_path() -> Path:
    from koifish_cases import case_path

    return case_path("default.json")


def load_case(path: str | Path | None = None) -> LoadedCase:
    from koifish_core.config.koifish_original import is_original_layout, map_original

    source_path = default_case_path() if path is None else Path(path)
    source = "<default case>" if path is None else str(path)
    raw = _read_json(source_path)
    warnings: list[str] = []
    fmt = "koifish"
    if is_original_layout(raw):
        fmt = "koifish-original"
        raw, warnings = map_original(raw, source)
    case = build_case(raw, source)
    if case.model.remat and case.train.device == "cpu":
        warnings.append(f"model.remat {case.model.remat}: the CPU engine keeps all activations; "
                        "rematerialisation is done by the CUDA engine (--device cuda)")
    if path is not None and "name" not in raw:
        case.name = source_path.stem
    return LoadedCase(case=case, source=source, format=fmt, warnings=warnings)


def case_to_dict(case: Case) -> dict:
    return dataclasses.asdict(case)
