"""A PEFT adapter folder uploaded as a zip or tar archive: safe extraction, then the importer.

Nothing in an archive is trusted: members must be plain files with relative paths inside the
extraction directory (no "..", no absolute paths, no links or devices), and their count and
total uncompressed size are capped before anything is written, so an archive bomb is refused
unread.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from adapters.importers import AdapterImportError, ImportedAdapter, import_peft
from adapters.validation import DEFAULT_LIMITS, largest_file_bytes
from model.config import ModelConfig

MAX_MEMBERS = 64
# The largest adapter file of any kind (a LoRA's) plus its config.
MAX_TOTAL_BYTES = largest_file_bytes(DEFAULT_LIMITS) + (1 << 20)


def archive_kind(data: bytes) -> str | None:
    """'zip', 'tar' (plain or gzip/bz2/xz-compressed) or None."""
    if data.startswith(b"PK\x03\x04"):
        return "zip"
    if data[257:262] == b"ustar" or data[:2] == b"\x1f\x8b" or data[:3] == b"BZh" or data[:6] == b"\xfd7zXZ\x00":
        return "tar"
    return None


def _safe_relative(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name or not path.parts:
        raise AdapterImportError(f"archive member {name!r}: only relative paths inside the archive are allowed")
    return path


def _members(data: bytes, kind: str):
    """(relative path, reader) for every file member, checked before anything is extracted."""
    total, out = 0, []
    if kind == "zip":
        archive = zipfile.ZipFile(io.BytesIO(data))
        for info in archive.infolist():
            if info.is_dir():
                continue
            if (info.external_attr >> 16) & 0o170000 not in (0, 0o100000):   # symlinks and the like
                raise AdapterImportError(f"archive member {info.filename!r} is not a regular file")
            total += info.file_size
            out.append((_safe_relative(info.filename), lambda i=info: archive.read(i)))
    else:
        archive = tarfile.open(fileobj=io.BytesIO(data))
        for info in archive.getmembers():
            if info.isdir():
                continue
            if not info.isfile():
                raise AdapterImportError(f"archive member {info.name!r} is not a regular file")
            total += info.size
            out.append((_safe_relative(info.name), lambda i=info: archive.extractfile(i).read()))
    if len(out) > MAX_MEMBERS or total > MAX_TOTAL_BYTES:
        raise AdapterImportError(f"archive too large: {len(out)} files, {total} bytes unpacked "
                                 f"(limits {MAX_MEMBERS} files, {MAX_TOTAL_BYTES} bytes)")
    return out


def import_peft_archive(data: bytes, cfg: ModelConfig) -> ImportedAdapter:
    """The one PEFT adapter in a zip/tar of its folder (at the top or in one subfolder)."""
    kind = archive_kind(data)
    if kind is None:
        raise AdapterImportError("not a zip or tar archive")
    try:
        members = _members(data, kind)
        with tempfile.TemporaryDirectory() as d:
            root = Path(d)
            for rel, read in members:
                target = root / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(read())
            found = import_peft(_adapter_root(root), cfg)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise AdapterImportError(f"unreadable {kind} archive: {e}") from None
    if len(found) != 1:
        raise AdapterImportError(f"the archive holds {len(found)} PEFT adapters; upload one at a time")
    return found[0]


def _adapter_root(root: Path) -> Path:
    """Archives made with `zip -r name.zip name/` wrap the folder in one directory."""
    entries = list(root.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return root
