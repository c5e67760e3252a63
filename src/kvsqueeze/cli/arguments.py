"""The argument types and option groups the commands share, and how a command loads its model."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from kvsqueeze.cli.logs import logger
from kvsqueeze.gguf_packages import GGUF_PACKAGES

_WORDS = {"true": True, "false": False, "none": None, "null": None}


def option_value(raw: str) -> Any:
    """An --option VALUE as Python sees it: JSON first (8, 8.5, true, null, "text", [1, 2]), then True/False/None
    in any case, then an int or a float (nan and inf included), else the text itself. The method then checks the
    type: "8.5" for an integer option is refused, not rounded."""
    text = raw.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return raw


def parse_option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--option expects KEY=VALUE, got {text!r}")
    return key.strip(), option_value(raw)


def ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1) (the fraction of tokens removed), got {value}")
    return value


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def ratios(text: str) -> list[float]:
    return [ratio(t) for t in names(text)]


def lengths(text: str) -> list[int]:
    try:
        return [positive(t) for t in names(text)]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"context lengths must be integers >= 1, got {text!r}") from None


def kv_bits_list(text: str) -> list[int | None]:
    """--kv-bits 16,8,4,2: integers, with 'none' (and 16 or 32, as the bench reads them) for full precision; the
    bench checks the values (2, 4 or 8) before the model loads."""
    out: list[int | None] = []
    for token in names(text):
        if token.lower() == "none":
            out.append(None)
            continue
        try:
            out.append(int(token))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bits must be 2, 4, 8, or 16/none for full precision; got {token!r}"
            ) from None
    return out


def method_option(text: str) -> tuple[str, str, Any]:
    key, value = parse_option(text)
    method, dot, name = key.partition(".")
    if not dot or not method or not name:
        raise argparse.ArgumentTypeError(f"--option expects METHOD.KEY=VALUE (e.g. snapkv.window=16), got {text!r}")
    return method, name, value


def task_option(text: str) -> tuple[str, str, Any]:
    key, value = parse_option(text)
    task, dot, name = key.partition(".")
    if not dot or not task or not name:
        raise argparse.ArgumentTypeError(
            f"--task-option expects TASK.KEY=VALUE (e.g. passkey_varied.phrasings=pass_key,magic_number), got {text!r}"
        )
    return task, name, value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default where it says something (not None, not a flag's) and keeps the description
    and the examples of the epilog as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:  # the hook ArgumentDefaults... overrides too
        if action.nargs == 0 or action.default is None or action.default == []:
            return action.help
        return super()._get_help_string(action)


def logging_options(top: bool) -> argparse.ArgumentParser:
    """-v/-q, accepted before the subcommand and after it. Only the top parser sets the default (INFO): a subparser's
    default would overwrite a -v given before the subcommand."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_mutually_exclusive_group()
    for flags, level, text in (
        (("-v", "--verbose"), logging.DEBUG, "debug messages on stderr"),
        (("-q", "--quiet"), logging.WARNING, "only warnings and errors on stderr (no progress bar)"),
    ):
        group.add_argument(*flags, dest="log_level", action="store_const", const=level, default=argparse.SUPPRESS,
                           help=text)  # fmt: skip
    if top:
        parent.set_defaults(log_level=logging.INFO)
    return parent


def model_options() -> argparse.ArgumentParser:
    """The options that choose and place the model, shared by every subcommand that loads one."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("model")
    group.add_argument(
        "--model",
        default=None,
        help=f"a short name ({', '.join(GGUF_PACKAGES)}: a model shipped in a Python package, converted once) or a "
        "local model directory (default: the embedded SmolLM2-135M-Instruct)",
    )
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    group.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention underneath kvsqueeze")
    group.add_argument("--device", default=None, help="torch device, e.g. cuda (default: the CPU)")
    return parent


def load_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    from kvsqueeze.loading import check_device, load_model

    if args.device is not None:
        check_device(args.device)  # before the "Loading" line: a device this machine lacks is the only message
    logger.info("Loading model %s ...", args.model or "SmolLM2-135M-Instruct (embedded)")
    return load_model(args.model, dtype=args.dtype, attn_implementation=args.attn, device=args.device)


def add_parser(sub: Any, name: str, parents: list[argparse.ArgumentParser], examples: str, **kwargs: Any) -> Any:
    """A subcommand's parser: the shared help layout, `examples` as its epilog."""
    return sub.add_parser(name, parents=parents, formatter_class=HelpFormatter, epilog=examples, **kwargs)


GENERATE_DEFAULTS = {"method": "knorm", "ratio": 0.5}


OPTION_HELP = "method option KEY=VALUE (VALUE read as JSON, or True/False/None; other text stays text)"


def budget_policies() -> list[str]:
    """The budget policies' names, for --budget-policy's choices."""
    from kvsqueeze.methods.registry import BUDGET_POLICIES

    return sorted(BUDGET_POLICIES)


def add_quant_layout_options(p: argparse.ArgumentParser) -> None:
    """--kv-group-size and --kv-residual: how a quantized cache is laid out (with --kv-bits)."""
    p.add_argument("--kv-group-size", type=int, default=32, help="with --kv-bits: values sharing a scale and zero")
    p.add_argument("--kv-residual", type=int, default=64, help="with --kv-bits: newest tokens kept in full precision")


def add_executor_options(p: argparse.ArgumentParser, what: str) -> None:
    """--executor serial|ray and the Ray options (bench, tune); `what`: what the executor computes."""
    p.add_argument(
        "--executor",
        choices=["serial", "ray"],
        default="serial",
        help=f"who computes the {what}: this process (serial) or Ray actors, each loading the model once (needs "
        "pip install 'kvsqueeze[ray]'); not part of the run: either one resumes the other's folder",
    )
    p.add_argument("--ray-address", default=None, help="with --executor ray: a running cluster to join (default: "
                   "start Ray on this machine)")  # fmt: skip
    p.add_argument("--actors", type=positive, default=None, help="with --executor ray: how many actors (default: one "
                   "per GPU with --device cuda, else 2)")  # fmt: skip
    p.add_argument("--actor-threads", type=positive, default=None, help="with --executor ray: torch threads (and Ray "
                   "CPUs) per CPU actor (default: the smallest node's cores // actors)")  # fmt: skip
    p.add_argument("--retries", type=int, default=2, help="with --executor ray: how many times a unit whose actor "
                   "died runs again before its rows go to failed.jsonl")  # fmt: skip


def ray_options(args: argparse.Namespace) -> Any:
    """The RayOptions of --executor ray (None for a serial run); the Ray options without it are a mistake."""
    from kvsqueeze.bench.ray_executor import RayOptions, import_ray

    given = [f for f, v in (("--ray-address", args.ray_address), ("--actors", args.actors),
                            ("--actor-threads", args.actor_threads)) if v is not None]  # fmt: skip
    if args.executor != "ray":
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --executor ray")
        return None
    import_ray()  # ModuleNotFoundError saying how to install Ray, before the model loads
    return RayOptions(address=args.ray_address, actors=args.actors, threads=args.actor_threads, retries=args.retries)
