"""
Writing files so that no reader ever sees half of one: the project's one atomic writer.

An extra: every file that saves something (adapters, checkpoints, predictions, the gate page)
calls these two functions.
"""

import json
import os
import tempfile


def atomic_write(path, write):
    """Call write(tmp_path), then rename tmp_path to path: readers never see a half-written file,
    and a run killed in the middle leaves the previous version whole."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """obj as indented JSON at path, atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    atomic_write(path, write)
