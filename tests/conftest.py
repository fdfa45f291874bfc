"""Fixtures every test file uses."""
import os
import subprocess

import pytest


@pytest.fixture
def unwritable_dir(tmp_path):
    """An empty folder nothing can be written into, for this process and the scripts it starts. An ordinary user
    gets a 555 folder; root writes into those, so as root it is a read-only bind mount of itself (a read-only
    mount is what users meet), or an immutable folder where mounting is not allowed."""
    d = tmp_path / "readonly"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    for on, off in ((["mount", "--bind", "-o", "ro", str(d), str(d)], ["umount", str(d)]),
                    (["chattr", "+i", str(d)], ["chattr", "-i", str(d)])):
        if subprocess.run(on, capture_output=True).returncode == 0:
            try:
                yield d
            finally:
                subprocess.run(off, capture_output=True)
            return
    pytest.skip("cannot make a folder unwritable for root here (no bind mount, no chattr)")
