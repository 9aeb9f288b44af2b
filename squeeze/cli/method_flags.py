"""Flags that choose a registered method and set its options, for commands that run one (prune, quantize).

The CLI restates neither the methods nor their defaults: `--method`'s help lists what is registered, and a
method flag's help names the methods that take its option and their default, read from each method's options
class when the command is built (every run), so a newly registered method or a changed default shows at once.
A flag defaults to None: not given, the method's own default applies. `--option KEY=VALUE` reaches any option
of any method, a plugin's included.
"""

from __future__ import annotations

from typing import Any, Callable

import pydantic
import typer
import yaml
from typer.models import OptionInfo

from squeeze import api
from squeeze.api import SqueezeError

__all__ = ["MethodFlags", "OPTION_HELP"]

OPTION_HELP = ("Any option of the method as KEY=VALUE, repeatable (squeeze list methods; recipe `options:`): dotted "
               "keys reach nested options (short_term.iterations=50), values are read as YAML (50, 0.5, true, minmax).")


class _RegistryHelp(OptionInfo):
    """An option whose help is written when typer builds the command, from what is registered then."""

    def __init__(self, option: OptionInfo, make_help: Callable[[], str]) -> None:
        self.__dict__.update(vars(option))
        self.make_help = make_help

    @property
    def help(self) -> str:
        # Every command's options are built on each run, `squeeze --version` included: a registry that cannot
        # load (two modules registering one name) fails the command that runs a method, not all of them.
        try:
            return self.make_help()
        except SqueezeError as exc:
            return f"(the registered methods could not be listed: {exc.message})"

    @help.setter
    def help(self, value: str | None) -> None:  # typer's own assignment; the registry's wording wins
        pass


def _shown(default: Any, name: str) -> str:
    """A default as the user would type it; '' where there is nothing to show (None, an empty list)."""
    if isinstance(default, bool):
        on, _, off = name.partition("/")
        return (on if default else off) if off else ("on" if default else "off")
    if isinstance(default, list):
        return ",".join(map(str, default))
    if isinstance(default, float):
        return f"{default:g}"
    return "" if default is None else str(default)


class MethodFlags:
    """One command's method flags: `--method` over a family of the registry, and flags mapped to option keys."""

    def __init__(self, family: str, noun: str, command: str) -> None:
        """`noun` words an unknown method ("Unknown pruning method `x`"); `command` points to its --help."""
        self.family, self.noun, self.command = family, noun, command
        self.keys: dict[str, str] = {}  # flag, as --help shows it (--per-channel/--per-tensor) -> dotted option key

    def names(self) -> list[str]:
        return [m.name.removeprefix(f"{self.family}.") for m in api.methods(self.family)]

    def method_option(self, default: str, what: str) -> Any:
        """`--method`; its help lists the family's registered methods (`what` they are: "pruning search")."""
        return _RegistryHelp(typer.Option(default, "--method", "-m"), lambda: (
            f"A registered {what}: {', '.join(self.names())} (squeeze list methods: {self.family}.*)."))

    def flag(self, key: str, name: str, text: str, **kwargs: Any) -> Any:
        """A flag for option `key` (dotted for a nested one); `text` says what it is, without the default."""
        self.keys[name] = key
        return _RegistryHelp(typer.Option(None, name, **kwargs), lambda: self._help(key, name, text))

    def _help(self, key: str, name: str, text: str) -> str:
        family = api.methods(self.family)
        takers: dict[str, str] = {}
        for method in family:
            try:
                takers[method.name.removeprefix(f"{self.family}.")] = _shown(api.option_default(method, key), name)
            except KeyError:
                continue
        shown = sorted(set(takers.values()) - {""})
        if len(shown) > 1:
            shown = [", ".join(f"{d} for {m}" for m, d in takers.items() if d)]
        if shown:  # inside a closing parenthesis of the text, else in one of its own
            text = f"{text[:-1]}; default {shown[0]})" if text.endswith(")") else f"{text} (default {shown[0]})"
        if len(takers) == len(family):
            return f"{text}."
        if text[1:2].islower():  # "int8, qat: weight scales ...", not "MACs" or "SNR"
            text = text[0].lower() + text[1:]
        return f"{', '.join(takers) or 'no registered method'}: {text}."

    def get(self, method: str) -> type:
        """The registered method `family.<method>`; an unknown one lists the family's."""
        if method not in self.names():
            raise SqueezeError(f"Unknown {self.noun} `{method}`.", f"Choose one of: {', '.join(self.names())}.")
        return api.get_pass(f"{self.family}.{method}")

    def options(self, method: type, flags: dict[str, Any], pairs: list[str] | None) -> tuple[dict[str, Any], dict[str, str]]:
        """The options the user gave, flags by name (None: not given) then each --option KEY=VALUE, and what set
        each dotted key (`--short-term-iters`, `--option short_term.iterations`), for `invalid`."""
        sources = {self.keys[f]: f for f, v in flags.items() if v is not None}
        values = {self.keys[f]: v for f, v in flags.items() if v is not None}
        for key, value in map(_pair, pairs or []):
            if key in values:
                raise SqueezeError(f"{sources[key]} and --option {key} both set `{key}`.", "Give it once.")
            sources[key], values[key] = f"--option {key}", value
        try:
            return api.method_options(method, values), sources
        except api.UnknownOptionError as exc:
            source = next(s for k, s in sources.items() if k.partition(".")[0] == exc.key)
            if not source.startswith("--option"):  # all the flags that set this option, as they read in --help
                source = "/".join(f for f, k in self.keys.items() if k.partition(".")[0] == exc.key)
            raise SqueezeError(f"{source} does not apply to --method {method.name.removeprefix(f'{self.family}.')}.",
                               f"Its options: {', '.join(exc.accepted) or 'none'}.") from None

    def invalid(self, exc: pydantic.ValidationError, method: type, names: dict[str, str]) -> Exception:
        """A validation error of what the user typed (the method's options, the budget, the recipe they make) as
        one naming it: `names` maps fields (dotted) to flags. Any other error is returned as is: a bug, reported
        as one."""
        if exc.title not in (method.Options.__name__, "Budget", "MeasureOverrides", "Recipe"):
            return exc

        def where(loc: tuple) -> str:
            key = ".".join(map(str, loc))
            return names.get(key) or names.get(str(loc[-1]) if loc else "", key)

        bad = "; ".join(f"{where(e['loc'])} `{e['input']}`: {e['msg']}" if e["loc"] else e["msg"] for e in exc.errors())
        return SqueezeError(f"Invalid option value ({bad}).", f"See `squeeze {self.command} --help` for the accepted values.")


def _pair(text: str) -> tuple[str, Any]:
    """'short_term.iterations=50' -> ('short_term.iterations', 50): the value is read as a YAML scalar."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise SqueezeError(f"--option `{text}` is not KEY=VALUE.",
                           "Write e.g. --option short_term.iterations=50 (dotted keys reach nested options).")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise SqueezeError(f"--option `{text}`: the value is not YAML ({exc}).", "Quote it or write it plainly.") from None
