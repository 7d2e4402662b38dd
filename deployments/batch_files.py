"""The batch job's files: the input (a JSONL file or a folder of JSONL shards, local or on any filesystem pyarrow
reads), checked up front, and the output folder.

The output folder holds `manifest.json` (the input's fingerprint and the job's options, so a rerun resumes only
the same job), `shards/part-NNNNNN.jsonl` (results committed a shard at a time: written beside, then renamed, so a
killed job keeps every shard it finished and never leaves half a line), `audio/` (one file per spoken reply, also
written then renamed) and `results.jsonl`, all shards merged in input order when a run completes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from common.errors import InvalidRequestError

# the field that names a row, by input form: ours, or OpenAI's Batch API
ID_FIELDS = {"ours": "id", "openai": "custom_id"}
MAX_LISTED = 10  # problems named in an up-front error
# audio file extensions by the API's audio.format
_EXTENSIONS = {"wav": "wav", "pcm16": "pcm", "flac": "flac", "mp3": "mp3", "opus": "ogg"}


@dataclass(frozen=True)
class InputRow:
    key: str  # the row's id (custom_id in the OpenAI form), unique in the input
    position: int  # its place in the input (results.jsonl keeps this order)
    line: str  # the row's JSON text
    media_dir: str | None  # the local folder of its file: relative media paths are relative to it (None: remote)


@dataclass(frozen=True)
class BatchInput:
    form: str  # "ours" | "openai"
    rows: list[InputRow]
    fingerprint: str  # sha256 of the files' names and bytes


def read_input(path: str) -> BatchInput:
    """Every row of the input. A line that is not a JSON object with a string id, or an id given twice, fails the
    whole input here, before anything runs (as OpenAI's Batch API validates its input file): such a row has no name
    its result could be filed under. Everything else about a row is checked when it runs, and a bad one gets an
    error entry."""
    digest = hashlib.sha256()
    rows, problems, form = [], [], None
    for name, data, media_dir in _input_files(path):
        digest.update(name.encode() + b"\0" + data + b"\0")
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{name}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{where}: not JSON ({e.msg})")
                continue
            form = form or ("openai" if isinstance(row, dict) and "custom_id" in row else "ours")
            key = row.get(ID_FIELDS[form]) if isinstance(row, dict) else None
            if not isinstance(key, str) or not key:
                problems.append(f"{where}: not a JSON object with a non-empty string {ID_FIELDS[form]!r}")
                continue
            rows.append(InputRow(key, len(rows), line, media_dir))
    if problems:
        raise InvalidRequestError(_listed(f"{len(problems)} line(s) of {path} cannot be read as rows", problems))
    if not rows:
        raise InvalidRequestError(f"{path} holds no rows")
    _refuse_duplicates(rows, ID_FIELDS[form])
    return BatchInput(form, rows, digest.hexdigest())


def _listed(head: str, items: list[str]) -> str:
    more = f" (and {len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return f"{head}: " + "; ".join(items[:MAX_LISTED]) + more


def _refuse_duplicates(rows: list[InputRow], id_field: str) -> None:
    seen, repeated = set(), {}
    for row in rows:
        if row.key in seen:
            repeated[row.key] = None
        seen.add(row.key)
    if repeated:
        raise InvalidRequestError(_listed(f"{len(repeated)} {id_field}(s) appear more than once in the input",
                                          [repr(k) for k in repeated]))


def _input_files(path: str) -> list[tuple[str, bytes, str | None]]:
    """(name, bytes, local folder) of the input's files: the file itself, or a folder's `*.jsonl` in name order."""
    if "://" in path:
        return _remote_files(path)
    root = Path(path)
    if root.is_dir():
        files = sorted(root.glob("*.jsonl"))
        if not files:
            raise InvalidRequestError(f"{path} holds no *.jsonl files")
    elif root.is_file():
        files = [root]
    else:
        raise InvalidRequestError(f"{path} does not exist")
    return [(f.name, f.read_bytes(), str(f.parent.resolve())) for f in files]


def _remote_files(uri: str) -> list[tuple[str, bytes, None]]:
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    info = fs.get_file_info(root)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise InvalidRequestError(f"{uri} does not exist")
    if info.type == pyarrow.fs.FileType.Directory:
        infos = [i for i in fs.get_file_info(pyarrow.fs.FileSelector(root)) if i.path.endswith(".jsonl")]
    else:
        infos = [info]
    return [(i.base_name, fs.open_input_stream(i.path).read(), None) for i in sorted(infos, key=lambda i: i.path)]


def audio_file_name(key: str, audio_format: str) -> str:
    """The reply's audio file under `audio/`: the id, escaped so any id is one safe file name."""
    return f"{quote(key, safe='')}.{_EXTENSIONS[audio_format]}"


def _write_atomically(path: Path, data: bytes) -> None:
    """Write beside `path`, then rename over it: a reader (or a rerun after a kill) sees all of it or none."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class OutputDir:
    def __init__(self, root: str | Path, form: str):
        self.root = Path(root)
        self.id_field = ID_FIELDS[form]
        self.shards = self.root / "shards"
        self.audio = self.root / "audio"

    def open(self, manifest: dict) -> None:
        """Start this output, or resume it: a rerun must be the same job (same input, same options)."""
        path = self.root / "manifest.json"
        if path.exists():
            previous = json.loads(path.read_text())
            for field in ("fingerprint", "options"):
                if previous.get(field) != manifest[field]:
                    raise InvalidRequestError(
                        f"{self.root} holds the output of another job (its {field} was "
                        f"{json.dumps(previous.get(field))}, now {json.dumps(manifest[field])}): the input or the "
                        "options changed since it was started. Use a new --output, or delete this one to start over")
            return
        for folder in (self.root, self.shards, self.audio):
            folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, json.dumps(manifest, indent=2).encode())

    def _shard_files(self) -> list[Path]:
        return sorted(self.shards.glob("part-*.jsonl"))

    def done_keys(self) -> set[str]:
        return {json.loads(line)[self.id_field] for shard in self._shard_files()
                for line in shard.read_text().splitlines()}

    def commit(self, lines: list[str], audio: dict[str, bytes]) -> None:
        """One shard: its audio files first, then its lines, renamed into place last (the commit point: audio
        written by a run killed before it is written again by the rerun)."""
        for name, data in audio.items():
            _write_atomically(self.audio / name, data)
        shards = self._shard_files()
        number = int(shards[-1].stem.removeprefix("part-")) + 1 if shards else 0
        _write_atomically(self.shards / f"part-{number:06d}.jsonl", "".join(f"{line}\n" for line in lines).encode())

    def merge(self, order: dict[str, int]) -> Path:
        """results.jsonl: every committed line, in input order."""
        lines = [line for shard in self._shard_files() for line in shard.read_text().splitlines()]
        lines.sort(key=lambda line: order[json.loads(line)[self.id_field]])
        path = self.root / "results.jsonl"
        _write_atomically(path, "".join(f"{line}\n" for line in lines).encode())
        return path
