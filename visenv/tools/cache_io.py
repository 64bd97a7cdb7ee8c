"""Calls files: import outputs you already generated into a cache, export a cache, plan builds.

A calls file is JSONL, one call per line::

    {"tool": "tool_text2image_qwen", "arguments": {"prompt": "a red fox", "aspect_ratio": "16:9"},
     "file": "images/fox.png", "seed": 7}
    {"tool": "tool_image_edit_qwen", "arguments": {"image": "images/fox.png", "prompt": "make it night"},
     "file": ["images/fox_night.png"]}
    {"tool": "tool_prompt_refine", "arguments": {"prompt": "a fox"}, "text": "A red fox, low sun..."}

- ``file``: the output file (or a list, in order), relative to the calls file's folder; ``text``:
  the text answer (required for text tools, optional otherwise).
- Artifact arguments name files (relative paths) or content hashes ``"sha256:<hex>"``.
- ``seed``: optional; without it the entry answers any seed. ``version``: the tool version it was
  made with (default: the current one). ``attributes``: optional attributes per file that the file
  cannot show (``shots``, ``has_audio``); measured ones (resolution, duration, fps) win.

:func:`export_cache` writes the same format (content hashes for artifacts), so an export imports
back to the same keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from visenv.error import CacheFormatError, UnknownToolError
from visenv.media import ID_PREFIX, Artifact, sha256_file
from visenv.mediadb import MEDIA_SUFFIXES, probe
from visenv.tools.backends import MediaOutput, ToolRequest
from visenv.tools.cache import ToolCache
from visenv.tools.cache_key import HASH_PREFIX, CallKey
from visenv.tools.spec import ToolSpec
from visenv.tools.specs import get_tool

_HASH_REF = re.compile(rf"^{HASH_PREFIX}[0-9a-f]{{64}}$")


@dataclass(frozen=True)
class CallLine:
    """One parsed line of a calls file.

    Attributes:
        line: the 1-based line number.
        spec: the tool.
        version: the tool version the line was made with.
        arguments: the arguments, artifact references as ``"sha256:<hex>"``.
        inputs: artifact argument -> artifacts, for the arguments whose files are at hand.
        seed: the seed, or None (answers any seed).
        files: the output files.
        text: the text answer.
        attributes: per output file, attributes given by the line.
    """

    line: int
    spec: ToolSpec
    version: int
    arguments: Mapping[str, Any]
    inputs: Mapping[str, tuple[Artifact, ...]]
    seed: int | None
    files: tuple[Path, ...] = ()
    text: str = ""
    attributes: tuple[Mapping[str, Any], ...] = field(default=())

    def request(self) -> ToolRequest:
        """The call as a backend request (seed 0 when the line has none)."""
        return ToolRequest(self.spec, self.arguments, self.inputs, 0 if self.seed is None else self.seed)

    def key(self) -> CallKey:
        """The cache key of the call."""
        key = CallKey.of(self.spec, self.arguments, self.inputs, self.seed)
        return CallKey(key.tool, self.version, key.arguments, key.seed)


def _fail(path: Path, line: int, message: str) -> CacheFormatError:
    return CacheFormatError(f"{path}:{line}: {message}")


def _artifact(file: Path, kinds: tuple[str, ...], where: str) -> Artifact:
    kind = MEDIA_SUFFIXES.get(file.suffix.lower())
    if kind not in kinds:
        raise ValueError(f"{where}: {file.name} is not a {' or '.join(kinds)} file")
    sha = sha256_file(file)
    return Artifact(id=f"{ID_PREFIX[kind]}_{sha[:12]}", kind=kind, sha256=sha, attributes=probe(file, kind),
                    producer="import", path=str(file))


def _resolve_inputs(spec: ToolSpec, arguments: dict[str, Any], base: Path, cache: ToolCache | None
                    ) -> dict[str, tuple[Artifact, ...]]:
    """Replace artifact references by hashes in ``arguments``; returns the artifacts whose files exist."""
    inputs = {}
    for inp in spec.inputs:
        if inp.argument not in arguments:
            continue
        refs = arguments[inp.argument] if inp.many else [arguments[inp.argument]]
        artifacts, hashes = [], []
        for ref in refs:
            if isinstance(ref, str) and _HASH_REF.match(ref):
                blob = cache.blob_path(ref[len(HASH_PREFIX):]) if cache is not None else None
                if blob is not None:
                    artifacts.append(_artifact(blob, inp.kinds, inp.argument))
                hashes.append(ref)
                continue
            file = base / str(ref)
            if not file.is_file():
                raise ValueError(f"{inp.argument}: {ref!r} is neither a file under {base} nor '{HASH_PREFIX}<hex>'")
            artifact = _artifact(file, inp.kinds, inp.argument)
            artifacts.append(artifact)
            hashes.append(HASH_PREFIX + artifact.sha256)
        arguments[inp.argument] = hashes if inp.many else hashes[0]
        if len(artifacts) == len(refs):
            inputs[inp.argument] = tuple(artifacts)
    return inputs


def _parse_line(record: Any, base: Path, cache: ToolCache | None, outputs: bool) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ValueError("each line must be a JSON object with 'tool' and 'arguments'")
    spec = get_tool(str(record.get("tool")))
    arguments = record.get("arguments")
    if not isinstance(arguments, dict):
        raise ValueError("'arguments' must be a JSON object")
    problems = spec.validate(arguments)
    if problems:
        raise ValueError(f"invalid arguments for {spec.name}: {'; '.join(problems)}")
    arguments = dict(arguments)
    inputs = _resolve_inputs(spec, arguments, base, cache)
    seed = record.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"'seed' must be an integer or null, not {seed!r}")
    parsed = {"spec": spec, "version": int(record.get("version", spec.version)), "arguments": arguments,
              "inputs": inputs, "seed": seed}
    if not outputs:
        return parsed
    names = record.get("file", [])
    names = [names] if isinstance(names, str) else names
    files = tuple(base / str(name) for name in names)
    text = record.get("text", "")
    if not isinstance(text, str):
        raise ValueError("'text' must be a string")
    kind = spec.output.kind
    if kind == "text" and (files or "text" not in record):
        raise ValueError(f"{spec.name} answers with text: give 'text' and no 'file'")
    if kind != "text" and not files:
        raise ValueError(f"{spec.name} produces {kind}: give its 'file' (or a list of files)")
    for file in files:
        if not file.is_file():
            raise ValueError(f"output file {file} does not exist")
        if MEDIA_SUFFIXES.get(file.suffix.lower()) != kind:
            raise ValueError(f"{file.name} is not a {kind} file ({spec.name} produces {kind})")
    attributes = record.get("attributes", [{}] * len(files))
    attributes = [attributes] if isinstance(attributes, dict) else attributes
    if not isinstance(attributes, list) or len(attributes) != len(files) or \
            not all(isinstance(a, dict) for a in attributes):
        raise ValueError("'attributes' must be an object per output file")
    return {**parsed, "files": files, "text": text, "attributes": tuple(attributes)}


def read_calls(path: str | os.PathLike, cache: ToolCache | None = None, outputs: bool = True) -> list[CallLine]:
    """Parse and check a calls file (see the module docstring); files are relative to its folder.

    Args:
        path: the JSONL file.
        cache: a cache whose blobs resolve ``"sha256:<hex>"`` artifact references to files.
        outputs: whether lines must name their outputs (import) or only the call (build).

    Raises:
        CacheFormatError: a line is not a valid call; the message names the file and line.
    """
    path = Path(path)
    calls = []
    with open(path, encoding="utf-8") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                calls.append(CallLine(line=number, **_parse_line(json.loads(raw), path.parent, cache, outputs)))
            except (ValueError, UnknownToolError, OSError) as exc:
                raise _fail(path, number, str(exc)) from None
    return calls


def import_calls(cache: ToolCache, calls_file: str | os.PathLike, progress: bool = True,
                 batch_size: int = 256) -> tuple[int, int]:
    """Import a folder of outputs described by a calls file into ``cache``.

    Every line is checked before anything is written. Lines whose key is already cached are
    skipped (the stored entry stands), so an import can be re-run; an entry whose file is damaged
    is quarantined and imported afresh, and a damaged file of the same content is rewritten.

    Returns:
        (entries imported, lines skipped because already cached).
    """
    from tqdm import tqdm

    calls = read_calls(calls_file, cache=cache, outputs=True)
    imported = skipped = 0
    for start in tqdm(range(0, len(calls), batch_size), desc="import", unit="batch", disable=not progress):
        items = []
        for call in calls[start:start + batch_size]:
            key = call.key()
            if cache.get_intact(key) is not None:
                skipped += 1
                continue
            prompt = call.arguments.get("prompt", "")
            outputs = []
            for file, given in zip(call.files, call.attributes):
                kind = MEDIA_SUFFIXES[file.suffix.lower()]
                outputs.append(MediaOutput(kind, sha256_file(file), str(file), {**given, **probe(file, kind)}, prompt))
            spec = call.spec if call.version == call.spec.version else _at_version(call.spec, call.version)
            items.append((spec, key, outputs, call.text, "import"))
        cache.put_many(items)
        imported += len(items)
    return imported, skipped


def _at_version(spec: ToolSpec, version: int) -> ToolSpec:
    return dataclasses.replace(spec, version=version)


def export_cache(cache: ToolCache, folder: str | os.PathLike, tool: str | None = None,
                 progress: bool = True) -> int:
    """Write the cache (or one tool's entries) as ``folder/calls.jsonl`` plus ``folder/media/``.

    Media files are hard-linked when the folder is on the cache's file system, else copied. An
    entry whose file is damaged is quarantined instead (:meth:`~visenv.tools.cache.ToolCache.servable`).

    Returns:
        The number of entries exported.
    """
    from tqdm import tqdm

    folder = Path(folder)
    (folder / "media").mkdir(parents=True, exist_ok=True)
    count = 0
    with open(folder / "calls.jsonl", "w", encoding="utf-8") as fh:
        for entry in tqdm(cache.entries(tool), desc="export", unit="entry", disable=not progress):
            if not cache.servable(entry):
                continue
            names = []
            for out in entry.outputs:
                target = folder / "media" / Path(out.path).name
                if not target.exists():
                    try:
                        os.link(out.path, target)
                    except OSError:
                        shutil.copyfile(out.path, target)
                names.append(f"media/{target.name}")
            record: dict[str, Any] = {"tool": entry.tool, "version": entry.tool_version,
                                      "arguments": entry.arguments, "seed": entry.seed}
            if names:
                record["file"] = names
                record["attributes"] = [dict(out.attributes) for out in entry.outputs]
            if entry.text or not names:
                record["text"] = entry.text
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count
