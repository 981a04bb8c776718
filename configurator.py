"""Settings the way nanoGPT and llama2.c take them: a dict of defaults, then each config file
named on the command line (plain Python, `key = value` lines), then --key=value flags, in the
order given. Every name must be a known setting and every value of its default's type (an int
is a fine float); settings with a fixed set of values are checked against it.
"""
import ast
import os
import types

from cli import UsageError


def _checked(key, value, defaults, choices, source):
    if key not in defaults:
        raise UsageError(f"{source}: unknown setting {key!r} (valid: {', '.join(sorted(defaults))})")
    expected = type(defaults[key])
    if expected is float and type(value) is int:
        value = float(value)
    if type(value) is not expected:
        raise UsageError(f"{source}: {key} expects {expected.__name__}, got {value!r} "
                         f"(valid settings: {', '.join(sorted(defaults))})")
    if key in choices and value not in choices[key]:
        raise UsageError(f"{source}: {key} must be one of {', '.join(choices[key])}, got {value!r}")
    return value


def wants_help(argv) -> bool:
    return any(arg in ("-h", "--help") for arg in argv)


def settings_help(doc: str, defaults: dict, choices: dict = None) -> str:
    """--help: the script's docstring, then every setting with its default (and its choices)."""
    lines = [doc.strip(), "", "settings (--key=value; a bare --key turns a True/False setting on):"]
    for key, value in defaults.items():
        allowed = f"  (one of {', '.join(choices[key])})" if choices and key in choices else ""
        lines.append(f"  --{key}={value!r}{allowed}")
    return "\n".join(lines)


def parse_settings(argv, defaults: dict, choices: dict = None) -> dict:
    """defaults <- config files <- --key=value flags, in the order given."""
    settings = dict(defaults)
    for arg in argv:
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            if not eq and isinstance(defaults.get(key), bool):
                raw = "True"  # --force, --compile: a bare switch turns it on
            elif not eq:
                raise UsageError(f"{arg}: expected --key=value")
            value = raw
            if not isinstance(defaults.get(key), str):
                try:
                    value = ast.literal_eval({"true": "True", "false": "False"}.get(raw, raw))
                except (ValueError, SyntaxError):
                    pass
            settings[key] = _checked(key, value, defaults, choices or {}, arg)
        else:
            if not os.path.isfile(arg):
                raise UsageError(f"{arg}: no such config file (expected a .py file of settings or --key=value)")
            namespace = {}
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, "exec"), {}, namespace)
            except Exception as exc:
                raise UsageError(f"{arg}: cannot run config file ({type(exc).__name__}: {exc})") from None
            for key, value in namespace.items():
                if not key.startswith("_") and not isinstance(value, types.ModuleType):
                    settings[key] = _checked(key, value, defaults, choices or {}, arg)
    return settings
