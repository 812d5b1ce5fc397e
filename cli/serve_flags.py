"""``dcar serve``: the DCAR_* variable and default of every flag in ``--help``, and settings errors as one line.

The flags themselves are defined by ``dcar.server.serve`` (each overrides one ``Settings`` field and defaults
to None, so that the environment stays in force); this module reads ``Settings`` to say, beside each flag,
which variable it overrides and what applies when neither is given.
"""

from __future__ import annotations

import argparse
import re

from pydantic import ValidationError

from dcar.server.settings import Settings

_OWN_DEFAULT = re.compile(r"\s*\(default[^)]*\)")  # "(default 8000)" in a flag's own help text


def _default_text(field: str) -> str:
    info = Settings.model_fields[field]
    default = info.get_default(call_default_factory=True)
    if default is None:
        # e.g. dtype: "float32 / float16 / bfloat16; default fp16 on CUDA, fp32 on CPU"
        description = info.description or ""
        return description[description.find("default") :] if "default" in description else "default: unset"
    if isinstance(default, bool):
        return f"default: {str(default).lower()}"
    if isinstance(default, list):
        return "default: " + (",".join(default) if default else "empty")
    return f"default: {default}"


def describe_settings(parser: argparse.ArgumentParser) -> None:
    """Append ``[env DCAR_X; default: Y]`` to the help of every flag that sets a Settings field."""
    for action in parser._actions:
        if action.dest not in Settings.model_fields or not action.help:
            continue
        own = _OWN_DEFAULT.sub("", action.help)
        own = own.split("; default")[0]  # "...; default: DCAR_API_KEYS, or no auth" is restated below
        action.help = f"{own} [env DCAR_{action.dest.upper()}; {_default_text(action.dest)}]"


def _one_line(error: ValidationError, args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The first problem of a settings error, naming the flag if one was given, else the variable."""
    first = error.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    if field and getattr(args, field, None) is not None:
        where = flags.get(field, f"--{field.replace('_', '-')}")
    elif field:
        where = f"DCAR_{field.upper()}"
    else:
        where = "settings"
    message = first["msg"].removeprefix("Value error, ")
    got = f", got {first['input']!r}" if field and not isinstance(first["input"], dict) else ""
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{where}: {message}{got}{more}"


def check_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Validate the flags and DCAR_* variables together before anything starts; exit 2 with one line if bad."""
    from dcar.server.serve import device_refusal, settings_from_args

    try:
        settings = settings_from_args(args)
        if getattr(args, "ray", False):
            from dcar.server.ray_serve import options_from_args

            options_from_args(args)
    except ValidationError as e:
        parser.error(_one_line(e, args, parser))
    except ValueError as e:  # RayOptions: the message names the option and the fix
        parser.error(str(e))
    if not getattr(args, "ray", False):
        problem = device_refusal(settings, args)
        if problem:
            parser.error(problem)
