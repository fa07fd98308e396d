"""Named real-world pattern configurations: the catalogue's JSON files.

The catalogue ships inside the package as data (``flexna.tools.masks``, read with
:mod:`importlib.resources`; in a source checkout it is the top-level ``masks/``
folder). Each ``NAME.json`` holds ``name`` (equal to ``NAME``), ``description``,
``source``, the pattern and the model's ``heads`` and ``head_dim``. The pattern is
neighborhood attention (``shape``, ``kernel_size``, ``stride``, ``dilation``,
``is_causal``) unless ``"rule"`` names another one with its own fields:
``"sliding_tile"`` (STA: ``shape``, ``tile``, ``window``), ``"radial"`` (radial attention:
``shape`` = frames and tokens per frame, ``model``, ``decay_factor``, ``block_size``) and
``"radial_window"`` (its 3-D-window variant: ``shape``, ``radius``, ``min_radius``,
``dense_frames``, ``sink``).
An optional ``adaptive`` object declares adaptive blocks on the pattern's window
(:func:`flexna.adaptive_block_mask`): exactly one of ``threshold`` (NABLA's softmax mass,
``0 < threshold <= 1``) and ``top_k`` (an integer >= 1), and ``seed`` (an integer in
``0..2**31-1``) for the synthetic ``q``/``k`` of :func:`flexna.adaptive.local_qk` that
``flexna show`` draws the selection from (it is data-dependent; the entry fixes one draw).
An optional ``model_config`` holds
how a whole model runs it, in the format of
:meth:`flexna.integrations.config.SparsityConfig.create` (``pattern`` or ``layers`` in the
NATTEN / Cosmos format, ``dense_layers``, ``dense_steps``); it must fit the entry's ``shape``.
:meth:`CatalogueEntry.sparsity_config` gives it, or, without one, the entry's pattern with
``base_size`` = ``shape`` (windows rescale with the resolution).

Another folder can stand in for it: pass ``folder=`` (the command line's
``--catalogue DIR``) or set ``FLEXNA_MASKS``. Names are plain file stems checked
against the folder's listing, so a name never reaches outside the folder. A file
that does not hold a valid entry raises :class:`CatalogueError`, naming the file
and the field at fault.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from flexna.integrations.config import SparsityConfig
from flexna.pattern import NAPattern

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

CATALOGUE_ENV = "FLEXNA_MASKS"
PACKAGE = "flexna.tools.masks"
# a catalogue name: a plain file stem (no separators, no leading dot)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+.-]{0,99}")
MAX_FILE_BYTES = 1 << 20
MAX_INT = 2**31 - 1  # every integer of an entry fits int32 (as FlexAttention's indices do)
MAX_TEXT = 2000
PATTERN_FIELDS = ("shape", "kernel_size", "stride", "dilation", "is_causal")
FIELDS = ("name", "description", "source", *PATTERN_FIELDS, "heads", "head_dim")
# rules other than NA: their pattern fields (instead of PATTERN_FIELDS[1:])
RULE_FIELDS = {"sliding_tile": ("shape", "tile", "window"),
               "radial": ("shape", "model", "decay_factor", "block_size"),
               "radial_window": ("shape", "radius", "min_radius", "dense_frames", "sink")}
_TEXT_FIELDS = {"model"}
_NUMBER_FIELDS = {"decay_factor"}
_ZERO_OK = {"radius", "min_radius", "dense_frames"}


ADAPTIVE_FIELDS = ("threshold", "top_k", "seed")
# synthetic q and k of an adaptive entry are each [1, 1, tokens, head_dim] float32 on the CPU
MAX_ADAPTIVE_VALUES = 2**25


class CatalogueError(ValueError):
    """A catalogue folder or file that cannot be used: ``where`` (file or folder), ``field``, ``problem``."""

    def __init__(self, where: str, problem: str, field: str | None = None) -> None:
        self.where, self.field, self.problem = where, field, problem
        super().__init__(f"{where}: {f'field {field!r}: ' if field else ''}{problem}")


class UnknownNameError(ValueError):
    """A name that is not one of the catalogue's entries."""


@dataclass(frozen=True)
class AdaptiveSelection:
    """An entry's ``adaptive`` object: one of ``threshold`` / ``top_k``, and the ``seed`` of the
    synthetic ``q``/``k`` its picture is drawn from."""

    threshold: float | None
    top_k: int | None
    seed: int

    def kwargs(self) -> dict:
        """The selection as keyword arguments of :func:`flexna.adaptive_block_mask`."""
        return {"threshold": self.threshold} if self.threshold is not None else {"top_k": self.top_k}

    def describe(self) -> str:
        """``threshold=0.9`` or ``top_k=8``."""
        return "".join(f"{k}={v}" for k, v in self.kwargs().items())


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    description: str
    source: str
    pattern: NAPattern
    heads: int
    head_dim: int
    model_config: dict | None = None
    adaptive: AdaptiveSelection | None = None  # adaptive blocks on the window (data-dependent)

    def sparsity_config(self) -> dict:
        """The entry as a model config for :func:`flexna.integrations.diffusers.apply_neighborhood_attention`
        (``model_config``, else the pattern with ``base_size`` = ``shape``)."""
        if self.model_config is not None:
            return json.loads(json.dumps(self.model_config))  # a copy the caller may change
        p = self.pattern
        return {"pattern": {"window_size": list(p.kernel_size), "stride": list(p.stride),
                            "dilation": list(p.dilation), "is_causal": list(p.is_causal),
                            "base_size": list(p.shape)}}


def catalogue_dir(folder: str | os.PathLike | None = None) -> Traversable:
    """The catalogue folder: ``folder``, else ``$FLEXNA_MASKS``, else the package data.

    Raises :class:`CatalogueError` when a given folder does not exist or is not a folder.
    """
    if folder is None:
        folder = os.environ.get(CATALOGUE_ENV) or None
        origin = f"${CATALOGUE_ENV}"
    else:
        origin = "catalogue folder"
    if folder is None:
        try:
            return resources.files(PACKAGE)
        except ModuleNotFoundError:
            raise CatalogueError(f"package data {PACKAGE}", "not installed (a broken install of "
                                 f"flexna?); set ${CATALOGUE_ENV} to a catalogue folder") from None
    path = Path(folder)
    if not path.exists():
        raise CatalogueError(f"{origin} {str(path)!r}", "no such folder")
    if not path.is_dir():
        raise CatalogueError(f"{origin} {str(path)!r}", "not a folder")
    return path


def _json_files(root: Traversable) -> list[Traversable]:
    try:
        items = list(root.iterdir())
    except OSError as exc:
        raise CatalogueError(str(root), f"cannot list the folder: {exc.strerror or exc}") from None
    return sorted((p for p in items if p.name.endswith(".json") and not p.name.startswith(".")),
                  key=lambda p: p.name[: -len(".json")])


def scan(folder: str | os.PathLike | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """``(valid names, [(file, problem), ...])``: every ``*.json`` of the folder, sorted.

    A name is valid when the file stem is a plain name; the file's content is checked by
    :func:`load_entry`.
    """
    names, bad = [], []
    root = catalogue_dir(folder)
    for item in _json_files(root):
        stem = item.name[: -len(".json")]
        if NAME_RE.fullmatch(stem):
            names.append(stem)
        else:
            bad.append((str(item), f"{stem!r} is not a plain catalogue name "
                        "(letters, digits and _+.- only, not starting with . or -)"))
    return names, bad


def list_entries(folder: str | os.PathLike | None = None) -> list[str]:
    """Names of all catalogue entries, sorted (files whose stem is not a plain name are left out)."""
    return scan(folder)[0]


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-8:]} ({len(text)} chars)"


def _check_int(where: str, field: str, value: object) -> int:
    if type(value) is not int:
        raise CatalogueError(where, f"must be an integer, got {_short(value)} "
                             f"({type(value).__name__})", field)
    if not 1 <= value <= MAX_INT:
        raise CatalogueError(where, f"{_short(value)} is out of range: need 1 <= {field} <= {MAX_INT}",
                             field)
    return value


def _check_ints(where: str, field: str, value: object) -> int | tuple[int, ...]:
    if type(value) is int:
        return _check_int(where, field, value)
    if not isinstance(value, list) or not 1 <= len(value) <= 3:
        raise CatalogueError(where, f"must be an integer or a list of 1 to 3 integers, got "
                             f"{_short(value)} ({type(value).__name__})", field)
    return tuple(_check_int(where, f"{field}[{i}]", v) for i, v in enumerate(value))


def _check_bools(where: str, field: str, value: object) -> bool | tuple[bool, ...]:
    if isinstance(value, bool):
        return value
    if not isinstance(value, list) or not 1 <= len(value) <= 3 or not all(
            isinstance(v, bool) for v in value):
        raise CatalogueError(where, f"must be true/false or a list of 1 to 3 of them, got "
                             f"{_short(value)}", field)
    return tuple(value)


def _check_text(where: str, field: str, value: object) -> str:
    if not isinstance(value, str):
        raise CatalogueError(where, f"must be a string, got {_short(value)} ({type(value).__name__})",
                             field)
    if len(value) > MAX_TEXT or not value.isprintable():
        raise CatalogueError(where, f"must be one printable line of at most {MAX_TEXT} characters",
                             field)
    return value


def parse_entry(where: str, stem: str, raw: bytes) -> CatalogueEntry:
    """Validate the bytes of the file ``where`` (named ``stem.json``) as a catalogue entry."""
    if len(raw) > MAX_FILE_BYTES:
        raise CatalogueError(where, f"larger than a catalogue entry may be ({MAX_FILE_BYTES} bytes)")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CatalogueError(where, "not UTF-8 text") from None
    except RecursionError:
        raise CatalogueError(where, "not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of too many digits
        raise CatalogueError(where, f"not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise CatalogueError(where, f"must hold a JSON object, got a {type(data).__name__}")
    rule = data.get("rule", "na")
    if rule != "na" and rule not in RULE_FIELDS:
        raise CatalogueError(where, f"{_short(rule)} is not a known rule (na, "
                             f"{', '.join(RULE_FIELDS)})", "rule")
    needed = FIELDS if rule == "na" else ("name", "description", "source", *RULE_FIELDS[rule],
                                          "heads", "head_dim")
    missing = [f for f in needed if f not in data]
    if missing:
        raise CatalogueError(where, "missing", missing[0])
    name = _check_text(where, "name", data["name"])
    if name != stem:
        raise CatalogueError(where, f"is {_short(name)}, but the file is {stem}.json: they must "
                             "agree", "name")
    description = _check_text(where, "description", data["description"])
    source = _check_text(where, "source", data["source"])
    heads = _check_int(where, "heads", data["heads"])
    head_dim = _check_int(where, "head_dim", data["head_dim"])
    fields = PATTERN_FIELDS if rule == "na" else RULE_FIELDS[rule]
    values = {f: _check_field(where, f, data[f]) for f in fields}
    try:
        pattern = _build_pattern(rule, values)
    except (ValueError, TypeError) as exc:
        first = re.match(r"\w+", str(exc))
        field = first.group(0) if first and first.group(0) in fields else "pattern"
        raise CatalogueError(where, str(exc), field) from None
    model_config = data.get("model_config")
    if model_config is not None:
        _check_model_config(where, model_config, pattern.shape)
    adaptive = None
    if "adaptive" in data:
        adaptive = _check_adaptive(where, data["adaptive"])
        count = pattern.num_tokens * head_dim
        if count > MAX_ADAPTIVE_VALUES:
            raise CatalogueError(where, f"the synthetic q/k of its picture would hold {count} values "
                                 f"(tokens x head_dim); need at most {MAX_ADAPTIVE_VALUES}", "adaptive")
    return CatalogueEntry(name, description, source, pattern, heads, head_dim, model_config, adaptive)


def _check_adaptive(where: str, value: object) -> AdaptiveSelection:
    """``adaptive``: an object with exactly one of threshold / top_k, and seed."""
    if not isinstance(value, dict):
        raise CatalogueError(where, f"must be an object with threshold or top_k, and seed, got "
                             f"{_short(value)} ({type(value).__name__})", "adaptive")
    unknown = [k for k in value if k not in ADAPTIVE_FIELDS]
    if unknown:
        key = unknown[0]
        raise CatalogueError(where, f"{_short(key)} is not a field of adaptive (allowed: "
                             f"{', '.join(ADAPTIVE_FIELDS)})",
                             f"adaptive.{key}" if re.fullmatch(r"[A-Za-z0-9_]{1,40}", key) else "adaptive")
    if ("threshold" in value) == ("top_k" in value):
        raise CatalogueError(where, "give exactly one of threshold (0 < threshold <= 1) and top_k "
                             f"(an integer in 1..{MAX_INT})", "adaptive")
    threshold, top_k = value.get("threshold"), value.get("top_k")
    if "threshold" in value:
        field = "adaptive.threshold"
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise CatalogueError(where, f"must be a number, got {_short(threshold)} "
                                 f"({type(threshold).__name__})", field)
        if not 0 < threshold <= 1:  # NaN fails too
            raise CatalogueError(where, f"{_short(threshold)} is out of range: need 0 < threshold <= 1",
                                 field)
        threshold = float(threshold)
    else:
        if type(top_k) is not int:
            raise CatalogueError(where, f"must be an integer, got {_short(top_k)} "
                                 f"({type(top_k).__name__})", "adaptive.top_k")
        if not 1 <= top_k <= MAX_INT:
            raise CatalogueError(where, f"{_short(top_k)} is out of range: need 1 <= top_k <= {MAX_INT}",
                                 "adaptive.top_k")
    if "seed" not in value:
        raise CatalogueError(where, f"missing (an integer in 0..{MAX_INT}: the seed of the synthetic "
                             "q/k the picture is drawn from)", "adaptive.seed")
    seed = value["seed"]
    if type(seed) is not int:
        raise CatalogueError(where, f"must be an integer, got {_short(seed)} ({type(seed).__name__})",
                             "adaptive.seed")
    if not 0 <= seed <= MAX_INT:
        raise CatalogueError(where, f"{_short(seed)} is out of range: need 0 <= seed <= {MAX_INT}",
                             "adaptive.seed")
    return AdaptiveSelection(threshold, top_k, seed)


def _check_model_config(where: str, config: object, shape: tuple[int, ...]) -> None:
    """``model_config`` must be a model dict that :class:`SparsityConfig` accepts and whose patterns
    fit ``shape``."""
    if not isinstance(config, dict) or not ({"pattern", "layers"} & set(config)):
        raise CatalogueError(where, "must be an object with 'pattern' or 'layers'", "model_config")
    try:
        cfg = SparsityConfig.create(config)
        layers = cfg.layers if isinstance(cfg.layers, tuple) else (cfg.layers,)
        for layer in layers:
            if layer is not None:
                layer.resolve(shape)
    except (ValueError, TypeError) as exc:
        raise CatalogueError(where, str(exc), "model_config") from None


def _check_field(where: str, field: str, value: object) -> object:
    """A pattern field checked for its kind (bools, text, a number, ints >= 1 or >= 0)."""
    if field in ("is_causal", "sink"):
        return _check_bools(where, field, value)
    if field in _TEXT_FIELDS:
        return _check_text(where, field, value)
    if field in _NUMBER_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CatalogueError(where, f"must be a number, got {_short(value)}", field)
        return value
    if field in _ZERO_OK:  # ints >= 0 (one, or one per axis)
        items = value if isinstance(value, list) and 1 <= len(value) <= 3 else [value]
        for i, v in enumerate(items):
            if type(v) is not int or not 0 <= v <= MAX_INT:
                at = f"{field}[{i}]" if isinstance(value, list) else field
                raise CatalogueError(where, f"must be an integer in 0..{MAX_INT}, got {_short(v)}", at)
        return tuple(items) if isinstance(value, list) else value
    return _check_ints(where, field, value)


def _build_pattern(rule: str, values: dict) -> NAPattern:
    """The validated pattern of a rule from its checked fields."""
    if rule == "sliding_tile":
        from flexna import sliding_tile_pattern

        return sliding_tile_pattern(values["shape"], values["tile"], values["window"])
    if rule == "radial":
        from flexna import radial_pattern

        shape = values["shape"]
        if not isinstance(shape, tuple) or len(shape) != 2:
            raise ValueError(f"shape must be [frames, tokens_per_frame], got {shape!r}")
        return radial_pattern(shape[0], shape[1], model=values["model"],
                              decay_factor=values["decay_factor"], block_size=values["block_size"])
    if rule == "radial_window":
        from flexna import radial_window_pattern

        sink = values["sink"]
        return radial_window_pattern(values["shape"], values["radius"], min_radius=values["min_radius"],
                                     dense_frames=values["dense_frames"],
                                     sink=sink if isinstance(sink, bool) else bool(sink[0]))
    return NAPattern.create(*(values[f] for f in PATTERN_FIELDS))


def check_name(name: str, folder: str | os.PathLike | None = None) -> Traversable:
    """The file of the entry ``name``: a plain stem listed in the folder (else ``UnknownNameError``)."""
    root = catalogue_dir(folder)
    names = list_entries(folder)
    if not (isinstance(name, str) and NAME_RE.fullmatch(name)) or name not in names:
        known = ", ".join(names) if names else "none"
        raise UnknownNameError(f"name = {_short(name)} is not in the catalogue {root} (names are plain "
                               f"file stems; known: {known})")
    return root / f"{name}.json"


def _read(item: Traversable) -> bytes:
    try:
        with item.open("rb") as f:
            return f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise CatalogueError(str(item), f"cannot read: {exc.strerror or exc}") from None


def load_all(folder: str | os.PathLike | None = None) -> tuple[list[CatalogueEntry], list[CatalogueError]]:
    """Every entry of the folder that is valid, and a :class:`CatalogueError` for every file that is not."""
    names, bad_names = scan(folder)
    root = catalogue_dir(folder)
    entries, bad = [], [CatalogueError(where, problem) for where, problem in bad_names]
    for name in names:
        item = root / f"{name}.json"
        try:
            entries.append(parse_entry(str(item), name, _read(item)))
        except CatalogueError as exc:
            bad.append(exc)
    bad.sort(key=lambda e: e.where)
    return entries, bad


def load_entry(name: str, folder: str | os.PathLike | None = None) -> CatalogueEntry:
    """Load and validate one entry by name.

    ``UnknownNameError`` (a ``ValueError``) when ``name`` is not an entry of the folder,
    :class:`CatalogueError` when its file is not a valid entry.
    """
    item = check_name(name, folder)
    return parse_entry(str(item), name, _read(item))
