"""A run folder's commit point, ``run.json`` (``besa.engine.checkpoint``): its format, its check when a run opens
the folder, and the names besa writes into the folder.

A run folder is data, never a source of paths: every name in ``run.json`` is checked to be the plain name
``RunFolder`` would have written (``acts-00004``), and a folder made by another run (another fingerprint) is
refused. A folder with no ``run.json`` yet is taken for the run: cleaned of what a killed run left, and marked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sized
from pathlib import Path
from typing import Any

from besa.engine import distributed
from besa.engine.checkpoint_files import remove_entry
from besa.errors import BesaError
from besa.settings.options import RUN_FILE, RUN_MARKER

__all__ = [
    "FORMAT_VERSION", "ACTS", "check_state", "is_run_artifact", "claim_folder", "read_state", "check_blocks",
    "new_state", "committed_state",
]  # fmt: skip

FORMAT_VERSION = 2
ACTS = re.compile(r"acts-\d{5}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_state(state: Any, where: str) -> None:
    """Refuse a ``run.json`` that is not what ``RunFolder`` writes: wrong types, counts out of range, or a name
    that is not the plain one it would have written (a path to elsewhere, say). Raises ``BesaError``."""

    def bad(what: str) -> BesaError:
        return BesaError(f"{where} is damaged ({what}); delete the run folder to start over")

    if not isinstance(state, dict):
        raise bad("not a JSON object")
    if state.get("format") != FORMAT_VERSION:
        raise BesaError(
            f"{where} has format {state.get('format')!r}, not {FORMAT_VERSION} (made by another version of besa); "
            "delete the run folder to start over"
        )
    total, done, blocks = state.get("num_blocks"), state.get("completed"), state.get("blocks")
    if not isinstance(total, int) or isinstance(total, bool) or total < 1:
        raise bad(f"num_blocks is {total!r}")
    if not isinstance(done, int) or isinstance(done, bool) or not 0 <= done <= total:
        raise bad(f"completed is {done!r}, not a count of blocks from 0 to {total}")
    if not isinstance(blocks, list) or len(blocks) != done:
        raise bad(f"it lists {len(blocks) if isinstance(blocks, list) else 'no'} blocks for {done} completed")
    for i, entry in enumerate(blocks):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("seconds"), (int, float))
            and isinstance(entry.get("record"), dict)
            and isinstance(entry.get("sha256"), str)
            and _SHA256.fullmatch(entry["sha256"])
        ):
            raise bad(f"the entry of block {i} is not a name, seconds, record and sha256")
    acts = state.get("activations")
    if acts is not None and not (isinstance(acts, str) and ACTS.fullmatch(acts)):
        raise bad(f"activations names {acts!r}, not a folder of its own")
    if acts is None and done < total or acts is not None and acts != f"acts-{done:05d}":
        raise bad(f"activations names {acts!r} after {done} of {total} blocks")
    for key in ("batches", "dense_batches"):
        value = state.get(key)
        if value is None and key == "dense_batches":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad(f"{key} is {value!r}")


def is_run_artifact(name: str) -> bool:
    """Whether a file or folder name is one ``RunFolder`` writes into a run folder."""
    return (
        name in ("blocks", "spill", RUN_MARKER)
        or bool(ACTS.fullmatch(name))
        or (name.startswith(".") and name.endswith(".tmp"))
    )


def _differences(here: dict[str, Any], there: dict[str, Any]) -> list[str]:
    keys = sorted(set(here) | set(there))
    return [
        f"{k}: {here.get(k)!r} now, {there.get(k)!r} in the run folder"
        for k in keys
        if here.get(k) != there.get(k)
    ]


def claim_folder(path: Path) -> None:
    """Take ``path`` (no ``run.json`` in it) for this run: refuse it if it holds anything besa did not write, else
    (the writer, once every process has looked) clean what a run killed before its first checkpoint left and mark
    the folder as ours."""
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    foreign = [n for n in entries if not is_run_artifact(n)]
    if foreign or entries and not (path / RUN_MARKER).is_file():
        raise BesaError(
            f"run folder {str(path)!r} holds {(foreign or entries)[0]!r} and no {RUN_FILE}: pass "
            "another --run-dir"
        )
    distributed.barrier()  # every process has looked at the folder before the first one cleans it
    if distributed.world().writer:
        for name in entries:  # left by a run killed before its first checkpoint
            remove_entry(path / name)
        path.mkdir(parents=True, exist_ok=True)
        (path / RUN_MARKER).touch()  # the folder is ours: what it holds from now on, we wrote
    distributed.barrier()


def read_state(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The checked ``run.json`` of run folder ``path``; ``BesaError`` for a folder holding a link, an unreadable or
    damaged ``run.json``, or one made with a fingerprint other than ``fingerprint``."""
    run_file = path / RUN_FILE
    links = [p.name for p in path.iterdir() if p.is_symlink()]
    if links:
        raise BesaError(
            f"run folder {str(path)!r} holds a link {links[0]!r}: besa writes only real files there; "
            "delete the run folder to start over"
        )
    try:
        state = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BesaError(f"cannot read {str(run_file)!r}: {exc}") from None
    check_state(state, repr(str(run_file)))
    found = state.get("fingerprint")
    diffs = _differences(fingerprint, found if isinstance(found, dict) else {"": found})
    if diffs:
        raise BesaError(
            f"run folder {str(path)!r} belongs to another run ({'; '.join(diffs[:3])}); "
            "pass another --run-dir or delete that folder"
        )
    return state


def check_blocks(state: dict[str, Any], path: Path, names: list[str], redo_from: int | None) -> None:
    """Refuse to resume the checked ``state`` of run folder ``path`` for a model whose blocks are ``names`` when it
    was made for another, or to redo from a block (``redo_from``) that is not done yet."""
    done = int(state["completed"])
    if state["num_blocks"] != len(names):
        raise BesaError(
            f"run folder {str(path)!r} was made for a model of {state['num_blocks']} blocks, "
            f"this one has {len(names)}"
        )
    for i, name in enumerate(names[:done]):
        if state["blocks"][i]["name"] != name:
            raise BesaError(
                f"run folder {str(path)!r}: block {i} is {state['blocks'][i]['name']!r}, not {name!r}"
            )
    if redo_from is not None and redo_from > done:
        raise BesaError(f"--redo-from {redo_from}: only blocks 0-{done - 1} of {str(path)!r} are done")


def new_state(fingerprint: dict[str, Any], num_blocks: int) -> dict[str, Any]:
    """The ``run.json`` of a run of ``num_blocks`` blocks before its first commit."""
    return {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "num_blocks": num_blocks,
        "completed": 0,
        "blocks": [],
        "activations": None,
    }


def committed_state(
    state: dict[str, Any],
    index: int,
    activations: str | None,
    inputs: Sized | None,
    dense_inputs: Sized | None,
    entry: dict[str, Any],
) -> dict[str, Any]:
    """``state`` once block ``index`` is committed: its ``entry`` (name, seconds, record, sha256) in place, the
    next block's activation folder (``None`` after the last) and how many batches of inputs it holds."""
    return {
        **state,
        "completed": index + 1,
        "activations": activations,
        "batches": len(inputs) if inputs is not None else 0,
        "dense_batches": len(dense_inputs) if dense_inputs is not None else None,
        "blocks": [
            *state["blocks"][:index],
            entry,
        ],
    }
