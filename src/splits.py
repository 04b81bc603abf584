"""Splits of an image folder: find and validate them, write a flat folder's split down once
(sealed), and fingerprint them.

Layouts accepted by `find_splits(DIR)`:
  DIR/{train, valid|val, test}/<class>/<images>   used as given;
  DIR/<class>/<images>                            split once (stratified, seeded, 70/15/15 by
                                                  default) and written to DIR/.tlsweep-split.json
                                                  and a copy under the cache dir, which every later
                                                  run reuses, so the test set never moves.
The test split's files are listed and hashed (bytes, to notice any change before the final
test), never decoded: test images are decoded by `final_test` alone.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .files import write_json_atomic

log = logging.getLogger("tlsweep")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLIT_FILE = ".tlsweep-split.json"
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Splits:
    root: Path                                   # every entry path is relative to this
    layout: str                                  # "given" or "flat"
    classes: tuple[str, ...]
    train: tuple[tuple[str, int], ...]
    valid: tuple[tuple[str, int], ...]
    test: tuple[tuple[str, int], ...]            # names only: nothing but final_test opens these
    split_file: Path | None = None               # where a flat layout's split is written down
    ignored_files: int = 0                       # non-image files skipped while listing
    test_sha256: dict | None = None              # test file -> sha256, as recorded when the split was made

    @functools.cached_property
    def fingerprints(self) -> dict[str, str]:
        """Split name -> `fingerprint` of its files, computed once."""
        return {name: fingerprint(self.root, getattr(self, name)) for name in SPLITS}

    @functools.cached_property
    def test_hashes(self) -> dict[str, str]:
        """Test file -> sha256 of its bytes: recorded with a flat split, else computed now."""
        return self.test_sha256 or file_hashes(self.root, self.test)

    def record(self) -> dict:
        """The split written down: file lists per split, a fingerprint of each, and the hash of
        every test file (what `final_test` checks before it scores)."""
        rec = {"root": str(self.root), "layout": self.layout, "classes": list(self.classes)}
        for name in SPLITS:
            rec[name] = [[p, y] for p, y in getattr(self, name)]
            rec[f"{name}_fingerprint"] = self.fingerprints[name]
        rec["test_sha256"] = dict(self.test_hashes)
        return rec

    def summary(self) -> dict:
        counts = {name: {c: 0 for c in self.classes} for name in SPLITS}
        for name in SPLITS:
            for _, y in getattr(self, name):
                counts[name][self.classes[y]] += 1
        return {"root": str(self.root), "layout": self.layout, "n_classes": len(self.classes),
                "classes": list(self.classes), "counts": {n: len(getattr(self, n)) for n in SPLITS},
                "counts_per_class": counts, "ignored_non_image_files": self.ignored_files,
                "fingerprint": dict(self.fingerprints)}


def _hash_files(root: Path, entries, exact: bool) -> str:
    """sha256 over (relative path, label, size) per file; stats files, never opens them.
    `exact` adds the folder, modification times and the order of the entries."""
    h = hashlib.sha256(str(Path(root).resolve()).encode() if exact else b"")
    for rel, label in (entries if exact else sorted(entries)):
        st = os.stat(Path(root) / rel)
        fields = [rel, str(label), str(st.st_size)] + ([str(st.st_mtime_ns)] if exact else [])
        h.update(("\0".join(fields) + "\n").encode())
    return h.hexdigest()[:16]


def fingerprint(root: Path, entries) -> str:
    """Which files, labels and sizes a split has, in any order or folder (records, resume checks)."""
    return _hash_files(root, entries, exact=False)


def file_hashes(root: Path, entries) -> dict[str, str]:
    """Relative path -> sha256 of the file's bytes (read, never decoded)."""
    out = {}
    for rel, _ in entries:
        with open(Path(root) / rel, "rb") as f:
            out[rel] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def changed_files(root: Path, recorded: dict[str, str]) -> list[str]:
    """The recorded files whose bytes differ now (or that are gone)."""
    changed = []
    for rel, digest in recorded.items():
        path = Path(root) / rel
        if not path.is_file() or file_hashes(root, [(rel, 0)])[rel] != digest:
            changed.append(rel)
    return changed


def content_key(root: Path, entries) -> str:
    """Also the folder, modification times and ORDER (rows of a cached array follow it): what
    a cache of decoded pixels must depend on."""
    return _hash_files(root, entries, exact=True)


def _list_class_dir(class_dir: Path) -> tuple[list[Path], int]:
    images, ignored = [], 0
    for p in sorted(class_dir.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            if p.suffix.lower() in IMAGE_EXTS:
                images.append(p)
            else:
                ignored += 1
    return images, ignored


def _scan(split_dir: Path) -> tuple[dict[str, list[Path]], int]:
    """Class name -> image paths under `split_dir/<class>/`; errors name the empty dir."""
    class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<images>")
    found, ignored = {}, 0
    for d in class_dirs:
        images, skipped = _list_class_dir(d)
        ignored += skipped
        if not images:
            raise DataError(f"class folder {d} has no images (extensions {sorted(IMAGE_EXTS)}); "
                            f"add images or remove the folder")
        found[d.name] = images
    return found, ignored


def _given_layout(root: Path) -> Splits:
    valid_dir = root / "valid" if (root / "valid").is_dir() else root / "val"
    dirs = {"train": root / "train", "valid": valid_dir, "test": root / "test"}
    missing = [str(d) for d in dirs.values() if not d.is_dir()]
    if missing:
        raise DataError(f"{root} looks like a split layout (has train/) but lacks {missing}; "
                        f"provide train/, valid/ (or val/) and test/, or a flat <class>/ layout")
    scanned, ignored = {}, 0
    for name, d in dirs.items():
        scanned[name], skipped = _scan(d)
        ignored += skipped
    names = {n: set(s) for n, s in scanned.items()}
    if not names["train"] == names["valid"] == names["test"]:
        every = names["train"] | names["valid"] | names["test"]
        diff = {n: sorted(every - names[n]) for n in SPLITS if every - names[n]}
        raise DataError(f"class sets differ across splits in {root}: missing {diff}; "
                        f"every split needs the same class folders")
    classes = tuple(sorted(names["train"]))
    lists = {n: tuple((str(p.relative_to(root)), classes.index(c))
                      for c in classes for p in scanned[n][c]) for n in SPLITS}
    return Splits(root, "given", classes, lists["train"], lists["valid"], lists["test"],
                  ignored_files=ignored)


def cache_dir() -> Path:
    """Where demo data and fallback split files live: $TLSWEEP_CACHE or ~/.cache/tlsweep."""
    return Path(os.environ.get("TLSWEEP_CACHE", Path.home() / ".cache" / "tlsweep"))


def _split_file_candidates(root: Path) -> list[Path]:
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return [root / SPLIT_FILE, cache_dir() / "splits" / f"{key}.json"]


def _stratified(found: dict[str, list[Path]], root: Path, seed: int, fractions) -> dict:
    rng = random.Random(seed)
    out = {n: [] for n in SPLITS}
    for c in sorted(found):
        rels = [str(p.relative_to(root)) for p in found[c]]
        if len(rels) < 3:
            raise DataError(f"class {c!r} in {root} has {len(rels)} image(s); a flat folder needs at "
                            f"least 3 per class to give train, valid and test one each")
        rng.shuffle(rels)
        n_valid = max(1, round(len(rels) * fractions[1]))
        n_test = max(1, round(len(rels) * fractions[2]))
        out["test"] += [[r, c] for r in rels[:n_test]]
        out["valid"] += [[r, c] for r in rels[n_test:n_test + n_valid]]
        out["train"] += [[r, c] for r in rels[n_test + n_valid:]]
    return out


def _read_split_file(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
        if not all(isinstance(doc.get(n), list) for n in SPLITS):
            raise ValueError(f"it lacks one of the lists {list(SPLITS)}")
        return doc
    except (OSError, ValueError) as exc:
        raise DataError(f"split file {path} is damaged ({exc}). It records which images are test images, "
                        f"so it is never re-drawn silently: restore it (every sweep's MLflow parent run has it "
                        f"as dataset/split.json), or delete it only if no sweep has used this folder") from exc


def _flat_layout(root: Path, seed: int, fractions) -> Splits:
    found, ignored = _scan(root)
    candidates = _split_file_candidates(root)
    docs = {p: _read_split_file(p) for p in candidates if p.is_file()}
    if not docs:
        lists = _stratified(found, root, seed, fractions)
        # Hashed when the split is made: final_test refuses test files changed since.
        test = [(r, c) for r, c in lists["test"]]
        doc = {"seed": seed, "fractions": list(fractions), **lists, "test_sha256": file_hashes(root, test)}
    else:
        doc, *others = docs.values()
        if any(o.get(n) != doc.get(n) for o in others for n in SPLITS):
            raise DataError(f"the split files {[str(p) for p in docs]} record different splits of {root}; "
                            f"keep the one your sweeps used and delete the other")
    # The split is kept in the data folder AND the cache dir: deleting one copy (or re-running
    # with another --seed) never re-draws the test set; a missing copy is written again.
    written, errors = [], []
    for target in candidates:
        if target in docs:
            written.append(target)
            continue
        try:
            write_json_atomic(target, doc)
            written.append(target)
            if docs:
                log.info("split of %s: restored the copy %s from %s", root, target, next(iter(docs)))
        except OSError as exc:  # read-only data folder: the cache dir's copy serves
            errors.append(f"{target}: {exc}")
    if not written:
        raise DataError(f"cannot record the split of {root}: {'; '.join(errors)}. Make the data folder "
                        f"writable or set TLSWEEP_CACHE to a writable folder")
    existing = written[0]
    classes = tuple(sorted({c for n in SPLITS for _, c in doc[n]}))
    gone = [r for n in SPLITS for r, _ in doc[n] if not (root / r).is_file()]
    if gone:
        raise DataError(f"{len(gone)} file(s) in the recorded split {existing} are gone, e.g. {gone[:3]}; "
                        f"restore them (the test split must not change)")
    if set(found) != set(classes):
        raise DataError(f"class folders in {root} {sorted(found)} differ from the recorded split "
                        f"{existing} {list(classes)}; restore the folders")
    lists = {n: tuple((r, classes.index(c)) for r, c in doc[n]) for n in SPLITS}
    return Splits(root, "flat", classes, lists["train"], lists["valid"], lists["test"],
                  split_file=existing, ignored_files=ignored, test_sha256=doc.get("test_sha256"))


def find_splits(data_dir: str | Path, seed: int = 0, fractions=(0.70, 0.15, 0.15)) -> Splits:
    """Find train/valid/test under `data_dir` (either layout); errors name the path and the fix."""
    root = Path(data_dir).expanduser().resolve()  # recorded paths must work from any directory
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist; pass --data DIR with "
                        f"DIR/<class>/<images> or DIR/{{train,valid,test}}/<class>/<images>")
    if (root / "train").is_dir():
        return _given_layout(root)
    return _flat_layout(root, seed, fractions)


