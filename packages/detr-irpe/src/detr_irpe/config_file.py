"""``--config FILE.yaml``: training options from a YAML file, and the run's ``config.yaml``.

The file is a mapping of option names without the dashes to values, e.g.
``{lr: 1.0e-4, epochs: 50, enc_rpe2d: rpe-2.0-product-ctx-1-k, no_flip_aug: true}``; the
destination names the parser stores (``flip_aug: false``) are accepted too, so the
``config.yaml`` a run writes can be passed back with ``--config``. The values become the
parser's defaults before the command line is parsed, so a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Any

from detr_irpe.atomic import atomic_write
from detr_irpe.config import OptionError

__all__ = ["CONFIG_FILE", "apply_config_file", "config_defaults", "write_run_config"]

CONFIG_FILE = "config.yaml"

# Set by the process launcher or by set-up, not options: never written to config.yaml.
_RUNTIME = frozenset({"config", "rank", "gpu", "distributed", "dist_backend"})


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Option name without dashes, and destination name, -> its action."""
    found: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "config"):
            continue
        found.setdefault(action.dest, action)
        for option in action.option_strings:
            found.setdefault(option.lstrip("-"), action)
    return found


def _convert(key: str, value: Any, action: argparse.Action, source: str) -> Any:
    """``value`` as the action stores it; OptionError naming ``key`` and ``source``."""
    where = f"{source}: '{key}'"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise OptionError(f"{where} must be true or false, got {value!r}")
        negated = key != action.dest  # e.g. no_flip_aug: true -> flip_aug = False
        return (not value) if negated else value
    if value is None:
        return None
    convert = action.type or (lambda v: v)
    try:
        if action.nargs in ("+", "*") or isinstance(action.nargs, int):
            items = value if isinstance(value, list) else [value]
            converted = [convert(v) for v in items]
        else:
            converted = convert(value)
    except (TypeError, ValueError) as err:
        raise OptionError(f"{where} has a bad value {value!r}: {err}") from None
    items = converted if isinstance(converted, list) else [converted]
    if action.choices is not None and any(v not in action.choices for v in items):
        choices = ", ".join(map(str, action.choices))
        raise OptionError(f"{where} must be one of {choices}, got {value!r}")
    return converted


def config_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The parser defaults a YAML file sets (destination name -> value).

    Raises:
        OptionError: the file is missing or not a YAML mapping, or a key is not an option of
            ``parser`` or its value does not fit; the message names the key and the file.
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
    except OSError as err:
        raise OptionError(f"--config {path}: cannot read it ({err.strerror})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise OptionError(f"--config {path}{line}: not valid YAML") from None
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise OptionError(f"--config {path}: expected a mapping of option names to values")
    actions = _actions(parser)
    defaults: dict[str, Any] = {}
    for key, value in values.items():
        if str(key) in _RUNTIME:
            continue
        action = actions.get(str(key))
        if action is None:
            raise OptionError(f"{path}: unknown option '{key}' (not a flag of {parser.prog})")
        defaults[action.dest] = _convert(str(key), value, action, path)
    return defaults


def apply_config_file(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> None:
    """With ``--config FILE`` in ``argv``, make the file's values ``parser``'s defaults."""
    if not any(a.dest == "config" for a in parser._actions):
        return
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--config")
    known, _ = probe.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**config_defaults(parser, known.config))


def write_run_config(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    output_dir: str | os.PathLike[str],
) -> None:
    """Write the options of ``parser`` that ``args`` holds to ``output_dir/config.yaml``
    (atomically), a file ``--config`` accepts."""
    import yaml

    names = [a.dest for a in parser._actions if a.option_strings and a.dest != "help"]
    values = {n: getattr(args, n) for n in names if hasattr(args, n) and n not in _RUNTIME}
    with atomic_write(os.path.join(os.fspath(output_dir), CONFIG_FILE), "w") as handle:
        yaml.safe_dump(values, handle, sort_keys=False, default_flow_style=None)
