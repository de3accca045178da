"""Config, override and corpus errors -> one readable line that names the key at fault.

Formatting only; it must not decide exit codes or print anything itself.
"""

from __future__ import annotations

import re

import yaml
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from lmcore.config import ConfigError
from lmcore.data import CorpusError
from lmcore.distributed import DistributedEnvError


def is_config_error(exc: BaseException) -> bool:
    """A mistake in the config, the overrides, the corpus or the launch environment."""
    return isinstance(exc, (HydraException, OmegaConfBaseException, ConfigError, CorpusError,
                            DistributedEnvError, yaml.YAMLError))  # a config file that is not YAML


def _underlying(exc: BaseException) -> BaseException | None:
    """What Hydra wraps: the cause of an override's error; for a key in a config file Hydra
    1.3 raises from inside the handler, so the error is only the exception's context."""
    return exc.__cause__ or exc.__context__


def _full_key(exc: BaseException) -> str | None:
    for e in (exc, _underlying(exc)):
        key = getattr(e, "full_key", None)
        if key:
            return str(key)
    return None


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def one_line(exc: BaseException) -> str:
    cause = _underlying(exc)
    key = _full_key(exc)
    if isinstance(exc, MissingConfigException):
        return _missing_option(str(exc))
    if isinstance(exc, yaml.YAMLError):
        return _yaml_error(exc)
    if isinstance(exc, OverrideParseException):
        return _first_line(str(exc)) + " (overrides look like key=value)"
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        where = re.match(r"In '([^']+)':", str(exc))  # a key in a config file, not an override
        place = f" in {where.group(1)}.yaml" if where else ""
        return f"unknown config key '{key}'{place} (see config/README.md)"
    if isinstance(cause, ValidationError) and key:
        return f"{key}: {_first_line(str(cause))}"
    if isinstance(exc, MissingMandatoryValue) and key:
        return f"{key} must be set (e.g. {key}=...)"
    if isinstance(exc, OmegaConfBaseException) and key:
        return f"{key}: {_first_line(str(exc))}"
    message = _first_line(str(exc)) or type(exc).__name__
    if not is_config_error(exc):
        message = f"{type(exc).__name__}: {message}"
    return message


def _missing_option(text: str) -> str:
    """Hydra's "Could not find 'model/nope'" + its option list, on one line."""
    found = re.search(r"Could not find '([^']*)'", text)
    what = found.group(1) if found else _first_line(text)
    group = what.split("/")[0]
    options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], re.M)
    options = [o for o in options if not o.startswith("base_")]
    choose = f"; choose {group}={' | '.join(options)}" if options else ""
    return f"no config '{what}'{choose}"


def _yaml_error(exc: yaml.YAMLError) -> str:
    """PyYAML's problem with the file and line it is at (its message spreads them over lines)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or _first_line(str(exc)) or type(exc).__name__
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"invalid YAML in {mark.name}, line {mark.line + 1}, column {mark.column + 1}: {problem}"
