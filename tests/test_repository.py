"""What git tracks is the same on every machine: no path of this checkout, no local store."""

import re
import subprocess

from conftest import ROOT

LOCAL_STORE = re.compile(r"sqlite:/{4}")  # an SQLite store at an absolute path


def test_no_tracked_file_holds_a_path_of_this_checkout_or_a_local_store():
    names = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    offenders = []
    for name in names:
        path = ROOT / name
        if path.is_file() and not path.is_symlink():
            text = path.read_bytes().decode(errors="ignore")
            if str(ROOT) in text or LOCAL_STORE.search(text):
                offenders.append(name)
    assert offenders == []
